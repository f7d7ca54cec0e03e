//! Readers that rely on the TCP receive API beyond a plain read: a blocking `recv(MSG_WAITALL)`
//! and `SO_RCVLOWAT` (tcp_bpf honours neither for redirected bytes: on this kernel the first
//! MSG_WAITALL read of 1 MiB returned 327,680 bytes). The reader guard detects such a pod and
//! keeps its new connections on the stack, where the kernel honours both; `SO_RCVLOWAT` set on a
//! listening socket is seen before any connection exists.
//!
//! Run as root: `cargo test -p meshlane-lab --test readers -- --test-threads=1`.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use meshlane_lab::{Lab, spawn_piped, wait_for_line};

/// A server that reads each connection's `size` bytes with ONE blocking recv_into(MSG_WAITALL)
/// (mode `waitall`) and then plain reads for whatever that left, or with plain reads after
/// SO_RCVLOWAT=2 on the accepted socket (mode `lowat`; `lowat-listener` sets it on the listening
/// socket instead, before any connection), and prints what the first call returned, what the
/// connection carried in all, and whether it was exact. (SO_RCVLOWAT is a wakeup threshold, not
/// a read length: even the stack returns less than a large mark when the window fills first, so
/// only MSG_WAITALL's first read is held to the length asked.)
const WAITALL_SERVER: &str = r#"
import socket, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sizes = [int(x) for x in sys.argv[4].split(",")]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
if mode == "lowat-listener":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 2)
s.listen(64)
print("listening", flush=True)
for size in sizes:
    c, _ = s.accept()
    buf = bytearray(size)
    if mode == "lowat":
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 2)
    if mode.startswith("lowat"):
        first = c.recv_into(buf, size)
    else:
        first = c.recv_into(buf, size, socket.MSG_WAITALL)
    total = first
    while total < size:
        k = c.recv_into(memoryview(buf)[total:], size - total)
        if k == 0:
            break
        total += k
    exact = bytes(buf[:total]) == bytes(i % 251 for i in range(total))
    print(first, total, int(exact), flush=True)
    c.sendall(b"k")
    c.close()
"#;

/// A client that sends `size` bytes in writes of at most 64 KiB, waits for the server's one-byte
/// answer (so the server never sees EOF before it read everything) and closes.
const CLIENT: &str = r#"
import socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port))
data = bytes(i % 251 for i in range(size))
for off in range(0, size, 65536):
    c.sendall(data[off:off + 65536])
if c.recv(1) != b"k":
    sys.exit("no answer")
c.close()
"#;

/// Runs `sizes` connections a → b against the WAITALL server in `mode`; returns, per
/// connection, (requested, first call, total, exact).
fn waitall_rounds(
    lab: &Lab,
    a: &meshlane_lab::Pod,
    b: &meshlane_lab::Pod,
    port: u16,
    mode: &str,
    sizes: &[usize],
) -> Result<Vec<(usize, usize, usize, bool)>> {
    let list: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let mut server = lab.cmd(b, "python3")?;
    server.args([
        "-c",
        WAITALL_SERVER,
        &b.ip.to_string(),
        &port.to_string(),
        mode,
        &list.join(","),
    ]);
    let mut server = spawn_piped(&mut server)?;
    let (_, lines) = wait_for_line(&mut server, Duration::from_secs(10), |l| l == "listening")?;
    let mut out = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let client = lab
            .cmd(a, "python3")?
            .args([
                "-c",
                CLIENT,
                &b.ip.to_string(),
                &port.to_string(),
                &size.to_string(),
            ])
            .output()?;
        if !client.status.success() {
            bail!("client {i}: {}", String::from_utf8_lossy(&client.stderr));
        }
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("the server did not report connection {i}"))?;
        let f: Vec<usize> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("server said {line:?}"))?;
        out.push((*size, f[0], f[1], f[2] == 1));
    }
    let _ = server.wait();
    Ok(out)
}

/// Connections that were not byte-exact, or (`whole_first`) whose first read was short:
/// (index, asked, first read, total).
fn affected(
    rounds: &[(usize, usize, usize, bool)],
    whole_first: bool,
) -> Vec<(usize, usize, usize, usize)> {
    rounds
        .iter()
        .enumerate()
        .filter(|(_, (size, first, total, exact))| {
            (whole_first && first != size) || total != size || !exact
        })
        .map(|(i, (size, first, total, _))| (i, *size, *first, *total))
        .collect()
}

/// The pod's entry in the guard's status (detections of `kind`, and at least `excluded` sockets
/// kept off the fast path because of it), and the CLI's sentence about it.
fn guarded(lab: &Lab, pod: &str, kind: &str, words: &str, excluded: u64) -> Result<()> {
    let st = lab.call(&meshlane_api::Request::Status)?;
    let pods = st["reader_guard"]["pods"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        pods.iter().any(|p| p["pod"] == pod
            && p[kind].as_u64() >= Some(1)
            && p["excluded_sockets"].as_u64() >= Some(excluded)),
        "status does not list {pod} for {kind}: {:#}",
        st["reader_guard"]
    );
    let out = lab.cli(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("{pod} reads with")) && l.contains(words)),
        "{text}"
    );
    Ok(())
}

/// Transfer sizes, 1 B to 16 MiB.
const SIZES: [usize; 10] = [
    1 << 20,
    4 << 20,
    100_000,
    1 << 20,
    16 << 20,
    1,
    64 << 10,
    2 << 20,
    7,
    1 << 20,
];

/// The sizes for SO_RCVLOWAT=2 readers: none below the mark. (With fewer bytes than the mark
/// queued the kernel does not wake a reader blocked in recv even when it asked for only those —
/// tcp_data_ready compares with sk_rcvlowat — so a 1-byte transfer would stall on the stack too.)
fn lowat_sizes() -> Vec<usize> {
    SIZES.iter().copied().filter(|s| *s >= 2).collect()
}

/// Connections a → b against the server in `mode`: at most the first (open when the guard first
/// saw the pod) is affected — short at its first read when `whole_first`, or not byte-exact —
/// `counter` counted the detection, every later connection's two sockets were kept off the fast
/// path, and the pod is listed with `kind`.
fn caught_after_the_first(
    port: u16,
    mode: &str,
    sizes: &[usize],
    whole_first: bool,
    (counter, kind, words): (&str, &str, &str),
) -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let excluded0 = lab.counter("sock_reader_excluded")?;
    let rounds = waitall_rounds(&lab, &a, &b, port, mode, sizes)?;
    let bad = affected(&rounds, whole_first);
    eprintln!(
        "{words}: connections affected: {} of {} ({bad:?})",
        bad.len(),
        sizes.len()
    );
    assert!(
        bad.iter().all(|(i, ..)| *i == 0),
        "connections after the first detection were affected: {bad:?}"
    );
    assert!(lab.counter(counter)? > 0, "{counter}: nothing detected");
    let later = 2 * (sizes.len() as u64 - 1);
    assert!(
        lab.counter("sock_reader_excluded")? >= excluded0 + later,
        "the later connections were not kept off the fast path"
    );
    guarded(&lab, "lab/b", kind, words, later)
}

/// A blocking MSG_WAITALL reader: every connection after the first detection gets all it asked
/// for in one call; the pod is listed.
#[test]
fn a_waitall_reader_gets_whole_reads_after_the_first_detection() -> Result<()> {
    caught_after_the_first(
        7970,
        "waitall",
        &SIZES,
        true,
        ("waitall_detected", "waitall", "MSG_WAITALL"),
    )
}

/// SO_RCVLOWAT set on each accepted socket: the pod is caught at the first connection, and every
/// later one stays on the stack, where the kernel honours the option.
#[test]
fn an_rcvlowat_reader_is_kept_off_the_fast_path_after_the_first_detection() -> Result<()> {
    caught_after_the_first(
        7971,
        "lowat",
        &lowat_sizes(),
        false,
        ("rcvlowat_detected", "rcvlowat", "SO_RCVLOWAT"),
    )
}

/// SO_RCVLOWAT set on the listening socket: seen before any connection exists, so no connection
/// is affected at all.
#[test]
fn rcvlowat_on_a_listener_keeps_every_connection_whole() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let sizes = lowat_sizes();
    let (redirected0, inserted0) = (
        lab.counter("bytes_redirected")?,
        lab.counter("sock_inserted")?,
    );
    let rounds = waitall_rounds(&lab, &a, &b, 7972, "lowat-listener", &sizes)?;
    let bad = affected(&rounds, false);
    assert!(bad.is_empty(), "connections read short: {bad:?}");
    assert_eq!(
        lab.counter("sock_inserted")?,
        inserted0,
        "a connection entered the fast path"
    );
    assert_eq!(lab.counter("bytes_redirected")?, redirected0);
    guarded(
        &lab,
        "lab/b",
        "rcvlowat",
        "SO_RCVLOWAT",
        2 * sizes.len() as u64,
    )
}

/// The same pods, without such readers, stay in the fast path: a plain reader and SO_RCVLOWAT=1
/// (the default) trigger nothing.
#[test]
fn plain_readers_are_not_guarded() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let redirected0 = lab.counter("bytes_redirected")?;
    let srv =
        meshlane_lab::probe::serve(&lab, Some(&b), &format!("{}:7973", b.ip), &["--conns", "1"])?;
    meshlane_lab::probe::send(
        &lab,
        Some(&a),
        srv.addr,
        &["--bytes", &(4u64 << 20).to_string()],
    )?;
    srv.finish(Duration::from_secs(30))?;
    assert!(lab.counter("bytes_redirected")? - redirected0 >= 4 << 20);
    for c in [
        "waitall_detected",
        "rcvlowat_detected",
        "splice_detected",
        "sock_reader_excluded",
    ] {
        assert_eq!(lab.counter(c)?, 0, "{c}");
    }
    let st = lab.call(&meshlane_api::Request::Status)?;
    assert_eq!(st["reader_guard"]["pods"], serde_json::json!([]));
    Ok(())
}
