//! `meshlane-cni-latency`: what meshlane-cni adds to a pod's CNI ADD and DEL, measured side by
//! side in one run — the lab's chain (bridge + host-local + portmap, Debian's plugins, spec
//! 1.0.0, run by cnitool) with and without `meshlane` last, interleaved pod by pod — and how long
//! a pod queued while the agent was away takes to be enrolled once the agent starts.
//!
//! Root; builds its own lab and removes it. `--pods N` (default 200).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use meshlane_api::Request;
use meshlane_lab::{
    Lab,
    cni::{self, Network},
    run,
};
use meshlane_perf::workloads::median;

#[derive(Debug, Parser)]
#[command(about = "CNI ADD/DEL latency added by meshlane-cni, and queued-pod enrollment time")]
struct Args {
    /// Pods per chain.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pods: u32,
}

fn p99(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
}

fn timed(lab: &Lab, net: &Network, cmd: &str, ns: &std::path::Path, args: &str) -> Result<f64> {
    let t = Instant::now();
    let out = cni::cnitool_run(lab, net, cmd, Some(ns), args)?;
    let took = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "cnitool {cmd} {}: {}{}",
            ns.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut lab = Lab::with_agent(&[], false, &[])?;
    let with = cni::conflist(&lab, "1.0.0");
    let mut without = with.clone();
    without["plugins"]
        .as_array_mut()
        .context("plugins")?
        .retain(|p| p["type"] != "meshlane");
    let plugins = std::path::Path::new(cni::DEBIAN_PLUGINS);
    let net_with = cni::write(&lab, "with", &with, plugins)?;
    let net_without = cni::write(&lab, "without", &without, plugins)?;
    let ns: PathBuf = {
        let name = format!("{}-bench", lab.id);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        PathBuf::from("/run/netns").join(name)
    };
    let cni_args = cni::k8s_args("bench", &[]);
    let (mut add_a, mut del_a, mut add_b, mut del_b) = (vec![], vec![], vec![], vec![]);
    let result = (|| -> Result<()> {
        for i in 0..args.pods {
            // Alternate which chain goes first, so slow drifts hit both alike.
            let order: [(&Network, bool); 2] = if i % 2 == 0 {
                [(&net_without, false), (&net_with, true)]
            } else {
                [(&net_with, true), (&net_without, false)]
            };
            for (net, is_with) in order {
                let a = timed(&lab, net, "add", &ns, &cni_args)?;
                let d = timed(&lab, net, "del", &ns, &cni_args)?;
                if is_with {
                    add_b.push(a);
                    del_b.push(d);
                } else {
                    add_a.push(a);
                    del_a.push(d);
                }
            }
        }
        println!(
            "CNI latency over {} pods each (ms; median / p99), same run, interleaved:",
            args.pods
        );
        println!(
            "| op  | chain without meshlane | with meshlane | ratio (median) | added (median) |"
        );
        println!(
            "|-----|------------------------|---------------|----------------|----------------|"
        );
        for (op, a, b) in [("ADD", &add_a, &add_b), ("DEL", &del_a, &del_b)] {
            println!(
                "| {op} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | {:.1} ms |",
                median(a),
                p99(a),
                median(b),
                p99(b),
                median(b) / median(a),
                median(b) - median(a)
            );
        }

        // A pod added while the agent is away: how long after the agent starts is it enrolled?
        let mut took = Vec::new();
        for _ in 0..5 {
            lab.stop_agent()?;
            timed(&lab, &net_with, "add", &ns, &cni_args)?;
            let start = Instant::now();
            lab.restart_agent(&[])?;
            loop {
                let pods = lab.call(&Request::PodList)?;
                if pods.as_array().is_some_and(|p| !p.is_empty()) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("the queued pod was not enrolled within 10 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            took.push(start.elapsed().as_secs_f64() * 1e3);
            timed(&lab, &net_with, "del", &ns, &cni_args)?;
        }
        println!(
            "agent start → queued pod enrolled (self-test included): median {:.0} ms, max {:.0} ms over {} starts",
            median(&took),
            took.iter().copied().fold(0.0, f64::max),
            took.len()
        );
        Ok(())
    })();
    let _ = Command::new("ip")
        .arg("netns")
        .arg("del")
        .arg(ns.file_name().unwrap_or_default())
        .output();
    lab.teardown();
    result
}
