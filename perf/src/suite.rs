//! The benchmark groups. Every group runs its variants interleaved (A B C A B C …) once per
//! repetition, so slow drifts of a shared machine hit every variant alike, and checks from
//! meshlane's own counters that each meshlane variant really took the path it is named after.

mod tel;

use std::{
    cell::Cell,
    net::IpAddr,
    os::fd::OwnedFd,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use meshlane_api::types::SidecarSpec;
use meshlane_lab::{
    Lab, Pod, bin, spawn_piped,
    svc::{
        Proc, flush_iptables, haproxy_sidecar, install_istio_iptables, iptables_restore,
        kube_proxy_rules, nginx, run_in, services_summary, wait_applied, write_services,
    },
    wait_for_line,
};

use meshlane_perf::{
    halt_poll::HaltPoll,
    workloads::{
        CpuClock, Pin, cross_cpu_interrupts, iperf3, oha, sockperf_pingpong, sockperf_throughput,
        wrk,
    },
};

use crate::{
    Args, Group,
    report::{Better, Check, Meta, Op, Plot, ProgramStat, Report},
};

/// The VIP of the mesh group's Service (nginx on :80, sockperf servers on the ping-pong ports).
const MESH_VIP: &str = "10.96.0.10";
/// Ping-pong ports of the mesh group, each a port of the VIP too.
const MESH_PORTS: std::ops::Range<u16> = 12000..12064;
/// Keep-alive connections of the fixed-rate HTTP load, and of the saturating one.
const OHA_CONNS: u32 = 8;
const WRK_CONNS: u32 = 16;

/// Counters read before and after a measured run.
#[derive(Clone, Copy)]
struct Usage {
    host: CpuClock,
    pods_secs: f64,
    bpf_ns: u64,
    ipis: u64,
}

/// Where a placement's processes run, and whether idle vCPUs poll before halting.
#[derive(Clone, Copy, Debug)]
struct Placement {
    /// Suffix of the metric ids measured in this placement.
    suffix: &'static str,
    label: &'static str,
    /// Pod ↔ pod client and server.
    pin: Pin,
    /// Every process of the mesh group (None: wherever the scheduler puts them).
    mesh_cpu: Option<usize>,
    /// Whether iperf3 runs here too (it needs two CPUs).
    streams: bool,
    /// Runs with the guest's halt-polling window set to `--halt-poll-ns`.
    halt_poll: bool,
}

/// Client on CPU 0 and server on CPU 1, as pods on a node usually are; on a VM every message
/// then also pays the wake-up of an idle vCPU.
const TWO_CPUS: Placement = Placement {
    suffix: "",
    label: "two CPUs",
    pin: Pin::SPLIT,
    mesh_cpu: None,
    streams: true,
    halt_poll: false,
};
/// The same with idle vCPUs polling before they halt (the kernel's default for KVM guests):
/// a wake-up no longer waits for the hypervisor, as on bare metal.
const TWO_CPUS_POLL: Placement = Placement {
    suffix: ".poll",
    label: "two CPUs, halt-polling",
    halt_poll: true,
    ..TWO_CPUS
};
/// Client and server on CPU 1: the wake-up is a context switch, and the path itself shows.
const ONE_CPU: Placement = Placement {
    suffix: ".1cpu",
    label: "one CPU",
    pin: Pin {
        client: Some(1),
        server: Some(1),
    },
    mesh_cpu: Some(1),
    streams: false,
    halt_poll: false,
};
/// Every placement a full run can measure, in the order of the report.
const ALL_PLACEMENTS: [Placement; 3] = [TWO_CPUS, TWO_CPUS_POLL, ONE_CPU];

/// The placements this run measures: the quick run only one CPU (steadiest on a shared
/// machine); halt-polling only where the machine has a window to change and does not already
/// poll that long.
fn placements(args: &Args) -> Vec<Placement> {
    if args.quick {
        return vec![ONE_CPU];
    }
    let poll =
        args.halt_poll_ns > 0 && HaltPoll::current().is_some_and(|now| now < args.halt_poll_ns);
    ALL_PLACEMENTS
        .into_iter()
        .filter(|p| poll || !p.halt_poll)
        .collect()
}

/// Per-request figures of an HTTP run: id, title, unit.
const HTTP_METRICS: [(&str, &str, &str); 6] = [
    ("p50", "p50", "µs"),
    ("p99", "p99", "µs"),
    ("cpu", "host CPU per request (/proc/stat)", "µs"),
    (
        "cpucg",
        "CPU per request of the pods' processes (cgroup)",
        "µs",
    ),
    ("bpf", "eBPF run time per request", "ns"),
    (
        "ipi",
        "cross-CPU interrupts per request (RES + CAL)",
        "IPIs",
    ),
];

const POD: &str = "pod ↔ pod (same node)";
const MESH: &str = "mesh: client → sidecar → sidecar → nginx, and proxyless";
const DNAT: &str = "Service DNAT: new connections/s";

const LOOPBACK: &str = "loopback";
const VETH: &str = "veth";
const ACCEL: &str = "accelerated";
/// Accelerated pods enrolled with telemetry off: what flow telemetry costs is ACCEL ÷ this.
const ACCEL_NOTEL: &str = "accelerated, no telemetry";
/// Client → nginx with neither sidecars nor meshlane: what the proxies add is measured against it.
const DIRECT: &str = "direct, no proxy";
const IPT_SIDECAR: &str = "iptables sidecar";
const ML_SIDECAR: &str = "meshlane sidecar";
const PROXYLESS: &str = "proxyless VIP";
const IPT_DNAT: &str = "iptables DNAT";
const HOOK: &str = "connect hook";

struct Bench<'a> {
    args: &'a Args,
    secs: u32,
    lab: Lab,
    a: Pod,
    b: Pod,
    m: Pod,
    services: std::path::PathBuf,
    report: Report,
    port: Cell<u16>,
    mesh_port: Cell<u16>,
    placements: Vec<Placement>,
}

pub fn run(args: &Args) -> Result<Report> {
    let t0 = Instant::now();
    let started = utc_now();
    let commit = crate::commit(args.out());
    // Per-program run time and count, for as long as this fd is open (BPF_ENABLE_STATS: the
    // kernel turns it off again when the fd closes, also if this process dies).
    let _stats: OwnedFd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling eBPF run-time statistics (BPF_ENABLE_STATS)")?;
    let mut lab = Lab::new()?;
    let a = lab.add_pod("client")?;
    let b = lab.add_pod("server")?;
    let m = lab.add_pod("meshlane-client")?;
    let services = lab.dir.join("services.yaml");
    write_services(&services, mesh_services(&b))?;
    lab.start_agent(&["--services", &services.display().to_string()])?;
    println!(
        "lab {}: pods {} {} {}; agent on {}",
        lab.id,
        a.ip,
        b.ip,
        m.ip,
        lab.cgroup.display()
    );
    let mut bench = Bench {
        args,
        secs: args.secs.unwrap_or(if args.quick { 2 } else { 3 }),
        lab,
        a,
        b,
        m,
        services,
        report: Report::default(),
        port: Cell::new(20000),
        mesh_port: Cell::new(MESH_PORTS.start),
        placements: placements(args),
    };
    let machine_poll = HaltPoll::current();
    if !args.quick {
        bench.report.meta.notes.push(match machine_poll {
            Some(ns) if bench.placements.iter().any(|p| p.halt_poll) => format!(
                "halt-polling: this guest's idle vCPUs poll for {ns} ns before halting; the \
                 \"halt-polling\" placement raises that to {} ns (the kernel's default) for \
                 its runs and puts it back",
                args.halt_poll_ns
            ),
            Some(ns) => format!(
                "halt-polling: this guest's idle vCPUs poll for {ns} ns before halting; no \
                 separate halt-polling placement"
            ),
            None => "halt-polling: no cpuidle haltpoll governor (not a KVM guest, or it is \
                     not used); no separate halt-polling placement"
                .into(),
        });
    }
    if args.groups.contains(&Group::Pod) {
        bench.pod_group()?;
        if !args.quick && args.worst_rtt_round_trips > 0 {
            bench.worst_rtt()?;
        }
    }
    if args.groups.contains(&Group::Mesh) {
        bench.mesh_group()?;
    }
    if args.groups.contains(&Group::Dnat) {
        bench.dnat_group()?;
    }
    if args.groups.contains(&Group::Telemetry) {
        bench.telemetry_group()?;
    }

    let mut report = std::mem::take(&mut bench.report);
    report.programs = programs();
    report.meta = Meta {
        mode: if args.quick { "quick" } else { "full" }.into(),
        started,
        duration_secs: t0.elapsed().as_secs_f64(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpu_model: crate::cpu_model(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        commit,
        repetitions: args.reps as usize,
        seconds_per_run: bench.secs,
        pinning: "pod ↔ pod: client on CPU 0 and server on CPU 1 (two CPUs, also with \
                  halt-polling) and both on CPU 1 (one CPU); throughput runs on two CPUs; mesh \
                  group unpinned (two CPUs) and all on CPU 1 (one CPU); DNAT group unpinned"
            .into(),
        notes: [
            "host CPU per request: busy time of all CPUs during the run (wall time × CPUs − \
             idle, iowait and steal from /proc/stat; the idle column is the idle loop's own \
             clock, the user/system columns are tick samples that alias with timer-driven load) \
             ÷ requests answered — load generator, proxies, nginx and kernel together",
            "cross-CPU interrupts per request: RES + CAL from /proc/interrupts during the run ÷ \
             requests answered; each is a wake-up sent to another, idle CPU",
            "eBPF per request: run time of all meshlane programs (BPF_ENABLE_STATS) during the \
             run ÷ requests answered",
            "HTTP at fixed rates: oha --latency-correction, latency measured from the moment \
             oha's timer releases each request (waiting for a free connection counts); that \
             timer has 1 ms resolution, so at 4000/s requests leave in bursts of four",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(report.meta.notes.drain(..))
        .collect(),
    };
    report.targets = targets(&report, args);
    report.gates = gates(&report);
    report.plots = plots(args, &bench.placements);
    report.evaluate();
    report.write(args.out())?;
    println!("\n{}", report.markdown());
    bench.lab.teardown();
    Ok(report)
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn size_label(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn vip(i: usize) -> String {
    format!("10.100.{}.{}", i / 250, i % 250 + 1)
}

fn mesh_services(b: &Pod) -> String {
    let mut s = format!(
        "services:\n  - name: nginx\n    vip: {MESH_VIP}\n    port: 80\n    backends: [\"{}:80\"]\n",
        b.ip
    );
    for p in MESH_PORTS {
        s += &format!(
            "  - name: sockperf-{p}\n    vip: {MESH_VIP}\n    port: {p}\n    backends: [\"{}:{p}\"]\n",
            b.ip
        );
    }
    s
}

fn pp_sizes(quick: bool) -> &'static [usize] {
    if quick { &[64] } else { &[64, 1024, 4096] }
}

fn iperf_sizes(quick: bool) -> &'static [usize] {
    if quick {
        &[128 << 10]
    } else {
        &[64, 1 << 10, 16 << 10, 128 << 10, 1 << 20]
    }
}

/// meshlane's programs loaded in this kernel, by name: runs and run time so far.
fn programs() -> Vec<ProgramStat> {
    let mut by_name: Vec<ProgramStat> = Vec::new();
    for p in aya::programs::loaded_programs().flatten() {
        let Some(name) = p.name_as_str().filter(|n| n.starts_with("ml_")) else {
            continue;
        };
        let (runs, ns) = (p.run_count(), p.run_time().as_nanos() as u64);
        match by_name.iter_mut().find(|s| s.name == name) {
            Some(s) => {
                s.runs += runs;
                s.run_time_ns += ns;
            }
            None => by_name.push(ProgramStat {
                name: name.to_string(),
                runs,
                run_time_ns: ns,
            }),
        }
    }
    by_name.sort_by_key(|p| std::cmp::Reverse(p.run_time_ns));
    by_name
}

impl Bench<'_> {
    fn next_port(&self) -> u16 {
        let p = self.port.get();
        self.port.set(p + 1);
        p
    }

    fn next_mesh_port(&self) -> u16 {
        let p = self.mesh_port.get();
        let next = if p + 1 >= MESH_PORTS.end {
            MESH_PORTS.start
        } else {
            p + 1
        };
        self.mesh_port.set(next);
        p
    }

    fn counter(&self, name: &str) -> Result<u64> {
        self.lab.counter(name)
    }

    /// Loopback, veth and accelerated pod ↔ pod: sockperf and iperf3.
    fn pod_group(&mut self) -> Result<()> {
        let quick = self.args.quick;
        let variants: &[&str] = if quick {
            &[VETH, ACCEL, ACCEL_NOTEL]
        } else {
            &[LOOPBACK, VETH, ACCEL, ACCEL_NOTEL]
        };
        let placements = self.placements.clone();
        let r = &mut self.report;
        for p in &placements {
            for &size in pp_sizes(quick) {
                for q in ["p50", "p99"] {
                    r.metric(
                        &format!("pod.pp{size}.{q}{}", p.suffix),
                        POD,
                        &format!("sockperf ping-pong {}, {q}, {}", size_label(size), p.label),
                        "µs",
                        Better::Lower,
                        VETH,
                        variants,
                    );
                }
            }
        }
        if !quick {
            r.metric(
                "pod.tp64",
                POD,
                "sockperf throughput 64 B, two CPUs",
                "msg/s",
                Better::Higher,
                VETH,
                variants,
            );
        }
        // Streams need two CPUs: the quick run, which pings on one CPU, streams on two.
        let streams: Vec<Placement> = if quick {
            vec![TWO_CPUS]
        } else {
            placements.iter().copied().filter(|p| p.streams).collect()
        };
        for p in &streams {
            for &len in iperf_sizes(quick) {
                let id = format!("pod.iperf{len}{}", p.suffix);
                let what = format!("iperf3 {} writes, {}", size_label(len), p.label);
                r.metric(&id, POD, &what, "Gbit/s", Better::Higher, VETH, variants);
                if quick {
                    continue;
                }
                for (end, who) in [("cpus", "sender"), ("cpur", "receiver")] {
                    let id = format!("pod.iperf{len}.{end}{}", p.suffix);
                    r.metric(
                        &id,
                        POD,
                        &format!("{what}: {who} process CPU"),
                        "% of a CPU",
                        Better::Lower,
                        VETH,
                        variants,
                    );
                    r.without_ratios(&id);
                }
            }
        }
        let reps = self.args.reps;
        for rep in 1..=reps {
            for &v in variants {
                println!("[pod ↔ pod] repetition {rep}/{reps}: {v}");
                let redirected = self.counter("msg_redirected")?;
                if v == ACCEL {
                    self.lab.enroll(&self.a)?;
                    self.lab.enroll(&self.b)?;
                } else if v == ACCEL_NOTEL {
                    self.lab.enroll_unobserved(&self.a)?;
                    self.lab.enroll_unobserved(&self.b)?;
                }
                let (server, ip): (&Pod, IpAddr) = if v == LOOPBACK {
                    (&self.a, "127.0.0.1".parse()?)
                } else {
                    (&self.b, self.b.ip.into())
                };
                for p in &placements {
                    let _poll = self.halt_poll(p)?;
                    for &size in pp_sizes(quick) {
                        let port = self.next_port();
                        let l = sockperf_pingpong(
                            &self.lab, &self.a, server, ip, port, size, self.secs, p.pin,
                        )?;
                        let r = &mut self.report;
                        r.add(&format!("pod.pp{size}.p50{}", p.suffix), v, l.p50_us);
                        r.add(&format!("pod.pp{size}.p99{}", p.suffix), v, l.p99_us);
                    }
                }
                for p in &streams {
                    let _poll = self.halt_poll(p)?;
                    if !quick && !p.halt_poll {
                        let port = self.next_port();
                        let tp = sockperf_throughput(
                            &self.lab, &self.a, server, ip, port, 64, self.secs, p.pin,
                        )?;
                        self.report.add("pod.tp64", v, tp);
                    }
                    for &len in iperf_sizes(quick) {
                        let port = self.next_port();
                        let t =
                            iperf3(&self.lab, &self.a, server, ip, port, len, self.secs, p.pin)?;
                        let (r, sfx) = (&mut self.report, p.suffix);
                        r.add(&format!("pod.iperf{len}{sfx}"), v, t.bits_per_sec / 1e9);
                        if !quick {
                            r.add(&format!("pod.iperf{len}.cpus{sfx}"), v, t.sender_cpu_pct);
                            r.add(&format!("pod.iperf{len}.cpur{sfx}"), v, t.receiver_cpu_pct);
                        }
                    }
                }
                let redirected = self.counter("msg_redirected")? - redirected;
                if v == ACCEL || v == ACCEL_NOTEL {
                    self.lab.unenroll(&self.a)?;
                    self.lab.unenroll(&self.b)?;
                    if redirected == 0 {
                        bail!("the accelerated runs redirected no message: not the sk_msg path");
                    }
                } else if redirected != 0 {
                    bail!("{redirected} messages were redirected in the {v} runs");
                }
            }
        }
        Ok(())
    }

    /// The guest's halt-polling window for the runs of placement `p`, while the guard lives.
    fn halt_poll(&self, p: &Placement) -> Result<Option<HaltPoll>> {
        if !p.halt_poll {
            return Ok(None);
        }
        HaltPoll::set(&self.lab, self.args.halt_poll_ns).map(Some)
    }

    /// The worst round trip over `--worst-rtt-round-trips` ping-pongs on the accelerated path,
    /// in runs long enough to reach that count.
    fn worst_rtt(&mut self) -> Result<()> {
        let want = self.args.worst_rtt_round_trips;
        self.report.metric(
            "pod.worst",
            POD,
            "worst round trip, 64 B ping-pong, two CPUs",
            "ms",
            Better::Lower,
            ACCEL,
            &[ACCEL],
        );
        let p50_us = self
            .report
            .get("pod.pp64.p50")
            .and_then(|m| m.summary(ACCEL))
            .map_or(30.0, |s| s.median);
        self.lab.enroll(&self.a)?;
        self.lab.enroll(&self.b)?;
        let ip: IpAddr = self.b.ip.into();
        let (mut seen, mut runs, mut worst) = (0u64, 0u32, 0f64);
        while seen < want && runs < 10 {
            let secs =
                (((want - seen) as f64 * p50_us * 1.25 / 1e6).ceil() as u32 + 1).clamp(3, 300);
            println!("[pod ↔ pod] worst round trip: {secs} s of ping-pong ({seen}/{want} so far)");
            let port = self.next_port();
            let l = sockperf_pingpong(
                &self.lab,
                &self.a,
                &self.b,
                ip,
                port,
                64,
                secs,
                TWO_CPUS.pin,
            )?;
            seen += l.observations;
            worst = worst.max(l.max_us);
            runs += 1;
            self.report.add("pod.worst", ACCEL, l.max_us / 1e3);
        }
        self.lab.unenroll(&self.a)?;
        self.lab.unenroll(&self.b)?;
        if seen < want {
            bail!("only {seen} of {want} round trips in {runs} runs");
        }
        self.report.meta.notes.push(format!(
            "worst round trip: {:.3} ms over {seen} accelerated 64 B round trips ({runs} runs)",
            worst / 1e3
        ));
        Ok(())
    }

    /// Sidecar paths and the proxyless VIP path: sockperf, oha at fixed rates, wrk; with the
    /// processes left to the scheduler (two CPUs) and all on one CPU.
    fn mesh_group(&mut self) -> Result<()> {
        let quick = self.args.quick;
        let variants: &[&str] = if quick {
            &[IPT_SIDECAR, ML_SIDECAR]
        } else {
            &[DIRECT, IPT_SIDECAR, ML_SIDECAR, PROXYLESS]
        };
        let placements = self.placements.clone();
        let r = &mut self.report;
        for &Placement {
            suffix: sfx, label, ..
        } in &placements
        {
            let mut declare = |id: String, title: String, unit: &str, better: Better| {
                r.metric(
                    &format!("{id}{sfx}"),
                    MESH,
                    &format!("{title}, {label}"),
                    unit,
                    better,
                    IPT_SIDECAR,
                    variants,
                );
            };
            for q in ["p50", "p99"] {
                declare(
                    format!("mesh.pp64.{q}"),
                    format!("sockperf ping-pong 64 B, {q}"),
                    "µs",
                    Better::Lower,
                );
            }
            if quick {
                continue;
            }
            for &rate in &self.args.rates {
                for (id, title, unit) in HTTP_METRICS {
                    declare(
                        format!("mesh.http{rate}.{id}"),
                        format!("HTTP 1 KiB at {rate}/s, {title}"),
                        unit,
                        Better::Lower,
                    );
                }
            }
            declare(
                "mesh.wrk.rps".into(),
                "HTTP 1 KiB at saturation (wrk)".into(),
                "req/s",
                Better::Higher,
            );
            for (id, title, unit) in &HTTP_METRICS[..1] {
                declare(
                    format!("mesh.wrk.{id}"),
                    format!("HTTP 1 KiB at saturation (wrk), {title}"),
                    unit,
                    Better::Lower,
                );
            }
            for (id, title, unit) in &HTTP_METRICS[2..4] {
                declare(
                    format!("mesh.wrk.{id}"),
                    format!("HTTP 1 KiB at saturation (wrk), {title}"),
                    unit,
                    Better::Lower,
                );
            }
            for &rate in &self.args.rates {
                r.without_ratios(&format!("mesh.http{rate}.bpf{sfx}"));
                r.without_ratios(&format!("mesh.http{rate}.ipi{sfx}"));
            }
        }

        let www = self.lab.dir.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("1k"), vec![b'x'; 1024])?;
        let _nginx = nginx(&self.lab, &self.b, "0.0.0.0:80", &www)?;
        let _sidecars = [
            haproxy_sidecar(&self.lab, &self.a)?,
            haproxy_sidecar(&self.lab, &self.b)?,
        ];
        let reps = self.args.reps;
        for rep in 1..=reps {
            for p in &placements {
                self.place_servers(p.mesh_cpu)?;
                let _poll = self.halt_poll(p)?;
                for &v in variants {
                    println!("[mesh] repetition {rep}/{reps}, {}: {v}", p.label);
                    self.mesh_variant(v, p.suffix, p.mesh_cpu)?;
                }
            }
        }
        Ok(())
    }

    /// Moves the pods' long-running processes (sidecars, nginx) onto `cpu`, or lets them run
    /// anywhere.
    fn place_servers(&self, cpu: Option<usize>) -> Result<()> {
        let cpus = match cpu {
            Some(c) => c.to_string(),
            None => format!("0-{}", std::thread::available_parallelism()?.get() - 1),
        };
        for pod in [&self.a, &self.b] {
            for pid in std::fs::read_to_string(pod.cgroup.join("cgroup.procs"))?.lines() {
                meshlane_lab::run(
                    std::process::Command::new("taskset").args(["-a", "-p", "-c", &cpus, pid]),
                )?;
            }
        }
        Ok(())
    }

    /// One variant of the mesh group, once: configure, measure, check the path, undo.
    fn mesh_variant(&mut self, v: &str, sfx: &str, cpu: Option<usize>) -> Result<()> {
        let before = self.path_counters()?;
        match v {
            IPT_SIDECAR => {
                install_istio_iptables(&self.lab, &self.a)?;
                install_istio_iptables(&self.lab, &self.b)?;
            }
            ML_SIDECAR => {
                self.lab
                    .enroll_with(&self.a, Some(SidecarSpec::default()))?;
                self.lab
                    .enroll_with(&self.b, Some(SidecarSpec::default()))?;
            }
            DIRECT => {}
            _ => {
                self.lab.enroll(&self.a)?;
                self.lab.enroll(&self.b)?;
            }
        }
        let host = if v == PROXYLESS {
            MESH_VIP.to_string()
        } else {
            self.b.ip.to_string()
        };
        let port = self.next_mesh_port();
        let pin = Pin {
            client: cpu,
            server: cpu,
        };
        let l = sockperf_pingpong(
            &self.lab,
            &self.a,
            &self.b,
            host.parse()?,
            port,
            64,
            self.secs,
            pin,
        )?;
        self.report.add(&format!("mesh.pp64.p50{sfx}"), v, l.p50_us);
        self.report.add(&format!("mesh.pp64.p99{sfx}"), v, l.p99_us);
        let url = format!("http://{host}/1k");
        if !self.args.quick {
            for &rate in &self.args.rates {
                let u0 = self.usage()?;
                let h = oha(&self.lab, &self.a, &url, rate, OHA_CONNS, self.secs, cpu)?;
                let u1 = self.usage()?;
                if h.errors > 0 || h.ok == 0 {
                    bail!("oha at {rate}/s over {v}: {} ok, {} failed", h.ok, h.errors);
                }
                let n = h.ok as f64;
                let id = format!("mesh.http{rate}");
                self.report.add(&format!("{id}.p50{sfx}"), v, h.p50_us);
                self.report.add(&format!("{id}.p99{sfx}"), v, h.p99_us);
                self.add_usage(&id, sfx, v, u0, u1, n);
            }
            let u0 = self.usage()?;
            let h = wrk(&self.lab, &self.a, &url, WRK_CONNS, self.secs, cpu)?;
            let u1 = self.usage()?;
            if h.errors > 0 || h.ok == 0 {
                bail!("wrk over {v}: {} ok, {} failed", h.ok, h.errors);
            }
            self.report.add(&format!("mesh.wrk.rps{sfx}"), v, h.per_sec);
            self.report.add(&format!("mesh.wrk.p50{sfx}"), v, h.p50_us);
            self.add_usage("mesh.wrk", sfx, v, u0, u1, h.ok as f64);
        }
        let after = self.path_counters()?;
        if v == IPT_SIDECAR || v == DIRECT {
            if v == IPT_SIDECAR {
                flush_iptables(&self.lab, &self.a)?;
                flush_iptables(&self.lab, &self.b)?;
            }
            if after != before {
                bail!("meshlane touched the {v} runs: {before:?} → {after:?}");
            }
            return Ok(());
        }
        self.lab.unenroll(&self.a)?;
        self.lab.unenroll(&self.b)?;
        let took = if v == ML_SIDECAR {
            after.0 > before.0 && after.2 > before.2
        } else {
            after.1 > before.1 && after.2 > before.2
        };
        if !took {
            bail!(
                "the {v} runs did not take meshlane's path: (capture_outbound, \
                 svc_connect_translated, msg_redirected) {before:?} → {after:?}"
            );
        }
        Ok(())
    }

    /// (capture_outbound, svc_connect_translated, msg_redirected).
    fn path_counters(&self) -> Result<(u64, u64, u64)> {
        Ok((
            self.counter("capture_outbound")?,
            self.counter("svc_connect_translated")?,
            self.counter("msg_redirected")?,
        ))
    }

    /// Host CPU by /proc/stat, CPU seconds of the two pods' processes (cgroup cpu.stat),
    /// meshlane eBPF nanoseconds and cross-CPU interrupts so far.
    fn usage(&self) -> Result<Usage> {
        let mut pods = 0.0;
        for pod in [&self.a, &self.b] {
            let stat = std::fs::read_to_string(pod.cgroup.join("cpu.stat"))?;
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .context("cpu.stat has no usage_usec")?;
            pods += usec as f64 / 1e6;
        }
        Ok(Usage {
            host: CpuClock::read()?,
            pods_secs: pods,
            bpf_ns: programs().iter().map(|p| p.run_time_ns).sum(),
            ipis: cross_cpu_interrupts()?,
        })
    }

    fn add_usage(&mut self, id: &str, sfx: &str, v: &str, u0: Usage, u1: Usage, requests: f64) {
        let per_request = |x: f64| x / requests;
        self.report.add(
            &format!("{id}.cpu{sfx}"),
            v,
            per_request(u1.host.busy_since(&u0.host) * 1e6),
        );
        self.report.add(
            &format!("{id}.cpucg{sfx}"),
            v,
            per_request((u1.pods_secs - u0.pods_secs) * 1e6),
        );
        if id != "mesh.wrk" {
            self.report.add(
                &format!("{id}.bpf{sfx}"),
                v,
                per_request(u1.bpf_ns.saturating_sub(u0.bpf_ns) as f64),
            );
            self.report.add(
                &format!("{id}.ipi{sfx}"),
                v,
                per_request(u1.ipis.saturating_sub(u0.ipis) as f64),
            );
        }
    }

    /// New connections/s to one VIP among 1, 1,000 and 5,000 services.
    fn dnat_group(&mut self) -> Result<()> {
        let counts: &[usize] = if self.args.quick {
            &[5000]
        } else {
            &[1, 1000, 5000]
        };
        run_in(
            &self.lab,
            &self.m,
            "ip",
            &["route", "add", "default", "dev", "eth0"],
        )?;
        self.lab.enroll(&self.m)?;
        let mut sink = self.lab.cmd(&self.b, bin("ml-svc")?)?;
        sink.args(["sink", "--listen", "0.0.0.0:8080"]);
        let mut sink = spawn_piped(&mut sink)?;
        wait_for_line(&mut sink, std::time::Duration::from_secs(10), |l| {
            l.starts_with("listening")
        })?;
        let _sink = Proc(sink);
        let backend = format!("{}:8080", self.b.ip);
        for &n in counts {
            let measured = n / 2;
            let id = format!("dnat.{n}");
            self.report.metric(
                &id,
                DNAT,
                &format!("to service {} of {n}", measured + 1),
                "conn/s",
                Better::Higher,
                IPT_DNAT,
                &[IPT_DNAT, HOOK],
            );
            println!("[DNAT] loading {n} services into iptables and into meshlane");
            let mut text = String::from("services:\n");
            for i in 0..n {
                text += &format!(
                    "  - name: svc-{i}\n    vip: {}\n    port: 80\n    backends: [\"{backend}\"]\n",
                    vip(i)
                );
            }
            let loads = services_summary(&self.lab)?["loads"].as_u64().unwrap_or(0);
            write_services(&self.services, text)?;
            let s = wait_applied(&self.lab, loads)?;
            if s["services"].as_u64() != Some(n as u64) {
                bail!("the agent holds {} services, not {n}", s["services"]);
            }
            // A fresh kube-proxy pod for every table size: conntrack entries of the previous
            // size's connections (same backend, another VIP) would otherwise clash with new
            // ones and turn this into a measurement of NAT clash resolution.
            let k = self.lab.add_pod(&format!("kube-proxy-{n}"))?;
            run_in(
                &self.lab,
                &k,
                "ip",
                &["route", "add", "default", "dev", "eth0"],
            )?;
            iptables_restore(&self.lab, &k, &kube_proxy_rules(n, vip, &backend))?;
            let to = format!("{}:80", vip(measured));
            let reps = self.args.reps;
            for rep in 1..=reps {
                println!("[DNAT] {n} services, repetition {rep}/{reps}");
                for (v, pod) in [(IPT_DNAT, &k), (HOOK, &self.m)] {
                    let translated = self.counter("svc_connect_translated")?;
                    let rate = connrate(&self.lab, pod, &to, self.secs)?;
                    let translated = self.counter("svc_connect_translated")? - translated;
                    if (v == HOOK) != (translated > 0) {
                        bail!("{v}: the connect hook translated {translated} connects");
                    }
                    self.report.add(&id, v, rate);
                }
            }
        }
        self.lab.unenroll(&self.m)?;
        Ok(())
    }
}

/// `ml-svc connrate` from `pod` to `to` for `secs`: connections/s, failing on any error.
fn connrate(lab: &Lab, pod: &Pod, to: &str, secs: u32) -> Result<f64> {
    let out = lab
        .cmd(pod, bin("ml-svc")?)?
        .args(["connrate", "--to", to, "--secs", &secs.to_string()])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("connrate: {}", String::from_utf8_lossy(&out.stderr)))?;
    if v["errors"].as_u64() != Some(0) {
        bail!("connrate from {} to {to} saw errors: {v}", pod.name);
    }
    v["per_sec"].as_f64().context("connrate printed no per_sec")
}

/// The targets, for the metrics this run measured.
fn targets(r: &Report, args: &Args) -> Vec<Check> {
    let mut t = Vec::new();
    for Placement { suffix, label, .. } in ALL_PLACEMENTS {
        t.push(Check::new(
            &format!("p50 latency, sk_msg pod↔pod ÷ veth pod↔pod (64 B ping-pong, {label})"),
            &format!("pod.pp64.p50{suffix}"),
            ACCEL,
            VETH,
            Op::AtMost,
            0.75,
        ));
        for size in pp_sizes(false) {
            t.push(Check::new(
                &format!(
                    "p50 latency, sk_msg ÷ loopback ({} ping-pong, {label})",
                    size_label(*size)
                ),
                &format!("pod.pp{size}.p50{suffix}"),
                ACCEL,
                LOOPBACK,
                Op::AtMost,
                0.90,
            ));
        }
    }
    for Placement {
        suffix: sfx, label, ..
    } in ALL_PLACEMENTS
    {
        for &rate in &args.rates {
            let id = format!("mesh.http{rate}");
            let http = format!("1 KiB HTTP at {rate}/s, {label}");
            for (what, q, variant, threshold) in [
                ("p50 latency, meshlane sidecar", "p50", ML_SIDECAR, 0.80),
                ("p99 latency, meshlane sidecar", "p99", ML_SIDECAR, 0.85),
                ("p50 latency, proxyless VIP", "p50", PROXYLESS, 0.40),
                (
                    "host CPU per request (/proc/stat), meshlane sidecar",
                    "cpu",
                    ML_SIDECAR,
                    0.85,
                ),
                (
                    "CPU per request (pods' cgroups), meshlane sidecar",
                    "cpucg",
                    ML_SIDECAR,
                    0.85,
                ),
            ] {
                t.push(Check::new(
                    &format!("{what} ÷ iptables sidecar ({http})"),
                    &format!("{id}.{q}{sfx}"),
                    variant,
                    IPT_SIDECAR,
                    Op::AtMost,
                    threshold,
                ));
            }
        }
    }
    // What flow telemetry costs the fast path (issue 15's budget), same run.
    for Placement { suffix, label, .. } in ALL_PLACEMENTS {
        t.push(Check::new(
            &format!("p50 latency, telemetry on ÷ off (64 B ping-pong accelerated, {label})"),
            &format!("pod.pp64.p50{suffix}"),
            ACCEL,
            ACCEL_NOTEL,
            Op::AtMost,
            1.03,
        ));
    }
    t.push(Check::new(
        "iperf3 throughput, telemetry on ÷ off (128 KiB writes accelerated, two CPUs)",
        &format!("pod.iperf{}", 128 << 10),
        ACCEL,
        ACCEL_NOTEL,
        Op::AtLeast,
        0.97,
    ));
    for p in ALL_PLACEMENTS.iter().filter(|p| p.streams) {
        for (len, threshold) in [(128 << 10, 0.95), (1 << 20, 0.90)] {
            t.push(Check::new(
                &format!(
                    "iperf3 throughput, accelerated ÷ loopback, {} writes ({})",
                    size_label(len),
                    p.label
                ),
                &format!("pod.iperf{len}{}", p.suffix),
                ACCEL,
                LOOPBACK,
                Op::AtLeast,
                threshold,
            ));
        }
    }
    t.push(Check::new(
        "new connections/s, connect hook ÷ iptables DNAT, 1 service",
        "dnat.1",
        HOOK,
        IPT_DNAT,
        Op::AtLeast,
        1.0,
    ));
    t.push(Check::new(
        "new connections/s, connect hook ÷ iptables DNAT, 5,000 services",
        "dnat.5000",
        HOOK,
        IPT_DNAT,
        Op::AtLeast,
        1.3,
    ));
    t.push(Check::new(
        "worst round trip over 10⁶ ping-pongs, accelerated path",
        "pod.worst",
        ACCEL,
        "",
        Op::ValueBelow,
        50.0,
    ));
    t.push(Check::new(
        "agent CPU + telemetry eBPF per request at 10,000 HTTP requests/s, accelerated (µs)",
        "tel.http.cost",
        ACCEL,
        "",
        Op::ValueBelow,
        2.0,
    ));
    t.push(Check::new(
        "HTTP requests/s at saturation, telemetry on ÷ off (accelerated)",
        "tel.wrk.rps",
        ACCEL,
        ACCEL_NOTEL,
        Op::AtLeast,
        0.97,
    ));
    measured_only(r, t)
}

/// The checks whose metric and variants this run measured (`--groups` may leave some out).
fn measured_only(r: &Report, mut checks: Vec<Check>) -> Vec<Check> {
    checks.retain(|c| {
        r.get(&c.metric).is_some_and(|m| {
            let has = |v: &str| m.variant(v).is_some_and(|v| !v.samples.is_empty());
            has(&c.variant) && (c.op == Op::ValueBelow || has(&c.base))
        })
    });
    checks
}

/// Regression gates: acceleration and capture must keep helping. Ratios only, with margins
/// wide enough for a noisy shared 2-CPU machine.
fn gates(r: &Report) -> Vec<Check> {
    let gates = vec![
        Check::new(
            "p50 latency, accelerated ÷ veth (64 B ping-pong, one CPU)",
            "pod.pp64.p50.1cpu",
            ACCEL,
            VETH,
            Op::AtMost,
            0.95,
        ),
        Check::new(
            "iperf3 throughput, accelerated ÷ veth (128 KiB writes)",
            &format!("pod.iperf{}", 128 << 10),
            ACCEL,
            VETH,
            Op::AtLeast,
            1.0,
        ),
        Check::new(
            "p50 latency, meshlane sidecar ÷ iptables sidecar (64 B ping-pong, one CPU)",
            "mesh.pp64.p50.1cpu",
            ML_SIDECAR,
            IPT_SIDECAR,
            Op::AtMost,
            1.0,
        ),
        Check::new(
            "new connections/s, connect hook ÷ iptables DNAT (5,000 services)",
            "dnat.5000",
            HOOK,
            IPT_DNAT,
            Op::AtLeast,
            1.0,
        ),
    ];
    measured_only(r, gates)
}

fn plots(args: &Args, placements: &[Placement]) -> Vec<Plot> {
    let cat = |label: String, id: String| (label, id);
    let mut out = Vec::new();
    for p in placements {
        let (sfx, label) = (p.suffix, p.label);
        let file = sfx.replace('.', "-");
        out.push(Plot {
            file: format!("pod-latency{file}.svg"),
            title: format!("pod ↔ pod round trip, sockperf ping-pong ({label})"),
            unit: "µs, lower is better".into(),
            categories: pp_sizes(false)
                .iter()
                .map(|s| {
                    cat(
                        format!("{} p50", size_label(*s)),
                        format!("pod.pp{s}.p50{sfx}"),
                    )
                })
                .chain([cat("64 B p99".into(), format!("pod.pp64.p99{sfx}"))])
                .collect(),
        });
        if p.streams {
            out.push(Plot {
                file: format!("pod-iperf3{file}.svg"),
                title: format!("pod ↔ pod iperf3 single stream, by write size ({label})"),
                unit: "Gbit/s, higher is better".into(),
                categories: iperf_sizes(false)
                    .iter()
                    .map(|s| cat(size_label(*s), format!("pod.iperf{s}{sfx}")))
                    .collect(),
            });
        }
    }
    out.push(Plot {
        file: "dnat-connrate.svg".into(),
        title: "new connections/s to one VIP among N services".into(),
        unit: "connections/s, higher is better".into(),
        categories: [1, 1000, 5000]
            .iter()
            .map(|n| cat(format!("{n} services"), format!("dnat.{n}")))
            .collect(),
    });
    for p in placements {
        let (sfx, label) = (p.suffix, p.label);
        let file = sfx.replace('.', "-");
        let mut latency = vec![cat(
            "sockperf 64 B p50".into(),
            format!("mesh.pp64.p50{sfx}"),
        )];
        let mut cpu = Vec::new();
        for &rate in &args.rates {
            for q in ["p50", "p99"] {
                latency.push(cat(
                    format!("HTTP {rate}/s {q}"),
                    format!("mesh.http{rate}.{q}{sfx}"),
                ));
            }
            cpu.push(cat(
                format!("HTTP {rate}/s"),
                format!("mesh.http{rate}.cpucg{sfx}"),
            ));
        }
        cpu.push(cat(
            "HTTP saturation".into(),
            format!("mesh.wrk.cpucg{sfx}"),
        ));
        out.push(Plot {
            file: format!("mesh-latency{file}.svg"),
            title: format!("client → sidecars → nginx, and proxyless via a VIP ({label})"),
            unit: "µs, lower is better".into(),
            categories: latency,
        });
        out.push(Plot {
            file: format!("mesh-cpu{file}.svg"),
            title: format!("CPU per HTTP request, pods' cgroups ({label})"),
            unit: "µs of CPU, lower is better".into(),
            categories: cpu,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_dates() {
        assert_eq!(size_label(64), "64 B");
        assert_eq!(size_label(16 << 10), "16 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
        let d = utc_now();
        assert!(
            d.len() == 20 && d.ends_with('Z') && d.starts_with("20"),
            "{d}"
        );
    }
}
