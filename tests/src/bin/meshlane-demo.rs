//! `meshlane-demo`: two pods on one node, the agent on the lab's cgroup, sockperf ping-pong and
//! iperf3 between the pods with enrollment off and on (interleaved), and a side-by-side table.
//! Everything it creates is removed at the end, also when it fails.

use std::net::IpAddr;

use anyhow::Result;
use meshlane_lab::{
    Lab,
    bench::{Latency, iperf3, median, sockperf_pingpong},
};

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
    println!(
        "lab {}: pods client {} and server {} on a bridge",
        lab.id, a.ip, b.ip
    );
    lab.start_agent(&[])?;
    let st = lab.call(&meshlane::api::Request::Status)?;
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
        let l = sockperf_pingpong(&lab, &a, &b, bip, 11111, 64, SECS)?;
        let t = iperf3(&lab, &a, &b, bip, 5201, 128 << 10, SECS)?;
        veth.push((l, t));
        lo.push(iperf3(
            &lab,
            &a,
            &a,
            "127.0.0.1".parse()?,
            5202,
            128 << 10,
            SECS,
        )?);

        println!("round {round}/{ROUNDS}: accelerated (both pods enrolled)");
        lab.enroll(&a)?;
        lab.enroll(&b)?;
        let l = sockperf_pingpong(&lab, &a, &b, bip, 11112, 64, SECS)?;
        let t = iperf3(&lab, &a, &b, bip, 5203, 128 << 10, SECS)?;
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
    println!(
        "| {:<26} | {:>10} | {:>11} | {:>6} |",
        "metric", "veth", "accelerated", "ratio"
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(28),
        "-".repeat(12),
        "-".repeat(13),
        "-".repeat(8)
    );
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
    lab.teardown();
    println!("lab removed");
    Ok(())
}
