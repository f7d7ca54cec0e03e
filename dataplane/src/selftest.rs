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
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use dataplane_common::{Counter, NetnsInfo, netns_flags};
use serde::{Deserialize, Serialize};

use crate::dataplane::Dataplane;

/// The argument that turns the agent binary into the self-test child.
pub const CHILD_ARG: &str = "__selftest-child";
const TRANSFER_BYTES: usize = 4 << 20;
const FIONREAD_BYTES: usize = 3000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SelfTestReport {
    pub passed: bool,
    pub detail: String,
    pub checks: Vec<Check>,
}

impl SelfTestReport {
    fn failed(detail: impl Into<String>, checks: Vec<Check>) -> Self {
        SelfTestReport {
            passed: false,
            detail: detail.into(),
            checks,
        }
    }
}

/// Runs the self-test. Never returns an error: any failure is a failed report, and the agent
/// keeps running with redirect off.
pub fn run(dp: &mut Dataplane, exe: &Path) -> SelfTestReport {
    let cg = dp
        .options
        .cgroup
        .join(format!("meshlane-selftest-{}", std::process::id()));
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

fn run_in(dp: &mut Dataplane, exe: &Path, cg: &Path) -> SelfTestReport {
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
    dp: &mut Dataplane,
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
    set_loopback_up()?;
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

/// The checks themselves, on a connected pair: byte-exact transfer client → server, FIONREAD on
/// the server, epoll wakeup of the server. Public so the lab tests can run them on pod sockets.
pub fn socket_checks(
    client: &mut TcpStream,
    server: &mut TcpStream,
) -> std::io::Result<Vec<Check>> {
    let mut checks = Vec::new();
    // 1. Byte-exact transfer.
    let reader = {
        let mut s = server.try_clone()?;
        std::thread::spawn(move || -> std::io::Result<(usize, bool)> {
            let mut got = vec![0u8; TRANSFER_BYTES];
            read_exact_retrying(&mut s, &mut got, Duration::from_secs(10))?;
            Ok((
                got.len(),
                got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            ))
        })
    };
    let data: Vec<u8> = (0..TRANSFER_BYTES).map(pattern).collect();
    client.write_all(&data)?;
    let (n, same) = reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    checks.push(Check {
        name: "byte_exact".into(),
        ok: n == TRANSFER_BYTES && same,
        detail: format!("{n} of {TRANSFER_BYTES} bytes read, identical: {same}"),
    });

    // 2. FIONREAD equals the bytes queued.
    client.write_all(&data[..FIONREAD_BYTES])?;
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut queued = 0;
    while Instant::now() < deadline {
        queued = fionread(server)?;
        if queued >= FIONREAD_BYTES {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    checks.push(Check {
        name: "fionread".into(),
        ok: queued == FIONREAD_BYTES,
        detail: format!("FIONREAD said {queued}, {FIONREAD_BYTES} bytes were queued"),
    });
    let mut sink = vec![0u8; FIONREAD_BYTES];
    read_exact_retrying(server, &mut sink, Duration::from_secs(2))?;

    // 3. epoll wakes the reader within 100 ms of the write.
    let waited = epoll_wait_after_write(server, client)?;
    checks.push(Check {
        name: "epoll_wakeup".into(),
        ok: waited.is_some_and(|d| d < Duration::from_millis(100)),
        detail: match waited {
            Some(d) => format!("woke {} µs after the write", d.as_micros()),
            None => "no wakeup within 1 s".into(),
        },
    });
    Ok(checks)
}

/// `read(2)` the way event-driven programs (nginx, Envoy, Go, tokio) do it: on EAGAIN, wait for
/// POLLIN and read again. A blocking read on a socket in a SOCKHASH can return EAGAIN when the
/// reader is woken without data — for instance by a send-space wakeup while another thread of the
/// same socket writes (tcp_bpf_recvmsg does not loop the way tcp_recvmsg does). Such a program sees
/// the same bytes; only programs that treat EAGAIN on a blocking socket as fatal are affected
/// (README, "Known limitations").
pub fn read_retrying(
    s: &mut TcpStream,
    buf: &mut [u8],
    timeout: Duration,
) -> std::io::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                let mut fds = [libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd.
                unsafe {
                    libc::poll(
                        fds.as_mut_ptr(),
                        1,
                        left.as_millis().min(i32::MAX as u128) as i32,
                    )
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// `read_exact` on top of [`read_retrying`].
pub fn read_exact_retrying(
    s: &mut TcpStream,
    buf: &mut [u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = read_retrying(s, &mut buf[off..], timeout)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        off += n;
    }
    Ok(())
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

fn fionread(s: &TcpStream) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn epoll_wait_after_write(
    server: &TcpStream,
    client: &mut TcpStream,
) -> std::io::Result<Option<Duration>> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    ep.add(server, EpollEvent::new(EpollFlags::EPOLLIN, 1))?;
    let mut w = client.try_clone()?;
    let (tx, rx) = mpsc::channel();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        w.write_all(b"x")?;
        let _receiver_may_be_gone = tx.send(t);
        Ok(())
    });
    let mut events = [EpollEvent::empty()];
    let n = ep.wait(&mut events, EpollTimeout::from(1000u16))?;
    let woke = Instant::now();
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    let written = rx.recv().map_err(std::io::Error::other)?;
    Ok((n == 1).then(|| woke.saturating_duration_since(written)))
}

/// Brings `lo` up in the current network namespace (a new netns starts with it down).
pub fn set_loopback_up() -> std::io::Result<()> {
    // SAFETY: socket(2) for the ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; we set the name and flags.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq.
    let rc = unsafe {
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        rc
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// The path of the running binary, for re-executing it as the child.
pub fn current_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}
