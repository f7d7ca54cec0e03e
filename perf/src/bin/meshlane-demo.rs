//! `meshlane-demo`: pods on one node, the agent on the lab's cgroup, and three side-by-side
//! comparisons, each interleaved (A B A B …) in one run:
//! 1. pod ↔ pod: sockperf ping-pong and iperf3, not enrolled (veth) vs accelerated;
//! 2. app → HAProxy sidecar → HAProxy sidecar → app: Istio's iptables REDIRECT vs meshlane
//!    capture (no iptables) with acceleration;
//! 3. new connections per second to a Service VIP among 5,000: kube-proxy-style iptables DNAT vs
//!    the connect hook.
//!
//! Everything it creates is removed at the end, also when it fails.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use meshlane_api::types::SidecarSpec;
use meshlane_lab::{
    Lab, Pod, bin,
    svc::{
        Proc, flush_iptables, haproxy_sidecar, install_istio_iptables, iptables_restore,
        kube_proxy_rules,
    },
};
use meshlane_perf::workloads::{Latency, Pin, iperf3, median, sockperf_pingpong};

/// Services in the connection-rate comparison, and the one measured (kube-proxy's chain is
/// walked in order, so the middle one is the typical case).
const SERVICES: usize = 5_000;
const MEASURED: usize = SERVICES / 2;
const CONNRATE_SECS: &str = "3";

const ROUNDS: usize = 3;
const SECS: u32 = 4;

fn main() {
    if let Err(e) = run() {
        eprintln!("meshlane-demo: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut lab = Lab::new()?;
    let a = lab.add_pod("client")?;
    let b = lab.add_pod("server")?;
    let k = lab.add_pod("kube-proxy-client")?;
    let m = lab.add_pod("meshlane-client")?;
    println!(
        "lab {}: pods client {} and server {} on a bridge",
        lab.id, a.ip, b.ip
    );
    let services = lab.dir.join("services.yaml");
    let mut text = String::from("services:\n");
    for i in 0..SERVICES {
        text += &format!(
            "  - name: svc-{i}\n    vip: {}\n    port: 80\n    backends: [\"{}:8080\"]\n",
            vip(i),
            b.ip
        );
    }
    std::fs::write(&services, text)?;
    lab.start_agent(&["--services", &services.display().to_string()])?;
    let st = lab.call(&meshlane_api::Request::Status)?;
    println!(
        "agent attached to {} (self-test: {})",
        lab.cgroup.display(),
        st["selftest"]["detail"].as_str().unwrap_or("?")
    );

    let bip: IpAddr = b.ip.into();
    let mut veth: Vec<(Latency, f64)> = Vec::new();
    let mut accel: Vec<(Latency, f64)> = Vec::new();
    let mut lo: Vec<f64> = Vec::new();
    for round in 1..=ROUNDS {
        // Baselines: not enrolled — the veth + bridge path, and loopback inside one pod.
        println!("round {round}/{ROUNDS}: veth path (not enrolled)");
        let l = sockperf_pingpong(&lab, &a, &b, bip, 11111, 64, SECS, Pin::NONE)?;
        let t = iperf3(&lab, &a, &b, bip, 5201, 128 << 10, SECS, Pin::NONE)?.bits_per_sec;
        veth.push((l, t));
        lo.push(
            iperf3(
                &lab,
                &a,
                &a,
                "127.0.0.1".parse()?,
                5202,
                128 << 10,
                SECS,
                Pin::NONE,
            )?
            .bits_per_sec,
        );

        println!("round {round}/{ROUNDS}: accelerated (both pods enrolled)");
        lab.enroll(&a)?;
        lab.enroll(&b)?;
        let l = sockperf_pingpong(&lab, &a, &b, bip, 11112, 64, SECS, Pin::NONE)?;
        let t = iperf3(&lab, &a, &b, bip, 5203, 128 << 10, SECS, Pin::NONE)?.bits_per_sec;
        accel.push((l, t));
        lab.unenroll(&a)?;
        lab.unenroll(&b)?;
    }

    let med = |v: &[(Latency, f64)], f: fn(&(Latency, f64)) -> f64| {
        median(&v.iter().map(f).collect::<Vec<_>>())
    };
    let rows = [
        (
            "sockperf p50 (µs, 64 B)",
            med(&veth, |x| x.0.p50_us),
            med(&accel, |x| x.0.p50_us),
        ),
        (
            "sockperf p99 (µs, 64 B)",
            med(&veth, |x| x.0.p99_us),
            med(&accel, |x| x.0.p99_us),
        ),
        (
            "iperf3 (Gbit/s, 128 KiB)",
            med(&veth, |x| x.1) / 1e9,
            med(&accel, |x| x.1) / 1e9,
        ),
    ];
    let lo_gbps = median(&lo) / 1e9;
    println!();
    println!("medians of {ROUNDS} interleaved rounds, {SECS} s each, pod ↔ pod on one node");
    table_header("veth", "accelerated");
    for (name, v, a) in rows {
        println!("| {name:<26} | {v:>10.2} | {a:>11.2} | {:>6.2} |", a / v);
    }
    println!(
        "| {:<26} | {:>10} | {:>11.2} | {:>6.2} |",
        "iperf3 vs same-pod lo",
        format!("{lo_gbps:.2} lo"),
        rows[2].2,
        rows[2].2 / lo_gbps
    );
    println!();
    println!(
        "ratio = accelerated ÷ baseline (latency: lower is better; throughput: higher is better)"
    );
    let counters = lab.counters()?;
    println!(
        "fast path: {} messages / {} bytes redirected, {} sockets enrolled",
        counters["msg_redirected"], counters["bytes_redirected"], counters["sock_inserted"]
    );

    sidecar_paths(&lab, &a, &b)?;
    connection_rates(&lab, &k, &m, &b)?;
    lab.teardown();
    println!("lab removed");
    Ok(())
}

fn vip(i: usize) -> String {
    format!("10.100.{}.{}", i / 250, i % 250 + 1)
}

/// sockperf through two HAProxy sidecars (uid 1337, forwarding to SO_ORIGINAL_DST): Istio's
/// iptables REDIRECT rules vs meshlane capture with acceleration, interleaved.
fn sidecar_paths(lab: &Lab, a: &Pod, b: &Pod) -> Result<()> {
    println!();
    let _sidecars = [haproxy_sidecar(lab, a)?, haproxy_sidecar(lab, b)?];
    let bip: IpAddr = b.ip.into();
    let (mut ipt, mut ml) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        println!("round {round}/{ROUNDS}: sidecars captured by iptables REDIRECT");
        install_istio_iptables(lab, a)?;
        install_istio_iptables(lab, b)?;
        ipt.push(sockperf_pingpong(
            lab,
            a,
            b,
            bip,
            12000 + round as u16,
            64,
            SECS,
            Pin::NONE,
        )?);
        flush_iptables(lab, a)?;
        flush_iptables(lab, b)?;

        println!("round {round}/{ROUNDS}: sidecars captured by meshlane (no iptables)");
        lab.enroll_with(a, Some(SidecarSpec::default()))?;
        lab.enroll_with(b, Some(SidecarSpec::default()))?;
        ml.push(sockperf_pingpong(
            lab,
            a,
            b,
            bip,
            12100 + round as u16,
            64,
            SECS,
            Pin::NONE,
        )?);
        lab.unenroll(a)?;
        lab.unenroll(b)?;
    }
    let med = |v: &[Latency], f: fn(&Latency) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!();
    println!("app → sidecar → sidecar → app, sockperf 64 B ping-pong, medians of {ROUNDS} rounds");
    table_header("iptables", "meshlane");
    for (name, f) in [
        ("p50 (µs)", (|l: &Latency| l.p50_us) as fn(&Latency) -> f64),
        ("p99 (µs)", |l: &Latency| l.p99_us),
    ] {
        let (i, m) = (med(&ipt, f), med(&ml, f));
        println!("| {name:<26} | {i:>10.2} | {m:>11.2} | {:>6.2} |", m / i);
    }
    Ok(())
}

/// New connections per second to one VIP among 5,000: a pod using kube-proxy-style iptables
/// DNAT rules (not enrolled) vs a pod enrolled with meshlane (connect hook), interleaved.
fn connection_rates(lab: &Lab, k: &Pod, m: &Pod, b: &Pod) -> Result<()> {
    println!();
    println!(
        "loading {SERVICES} kube-proxy-style services into {}'s iptables",
        k.name
    );
    iptables_restore(
        lab,
        k,
        &kube_proxy_rules(SERVICES, vip, &format!("{}:8080", b.ip)),
    )?;
    // Nodes have a default route; without one the kernel refuses a connect to a VIP before the
    // nat table is consulted (the connect hook translates before routing and needs none).
    for p in [k, m] {
        meshlane_lab::svc::run_in(lab, p, "ip", &["route", "add", "default", "dev", "eth0"])?;
    }
    lab.enroll(m)?;
    let mut sink = lab.cmd(b, bin("ml-svc")?)?;
    sink.args(["sink", "--listen", "0.0.0.0:8080"]);
    let mut sink = meshlane_lab::spawn_piped(&mut sink)?;
    meshlane_lab::wait_for_line(&mut sink, std::time::Duration::from_secs(10), |l| {
        l.starts_with("listening")
    })?;
    let _sink = Proc(sink);
    let to = format!("{}:80", vip(MEASURED));
    let rate = |pod: &Pod| -> Result<f64> {
        let out = lab
            .cmd(pod, bin("ml-svc")?)?
            .args(["connrate", "--to", &to, "--secs", CONNRATE_SECS])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("connrate: {}", String::from_utf8_lossy(&out.stderr)))?;
        if v["errors"].as_u64().unwrap_or(1) != 0 {
            anyhow::bail!("connrate from {} saw errors: {v}", pod.name);
        }
        v["per_sec"].as_f64().context("per_sec")
    };
    let (mut ipt, mut hook) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        println!("round {round}/{ROUNDS}: connects to {to}");
        ipt.push(rate(k)?);
        hook.push(rate(m)?);
    }
    let (i, h) = (median(&ipt), median(&hook));
    println!();
    println!(
        "new connections/s to {to} (service {MEASURED} of {SERVICES}), medians of {ROUNDS} rounds"
    );
    table_header("iptables", "connect hook");
    println!(
        "| {:<26} | {i:>10.0} | {h:>11.0} | {:>6.2} |",
        "connections/s",
        h / i
    );
    Ok(())
}

/// The header of a side-by-side table: metric, baseline, meshlane, ratio.
fn table_header(baseline: &str, ours: &str) {
    println!(
        "| {:<26} | {baseline:>10} | {ours:>11} | {:>6} |",
        "metric", "ratio"
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(28),
        "-".repeat(12),
        "-".repeat(13),
        "-".repeat(8)
    );
}
