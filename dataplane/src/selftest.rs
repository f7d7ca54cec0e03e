//! The start-up self-test: before redirect is switched on for anyone, prove on this kernel that a
//! redirected connection is byte-exact, that FIONREAD counts redirected bytes, that MSG_PEEK shows
//! them, and that epoll wakes a reader within 100 ms. Kernel 929e30f93125 (6.18.14+) changed
//! FIONREAD and wakeups for sockhash sockets without an sk_skb verdict; a node where these fail
//! must stay on the stack, not stall nginx for a minute.
//!
//! A second phase runs the reader checks again with the client sending through the stack while
//! both sockets stay in the SOCKHASH — what `accel off --move-established` does to established
//! connections. On kernels without 04af4efde58a FIONREAD then reads 0 for bytes that are there;
//! the phase's result only decides whether that move is allowed (fail safe: established
//! connections then finish in the fast path), never whether redirect is on.
//!
//! The test runs in a child process (this same binary, `__selftest-child`) that joins a cgroup
//! below the attach point and a network namespace of its own, so its sockets go through our
//! programs and nobody else's are touched. The namespace is enrolled with the SELFTEST flag, which
//! lets it redirect while acceleration is still off for everyone else.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use dataplane_common::{Counter, NetnsInfo, netns_flags};

use meshlane_api::types::{Check, SelfTestReport};
use meshlane_sockcheck::{FIONREAD_BYTES, TRANSFER_BYTES, reader_checks, socket_checks};

use crate::maps::Maps;

/// The argument that turns the agent binary into the self-test child.
pub const CHILD_ARG: &str = "__selftest-child";

/// Runs the self-test. Never returns an error: any failure is a failed report, and the agent
/// keeps running with redirect off.
pub fn run(dp: &mut Maps, cgroup: &Path, exe: &Path) -> SelfTestReport {
    let cg = cgroup.join(format!("meshlane-selftest-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&cg) {
        return SelfTestReport::failed(format!("creating cgroup {}: {e}", cg.display()), vec![]);
    }
    let report = run_in(dp, exe, &cg);
    // The child has exited by now; an empty cgroup can be removed.
    for _ in 0..50 {
        if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report
}

fn run_in(dp: &mut Maps, exe: &Path, cg: &Path) -> SelfTestReport {
    let mut child = match Command::new(exe)
        .arg(CHILD_ARG)
        .arg(cg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return SelfTestReport::failed(format!("starting {}: {e}", exe.display()), vec![]);
        }
    };
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let report = drive(dp, &mut child, &rx);
    let _killed_if_still_running = child.kill();
    let _reaped = child.wait();
    report
}

fn drive(
    dp: &mut Maps,
    child: &mut std::process::Child,
    rx: &mpsc::Receiver<String>,
) -> SelfTestReport {
    let cookie = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) => match line
            .strip_prefix("cookie ")
            .and_then(|c| c.parse::<u64>().ok())
        {
            Some(c) => c,
            None => return SelfTestReport::failed(format!("child said {line:?}"), vec![]),
        },
        Err(_) => return SelfTestReport::failed("the self-test child did not start", vec![]),
    };
    if let Err(e) = dp.put_netns(
        cookie,
        NetnsInfo {
            flags: netns_flags::ACCELERATE | netns_flags::SELFTEST,
            pod_id: 0,
            addr: [0; 4],
        },
    ) {
        return SelfTestReport::failed(format!("enrolling the self-test netns: {e}"), vec![]);
    }
    let report = phases(dp, child, rx, cookie);
    if let Err(e) = dp.del_netns(cookie) {
        tracing::warn!(error = %e, "removing the self-test netns entry");
    }
    report
}

/// Sends `word` to the child and waits for its next line.
fn ask(child: &mut std::process::Child, rx: &mpsc::Receiver<String>, word: &str) -> Option<String> {
    let said = child.stdin.as_mut().map(|s| {
        s.write_all(format!("{word}\n").as_bytes())
            .and_then(|()| s.flush())
    });
    match said {
        Some(Ok(())) => rx.recv_timeout(Duration::from_secs(30)).ok(),
        _ => None,
    }
}

fn phases(
    dp: &mut Maps,
    child: &mut std::process::Child,
    rx: &mpsc::Receiver<String>,
    cookie: u64,
) -> SelfTestReport {
    // 1. A redirected pair: byte-exact, FIONREAD, MSG_PEEK, epoll.
    let before = dp.counter(Counter::BytesRedirected).unwrap_or(0);
    let Some(line) = ask(child, rx, "go") else {
        return SelfTestReport::failed("the self-test child did not answer within 30 s", vec![]);
    };
    let after = dp.counter(Counter::BytesRedirected).unwrap_or(0);
    let mut checks: Vec<Check> = match serde_json::from_str(&line) {
        Ok(c) => c,
        Err(e) => return SelfTestReport::failed(format!("child output {line:?}: {e}"), vec![]),
    };
    let redirected = after.saturating_sub(before);
    let need = (TRANSFER_BYTES + FIONREAD_BYTES) as u64;
    checks.push(Check {
        name: "redirected".into(),
        ok: redirected >= need,
        detail: format!(
            "{redirected} bytes went through sk_msg redirect, expected at least {need}"
        ),
    });
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    let mut report = if failed.is_empty() {
        SelfTestReport {
            passed: true,
            detail: "byte-exact transfer, FIONREAD, MSG_PEEK and epoll wakeup correct on \
                     redirected sockets"
                .into(),
            checks,
            stack_delivery: Vec::new(),
            stack_bytes: 0,
        }
    } else {
        let detail = format!("failed: {}", failed.join(", "));
        return SelfTestReport::failed(detail, checks);
    };
    // 2. The same pair, still in the SOCKHASH, with the client sending through the stack.
    (report.stack_delivery, report.stack_bytes) = stack_delivery(dp, child, rx, cookie);
    report
}

/// The second phase: the agent makes the child's client socket sticky to the stack (as if it had
/// sent through the stack once), so its bytes reach a server socket that stays in the SOCKHASH
/// through TCP — what moving established connections off the fast path does. Any failure is a
/// failed check: it only forbids that move. Returns the checks and the bytes that went through the
/// stack.
fn stack_delivery(
    dp: &mut Maps,
    child: &mut std::process::Child,
    rx: &mpsc::Receiver<String>,
    cookie: u64,
) -> (Vec<Check>, u64) {
    let failed = |detail: String| {
        (
            vec![Check {
                name: "stack_setup".into(),
                ok: false,
                detail,
            }],
            0,
        )
    };
    let Some(line) = ask(child, rx, "ports") else {
        return failed("the self-test child did not name its ports".into());
    };
    let ports: Option<(u16, u16)> = line.strip_prefix("ports ").and_then(|p| {
        let (a, b) = p.split_once(' ')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    let Some((client_port, server_port)) = ports else {
        return failed(format!("child said {line:?}"));
    };
    let lo = crate::addr::ip_key(&std::net::Ipv4Addr::LOCALHOST.into());
    let key = dataplane_common::SockKey {
        netns: cookie,
        local_ip: lo,
        remote_ip: lo,
        local_port: client_port.into(),
        remote_port: server_port.into(),
    };
    if let Err(e) = dp.make_sticky(&key) {
        return failed(format!("marking the client socket: {e}"));
    }
    let before = dp.counter(Counter::BytesPassed).unwrap_or(0);
    let Some(line) = ask(child, rx, "go") else {
        return failed("the self-test child did not answer within 30 s".into());
    };
    let passed = dp
        .counter(Counter::BytesPassed)
        .unwrap_or(0)
        .saturating_sub(before);
    let mut checks: Vec<Check> = match serde_json::from_str(&line) {
        Ok(c) => c,
        Err(e) => return (failed(format!("child output {line:?}: {e}")).0, passed),
    };
    let need = FIONREAD_BYTES as u64;
    checks.push(Check {
        name: "stack_path".into(),
        ok: passed >= need,
        detail: format!("{passed} bytes went through the stack, expected at least {need}"),
    });
    (checks, passed)
}

/// Entry point of the child process. Prints `cookie N`, waits for `go`, prints the checks as
/// JSON; waits for `ports`, names its ports, waits for `go`, prints the stack-delivery checks as
/// JSON, exits.
pub fn child_main(cgroup: &Path) -> ! {
    let code = match child(cgroup) {
        Ok(checks) => {
            println!("{}", serde_json::to_string(&checks).unwrap_or_default());
            0
        }
        Err(e) => {
            eprintln!("meshlane self-test child: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn child(cgroup: &Path) -> std::io::Result<Vec<Check>> {
    // Join the cgroup first: `/sys` may not be reachable the same way after unshare.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    crate::sys::set_loopback_up()?;
    let cookie = crate::sys::current_netns_cookie()?;
    println!("cookie {cookie}");
    std::io::stdout().flush()?;
    expect("go")?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut client = TcpStream::connect(addr)?;
    let (mut server, _) = listener.accept()?;
    // Both sockets are established and in the SOCKHASH once accept() returns.
    let checks = socket_checks(&mut client, &mut server)?;
    println!(
        "{}",
        serde_json::to_string(&checks).map_err(std::io::Error::other)?
    );
    std::io::stdout().flush()?;
    // The second phase, if the agent asks: the same pair, the client sending through the stack.
    expect("ports")?;
    println!("ports {} {}", client.local_addr()?.port(), addr.port());
    std::io::stdout().flush()?;
    expect("go")?;
    reader_checks(&mut client, &mut server, "stack_")
}

/// Reads the agent's next word.
fn expect(word: &str) -> std::io::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if line.trim() != word {
        return Err(std::io::Error::other(format!(
            "expected {word}, got {line:?}"
        )));
    }
    Ok(())
}

/// The path of the running binary, for re-executing it as the child.
pub fn current_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}
