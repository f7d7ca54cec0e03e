//! Checks of what a reader of a socket sees, run on a connected pair: the agent's start-up
//! self-test runs them on a redirected pair before it switches redirect on, and the lab runs the
//! same checks on pod sockets. They own the knowledge of how a SOCKHASH socket can misbehave on
//! a given kernel (929e30f93125 broke FIONREAD and epoll for sockhash sockets without an sk_skb
//! verdict; 04af4efde58a fixed it), so there is one copy of it.
//!
//! It must never touch BPF or namespaces: the caller decides which path the sockets take.
#![deny(unsafe_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::{AsFd, AsRawFd},
    sync::mpsc,
    time::{Duration, Instant},
};

pub use meshlane_api::types::Check;

/// Bytes of the byte-exact transfer.
pub const TRANSFER_BYTES: usize = 4 << 20;
/// Bytes queued for the FIONREAD check.
pub const FIONREAD_BYTES: usize = 3000;

/// The checks themselves, on a connected pair: byte-exact transfer client → server, then
/// [`reader_checks`].
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

    checks.extend(reader_checks(client, server, "")?);
    Ok(checks)
}

/// What a reader of `server` sees of bytes `client` writes: FIONREAD equals the bytes queued,
/// MSG_PEEK shows them without consuming them, epoll wakes the reader within 100 ms of a write.
/// Each check's name starts with `prefix`.
pub fn reader_checks(
    client: &mut TcpStream,
    server: &mut TcpStream,
    prefix: &str,
) -> std::io::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let data: Vec<u8> = (0..FIONREAD_BYTES).map(pattern).collect();
    client.write_all(&data)?;
    // Wait (with a deadline) until all of it is readable, by FIONREAD or else by MSG_PEEK.
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut peek = vec![0u8; FIONREAD_BYTES];
    let (mut queued, mut peeked) = (0, 0);
    while Instant::now() < deadline {
        queued = fionread(server)?;
        peeked = sys::peek(server.as_raw_fd(), &mut peek)?;
        if queued >= FIONREAD_BYTES && peeked >= FIONREAD_BYTES {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    checks.push(Check {
        name: format!("{prefix}fionread"),
        ok: queued == FIONREAD_BYTES,
        detail: format!("FIONREAD said {queued}, {FIONREAD_BYTES} bytes were queued"),
    });
    let mut got = vec![0u8; FIONREAD_BYTES];
    read_exact_retrying(server, &mut got, Duration::from_secs(2))?;
    let same = peek[..peeked] == got[..peeked] && got == data;
    checks.push(Check {
        name: format!("{prefix}msg_peek"),
        ok: peeked == FIONREAD_BYTES && same,
        detail: format!(
            "MSG_PEEK showed {peeked} of {FIONREAD_BYTES} queued bytes; the read after it got \
             the same bytes: {same}"
        ),
    });
    let waited = epoll_wait_after_write(server, client)?;
    checks.push(Check {
        name: format!("{prefix}epoll_wakeup"),
        ok: waited.is_some_and(|d| d < Duration::from_millis(100)),
        detail: match waited {
            Some(d) => format!("woke {} µs after the write", d.as_micros()),
            None => "no wakeup within 1 s".into(),
        },
    });
    // The byte that woke it.
    let mut one = [0u8; 1];
    read_exact_retrying(server, &mut one, Duration::from_secs(2))?;
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
                let ms = left.as_millis().min(u128::from(u16::MAX)) as u16;
                let mut fds = [nix::poll::PollFd::new(
                    s.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
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
    sys::fionread(s.as_raw_fd())
}

/// The one raw syscall nix has no safe wrapper for.
#[allow(unsafe_code)]
mod sys {
    use std::os::fd::RawFd;

    nix::ioctl_read_bad!(fionread_raw, libc::FIONREAD, libc::c_int);

    /// `recv(MSG_PEEK | MSG_DONTWAIT)`: bytes readable now, left in the queue. Nothing readable
    /// yet is 0.
    pub fn peek(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
        match nix::sys::socket::recv(
            fd,
            buf,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes readable on `fd` (FIONREAD).
    pub fn fionread(fd: RawFd) -> std::io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `n`, which outlives the call.
        unsafe { fionread_raw(fd, &mut n) }?;
        Ok(n as usize)
    }
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
