//! The start-up self-test: before redirect is switched on for anyone, prove on this kernel that a
//! redirected connection is byte-exact, that FIONREAD counts redirected bytes, and that epoll
//! wakes a reader within 100 ms. Kernel 929e30f93125 (6.18.14+) broke the last two for sockhash
//! sockets without an sk_skb verdict (fixed by 04af4efde58a); a node with such a kernel must stay
//! on the stack, not stall nginx for a minute.
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
use meshlane_sockcheck::{FIONREAD_BYTES, TRANSFER_BYTES, socket_checks};

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
    let before = dp.counter(Counter::BytesRedirected).unwrap_or(0);
    let go = child
        .stdin
        .as_mut()
        .map(|s| s.write_all(b"go\n").and_then(|()| s.flush()));
    let result = match go {
        Some(Ok(())) => rx.recv_timeout(Duration::from_secs(30)).ok(),
        _ => None,
    };
    let after = dp.counter(Counter::BytesRedirected).unwrap_or(0);
    if let Err(e) = dp.del_netns(cookie) {
        tracing::warn!(error = %e, "removing the self-test netns entry");
    }
    let Some(line) = result else {
        return SelfTestReport::failed("the self-test child did not answer within 30 s", vec![]);
    };
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
    if failed.is_empty() {
        SelfTestReport {
            passed: true,
            detail: "byte-exact transfer, FIONREAD and epoll wakeup correct on redirected sockets"
                .into(),
            checks,
        }
    } else {
        let detail = format!("failed: {}", failed.join(", "));
        SelfTestReport::failed(detail, checks)
    }
}

/// Entry point of the child process. Prints `cookie N`, waits for `go`, prints the checks as
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
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if line.trim() != "go" {
        return Err(std::io::Error::other(format!("expected go, got {line:?}")));
    }

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut client = TcpStream::connect(addr)?;
    let (mut server, _) = listener.accept()?;
    // Both sockets are established and in the SOCKHASH once accept() returns.
    socket_checks(&mut client, &mut server)
}

/// The path of the running binary, for re-executing it as the child.
pub fn current_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}
