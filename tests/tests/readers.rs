//! Readers that rely on the TCP receive API beyond a plain read: `recv(MSG_WAITALL)` and
//! `SO_RCVLOWAT` (tcp_bpf ignores both on redirected bytes), and FIONREAD, MSG_PEEK and epoll on
//! sockets that stay in the SOCKHASH after `meshlane accel off`.
//!
//! Run as root: `cargo test -p meshlane-lab --test readers -- --test-threads=1`.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use meshlane_lab::{Lab, spawn_piped, wait_for_line};

/// A server that reads each connection's `size` bytes with ONE blocking recv_into(MSG_WAITALL)
/// (or, with mode `lowat`, one plain recv_into after SO_RCVLOWAT=size on the accepted socket),
/// and prints what that one call returned and what the connection carried in all.
const WAITALL_SERVER: &str = r#"
import socket, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sizes = [int(x) for x in sys.argv[4].split(",")]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(64)
print("listening", flush=True)
for size in sizes:
    c, _ = s.accept()
    buf = bytearray(size)
    if mode == "lowat":
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
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

#[test]
fn explore_waitall() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], true, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let sizes = [1 << 20, 4 << 20, 100_000, 1 << 20];
    let r = waitall_rounds(&lab, &a, &b, 7970, "waitall", &sizes)?;
    eprintln!("waitall: {r:?}");
    let r = waitall_rounds(&lab, &a, &b, 7971, "lowat", &sizes)?;
    eprintln!("lowat: {r:?}");
    eprintln!("{:?}", lab.counters()?);
    Ok(())
}
