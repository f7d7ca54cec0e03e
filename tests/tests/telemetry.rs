//! Flow telemetry against ground truth: the applications' own byte counts (`ml-probe` checks
//! every byte it reads, so what it says it wrote and read is exact), the kernel's own
//! retransmission counter, and a delay we configure with `tc netem`. Real kernel programs, a
//! real agent, real processes in pod namespaces.
//!
//! Run as root: `cargo test -p meshlane-lab --test telemetry -- --test-threads=1` (after
//! `cargo build --bins`).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use meshlane_api::{Request, types::AccelSpec};
use meshlane_lab::{
    Lab, Pod,
    metrics::{Sample, scrape, scrape_until, sum},
    probe::{Verdict, send, serve},
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SENT: &str = "meshlane_tcp_sent_bytes_total";
const RECEIVED: &str = "meshlane_tcp_received_bytes_total";
const OPENED: &str = "meshlane_tcp_connections_opened_total";
const CLOSED: &str = "meshlane_tcp_connections_closed_total";

fn addr(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Enrolls `pod` as `lab/<name>`, in the fast path or not.
fn enroll(lab: &Lab, pod: &Pod, accelerate: bool) -> Result<Value> {
    lab.call(&Request::PodAdd {
        netns: pod.netns_path.clone(),
        ips: vec![pod.ip.into(), pod.ip6.into()],
        name: Some(format!("lab/{}", pod.name)),
        sidecar: None,
        accel: (!accelerate).then_some(AccelSpec {
            enabled: false,
            exclude_ports: vec![],
        }),
        telemetry: None,
        cni: None,
    })
}

/// A lab with pods a and b enrolled in the fast path and c and d enrolled without it (the stack
/// path), all observed.
fn two_pairs() -> Result<(Lab, [Pod; 4])> {
    let lab = Lab::with_agent(&["a", "b", "c", "d"], false, &[])?;
    let pods = ["a", "b", "c", "d"].map(|n| lab.pod(n).clone());
    for (p, accelerate) in pods.iter().zip([true, true, false, false]) {
        enroll(&lab, p, accelerate)?;
    }
    Ok((lab, pods))
}

/// What `ml-probe serve` writes back on a connection that sent `n` bytes with `--duplex d`:
/// the duplex stream, then its verdict line.
fn server_writes(n: u64, d: u64) -> u64 {
    d + Verdict {
        bytes: n,
        pattern_ok: true,
        tag: String::new(),
    }
    .line()
    .len() as u64
}

/// The labels of one reporter's series for connections from `src` to `dst`.
fn pair<'a>(reporter: &'a str, src: &'a str, dst: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("reporter", reporter),
        ("source_workload", src),
        ("source_namespace", "lab"),
        ("destination_workload", dst),
        ("destination_namespace", "lab"),
    ]
}

fn with<'a>(mut l: Vec<(&'a str, &'a str)>, k: &'a str, v: &'a str) -> Vec<(&'a str, &'a str)> {
    l.push((k, v));
    l
}

/// `ml-probe` transfers of `sizes` (client bytes, server duplex bytes) from `src` to `dst`, one
/// connection each; returns (bytes the client wrote, bytes the server wrote).
fn transfers(
    lab: &Lab,
    src: &Pod,
    dst: &Pod,
    port: u16,
    sizes: &[(u64, u64)],
) -> Result<(u64, u64)> {
    let (mut up, mut down) = (0, 0);
    for &(n, d) in sizes {
        let srv = serve(
            lab,
            Some(dst),
            &addr(dst.ip, port).to_string(),
            &["--duplex", &d.to_string()],
        )?;
        send(
            lab,
            Some(src),
            srv.addr,
            &["--bytes", &n.to_string(), "--duplex", &d.to_string()],
        )?;
        let got = srv.finish(Duration::from_secs(120))?;
        if got["bytes"] != n {
            bail!("the server read {got}, {n} bytes were sent");
        }
        up += n;
        down += server_writes(n, d);
    }
    Ok((up, down))
}

/// Asserts every series of one connection set: both reporters, both directions, the bytes on
/// `path` and none on the other, and the connection counts.
fn assert_exact(s: &[Sample], src: &str, dst: &str, path: &str, up: u64, down: u64, conns: u64) {
    let other = if path == "redirected" {
        "stack"
    } else {
        "redirected"
    };
    for (reporter, sent, received) in [("source", up, down), ("destination", down, up)] {
        let l = pair(reporter, src, dst);
        let got = |name: &str, p: &str| sum(s, name, &with(l.clone(), "path", p)) as u64;
        assert_eq!(
            got(SENT, path),
            sent,
            "{src}→{dst} {reporter}: {path} bytes sent differ from what the application wrote"
        );
        assert_eq!(
            got(RECEIVED, path),
            received,
            "{src}→{dst} {reporter}: {path} bytes received differ from what the application read"
        );
        assert_eq!(
            got(SENT, other),
            0,
            "{src}→{dst} {reporter}: {other} bytes sent"
        );
        assert_eq!(
            got(RECEIVED, other),
            0,
            "{src}→{dst} {reporter}: {other} bytes received"
        );
        assert_eq!(
            sum(s, OPENED, &l) as u64,
            conns,
            "{src}→{dst} {reporter}: opened"
        );
        assert_eq!(
            sum(s, CLOSED, &l) as u64,
            conns,
            "{src}→{dst} {reporter}: closed"
        );
    }
}

/// Accelerated transfers of `sizes` from `src` to `dst` (one connection each), then every series
/// of the pair exact once they have closed.
fn transfers_are_counted_exactly(
    lab: &Lab,
    src: &Pod,
    dst: &Pod,
    port: u16,
    sizes: &[(u64, u64)],
) -> Result<()> {
    let (up, down) = transfers(lab, src, dst, port, sizes)?;
    let conns = sizes.len() as u64;
    let (s_name, d_name) = (src.name.as_str(), dst.name.as_str());
    let s = scrape_until(
        lab,
        Duration::from_secs(20),
        "the connections closed",
        |s| closed_both(s, s_name, d_name, conns),
    )?;
    assert_exact(&s, s_name, d_name, "redirected", up, down, conns);
    Ok(())
}

fn closed_both(s: &[Sample], src: &str, dst: &str, conns: u64) -> bool {
    ["source", "destination"]
        .iter()
        .all(|r| sum(s, CLOSED, &pair(r, src, dst)) as u64 == conns)
}

/// `meshlane observe --json` lines, parsed.
fn observe(lab: &Lab, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["observe", "--json"];
    all.extend_from_slice(args);
    let out = lab.cli(&all)?;
    if !out.status.success() {
        bail!(
            "meshlane observe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("observe line {l:?}")))
        .collect()
}

/// Bytes by path equal what the applications wrote and read, 1 B to 64 MiB, on the fast path
/// and on the stack (pods enrolled without acceleration), from both ends; connections opened
/// and closed equal the connections made; `meshlane observe` shows each connection's totals.
#[test]
fn bytes_and_connections_are_exact_on_both_paths() -> Result<()> {
    let (lab, [a, b, c, d]) = two_pairs()?;
    let sizes = [(1, 0), (1000, 1), (MIB, 64 << 10), (64 * MIB, MIB)];
    let conns = sizes.len() as u64;
    let (up_ab, down_ab) = transfers(&lab, &a, &b, 7100, &sizes)?;
    let (up_cd, down_cd) = transfers(&lab, &c, &d, 7101, &sizes)?;
    let s = scrape_until(
        &lab,
        Duration::from_secs(20),
        "every connection closed",
        |s| closed_both(s, "a", "b", conns) && closed_both(s, "c", "d", conns),
    )?;
    assert_exact(&s, "a", "b", "redirected", up_ab, down_ab, conns);
    assert_exact(&s, "c", "d", "stack", up_cd, down_cd, conns);
    // The fast path really carried a→b: the kernel counted those bytes as redirected.
    assert!(
        lab.counter("bytes_redirected")? >= up_ab + down_ab,
        "fewer bytes redirected than a→b carried"
    );

    // The flow records: both reporters' open and close of every a→b connection, totals as the
    // applications counted them.
    let recs = observe(&lab, &["--pod", "lab/a", "--last", "100"])?;
    let closes: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "close").collect();
    assert_eq!(recs.len(), 4 * sizes.len(), "records for lab/a: {recs:#?}");
    assert_eq!(closes.len(), 2 * sizes.len());
    let client_sent: u64 = closes
        .iter()
        .filter(|r| r["reporter"] == "source")
        .map(|r| r["sent_bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(client_sent, up_ab);
    for r in &closes {
        assert_eq!(r["accelerated"], true, "{r}");
        assert_eq!(r["source"]["pod"], "lab/a", "{r}");
        assert_eq!(r["destination"]["pod"], "lab/b", "{r}");
        assert_eq!(r["sent_bytes"], r["sent_redirected_bytes"], "{r}");
        assert_eq!(r["received_bytes"], r["received_redirected_bytes"], "{r}");
    }
    let none = observe(&lab, &["--namespace", "elsewhere"])?;
    assert!(none.is_empty(), "{none:?}");
    let bad = lab.cli(&["observe", "--protocol", "udp"])?;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("protocol"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    Ok(())
}

/// The counts of a connection that stays open are in the metrics while it is open (read from
/// the kernel's flow map), never go down, and end exact when it closes.
#[test]
fn open_connections_are_counted_live_and_never_go_down() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let n = 8 * MIB;
    let srv = serve(&lab, Some(&b), &addr(b.ip, 7200).to_string(), &[])?;
    // 64 KiB every 20 ms: about 2.6 s of sending.
    let client = {
        let mut cmd = lab.cmd(&a, meshlane_lab::bin("ml-probe")?)?;
        cmd.args([
            "send",
            "--to",
            &srv.addr.to_string(),
            "--bytes",
            &n.to_string(),
        ])
        .args(["--pace-ms", "20"]);
        meshlane_lab::spawn_piped(&mut cmd)?
    };
    let l = with(pair("source", "a", "b"), "path", "redirected");
    let mut last = 0u64;
    let mut seen_partial = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(&lab)?;
        let v = sum(&s, SENT, &l) as u64;
        assert!(v >= last, "the counter went down: {last} → {v}");
        last = v;
        if v > 0 && v < n {
            seen_partial = true;
        }
        if sum(&s, CLOSED, &pair("source", "a", "b")) as u64 == 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the connection did not close in 60 s (sent so far {v})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = client.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.finish(Duration::from_secs(30))?;
    assert!(
        seen_partial,
        "no scrape saw the connection while it was open"
    );
    assert_eq!(last, n, "after close the total is what the client wrote");
    Ok(())
}

/// `(RetransSegs)` of the TCP MIB of the pod's network namespace.
fn retrans_segs(lab: &Lab, pod: &Pod) -> Result<u64> {
    let out = meshlane_lab::run(lab.cmd(pod, "cat")?.arg("/proc/net/snmp"))?;
    let text = String::from_utf8(out.stdout)?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("Tcp header")?,
        tcp.next().context("Tcp values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .context("RetransSegs column")?;
    Ok(values
        .split_whitespace()
        .nth(i)
        .context("RetransSegs value")?
        .parse()?)
}

/// RTT and retransmits where the stack carries the connection, over an emulated link with 10 ms
/// of delay each way and 1 % loss of the server's packets. This kernel has no `sch_netem`
/// (CONFIG_NET_SCH_NETEM is not set), so the link is `ml-probe link-emu`: a TUN device in each
/// pod and a forwarder that delays every packet and drops the lossy direction's at random — the
/// same effect on TCP. The smoothed RTT of each connection, from either end, is within 10 % of
/// the 20 ms round trip, and the server's retransmits are within 5 % of its namespace's own TCP
/// MIB count (SYN-ACK retransmissions included on both sides: the kernel copies them into the
/// accepted socket's `total_retrans`).
#[test]
fn rtt_and_retransmits_match_the_link_and_the_kernel() -> Result<()> {
    let lab = Lab::with_agent(&["e", "f"], false, &[])?;
    let (e, f) = (lab.pod("e").clone(), lab.pod("f").clone());
    let mut emu = lab.host_cmd(meshlane_lab::bin("ml-probe")?)?;
    let stats = lab.dir.join("link-emu.stats");
    emu.args(["link-emu", "--delay-ms", "10", "--loss-b-to-a", "1"])
        .arg("--stats")
        .arg(&stats)
        .arg("--a-netns")
        .arg(&e.netns_path)
        .arg("--b-netns")
        .arg(&f.netns_path);
    let mut child = meshlane_lab::spawn_piped(&mut emu)?;
    meshlane_lab::wait_for_line(&mut child, Duration::from_secs(10), |l| l == "ready")?;
    let _emu = meshlane_lab::svc::Proc(child);
    let (ip_e, ip_f) = ("10.99.0.1", "10.99.0.2");
    for (pod, ip) in [(&e, ip_e), (&f, ip_f)] {
        for args in [
            vec![
                "-n",
                &pod.netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "mltun0",
            ],
            vec!["-n", &pod.netns, "link", "set", "mltun0", "up"],
        ] {
            let out = meshlane_lab::run(std::process::Command::new("ip").args(&args))?;
            meshlane_lab::succeeded(out, format!("ip {args:?}"))?;
        }
    }
    for (pod, ip) in [(&e, ip_e), (&f, ip_f)] {
        lab.call(&Request::PodAdd {
            netns: pod.netns_path.clone(),
            ips: vec![pod.ip.into(), ip.parse()?],
            name: Some(format!("lab/{}", pod.name)),
            sidecar: None,
            accel: Some(AccelSpec {
                enabled: false,
                exclude_ports: vec![],
            }),
            telemetry: None,
            cni: None,
        })?;
    }
    let before = retrans_segs(&lab, &f)?;
    let conns = 5u64;
    let duplex = (2 * MIB).to_string();
    let srv = serve(
        &lab,
        Some(&f),
        &format!("{ip_f}:7300"),
        &["--conns", &conns.to_string(), "--duplex", &duplex],
    )?;
    send(
        &lab,
        Some(&e),
        srv.addr,
        &[
            "--bytes",
            "1000",
            "--duplex",
            &duplex,
            "--conns",
            &conns.to_string(),
        ],
    )?;
    srv.finish(Duration::from_secs(120))?;
    let s = scrape_until(
        &lab,
        Duration::from_secs(20),
        "every connection closed",
        |s| closed_both(s, "e", "f", conns),
    )?;
    let kernel = retrans_segs(&lab, &f)? - before;
    let ours = sum(
        &s,
        "meshlane_tcp_retransmits_total",
        &pair("destination", "e", "f"),
    ) as u64;
    assert!(
        kernel > 0,
        "1 % loss caused no retransmission; nothing to compare"
    );
    assert!(
        ours.abs_diff(kernel) as f64 <= 0.05 * kernel as f64,
        "retransmits: meshlane {ours}, the kernel's TCP MIB {kernel}"
    );
    let rtt_count = sum(
        &s,
        "meshlane_tcp_rtt_seconds_count",
        &pair("destination", "e", "f"),
    );
    assert_eq!(
        rtt_count as u64, conns,
        "one RTT observation per server connection"
    );
    // The round trip as the emulator really applied it (its threads may run late on a busy
    // machine): the sum of the two directions' mean delays.
    let deadline = Instant::now() + Duration::from_secs(5);
    let real_ms = loop {
        let text = std::fs::read_to_string(&stats).unwrap_or_default();
        let us: Vec<f64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if us.len() == 2 && us.iter().all(|v| *v > 0.0) {
            break (us[0] + us[1]) / 1000.0;
        }
        if Instant::now() > deadline {
            bail!("the link emulator wrote no statistics: {text:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        (20.0..22.0).contains(&real_ms),
        "the emulated round trip was {real_ms:.2} ms, not about 20"
    );
    let recs = observe(&lab, &["--pod", "lab/f", "--last", "100"])?;
    for reporter in ["source", "destination"] {
        let mut rtts: Vec<f64> = recs
            .iter()
            .filter(|r| r["kind"] == "close" && r["reporter"] == reporter)
            .map(|r| r["srtt_us"].as_f64().unwrap_or(0.0) / 1000.0)
            .collect();
        assert_eq!(rtts.len() as u64, conns, "{reporter}: {recs:#?}");
        rtts.sort_by(f64::total_cmp);
        let p50 = rtts[rtts.len() / 2];
        assert!(
            (p50 - real_ms).abs() <= 0.1 * real_ms,
            "{reporter}: RTT p50 {p50:.2} ms is not within 10 % of the link's {real_ms:.2} ms \
             (configured 20) ({rtts:?})"
        );
    }
    Ok(())
}

/// A ring buffer too small for a burst of connections while the agent is stopped (128 KiB, for
/// 100 connections' open and close events and the payload records of their first bytes, about
/// 700 KiB): the loss is counted, the agent stays up, and connections made afterwards (10, about
/// 70 KiB of records, which fit even if the agent stalled again) are counted exactly.
#[test]
fn a_full_ring_counts_its_losses_and_later_counts_are_exact() -> Result<()> {
    let lab = Lab::with_agent(
        &["a", "b", "g", "h"],
        true,
        &["--events-ring-bytes", "131072"],
    )?;
    let (a, b, g, h) = (
        lab.pod("a").clone(),
        lab.pod("b").clone(),
        lab.pod("g").clone(),
        lab.pod("h").clone(),
    );
    let pid = nix::unistd::Pid::from_raw(lab.agent().child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let burst = || -> Result<()> {
        let srv = serve(
            &lab,
            Some(&b),
            &addr(b.ip, 7400).to_string(),
            &["--conns", "100"],
        )?;
        send(
            &lab,
            Some(&a),
            srv.addr,
            &["--bytes", "100", "--conns", "100"],
        )?;
        srv.finish(Duration::from_secs(60))?;
        Ok(())
    };
    let r = burst();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    r?;
    // The agent works off what the kernel kept before the later connections start (while the
    // ring is still full, their events would be lost as well).
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = lab.call(&Request::Status)?;
        if st["telemetry"]["backlog_bytes"] == 0 {
            break st;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not read its ring in 20 s: {}",
                st["telemetry"]
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lost = st["telemetry"]["events_lost"].as_u64().unwrap_or(0);
    assert!(
        lost > 0,
        "100 connections' events into a 128 KiB ring lost none"
    );
    transfers_are_counted_exactly(&lab, &g, &h, 7401, &[(5000, 700); 10])
}

/// SIGKILL of the agent while 20 connections are transferring, and a new agent: the totals
/// after equal what the applications wrote and read, neither lost nor counted twice (the
/// byte counters live in pinned maps and pinned tracepoints; closed totals are checkpointed
/// with the ring position).
#[test]
fn an_agent_killed_mid_transfer_loses_and_doubles_nothing() -> Result<()> {
    let (mut lab, [a, b, c, d]) = two_pairs()?;
    let conns = 20u64;
    let n = 4 * MIB;
    let mut running = Vec::new();
    for (src, dst, port) in [(&a, &b, 7500), (&c, &d, 7501)] {
        let srv = serve(
            &lab,
            Some(dst),
            &addr(dst.ip, port).to_string(),
            &["--conns", "20"],
        )?;
        let mut cmd = lab.cmd(src, meshlane_lab::bin("ml-probe")?)?;
        cmd.args([
            "send",
            "--to",
            &srv.addr.to_string(),
            "--bytes",
            &n.to_string(),
        ])
        .args([
            "--conns",
            "20",
            "--parallel",
            "--pace-ms",
            "20",
            "--chunk",
            "65536",
        ]);
        running.push((srv, meshlane_lab::spawn_piped(&mut cmd)?));
    }
    // Some connections have closed and some bytes are counted before the kill.
    scrape_until(&lab, Duration::from_secs(30), "bytes counted", |s| {
        sum(s, SENT, &pair("source", "a", "b")) > 0.0
            && sum(s, SENT, &pair("source", "c", "d")) > 0.0
    })?;
    lab.kill_agent()?;
    lab.restart_agent(&[])?;
    for (srv, client) in running {
        let out = client.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        srv.finish(Duration::from_secs(60))?;
    }
    let down = conns * server_writes(n, 0);
    let s = scrape_until(
        &lab,
        Duration::from_secs(20),
        "every connection closed",
        |s| closed_both(s, "a", "b", conns) && closed_both(s, "c", "d", conns),
    )?;
    assert_exact(&s, "a", "b", "redirected", conns * n, down, conns);
    assert_exact(&s, "c", "d", "stack", conns * n, down, conns);
    Ok(())
}

/// The labels of a series given every label.
fn labels<'a>(
    reporter: &'a str,
    (src, src_ns): (&'a str, &'a str),
    (dst, dst_ns): (&'a str, &'a str),
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("reporter", reporter),
        ("source_workload", src),
        ("source_namespace", src_ns),
        ("destination_workload", dst),
        ("destination_namespace", dst_ns),
    ]
}

/// Peers are named from what the agent knows: an un-enrolled pod (over IPv6) is `unknown` and
/// reports nothing itself; a connection inside one pod over loopback is that pod to itself; a
/// pod enrolled without telemetry reports nothing, its observed peer does. Every count exact.
#[test]
fn peers_are_named_and_unobserved_pods_stay_silent() -> Result<()> {
    let lab = Lab::with_agent(&["a", "u", "q"], false, &[])?;
    let (a, u, q) = (
        lab.pod("a").clone(),
        lab.pod("u").clone(),
        lab.pod("q").clone(),
    );
    lab.enroll(&a)?;
    lab.enroll_unobserved(&q)?;
    let one = |src: &Pod, srv_pod: &Pod, listen: SocketAddr, n: u64, d: u64| -> Result<()> {
        let srv = serve(
            &lab,
            Some(srv_pod),
            &listen.to_string(),
            &["--duplex", &d.to_string()],
        )?;
        send(
            &lab,
            Some(src),
            srv.addr,
            &["--bytes", &n.to_string(), "--duplex", &d.to_string()],
        )?;
        srv.finish(Duration::from_secs(60))?;
        Ok(())
    };
    one(&a, &u, addr(u.ip6, 7600), 3000, 100)?;
    one(&a, &a, addr(std::net::Ipv4Addr::LOCALHOST, 7601), 5000, 200)?;
    one(&q, &a, addr(a.ip, 7602), 7000, 300)?;
    let to_unknown = labels("source", ("a", "lab"), ("unknown", "unknown"));
    let in_a = labels("source", ("a", "lab"), ("a", "lab"));
    let from_q = labels("destination", ("q", "lab"), ("a", "lab"));
    let s = scrape_until(
        &lab,
        Duration::from_secs(20),
        "every connection closed",
        |s| {
            [&to_unknown, &in_a, &from_q]
                .iter()
                .all(|l| sum(s, CLOSED, l) as u64 == 1)
                && sum(
                    s,
                    CLOSED,
                    &labels("destination", ("a", "lab"), ("a", "lab")),
                ) as u64
                    == 1
        },
    )?;
    let bytes = |l: &[(&str, &str)], name: &str, path: &str| {
        sum(&s, name, &with(l.to_vec(), "path", path)) as u64
    };
    // a → u: through the stack (u is not enrolled), u's own side not reported.
    assert_eq!(bytes(&to_unknown, SENT, "stack"), 3000);
    assert_eq!(
        bytes(&to_unknown, RECEIVED, "stack"),
        server_writes(3000, 100)
    );
    assert_eq!(bytes(&to_unknown, SENT, "redirected"), 0);
    let u_reports = labels("destination", ("a", "lab"), ("unknown", "unknown"));
    assert_eq!(
        sum(&s, OPENED, &u_reports),
        0.0,
        "the un-enrolled pod reported"
    );
    // a → a over loopback: redirected, both ends a.
    assert_eq!(bytes(&in_a, SENT, "redirected"), 5000);
    assert_eq!(
        bytes(&in_a, RECEIVED, "redirected"),
        server_writes(5000, 200)
    );
    let in_a_server = labels("destination", ("a", "lab"), ("a", "lab"));
    assert_eq!(bytes(&in_a_server, RECEIVED, "redirected"), 5000);
    // q → a: only a's socket reports (q has telemetry off); the bytes were redirected.
    assert_eq!(bytes(&from_q, RECEIVED, "redirected"), 7000);
    assert_eq!(bytes(&from_q, SENT, "redirected"), server_writes(7000, 300));
    let q_reports = labels("source", ("q", "lab"), ("a", "lab"));
    assert_eq!(
        sum(&s, OPENED, &q_reports),
        0.0,
        "the pod without telemetry reported"
    );
    Ok(())
}

/// A checkpoint the agent cannot read never keeps it from starting: the file is kept aside,
/// status says what happened, the closed totals start again from 0 and count exactly.
#[test]
fn an_unreadable_checkpoint_is_kept_aside_and_counting_goes_on() -> Result<()> {
    let mut lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    transfers(&lab, &a, &b, 7700, &[(1000, 10)])?;
    scrape_until(
        &lab,
        Duration::from_secs(20),
        "the connection closed",
        |s| closed_both(s, "a", "b", 1),
    )?;
    let state = lab.agent().state.clone();
    lab.stop_agent()?;
    let mut name = state.file_name().context("state file name")?.to_os_string();
    name.push(".telemetry");
    let checkpoint = state.with_file_name(name);
    assert!(
        checkpoint.exists(),
        "no checkpoint at {}",
        checkpoint.display()
    );
    std::fs::write(&checkpoint, b"{\"ring_id\": \"not a number\"")?;
    lab.restart_agent(&[])?;
    let st = lab.call(&Request::Status)?;
    let detail = st["telemetry"]["detail"].as_str().unwrap_or("");
    assert!(detail.contains("unreadable"), "status: {detail}");
    assert!(
        checkpoint.with_extension("telemetry.bad").exists(),
        "the unreadable file was not kept: {detail}"
    );
    transfers_are_counted_exactly(&lab, &a, &b, 7701, &[(2000, 20)])
}

/// `oha` (fixed request count, keep-alive, 4,000/s) against nginx, on the fast path and on the
/// stack: the server's and the client's request counts equal what oha says it got (0 missing,
/// 0 extra), with the right method and status; `meshlane observe --protocol http` lists them.
#[test]
fn http_requests_are_counted_exactly_on_both_paths() -> Result<()> {
    let (lab, [a, b, c, d]) = two_pairs()?;
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("f"), vec![b'x'; 1024])?;
    for (client, server, port, path) in [(&a, &b, 8080, "redirected"), (&c, &d, 8081, "stack")] {
        let listen = format!("{}:{port}", server.ip);
        let _nginx = meshlane_lab::svc::nginx(&lab, server, &listen, &www)?;
        let n = 2000u64;
        for (target, status) in [("f", "200"), ("missing", "404")] {
            let out = meshlane_lab::run(
                lab.cmd(client, "timeout")?
                    .args(["60", "oha", "--no-tui", "--output-format", "json"])
                    .args(["-n", &n.to_string()])
                    // At 4,000/s the agent (a debug build in the tests) keeps up; past what it
                    // can read, the ring's loss is counted instead (see the ring test).
                    .args(["-c", "8", "-q", "4000"])
                    .arg(format!("http://{listen}/{target}")),
            )?;
            let out = meshlane_lab::succeeded(out, "oha")?;
            let report: Value = serde_json::from_slice(&out.stdout)?;
            let got = report["statusCodeDistribution"][status]
                .as_u64()
                .unwrap_or(0);
            assert_eq!(got, n, "oha's own count: {report:#}");
        }
        let src = client.name.as_str();
        let dst = server.name.as_str();
        let want = |status: &'static str| {
            vec![
                ("source_workload", src),
                ("destination_workload", dst),
                ("http_request_method", "GET"),
                ("http_response_status_code", status),
            ]
        };
        let s = scrape_until(
            &lab,
            Duration::from_secs(20),
            "every request counted",
            |s| {
                ["200", "404"].iter().all(|st| {
                    sum(s, "http_server_request_duration_seconds_count", &want(st)) as u64 == n
                        && sum(s, "http_client_request_duration_seconds_count", &want(st)) as u64
                            == n
                })
            },
        )
        .with_context(|| format!("{src} → {dst} ({path})"))?;
        assert_eq!(
            sum(
                &s,
                "meshlane_http_unparsed_total",
                &[("source_workload", src)]
            ),
            0.0,
            "{src} → {dst}: unparsed places"
        );
        let lost = lab.call(&Request::Status)?["telemetry"]["events_lost"].as_u64();
        assert_eq!(lost, Some(0), "{src} → {dst}: the ring lost events");
        // The bytes went the way this pair is meant to.
        let l = with(pair("source", src, dst), "path", path);
        assert!(sum(&s, SENT, &l) > 0.0, "{src} → {dst}: no {path} bytes");
    }
    let recs = observe(
        &lab,
        &[
            "--pod",
            "lab/b",
            "--protocol",
            "http",
            "--status",
            "404",
            "--last",
            "10",
        ],
    )?;
    assert_eq!(recs.len(), 10, "{recs:#?}");
    for r in &recs {
        assert_eq!(r["method"], "GET", "{r}");
        assert_eq!(r["path"], "/missing", "{r}");
        assert_eq!(r["status"], 404, "{r}");
        assert!(r["duration_ms"].as_f64().unwrap_or(-1.0) >= 0.0, "{r}");
    }
    Ok(())
}

/// A scripted HTTP/1.1 server (Python's `http.server`, `tests/py/httpd.py`) in pod b, curl in
/// pod a, on the fast path: `HEAD`, 204, 304, 404, 500, a chunked download, chunked and
/// fixed-length uploads (1 MiB, with `Expect: 100-continue`), a 1 MiB download and
/// `Connection: close` are each counted once with their method and status, from both ends; a
/// server that answers after 10, 50 and 200 ms has a server-side p50 within 5 % (or 1 ms) of the
/// delay, and the client's is never shorter.
#[test]
fn http_statuses_bodies_and_durations_match_what_the_applications_did() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let script = lab.dir.join("httpd.py");
    std::fs::write(&script, include_str!("../py/httpd.py"))?;
    let upload = lab.dir.join("upload.bin");
    std::fs::write(&upload, vec![b'u'; 1 << 20])?;
    let mut cmd = lab.cmd(&b, "python3")?;
    cmd.arg(&script).arg(b.ip.to_string()).arg("8090");
    let mut child = meshlane_lab::spawn_piped(&mut cmd)?;
    let (_, served) =
        meshlane_lab::wait_for_line(&mut child, Duration::from_secs(20), |l| l == "listening")?;
    let _server = meshlane_lab::svc::Proc(child);
    let base = format!("http://{}:8090", b.ip);
    let curl = |args: &[String]| -> Result<String> {
        let out = meshlane_lab::run(
            lab.cmd(&a, "curl")?
                .args(["-sS", "--max-time", "30", "-w", "%{http_code}\\n"])
                .args(args),
        )?;
        Ok(String::from_utf8(
            meshlane_lab::succeeded(out, format!("curl {args:?}"))?.stdout,
        )?)
    };
    let urls = |paths: &[&str]| -> Vec<String> {
        paths
            .iter()
            .flat_map(|p| ["-o".to_string(), "/dev/null".into(), format!("{base}{p}")])
            .collect()
    };
    // One keep-alive connection per curl call (curl reuses it for every URL of the call).
    let mut delays = Vec::new();
    for ms in [10, 50, 200] {
        delays.extend(std::iter::repeat_n(format!("/delay/{ms}"), 5));
    }
    let delay_refs: Vec<&str> = delays.iter().map(String::as_str).collect();
    let codes = curl(&urls(&delay_refs))?;
    assert_eq!(codes.lines().filter(|c| *c == "200").count(), 15, "{codes}");
    let codes = curl(&urls(&[
        "/status/204",
        "/status/304",
        "/status/404",
        "/status/500",
        "/chunked",
        "/big",
    ]))?;
    assert_eq!(codes, "204\n304\n404\n500\n200\n200\n");
    let head = curl(&[
        "-I".into(),
        "-o".into(),
        "/dev/null".into(),
        format!("{base}/"),
    ])?;
    assert_eq!(head, "200\n");
    let file = format!("@{}", upload.display());
    let chunked = curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-H".into(),
        "Transfer-Encoding: chunked".into(),
        "--data-binary".into(),
        file.clone(),
        format!("{base}/upload"),
    ])?;
    let fixed = curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-H".into(),
        "Expect: 100-continue".into(),
        "--data-binary".into(),
        file,
        format!("{base}/upload"),
    ])?;
    assert_eq!((chunked.as_str(), fixed.as_str()), ("201\n", "201\n"));
    let close = curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-H".into(),
        "Connection: close".into(),
        format!("{base}/status/200"),
    ])?;
    assert_eq!(close, "200\n");

    let want = [
        ("GET", "200", 15 + 2 + 1),
        ("GET", "204", 1),
        ("GET", "304", 1),
        ("GET", "404", 1),
        ("GET", "500", 1),
        ("HEAD", "200", 1),
        ("POST", "201", 2),
    ];
    let labels = |m: &'static str, st: &'static str| {
        vec![
            ("source_workload", "a"),
            ("destination_workload", "b"),
            ("http_request_method", m),
            ("http_response_status_code", st),
        ]
    };
    let s = scrape_until(
        &lab,
        Duration::from_secs(20),
        "every request counted",
        |s| {
            want.iter().all(|(m, st, n)| {
                ["server", "client"].iter().all(|side| {
                    let name = format!("http_{side}_request_duration_seconds_count");
                    sum(s, &name, &labels(m, st)) as u64 == *n
                })
            })
        },
    )?;
    let total = |side: &str| {
        sum(
            &s,
            &format!("http_{side}_request_duration_seconds_count"),
            &[],
        )
    };
    let all: Vec<String> = s
        .iter()
        .filter(|x| x.name.ends_with("request_duration_seconds_count"))
        .map(|x| format!("{} {:?} {}", x.name, x.labels, x.value))
        .collect();
    let made: u64 = want.iter().map(|(_, _, n)| n).sum();
    assert_eq!(
        total("server") as u64,
        made,
        "no request counted twice or under another label: {all:#?}"
    );
    assert_eq!(total("client") as u64, made, "{all:#?}");
    let unparsed: Vec<String> = s
        .iter()
        .filter(|x| x.name == "meshlane_http_unparsed_total")
        .map(|x| format!("{:?} {}", x.labels, x.value))
        .collect();
    assert!(
        unparsed.is_empty(),
        "unparsed: {unparsed:#?}\n{:#?}",
        observe(&lab, &["--protocol", "http", "--last", "100"])?
            .iter()
            .map(|r| format!(
                "{} {} {} {}",
                r["reporter"], r["method"], r["path"], r["status"]
            ))
            .collect::<Vec<_>>()
    );

    // The server's own account of each delay (printed after each answer).
    let own: Vec<(String, f64)> =
        std::iter::from_fn(|| served.recv_timeout(Duration::from_secs(5)).ok())
            .take(15)
            .filter_map(|l| {
                let mut it = l.split_whitespace().skip(1);
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect();
    assert_eq!(own.len(), 15, "the server's lines: {own:?}");
    let recs = observe(&lab, &["--protocol", "http", "--last", "100"])?;
    for ms in [10u64, 50, 200] {
        let path = format!("/delay/{ms}");
        let by = |reporter: &str| -> Vec<f64> {
            let mut v: Vec<f64> = recs
                .iter()
                .filter(|r| r["path"] == path.as_str() && r["reporter"] == reporter)
                .map(|r| r["duration_ms"].as_f64().unwrap_or(0.0))
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let (server, client) = (by("destination"), by("source"));
        assert_eq!((server.len(), client.len()), (5, 5), "{path}: {recs:#?}");
        let mut truth: Vec<f64> = own
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, t)| *t)
            .collect();
        truth.sort_by(f64::total_cmp);
        let (p50, real) = (server[2], truth[2]);
        assert!(
            real >= ms as f64,
            "{path}: the server says it took {real} ms"
        );
        let slack = (real * 0.05).max(1.0);
        assert!(
            (p50 - real).abs() <= slack,
            "{path}: server-side p50 {p50:.2} ms is not within {slack:.2} ms of the server's own \
             {real:.2} ms ({server:?} vs {truth:?})"
        );
        assert!(
            client[2] >= p50,
            "{path}: client p50 {} < server p50 {p50}",
            client[2]
        );
    }
    Ok(())
}

/// Keep-alive connections open across an agent restart (SIGTERM, then a new agent): every
/// request is counted once, before and after, and the connections' HTTP is parsed again from
/// their next message (the new agent never saw their first bytes).
#[test]
fn keep_alive_connections_are_parsed_again_after_an_agent_restart() -> Result<()> {
    use std::io::{BufRead as _, Write as _};
    let (mut lab, [a, b, ..]) = two_pairs()?;
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("f"), vec![b'x'; 100])?;
    let listen = format!("{}:8080", b.ip);
    let _nginx = meshlane_lab::svc::nginx(&lab, &b, &listen, &www)?;
    // 8 connections, 50 requests each; a line on stdin; 50 more on the same connections.
    let client = format!(
        r#"
import http.client, sys
conns = [http.client.HTTPConnection("{ip}", 8080) for _ in range(8)]
def burst():
    n = 0
    for _ in range(50):
        for c in conns:
            c.request("GET", "/f")
            r = c.getresponse()
            r.read()
            n += r.status == 200
    return n
print(burst(), flush=True)
sys.stdin.readline()
print(burst(), flush=True)
"#,
        ip = b.ip
    );
    let mut py = lab
        .cmd(&a, "python3")?
        .args(["-c", &client])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(py.stdout.take().context("client stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    assert_eq!(
        line.trim(),
        "400",
        "the client's own count before the restart"
    );
    // The histogram's name says which side reported it.
    let want = || {
        vec![
            ("source_workload", "a"),
            ("destination_workload", "b"),
            ("http_response_status_code", "200"),
        ]
    };
    let counted = |s: &[Sample], n: f64| {
        sum(s, "http_client_request_duration_seconds_count", &want()) == n
            && sum(s, "http_server_request_duration_seconds_count", &want()) == n
    };
    scrape_until(
        &lab,
        Duration::from_secs(20),
        "400 requests, both sides",
        |s| counted(s, 400.0),
    )?;
    lab.stop_agent()?;
    lab.restart_agent(&[])?;
    py.stdin
        .as_mut()
        .context("client stdin")?
        .write_all(b"go\n")?;
    line.clear();
    out.read_line(&mut line)?;
    assert_eq!(
        line.trim(),
        "400",
        "the client's own count after the restart"
    );
    assert!(py.wait()?.success());
    let s = scrape_until(
        &lab,
        Duration::from_secs(20),
        "800 requests, both sides",
        |s| counted(s, 800.0),
    )?;
    assert_eq!(
        sum(
            &s,
            "meshlane_http_unparsed_total",
            &[("source_workload", "a")]
        ),
        0.0,
        "unparsed places"
    );
    Ok(())
}
