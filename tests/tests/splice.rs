//! The splice guard: a reader that uses splice(2) on an accelerated socket would see a silent
//! EOF (redirected bytes wait where splice never looks). The guard detects the first such read
//! and keeps the reader's pod off the fast path from then on, so at most the connections open at
//! that moment are affected.
//!
//! Run as root: `cargo test -p meshlane-lab --test splice -- --test-threads=1`.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use meshlane_api::Request;
use meshlane_lab::{Lab, spawn_piped, wait_for_line};

/// A server that reads every connection with os.splice (mode `sendfile`: os.sendfile) into a
/// pipe and prints the bytes it got; mode `echo` also answers every read with its length and
/// prints `eof` at the end. A failed read prints `error ERRNO`.
const SPLICE_SERVER: &str = r#"
import os, socket, sys
host, port, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(64)
print("listening", flush=True)
for _ in range(n):
    c, _ = s.accept()
    r, w = os.pipe()
    total = 0
    try:
        while True:
            if mode == "sendfile":
                k = os.sendfile(w, c.fileno(), None, 1 << 16)
            else:
                k = os.splice(c.fileno(), w, 1 << 16)
            if k == 0:
                break
            total += k
            left = k
            while left > 0:
                left -= len(os.read(r, left))
            if mode == "echo":
                c.sendall(str(k).encode() + b"\n")
        print("eof" if mode == "echo" else total, flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
    c.close()
    os.close(r)
    os.close(w)
"#;

/// A client that sends `size` bytes and closes.
const CLIENT: &str = r#"
import socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port))
c.sendall(bytes(i % 251 for i in range(size)))
c.shutdown(socket.SHUT_WR)
c.recv(1)
c.close()
"#;

#[test]
fn a_splice_reader_is_detected_and_kept_off_the_fast_path() -> Result<()> {
    reader_is_detected("splice")
}

/// sendfile(2) from a socket (into a pipe; the kernel refuses a regular file as the target) reads
/// through the same tcp_splice_read.
#[test]
fn a_sendfile_reader_is_detected_and_kept_off_the_fast_path() -> Result<()> {
    reader_is_detected("sendfile")
}

/// io_uring's IORING_OP_SPLICE from a socket: no splice syscall, the same tcp_splice_read (run by
/// the submitting thread or an io-wq worker of its process).
#[test]
fn an_io_uring_splice_reader_is_detected_and_kept_off_the_fast_path() -> Result<()> {
    reader_is_detected("io_uring")
}

fn reader_is_detected(mode: &str) -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let st = lab.call(&Request::Status)?;
    assert_eq!(
        st["reader_guard"]["active"], true,
        "{:#}",
        st["reader_guard"]
    );
    // Which guard, and what this kernel said to the stronger ones (probed, not assumed).
    let detail = st["reader_guard"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("splice guard: {detail}");
    assert!(
        detail.contains("BPF LSM") && detail.contains("fmod_ret"),
        "{detail}"
    );

    let sizes: Vec<usize> = vec![
        1 << 20,
        1,
        1000,
        64 << 10,
        1 << 20,
        4 << 20,
        7,
        256 << 10,
        2 << 20,
        16 << 20,
    ];
    let mut server = if mode == "io_uring" {
        let mut c = lab.cmd(&b, meshlane_lab::bin("ml-probe")?)?;
        c.args(["uring-splice-serve", "--listen", &format!("{}:7950", b.ip)])
            .args(["--conns", &sizes.len().to_string()]);
        c
    } else {
        let mut c = lab.cmd(&b, "python3")?;
        c.args([
            "-c",
            SPLICE_SERVER,
            &b.ip.to_string(),
            "7950",
            &sizes.len().to_string(),
            mode,
        ]);
        c
    };
    let mut server = spawn_piped(&mut server)?;
    let (_, lines) = wait_for_line(&mut server, Duration::from_secs(10), |l| {
        l.starts_with("listening")
    })?;

    let detected0 = lab.counter("splice_detected")?;
    let mut affected = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let out = lab
            .cmd(&a, "python3")?
            .args(["-c", CLIENT, &b.ip.to_string(), "7950", &size.to_string()])
            .output()?;
        // The server's account: the bytes it got, or `error ERRNO` (a connection the agent
        // reset, if it was still open when the guard saw the splice).
        let said = lines
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("the server did not report connection {i}"))?;
        let client_ok = out.status.success();
        if !client_ok {
            eprintln!(
                "client {i}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        match said.trim().parse::<usize>() {
            Ok(got) if got == *size && client_ok => {}
            Ok(got) => affected.push((i, *size, got)),
            Err(_) => {
                eprintln!("server, connection {i}: {said}");
                affected.push((i, *size, 0));
            }
        }
    }
    let _ = server.wait();
    // Only connections open when the first splice was seen may have lost bytes: here the
    // first, as each connection ends before the next begins.
    assert!(
        affected.iter().all(|(i, _, _)| *i == 0),
        "connections after the first detection lost bytes: {affected:?}"
    );
    assert!(
        lab.counter("splice_detected")? > detected0,
        "no splice was detected"
    );
    assert!(
        lab.counter("sock_reader_excluded")? > 0,
        "no socket was kept off the fast path"
    );
    let st = lab.call(&Request::Status)?;
    let pods = st["reader_guard"]["pods"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        pods.iter().any(|p| p["pod"] == "lab/b"
            && p["splice"].as_u64() >= Some(1)
            && p["excluded_sockets"].as_u64() >= Some(2 * (sizes.len() as u64 - 1))),
        "status does not list lab/b: {:#}",
        st["reader_guard"]
    );
    eprintln!(
        "{mode}: connections affected before the detection: {} of {} ({affected:?})",
        affected.len(),
        sizes.len()
    );
    // `meshlane status` says so in words.
    let out = lab.cli(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains("lab/b reads with splice")),
        "{text}"
    );
    Ok(())
}

/// A client that sends 1000 bytes and waits up to 10 s for the answer: prints `ok`, `timeout`, or
/// the error it got.
const ECHO_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
c = socket.create_connection((host, port))
c.settimeout(10)
c.sendall(b"x" * 1000)
try:
    got = c.recv(100)
    print("ok" if got.strip() == b"1000" else "answer %r" % got, flush=True)
except socket.timeout:
    print("timeout", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"#;

/// A splice reader in a request/response exchange: on the connection that was already in the fast
/// path when the guard saw the splice, the request waits in a queue splice never reads, so the
/// exchange would hang forever. The agent resets that connection (SOCK_DESTROY): both ends get an
/// error within a second or two, not a hang; the next connections work.
#[test]
fn a_splice_reader_in_a_request_response_fails_loudly_then_works() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let mut server = lab.cmd(&b, "python3")?;
    server.args(["-c", SPLICE_SERVER, &b.ip.to_string(), "7955", "3", "echo"]);
    let mut server = spawn_piped(&mut server)?;
    let (_, lines) = wait_for_line(&mut server, Duration::from_secs(10), |l| l == "listening")?;
    let mut said = Vec::new();
    for i in 0..3 {
        let started = std::time::Instant::now();
        let out = lab
            .cmd(&a, "python3")?
            .args(["-c", ECHO_CLIENT, &b.ip.to_string(), "7955"])
            .output()?;
        let client = String::from_utf8_lossy(&out.stdout).trim().to_string();
        said.push((i, client.clone(), started.elapsed()));
        if i == 0 {
            let srv = lines
                .recv_timeout(Duration::from_secs(10))
                .context("the server said nothing about connection 0")?;
            eprintln!(
                "connection 0: client {client:?}, server {srv:?} after {:?}",
                started.elapsed()
            );
            assert!(
                client.starts_with("error"),
                "connection 0 did not fail loudly: {said:?}"
            );
            assert!(
                srv.starts_with("error"),
                "the server's splice did not fail: {srv}"
            );
        } else {
            assert_eq!(client, "ok", "connection {i}: {said:?}");
        }
    }
    let _ = server.kill();
    let st = lab.call(&Request::Status)?;
    assert!(
        lab.counter("splice_detected")? > 0
            && st["reader_guard"]["reset_connections"].as_u64() >= Some(1),
        "{:#}",
        st["reader_guard"]
    );
    Ok(())
}

/// The plain Go io.Copy proxy built by the test set-up.
fn goproxy() -> Result<std::path::PathBuf> {
    let p = std::path::Path::new("/var/cache/meshlane/bin/goproxy");
    if !p.exists() {
        bail!("{} is missing: run deploy/setup-tests.sh", p.display());
    }
    Ok(p.into())
}

/// 50 connections, 1 B to 16 MiB, from `client` through a Go io.Copy proxy in pod `p` (listening
/// on `listen`) to an ml-probe server in `b`: returns the indexes of the connections that were not
/// byte-exact.
fn through_go_proxy(
    lab: &Lab,
    client: &meshlane_lab::Pod,
    p: &meshlane_lab::Pod,
    listen: &str,
    b: &meshlane_lab::Pod,
) -> Result<Vec<usize>> {
    let sizes: Vec<u64> = [1u64, 1000, 64 << 10, 1 << 20, 16 << 20]
        .iter()
        .copied()
        .cycle()
        .take(50)
        .collect();
    let upstream = format!("{}:7961", b.ip);
    let srv = meshlane_lab::probe::serve(
        lab,
        Some(b),
        &upstream,
        &["--conns", &sizes.len().to_string()],
    )?;
    let mut proxy = lab.cmd(p, goproxy()?)?;
    proxy.args([listen, &upstream]);
    let mut proxy = spawn_piped(&mut proxy)?;
    let result = (|| -> Result<Vec<usize>> {
        wait_for_line(&mut proxy, Duration::from_secs(10), |l| {
            l.starts_with("listening")
        })?;
        let mut bad = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let out = lab
                .cmd(client, meshlane_lab::bin("ml-probe")?)?
                .args(["send", "--to", listen, "--bytes", &size.to_string()])
                .output()?;
            if !out.status.success() {
                eprintln!(
                    "connection {i} ({size} B): {} {}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                bad.push(i);
            }
        }
        Ok(bad)
    })();
    let _ = proxy.kill();
    let _ = proxy.wait();
    drop(srv);
    result
}

/// A Go io.Copy proxy between an enrolled client and server, in an enrolled pod: every
/// connection after the first detection is byte-exact, and the counters say what happened.
#[test]
fn a_go_io_copy_proxy_loses_nothing_after_the_first_detection() -> Result<()> {
    let lab = Lab::with_agent(&["client", "proxy", "server"], true, &[])?;
    let (c, p, s) = (
        lab.pod("client").clone(),
        lab.pod("proxy").clone(),
        lab.pod("server").clone(),
    );
    let bad = through_go_proxy(&lab, &c, &p, &format!("{}:7960", p.ip), &s)?;
    eprintln!("pod to pod: connections not byte-exact: {bad:?} of 50");
    assert!(
        bad.iter().all(|&i| i == 0),
        "connections after the first detection failed: {bad:?}"
    );
    assert!(lab.counter("splice_detected")? > 0);
    let st = lab.call(&Request::Status)?;
    assert!(
        st["reader_guard"]["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["pod"] == "lab/proxy"),
        "{:#}",
        st["reader_guard"]
    );
    Ok(())
}

/// The same with the client and the proxy in one pod, over loopback.
#[test]
fn a_go_io_copy_proxy_over_loopback_loses_nothing_after_the_first_detection() -> Result<()> {
    let lab = Lab::with_agent(&["proxy", "server"], true, &[])?;
    let (p, s) = (lab.pod("proxy").clone(), lab.pod("server").clone());
    let bad = through_go_proxy(&lab, &p, &p, "127.0.0.1:7962", &s)?;
    eprintln!("loopback: connections not byte-exact: {bad:?} of 50");
    assert!(
        bad.iter().all(|&i| i == 0),
        "connections after the first detection failed: {bad:?}"
    );
    assert!(lab.counter("splice_detected")? > 0);
    Ok(())
}
