//! Privileged end-to-end tests of the same-node fast path, each in a lab of its own: real kernel
//! programs, a real agent attached to the lab's cgroup, real processes in pod namespaces.
//!
//! Run as root: `cargo test -p meshlane-lab -- --test-threads=1` (after `cargo build --bins`).

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use meshlane_api::{
    ErrorKind, Request,
    types::{AccelSpec, SidecarSpec},
};
use meshlane_lab::{
    Lab, Pod, bin, map_entries,
    probe::{send, serve},
    spawn_piped, wait_for_line,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn probe() -> std::path::PathBuf {
    bin("ml-probe").expect("ml-probe is built")
}

fn lab(names: &[&str], enroll: bool, agent_args: &[&str]) -> Result<Lab> {
    Lab::with_agent(names, enroll, agent_args)
}

fn addr(ip: impl Into<std::net::IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

#[test]
fn byte_exact_transfers_every_send_path() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let methods = ["write", "writev", "sendfile", "splice", "msg_more"];
    let sizes = [1, 1000, 65_537, 4 * MIB + 1, 64 * MIB];
    let paths: [(&str, &Pod, String); 4] = [
        ("pod-to-pod IPv4", &b, addr(b.ip, 7001)),
        ("pod-to-pod IPv6", &b, addr(b.ip6, 7002)),
        ("loopback IPv4", &a, "127.0.0.1:7003".into()),
        ("loopback IPv6", &a, "[::1]:7004".into()),
    ];
    let redirected_before = lab.counter("bytes_redirected")?;
    let mut total = 0u64;
    for (what, server_pod, listen) in &paths {
        let n = methods.len() * sizes.len();
        let srv = serve(&lab, Some(server_pod), listen, &["--conns", &n.to_string()])?;
        for m in methods {
            for s in sizes {
                send(
                    &lab,
                    Some(&a),
                    srv.addr,
                    &["--method", m, "--bytes", &s.to_string()],
                )
                .with_context(|| format!("{what}: {m} of {s} bytes"))?;
                total += s;
            }
        }
        let summary = srv.finish(Duration::from_secs(60))?;
        assert_eq!(
            summary["bad"], 0,
            "{what}: server saw corrupt streams: {summary}"
        );
        assert_eq!(
            summary["errors"].as_array().map(Vec::len),
            Some(0),
            "{what}: {summary}"
        );
    }
    let redirected = lab.counter("bytes_redirected")? - redirected_before;
    assert!(
        redirected >= total,
        "only {redirected} of {total} bytes went through the fast path"
    );

    // A dual-stack server (listening on [::]) accepts an IPv4 client: its socket is AF_INET6
    // with ::ffff:a.b.c.d addresses, the client's is AF_INET. Both must produce the same key.
    for (what, server_pod, port, to) in [
        (
            "pod-to-pod",
            &b,
            7007u16,
            SocketAddr::new(b.ip.into(), 7007),
        ),
        ("loopback", &a, 7008, "127.0.0.1:7008".parse()?),
    ] {
        let before = lab.counter("bytes_redirected")?;
        let srv = serve(&lab, Some(server_pod), &format!("[::]:{port}"), &[])?;
        send(&lab, Some(&a), to, &["--bytes", &(8 * MIB).to_string()])
            .with_context(|| format!("IPv4 client to a dual-stack server, {what}"))?;
        srv.finish(Duration::from_secs(30))?;
        let redirected = lab.counter("bytes_redirected")? - before;
        assert!(
            redirected >= 8 * MIB,
            "IPv4 client to a dual-stack server ({what}): only {redirected} bytes redirected"
        );
    }

    // Concurrent streams in both directions: 8 connections, 8 MiB each way, pod-to-pod and
    // within one pod.
    for (what, server_pod, listen) in [
        ("pod-to-pod", &b, addr(b.ip, 7005)),
        ("loopback", &a, "127.0.0.1:7006".into()),
    ] {
        let srv = serve(
            &lab,
            Some(server_pod),
            &listen,
            &["--conns", "8", "--duplex", &(8 * MIB).to_string()],
        )?;
        send(
            &lab,
            Some(&a),
            srv.addr,
            &[
                "--conns",
                "8",
                "--parallel",
                "--duplex",
                &(8 * MIB).to_string(),
                "--bytes",
                &(8 * MIB).to_string(),
            ],
        )
        .with_context(|| format!("duplex {what}"))?;
        let summary = srv.finish(Duration::from_secs(60))?;
        assert_eq!(summary["bad"], 0, "duplex {what}: {summary}");
    }
    Ok(())
}

fn tx_bytes(ns: &str, dev: &str) -> u64 {
    Lab::link_bytes(ns, dev).expect("link counters").1
}

#[test]
fn accelerated_transfers_bypass_veth_and_lo() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let size = 64 * MIB;

    // Measures a 64 MiB transfer a → b and a → a (loopback) by the interface counters the kernel
    // keeps: a's eth0, the bridge-side veth of a, and a's lo.
    let measure = |port: u16| -> Result<(u64, u64, u64)> {
        let srv = serve(&lab, Some(&b), &addr(b.ip, port), &[])?;
        let (eth, veth) = (
            tx_bytes(&a.netns, "eth0"),
            Lab::link_bytes(&lab.node_ns, &a.host_veth)?.0,
        );
        send(&lab, Some(&a), srv.addr, &["--bytes", &size.to_string()])?;
        srv.finish(Duration::from_secs(60))?;
        let d_eth = tx_bytes(&a.netns, "eth0") - eth;
        let d_veth = Lab::link_bytes(&lab.node_ns, &a.host_veth)?.0 - veth;
        let lsrv = serve(&lab, Some(&a), &format!("127.0.0.1:{}", port + 1), &[])?;
        let lo = tx_bytes(&a.netns, "lo");
        send(&lab, Some(&a), lsrv.addr, &["--bytes", &size.to_string()])?;
        lsrv.finish(Duration::from_secs(60))?;
        let d_lo = tx_bytes(&a.netns, "lo") - lo;
        Ok((d_eth, d_veth, d_lo))
    };

    let (eth, veth, lo) = measure(7100)?;
    for (what, d) in [("pod eth0", eth), ("bridge veth", veth), ("lo", lo)] {
        assert!(
            d < 2 * MIB,
            "accelerated: {what} carried {d} bytes of a {size}-byte transfer (expected only handshakes)"
        );
    }

    for p in [&a, &b] {
        lab.unenroll(p)?;
    }
    let (eth, veth, lo) = measure(7200)?;
    for (what, d) in [("pod eth0", eth), ("bridge veth", veth), ("lo", lo)] {
        assert!(
            d >= size,
            "not enrolled: {what} carried only {d} bytes of a {size}-byte transfer"
        );
    }
    Ok(())
}

#[test]
fn fionread_epoll_poll_and_nginx_under_wrk() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());

    // FIONREAD, epoll and poll on an accelerated pod-to-pod connection and on loopback.
    for (what, listen, ns) in [
        ("pod-to-pod", addr(b.ip, 7300), &b.netns_path),
        ("loopback", "127.0.0.1:7301".to_string(), &a.netns_path),
    ] {
        let before = lab.counter("bytes_redirected")?;
        let out = lab
            .cmd(&a, probe())?
            .args(["checks", "--listen", &listen, "--server-netns"])
            .arg(ns)
            .output()?;
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let checks: Value = serde_json::from_slice(&out.stdout)?;
        for c in checks.as_array().context("checks")? {
            assert_eq!(
                c["ok"], true,
                "{what}: check {} failed: {}",
                c["name"], c["detail"]
            );
        }
        assert!(
            lab.counter("bytes_redirected")? - before >= 4 * MIB,
            "{what}: the checks' traffic was not redirected"
        );
    }

    // nginx in b, wrk in a, through the fast path.
    let (nginx, url) = nginx_answering(&lab, &a, &b)?;
    let result = (|| -> Result<()> {
        for path in ["1k", "256k"] {
            let before = lab.counter("bytes_redirected")?;
            let out = lab
                .cmd(&a, "wrk")?
                .args([
                    "-t2",
                    "-c32",
                    "-d4s",
                    "--latency",
                    "--timeout",
                    "2s",
                    &format!("{url}/{path}"),
                ])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "wrk failed: {text}");
            let w = parse_wrk(&text).with_context(|| format!("wrk output: {text}"))?;
            assert!(
                w.requests > 100,
                "{path}: only {} requests: {text}",
                w.requests
            );
            assert_eq!(w.errors, 0, "{path}: wrk saw errors: {text}");
            assert!(
                w.max_latency < Duration::from_secs(1),
                "{path}: a request took {:?}: {text}",
                w.max_latency
            );
            let redirected = lab.counter("bytes_redirected")? - before;
            assert!(
                redirected >= w.requests * 1024,
                "{path}: only {redirected} bytes redirected for {} requests",
                w.requests
            );
        }
        Ok(())
    })();
    drop(nginx);
    result
}

/// nginx in `b` serving `/1k` and `/256k`, answering `a`'s curl (waited for with a deadline).
/// Returns the server (stopped on drop) and its base URL.
fn nginx_answering(lab: &Lab, a: &Pod, b: &Pod) -> Result<(meshlane_lab::svc::Proc, String)> {
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("1k"), vec![b'x'; 1024])?;
    std::fs::write(www.join("256k"), vec![b'y'; 256 * 1024])?;
    let nginx = meshlane_lab::svc::nginx(lab, b, &format!("{}:8080", b.ip), &www)?;
    let url = format!("http://{}:8080", b.ip);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab
        .cmd(a, "curl")?
        .args(["-sf", "-o", "/dev/null", &format!("{url}/1k")])
        .status()?
        .success()
    {
        if Instant::now() > deadline {
            bail!("nginx did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((nginx, url))
}

/// The kill switch in the middle of keep-alive traffic: nginx's connections stay in the fast path
/// until they close (no SOCKHASH socket receives bytes through the stack, which FIONREAD does not
/// count on this kernel: 929e30f93125 without 04af4efde58a), new connections stay on the stack,
/// and no request stalls or fails.
#[test]
fn the_kill_switch_keeps_keepalive_readers_working() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let (nginx, url) = nginx_answering(&lab, &a, &b)?;
    let url = format!("{url}/1k");
    let result = (|| -> Result<()> {
        let redirected0 = lab.counter("bytes_redirected")?;
        let mut wrk = lab.cmd(&a, "wrk")?;
        wrk.args(["-t1", "-c8", "-d6s", "--latency", "--timeout", "2s", &url]);
        let wrk = spawn_piped(&mut wrk)?;
        // Keep-alive connections established and accelerated, then the switch.
        let deadline = Instant::now() + Duration::from_secs(10);
        while lab.counter("bytes_redirected")? < redirected0 + 1000 * 1024 {
            if Instant::now() > deadline {
                bail!("wrk's traffic was never redirected");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (counters0, redirected1) = (lab.counters()?, lab.counter("bytes_redirected")?);
        let out = lab.cli(&["accel", "off"])?;
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.contains("stay in the fast path until they close"),
            "{said}"
        );
        let out = wrk.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "wrk failed: {text}");
        let w = parse_wrk(&text).with_context(|| format!("wrk output: {text}"))?;
        let counters1 = lab.counters()?;
        let delta = |k: &str| {
            counters1.get(k).copied().unwrap_or(0) - counters0.get(k).copied().unwrap_or(0)
        };
        let redirected = lab.counter("bytes_redirected")? - redirected1;
        eprintln!(
            "after accel off: {redirected} bytes redirected, {} through the stack from sockets \
             in the map; {} requests, max {:?}",
            delta("bytes_passed"),
            w.requests,
            w.max_latency
        );
        // No socket in the map left the fast path because of the switch...
        for reason in [
            "pass_accel_off",
            "pass_self_not_enrolled",
            "pass_peer_not_local",
            "pass_peer_not_enrolled",
            "pass_sticky_stack",
        ] {
            assert_eq!(
                delta(reason),
                0,
                "{reason}: a socket in the map sent through the stack"
            );
        }
        // ...the only messages passed are nginx's answers to requests in flight when wrk closed
        // its 8 connections (their peer socket had left the map): at most one per connection.
        assert!(
            delta("pass_peer_socket_missing") <= 8,
            "{} messages passed with the peer gone",
            delta("pass_peer_socket_missing")
        );
        assert!(
            redirected > 100 * 1024,
            "the established connections left the fast path: {redirected}"
        );
        assert!(w.requests >= 1000, "only {} requests: {text}", w.requests);
        assert_eq!(w.errors, 0, "wrk saw errors: {text}");
        assert!(
            w.max_latency < Duration::from_secs(1),
            "a request took {:?}: {text}",
            w.max_latency
        );
        // A connection made now stays on the stack.
        let off = lab.counter("sock_accel_off")?;
        let ok = lab
            .cmd(&a, "curl")?
            .args(["-sf", "-o", "/dev/null", &url])
            .status()?;
        assert!(ok.success(), "curl after accel off failed");
        assert!(
            lab.counter("sock_accel_off")? >= off + 2,
            "the new connection was accelerated"
        );
        Ok(())
    })();
    drop(nginx);
    result
}

/// FIONREAD, MSG_PEEK, epoll and poll on a pair that was established before `accel off` and
/// stays in the SOCKHASH after it: the same values and wakeups as before the switch.
#[test]
fn sockets_left_in_the_map_after_accel_off_read_right() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    for (what, listen, ns) in [
        ("pod-to-pod", addr(b.ip, 7310), &b.netns_path),
        ("loopback", "127.0.0.1:7311".to_string(), &a.netns_path),
    ] {
        lab.call(&Request::Accel {
            on: true,
            move_established: false,
        })?;
        let mut child = lab
            .cmd(&a, probe())?
            .args(["checks", "--hold", "--listen", &listen, "--server-netns"])
            .arg(ns)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let (_, lines) = wait_for_line(&mut child, Duration::from_secs(10), |l| l == "connected")?;
        lab.call(&Request::Accel {
            on: false,
            move_established: false,
        })?;
        let (redirected0, passed0) = (
            lab.counter("bytes_redirected")?,
            lab.counter("bytes_passed")?,
        );
        use std::io::Write as _;
        child.stdin.take().context("stdin")?.write_all(b"go\n")?;
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("{what}: the checks printed nothing"))?;
        let out = child.wait_with_output()?;
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let checks: Value = serde_json::from_str(&line)?;
        let names: Vec<&str> = checks
            .as_array()
            .context("checks")?
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        for want in [
            "byte_exact",
            "fionread",
            "msg_peek",
            "epoll_wakeup",
            "poll_wakeup",
        ] {
            assert!(
                names.contains(&want),
                "{what}: no {want} check in {names:?}"
            );
        }
        for c in checks.as_array().context("checks")? {
            assert_eq!(
                c["ok"], true,
                "{what}: check {} failed after accel off: {}",
                c["name"], c["detail"]
            );
        }
        assert!(
            lab.counter("bytes_redirected")? - redirected0 >= 4 * MIB,
            "{what}: the pair left the fast path"
        );
        assert_eq!(
            lab.counter("bytes_passed")?,
            passed0,
            "{what}: bytes went through the stack"
        );
    }
    Ok(())
}

/// `accel off --move-established` does what the self-test allows: on a kernel where a SOCKHASH
/// socket receiving through the stack misreports (this one), it is refused, names why, and
/// changes nothing.
#[test]
fn moving_established_connections_follows_the_self_test() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let st = lab.call(&Request::Status)?;
    let stack = st["selftest"]["stack_delivery"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = stack.iter().filter_map(|c| c["name"].as_str()).collect();
    for want in [
        "stack_fionread",
        "stack_msg_peek",
        "stack_epoll_wakeup",
        "stack_path",
    ] {
        assert!(
            names.contains(&want),
            "no {want} in the self-test's stack checks: {stack:?}"
        );
    }
    // The phase proved it used the stack, or its verdict would mean nothing.
    assert!(
        stack
            .iter()
            .any(|c| c["name"] == "stack_path" && c["ok"] == true),
        "{stack:?}"
    );
    let allowed = stack.iter().all(|c| c["ok"] == true);
    eprintln!("self-test, stack bytes on SOCKHASH sockets: {stack:?}");
    let out = lab.cli(&["accel", "off", "--move-established"])?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let after = lab.call(&Request::Status)?;
    if allowed {
        assert!(out.status.success(), "{err}");
        assert_eq!(after["established_moved"], true);
    } else {
        assert!(!out.status.success(), "refusal expected");
        for c in stack.iter().filter(|c| c["ok"] != true) {
            let name = c["name"].as_str().unwrap_or_default();
            assert!(
                err.contains(name),
                "the refusal does not name {name}: {err}"
            );
        }
        assert!(err.contains("Nothing changed"), "{err}");
        assert_eq!(
            after["accelerate"], true,
            "the refusal changed acceleration"
        );
        assert_eq!(after["established_moved"], false);
    }
    // Never together with `on`.
    let out = lab.cli(&["accel", "on", "--move-established"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("accel off"));
    Ok(())
}

struct Wrk {
    requests: u64,
    errors: u64,
    max_latency: Duration,
}

fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(Duration::from_secs_f64(match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    }))
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut requests = None;
    let mut errors = 0u64;
    let mut max_latency = None;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency") && max_latency.is_none() {
            // "Latency   1.2ms  300us  12.3ms  90%"
            max_latency = parse_duration(t.split_whitespace().nth(3)?);
        } else if t.contains("requests in") {
            requests = t.split_whitespace().next()?.parse().ok();
        } else if let Some(rest) = t.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().ok()?;
        }
    }
    Some(Wrk {
        requests: requests?,
        errors,
        max_latency: max_latency?,
    })
}

#[test]
fn identical_loopback_tuples_in_two_pods_never_meet() -> Result<()> {
    let mut lab = lab(&["a", "b"], true, &[])?;
    let c = lab.add_pod("c")?; // never enrolled
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());

    // Both pods: server on 127.0.0.1:15001, client bound to 127.0.0.1:40000 — the same 4-tuple
    // in two namespaces, alive at the same time, streaming.
    let before = lab.counter("msg_redirected")?;
    let sa = serve(&lab, Some(&a), "127.0.0.1:15001", &["--tag", "a"])?;
    let sb = serve(&lab, Some(&b), "127.0.0.1:15001", &["--tag", "b"])?;
    let args = |tag: &'static str| {
        vec![
            "--bind",
            "127.0.0.1:40000",
            "--expect-tag",
            tag,
            "--bytes",
            "8388608",
            "--chunk",
            "16384",
            "--pace-ms",
            "1",
        ]
    };
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| send(&lab, Some(&a), sa.addr, &args("a")));
        let hb = s.spawn(|| send(&lab, Some(&b), sb.addr, &args("b")));
        (ha.join().expect("a"), hb.join().expect("b"))
    });
    ra.context("pod a")?;
    rb.context("pod b")?;
    for (p, s) in [("a", sa), ("b", sb)] {
        let v = s.finish(Duration::from_secs(30))?;
        assert_eq!(v["bytes"], 8 * MIB, "pod {p}'s server got {v}");
        assert_eq!(v["bad"], 0, "pod {p}'s server saw foreign bytes: {v}");
    }
    assert!(
        lab.counter("msg_redirected")? > before,
        "the two loopback streams were not accelerated at all"
    );

    // An un-enrolled pod and the host namespace: sockets are seen by sockops (they are in the
    // lab cgroup) but never inserted, never redirected.
    for (what, pod, listen) in [
        ("un-enrolled pod", Some(&c), "127.0.0.1:7400"),
        ("host netns", None, "127.0.0.1:0"),
    ] {
        let (msgs, seen) = (
            lab.counter("msg_redirected")?,
            lab.counter("sock_not_enrolled")?,
        );
        let srv = serve(&lab, pod, listen, &[])?;
        send(&lab, pod, srv.addr, &["--bytes", &(4 * MIB).to_string()])?;
        srv.finish(Duration::from_secs(30))?;
        assert_eq!(
            lab.counter("msg_redirected")?,
            msgs,
            "{what}: messages were redirected"
        );
        assert!(
            lab.counter("sock_not_enrolled")? >= seen + 2,
            "{what}: sockops did not see the sockets (is the process in the lab cgroup?)"
        );
    }

    // And the host namespace cannot be enrolled.
    let err = lab
        .call(&Request::PodAdd {
            netns: "/proc/self/ns/net".into(),
            ips: vec!["10.77.0.99".parse()?],
            name: None,
            sidecar: None,
            accel: None,
            telemetry: None,
            cni: None,
        })
        .expect_err("enrolling the host netns must fail");
    assert!(err.to_string().contains("host"), "{err}");
    Ok(())
}

#[test]
fn agent_restart_keeps_connections_and_acceleration() -> Result<()> {
    let mut lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let bytes = 2 * MIB;

    for how in ["SIGKILL", "SIGTERM"] {
        let (redirected0, passed0) = (
            lab.counter("bytes_redirected")?,
            lab.counter("bytes_passed")?,
        );
        // 200 connections streaming 2 MiB each in 16 KiB chunks every 150 ms (~19 s each): long
        // enough to outlast the agent's restart (self-test included) on a loaded machine.
        let srv = serve(&lab, Some(&b), &addr(b.ip, 7500), &["--conns", "200"])?;
        let mut client = lab.cmd(&a, probe())?;
        client.args([
            "send",
            "--to",
            &srv.addr.to_string(),
            "--conns",
            "200",
            "--parallel",
        ]);
        client.args([
            "--bytes",
            &bytes.to_string(),
            "--chunk",
            "16384",
            "--pace-ms",
            "150",
        ]);
        let mut client = spawn_piped(&mut client)?;
        // Both ends of all 200 connections in the SOCKHASH before the agent goes away.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let sockets = lab.call(&Request::Status)?["sockhash_sockets"]
                .as_u64()
                .unwrap_or(0);
            if sockets >= 400 {
                break;
            }
            assert!(
                Instant::now() < deadline && client.try_wait()?.is_none(),
                "{how}: only {sockets} sockets accelerated before the restart"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if how == "SIGKILL" {
            lab.kill_agent()?;
        } else {
            lab.stop_agent()?;
        }
        // The agent stays away for a moment: connections must not notice either way.
        std::thread::sleep(Duration::from_millis(300));
        let restart = Instant::now();
        lab.restart_agent(&[])?;
        eprintln!(
            "{how}: the agent was back (self-test passed, API up) after {:?}",
            restart.elapsed()
        );
        assert!(
            client.try_wait()?.is_none(),
            "{how}: the transfers ended before the agent was back; the test proves nothing"
        );

        let out = client.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{how}: connections broke across the restart: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = srv.finish(Duration::from_secs(60))?;
        assert_eq!(summary["bytes"], 200 * bytes, "{how}: {summary}");
        assert_eq!(summary["bad"], 0, "{how}: {summary}");
        assert_eq!(
            summary["errors"].as_array().map(Vec::len),
            Some(0),
            "{how}: {summary}"
        );
        // Every byte of every stream went through the fast path, before, during and after; the
        // only bytes through the stack are the restarted agent's self-test's own.
        let redirected = lab.counter("bytes_redirected")? - redirected0;
        let passed = lab.counter("bytes_passed")? - passed0;
        let selftest = lab.call(&Request::Status)?["selftest"]["stack_bytes"]
            .as_u64()
            .context("selftest.stack_bytes")?;
        assert!(
            redirected >= 200 * bytes && passed == selftest,
            "{how}: {redirected} bytes redirected and {passed} passed to the stack ({selftest} \
             of them the self-test's) for {} bytes sent",
            200 * bytes
        );

        // New connections after the restart are accelerated.
        let before = lab.counter("bytes_redirected")?;
        let s2 = serve(&lab, Some(&b), &addr(b.ip, 7501), &[])?;
        send(
            &lab,
            Some(&a),
            s2.addr,
            &["--bytes", &(8 * MIB).to_string()],
        )?;
        s2.finish(Duration::from_secs(30))?;
        assert!(
            lab.counter("bytes_redirected")? - before >= 8 * MIB,
            "{how}: a new connection after the restart was not accelerated"
        );
        // One sockops program on the lab cgroup, not one per agent start.
        let progs = lab.bpftool_cgroup()?;
        assert_eq!(
            progs.matches("sock_ops").count(),
            1,
            "{how}: bpftool shows {progs}"
        );
    }
    Ok(())
}

/// The opt-outs for workloads known to read with splice(2): a pod enrolled without the fast
/// path, and ports a pod keeps off it at either end, stay on the stack (shown by the veth's own
/// counters) while everything else of the node is accelerated; bad settings are refused.
#[test]
fn opt_outs_keep_a_pod_or_its_ports_off_the_fast_path() -> Result<()> {
    let lab = lab(&["a", "b", "c"], false, &[])?;
    let (a, b, c) = (
        lab.pod("a").clone(),
        lab.pod("b").clone(),
        lab.pod("c").clone(),
    );
    let add = |p: &Pod, accel: Option<AccelSpec>| {
        lab.call(&Request::PodAdd {
            netns: p.netns_path.clone(),
            ips: vec![p.ip.into(), p.ip6.into()],
            name: Some(format!("lab/{}", p.name)),
            sidecar: None,
            accel,
            telemetry: None,
            cni: None,
        })
    };
    for (bad, field) in [
        (vec![0u16], "accel.exclude_ports[0]"),
        (vec![80, 80], "given twice"),
        ((1..=65).collect(), "at most 64"),
    ] {
        let err = add(
            &c,
            Some(AccelSpec {
                enabled: true,
                exclude_ports: bad,
            }),
        )
        .expect_err("bad accel settings were accepted");
        assert!(format!("{err:#}").contains(field), "{err:#}");
    }
    assert_eq!(lab.call(&Request::PodList)?, serde_json::json!([]));
    add(&a, None)?;
    let pb = add(
        &b,
        Some(AccelSpec {
            enabled: false,
            exclude_ports: vec![],
        }),
    )?;
    assert_eq!(pb["accel"]["enabled"], false, "{pb}");
    add(
        &c,
        Some(AccelSpec {
            enabled: true,
            exclude_ports: vec![7901],
        }),
    )?;

    // One transfer from `from` to `to`:port: (bytes redirected, bytes through from's veth).
    let transfer = |from: &Pod, to: &Pod, port: u16| -> Result<(u64, u64)> {
        let veth = |p: &Pod| Lab::link_bytes(&lab.node_ns, &p.host_veth).map(|(rx, tx)| rx + tx);
        let (r0, v0) = (lab.counter("bytes_redirected")?, veth(from)?);
        meshlane_lab::probe::transfer(&lab, from, to, port, 8 * MIB)?;
        Ok((lab.counter("bytes_redirected")? - r0, veth(from)? - v0))
    };
    let excluded0 = lab.counter("sock_port_excluded")?;
    for (what, from, to, port, accelerated) in [
        ("a → b (b not accelerated)", &a, &b, 7900, false),
        ("a → c:7901 (c's excluded port)", &a, &c, 7901, false),
        (
            "c → a:7901 (c's excluded port, as the client's)",
            &c,
            &a,
            7901,
            false,
        ),
        ("a → c:7902", &a, &c, 7902, true),
        ("c → a:7903", &c, &a, 7903, true),
    ] {
        let (redirected, veth) = transfer(from, to, port)?;
        if accelerated {
            assert!(
                redirected >= 8 * MIB && veth < 2 * MIB,
                "{what}: {redirected} B redirected, {veth} B through the veth"
            );
        } else {
            assert!(
                redirected == 0 && veth >= 8 * MIB,
                "{what}: {redirected} B redirected, {veth} B through the veth"
            );
        }
    }
    // Both ends of the two connections with the excluded port were counted.
    assert!(
        lab.counter("sock_port_excluded")? - excluded0 >= 3,
        "sock_port_excluded did not count the excluded connections"
    );
    // Removing c removes its excluded port from the map.
    lab.unenroll(&c)?;
    assert_eq!(map_entries(&lab, "ML_NOACCEL")?, 0);
    Ok(())
}

#[test]
fn full_sockhash_falls_back_to_the_stack() -> Result<()> {
    let lab = lab(&["a", "b"], true, &["--sockhash-capacity", "8"])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let full_before = lab.counter("sock_map_full")?;
    let srv = serve(&lab, Some(&b), &addr(b.ip, 7600), &["--conns", "20"])?;
    send(
        &lab,
        Some(&a),
        srv.addr,
        &[
            "--conns",
            "20",
            "--parallel",
            "--bytes",
            &MIB.to_string(),
            "--chunk",
            "16384",
            "--pace-ms",
            "5",
        ],
    )?;
    let summary = srv.finish(Duration::from_secs(60))?;
    assert_eq!(summary["bad"], 0, "{summary}");
    assert_eq!(summary["bytes"], 20 * MIB, "{summary}");
    let counters = lab.counters()?;
    let full = counters["sock_map_full"] - full_before;
    assert!(
        full > 0,
        "40 sockets into an 8-entry SOCKHASH and no sock_map_full was counted: {counters:?}"
    );
    Ok(())
}

#[test]
fn kill_switch_turns_redirect_off_and_on() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let out = lab.cli(&["accel", "off"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (redirected, off) = (
        lab.counter("bytes_redirected")?,
        lab.counter("sock_accel_off")?,
    );
    let srv = serve(&lab, Some(&b), &addr(b.ip, 7700), &["--conns", "2"])?;
    send(
        &lab,
        Some(&a),
        srv.addr,
        &["--bytes", &(4 * MIB).to_string()],
    )?;
    assert_eq!(
        lab.counter("bytes_redirected")?,
        redirected,
        "redirected while switched off"
    );
    // Connections made while switched off never enter the SOCKHASH at all.
    assert!(
        lab.counter("sock_accel_off")? >= off + 2,
        "sock_accel_off was not counted"
    );
    let out = lab.cli(&["accel", "on"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    send(
        &lab,
        Some(&a),
        srv.addr,
        &["--bytes", &(4 * MIB).to_string()],
    )?;
    assert!(
        lab.counter("bytes_redirected")? - redirected >= 4 * MIB,
        "not redirected after accel on"
    );
    srv.finish(Duration::from_secs(30))?;
    Ok(())
}

/// Entries of a pinned map, as bpftool sees them.
#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() -> Result<()> {
    let mut lab = lab(&["a"], false, &[])?;
    let b = lab.add_pod("b")?;
    let a = lab.pod("a").clone();
    lab.enroll(&a)?;
    let snapshot = |lab: &Lab| -> Result<(Value, usize, usize)> {
        Ok((
            lab.call(&Request::PodList)?,
            map_entries(lab, "ML_NETNS")?,
            map_entries(lab, "ML_ENDPOINTS")?,
        ))
    };
    let before = snapshot(&lab)?;
    assert_eq!(before.1, 1, "one enrolled netns expected");
    assert_eq!(before.2, 2, "pod a's IPv4 and IPv6 endpoints expected");

    let netns_b = b.netns_path.display().to_string();
    let cases: Vec<(String, &str, ErrorKind)> = vec![
        (
            "this is not json".into(),
            "malformed request",
            ErrorKind::InvalidInput,
        ),
        (
            r#"{"op":"pod_launch"}"#.into(),
            "unknown variant",
            ErrorKind::InvalidInput,
        ),
        (
            r#"{"op":"pod_add","netns":"/run/netns/does-not-exist","ips":["10.77.0.50"]}"#.into(),
            "does-not-exist",
            ErrorKind::InvalidInput,
        ),
        (
            r#"{"op":"pod_add","netns":"relative/path","ips":["10.77.0.50"]}"#.into(),
            "absolute",
            ErrorKind::InvalidInput,
        ),
        (
            r#"{"op":"pod_add","netns":"/etc/hostname","ips":["10.77.0.50"]}"#.into(),
            "not a namespace",
            ErrorKind::InvalidInput,
        ),
        (
            r#"{"op":"pod_add","netns":"/proc/self/ns/net","ips":["10.77.0.50"]}"#.into(),
            "host",
            ErrorKind::InvalidInput,
        ),
        (
            format!(r#"{{"op":"pod_add","netns":"{netns_b}","ips":[]}}"#),
            "at least one",
            ErrorKind::InvalidInput,
        ),
        (
            format!(r#"{{"op":"pod_add","netns":"{netns_b}","ips":["127.0.0.1"]}}"#),
            "not a unicast",
            ErrorKind::InvalidInput,
        ),
        (
            format!(
                r#"{{"op":"pod_add","netns":"{netns_b}","ips":["10.77.0.50"],"name":"Bad Name"}}"#
            ),
            "NAMESPACE/NAME",
            ErrorKind::InvalidInput,
        ),
        (
            format!(
                r#"{{"op":"pod_add","netns":"{netns_b}","ips":["{}"]}}"#,
                a.ip
            ),
            "already belongs",
            ErrorKind::Conflict,
        ),
        (
            format!(
                r#"{{"op":"pod_add","netns":"{}","ips":["10.77.0.51"]}}"#,
                a.netns_path.display()
            ),
            "already enrolled",
            ErrorKind::Conflict,
        ),
        (
            format!(
                r#"{{"op":"pod_add","netns":"{netns_b}","ips":["10.77.0.50"],"name":"lab/a"}}"#
            ),
            "already enrolled",
            ErrorKind::Conflict,
        ),
        (
            r#"{"op":"pod_del","name":"lab/nobody"}"#.into(),
            "no enrolled pod",
            ErrorKind::NotFound,
        ),
        (
            r#"{"op":"pod_del","netns":"/run/netns/x","name":"lab/a"}"#.into(),
            "exactly one",
            ErrorKind::InvalidInput,
        ),
        (
            r#"{"op":"pod_del"}"#.into(),
            "exactly one",
            ErrorKind::InvalidInput,
        ),
    ];
    for (line, want, kind) in &cases {
        let resp = lab.client()?.call_raw(line)?;
        assert!(!resp.ok, "{line} was accepted");
        let err = resp
            .error
            .with_context(|| format!("{line}: refused without an error"))?;
        assert!(
            err.message.contains(want),
            "{line}: error {err:?} does not mention {want:?}"
        );
        assert_eq!(err.kind, *kind, "{line}: {err:?}");
        assert_eq!(snapshot(&lab)?, before, "{line} changed the state");
    }
    // A line past the size limit is refused without being parsed.
    let huge = format!(r#"{{"op":"status","pad":"{}"}}"#, "x".repeat(100_000));
    let resp = lab.client()?.call_raw(&huge)?;
    let err = resp
        .error
        .context("an oversized request refused without an error")?;
    assert!(!resp.ok && err.message.contains("limit"), "{err:?}");
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    assert_eq!(snapshot(&lab)?, before);

    // The CLI reports the agent's error and exits non-zero.
    let out = lab.cli(&[
        "pod",
        "add",
        "--netns",
        "/run/netns/nope",
        "--ip",
        "10.77.0.60",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/run/netns/nope"), "CLI said: {err}");
    assert_eq!(snapshot(&lab)?, before);
    Ok(())
}

/// Every operation through the typed client (typed request → agent → typed answer), and every
/// refusal kind, each provoked the way a caller would meet it.
#[test]
fn api_round_trip_per_operation_with_every_refusal_kind() -> Result<()> {
    let mut lab = lab(&["a", "b", "c"], false, &[])?;
    let (a, b, c) = (
        lab.pod("a").clone(),
        lab.pod("b").clone(),
        lab.pod("c").clone(),
    );
    let mut api = lab.client()?;

    let st = api.status()?;
    assert!(
        st.selftest.passed && st.accelerate && st.accel_wanted,
        "{st:?}"
    );
    assert_eq!((st.pods, st.sidecar_pods), (0, 0));
    assert!(st.counters.contains_key("msg_redirected"), "{st:?}");

    let add = |api: &mut meshlane_api::Client, p: &Pod, sc: Option<SidecarSpec>| {
        api.pod_add(
            p.netns_path.clone(),
            vec![p.ip.into(), p.ip6.into()],
            Some(format!("lab/{}", p.name)),
            sc,
            None,
        )
    };
    let pa = add(&mut api, &a, None)?;
    let pb = add(&mut api, &b, None)?;
    let pc = add(&mut api, &c, Some(SidecarSpec::default()))?;
    assert_eq!(pa.name.as_deref(), Some("lab/a"));
    assert_eq!(pa.ips, vec![std::net::IpAddr::from(a.ip), a.ip6.into()]);
    assert_eq!(pa.netns, a.netns_path);
    assert!(pa.sidecar.is_none() && pc.sidecar == Some(SidecarSpec::default()));
    assert!(pa.id != pb.id && pb.id != pc.id, "{pa:?} {pb:?} {pc:?}");
    assert_eq!(api.pod_list()?, vec![pa.clone(), pb.clone(), pc.clone()]);
    assert_eq!(api.status()?.sidecar_pods, 1);

    // Sockets: a paced stream a → b shows up with both ends named by their pods.
    let srv = serve(&lab, Some(&b), &addr(b.ip, 7700), &[])?;
    let mut client = lab.cmd(&a, probe())?;
    client.args(["send", "--to", &srv.addr.to_string()]);
    client.args([
        "--bytes",
        &(2 * MIB).to_string(),
        "--chunk",
        "16384",
        "--pace-ms",
        "40",
    ]);
    let client = spawn_piped(&mut client)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (sender, receiver) = loop {
        let socks = api.sockets()?;
        let sender = socks
            .iter()
            .find(|s| s.pod.as_deref() == Some("lab/a") && s.remote == srv.addr)
            .cloned();
        let receiver = socks
            .iter()
            .find(|s| s.pod.as_deref() == Some("lab/b") && s.local == srv.addr)
            .cloned();
        if let (Some(s), Some(r)) = (&sender, &receiver)
            && s.redirected_bytes > 0
        {
            break (s.clone(), r.clone());
        }
        assert!(
            Instant::now() < deadline,
            "the stream never showed in sockets: {socks:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sender.local, receiver.remote, "{sender:?} {receiver:?}");
    assert_eq!(sender.stack_bytes, 0, "{sender:?}");
    let out = client.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(srv.finish(Duration::from_secs(30))?["bytes"], 2 * MIB);

    let svc = api.services()?;
    assert_eq!((svc.summary.file.as_ref(), svc.summary.services), (None, 0));
    assert!(svc.services.is_empty());

    assert!(!api.accel(false, false)?.accelerate);
    assert!(!api.status()?.accelerate);
    assert!(api.accel(true, false)?.accelerate);

    // Refusals, one per kind.
    let kind = |r: Result<meshlane_api::types::Pod, meshlane_api::ClientError>| {
        r.err().and_then(|e| e.refusal_kind())
    };
    let relative = api.pod_add("relative".into(), vec![c.ip.into()], None, None, None);
    assert_eq!(kind(relative), Some(ErrorKind::InvalidInput));
    assert_eq!(
        kind(api.pod_del(None, Some("lab/nobody".into()))),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(kind(add(&mut api, &b, None)), Some(ErrorKind::Conflict));
    // The state file cannot be written (its temporary path is a directory): the agent fails,
    // says where, and changes nothing.
    let tmp = lab.agent().state.with_extension("json.tmp");
    std::fs::create_dir(&tmp)?;
    let del = api.pod_del(Some(a.netns_path.clone()), None);
    std::fs::remove_dir(&tmp)?;
    let err = del
        .err()
        .context("pod del succeeded with an unwritable state file")?;
    assert_eq!(err.refusal_kind(), Some(ErrorKind::Internal), "{err}");
    assert!(err.to_string().contains("json.tmp"), "{err}");
    assert_eq!(api.pod_list()?.len(), 3);

    assert_eq!(api.pod_del(Some(a.netns_path.clone()), None)?, pa);
    assert_eq!(api.pod_list()?, vec![pb, pc]);

    // Without a passed self-test, acceleration cannot be switched on: unavailable.
    lab.stop_agent()?;
    lab.restart_agent(&["--no-selftest"])?;
    let mut api = lab.client()?;
    let err = api
        .accel(true, false)
        .err()
        .context("accel on without a self-test")?;
    assert_eq!(err.refusal_kind(), Some(ErrorKind::Unavailable), "{err}");
    assert!(!api.status()?.accelerate);

    let gone = api.uninstall()?;
    assert!(
        gone.unpinned.iter().any(|p| p.ends_with("ML_SOCKS")),
        "{gone:?}"
    );
    Ok(())
}

#[test]
fn uninstall_detaches_and_unpins_everything() -> Result<()> {
    let lab = lab(&["a"], true, &[])?;
    assert!(lab.bpftool_cgroup()?.contains("sock_ops"));
    let bpffs = lab.agent().bpffs.clone();
    let pinned = walk(&meshlane_api::pins::PinPaths::new(&bpffs).root);
    assert!(
        pinned.iter().any(|p| p.ends_with("ML_SOCKS")),
        "nothing pinned where the check below looks: {pinned:?}"
    );
    let out = lab.cli(&["uninstall"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent exits by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = lab.agent_log();
    while lab.client().is_ok() {
        assert!(
            Instant::now() < deadline,
            "the agent kept running after uninstall: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !lab.bpftool_cgroup()?.contains("sock_ops"),
        "sockops still attached"
    );
    // The bpffs root keeps the kernel's own preloaded iterators (maps.debug, progs.debug);
    // everything meshlane pinned lives under v<ABI>/.
    let root = meshlane_api::pins::PinPaths::new(&bpffs).root;
    let left: Vec<_> = walk(&root);
    assert!(left.is_empty(), "pins left behind: {left:?}");
    assert!(
        !root.exists(),
        "the versioned pin directory {} is still there",
        root.display()
    );
    Ok(())
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn metrics_match_status_and_only_metrics_is_served() -> Result<()> {
    let lab = lab(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let srv = serve(&lab, Some(&b), &addr(b.ip, 7800), &[])?;
    send(
        &lab,
        Some(&a),
        srv.addr,
        &["--bytes", &(2 * MIB).to_string()],
    )?;
    srv.finish(Duration::from_secs(30))?;
    let url = format!("http://{}/metrics", lab.metrics_addr()?);
    let out = meshlane_lab::run(Command::new("curl").args(["-sf", &url]))?;
    let text = String::from_utf8(out.stdout)?;
    let status = lab.counters()?;
    for name in ["bytes_redirected", "sock_inserted", "msg_redirected"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "meshlane_dataplane_events_total{{reason=\"{name}\"}}"
                ))
            })
            .with_context(|| format!("no {name} series in:\n{text}"))?;
        let v: u64 = line.rsplit(' ').next().unwrap_or("").parse()?;
        // The counters only grow, and nothing runs between the scrape and the status call.
        assert_eq!(
            v, status[name],
            "{name}: /metrics says {v}, status says {}",
            status[name]
        );
    }
    assert!(
        text.contains("# TYPE meshlane_dataplane_events counter"),
        "{text}"
    );
    assert!(text.contains("meshlane_accelerate 1"), "{text}");
    assert!(text.contains("meshlane_pods 2"), "{text}");
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(url.replace("/metrics", "/nope"))
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    Ok(())
}

#[test]
fn a_pin_with_another_layout_is_refused_with_a_clear_error() -> Result<()> {
    let mut lab = lab(&["a"], true, &["--sockhash-capacity", "64"])?;
    lab.stop_agent()?;
    // Same bpffs, another capacity: the pinned SOCKHASH no longer fits this agent.
    let err = lab
        .start_agent(&[])
        .expect_err("an agent must not reuse a map of another size");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("ML_SOCKS") && msg.contains("64 entries") && msg.contains("65536 entries"),
        "unclear refusal: {msg}"
    );
    // What was pinned keeps working: the original capacity starts fine and finds its pod.
    lab.start_agent(&["--sockhash-capacity", "64"])?;
    let pods = lab.call(&Request::PodList)?;
    assert_eq!(pods.as_array().map(Vec::len), Some(1), "{pods}");
    Ok(())
}
