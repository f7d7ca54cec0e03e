//! `meshlane-bench`: meshlane against the paths it replaces, measured side by side in one run.
//!
//! Builds a lab (pods as network namespaces + cgroups below the lab's own cgroup, the agent
//! attached there only), then runs four groups, each with its variants interleaved
//! (A B C A B C …) for every repetition:
//!
//! - **pod ↔ pod**: loopback inside one pod, veth + bridge (not enrolled), accelerated (sk_msg):
//!   sockperf ping-pong latency with client and server on two CPUs and on one, sockperf
//!   throughput, iperf3 single stream at five write sizes (with each end's CPU), and the worst
//!   round trip over 10⁶ ping-pongs on the accelerated path;
//! - **mesh**: app → sidecar → sidecar → app with HAProxy captured by Istio's iptables REDIRECT
//!   rules, the same captured by meshlane with acceleration, proxyless pod → Service VIP → pod,
//!   and app → app directly (no proxy: the floor): sockperf, nginx 1 KiB over HTTP at fixed
//!   rates (oha) and at saturation (wrk), host CPU per request (`/proc/stat`), eBPF run time per
//!   request (BPF_ENABLE_STATS) and cross-CPU interrupts per request (`/proc/interrupts`);
//! - **Service DNAT**: new connections/s to a VIP among 1, 1,000 and 5,000 services, kube-proxy
//!   style iptables rules vs the connect hook.
//! - **telemetry**: client → nginx, accelerated, telemetry on and off: the agent's CPU and the
//!   telemetry programs' eBPF time per request at 10,000 requests/s and at saturation (wrk).
//!
//! On a KVM guest whose idle vCPUs halt without polling first, the pod and mesh groups also run
//! a "halt-polling" placement: two CPUs with the guest's halt-polling window at the kernel's
//! default (`--halt-poll-ns`), set for those runs only and put back (also by the next lab run,
//! should this one die). It separates what the hypervisor's wake-up costs from what the paths
//! cost.
//!
//! Writes `results.json`, `results.md` and SVG plots into `--out`, and exits 3 when a regression
//! gate (a ratio, never an absolute time) is missed. `--quick` runs the gates' workloads only.

mod report;
mod suite;

use std::{path::PathBuf, time::Instant};

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Group {
    Pod,
    Mesh,
    Dnat,
    Telemetry,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "meshlane's benchmark suite (needs root; builds and removes its own lab)"
)]
pub struct Args {
    /// The gates' workloads only, at most 3 minutes: what CI runs.
    #[arg(long)]
    pub quick: bool,
    /// Where results.json, results.md and the SVG plots go [default: perf/results, or
    /// target/perf-quick with --quick].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Repetitions of every variant (interleaved).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,
    /// Seconds per sockperf / iperf3 / HTTP run (default 3, quick 2).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub secs: Option<u32>,
    /// Fixed request rates (requests/s) for the HTTP runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,4000",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rates: Vec<u32>,
    /// Which groups to run: pod (pod ↔ pod), mesh (sidecars and proxyless), dnat (Service
    /// DNAT), telemetry (HTTP with telemetry on and off: the agent's CPU per request).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pod,mesh,dnat,telemetry"
    )]
    pub groups: Vec<Group>,
    /// Halt-polling window (ns) of the "halt-polling" placement: on a KVM guest whose idle
    /// vCPUs poll for less (some hosts boot guests with 0), the pod and mesh groups also run
    /// with this window, set for those runs only and put back. 0: no such placement.
    #[arg(long, default_value_t = 200_000,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub halt_poll_ns: u64,
    /// Round trips for the worst-case latency run on the accelerated path (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    pub worst_rtt_round_trips: u64,
}

impl Args {
    pub fn out(&self) -> &std::path::Path {
        self.out
            .as_deref()
            .unwrap_or(std::path::Path::new(if self.quick {
                "target/perf-quick"
            } else {
                "perf/results"
            }))
    }
}

fn main() {
    let args = Args::parse();
    let started = Instant::now();
    match suite::run(&args) {
        Ok(report) => {
            let failed = report.failed_gates();
            println!(
                "results in {} ({:.0} s)",
                args.out().display(),
                started.elapsed().as_secs_f64()
            );
            if !failed.is_empty() {
                for g in failed {
                    eprintln!(
                        "meshlane-bench: gate missed: {} = {} (must be {} {})",
                        g.name,
                        g.measured.map_or("n/a".into(), report::fmt),
                        match g.op {
                            report::Op::AtMost => "≤",
                            report::Op::AtLeast => "≥",
                            report::Op::ValueBelow => "<",
                        },
                        report::fmt(g.threshold)
                    );
                }
                std::process::exit(3);
            }
        }
        Err(e) => {
            eprintln!("meshlane-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Reads `/proc/cpuinfo`'s first model name.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The commit being measured, with `-dirty` when the work tree has changes outside `out` (the
/// results directory, which a run rewrites).
pub fn commit(out: &std::path::Path) -> String {
    let git = |args: &[&str]| -> Option<String> {
        let o = std::process::Command::new("git").args(args).output().ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => {
            let exclude = format!(":(exclude){}", out.display());
            let dirty = git(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                &exclude,
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty { format!("{c}-dirty") } else { c }
        }
        None => "unknown (not a git work tree)".into(),
    }
}
