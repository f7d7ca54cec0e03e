//! `ml-probe`: byte-exact TCP transfers for the lab tests, with the send paths applications use
//! (write, writev, sendfile, splice, MSG_MORE), shutdown(SHUT_WR) and duplex streams.
//!
//! ```text
//! ml-probe serve --listen 10.77.0.11:7000 [--conns N] [--duplex D] [--tag T]
//! ml-probe checks --listen ADDR --server-netns PATH   (FIONREAD, epoll, poll across two netns)
//! ml-probe send --to 10.77.0.11:7000 --bytes N [--method M] [--conns C] [--duplex D]
//!               [--bind ADDR] [--expect-tag T] [--chunk K] [--pace-ms MS]
//! ml-probe link-emu --a-netns PATH --b-netns PATH --delay-ms MS [--loss-b-to-a PCT] [--stats F]
//!               (a point-to-point link with delay and loss: tc netem's job, for kernels without
//!               sch_netem; TUN device `mltun0` in each namespace)
//! ```
//! Both print one JSON line at the end; `send` exits non-zero unless every connection was exact.

use std::{
    io::Write,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use meshlane_lab::probe::{Verdict, fill, first_mismatch};
use meshlane_sockcheck::read_retrying;

/// How long any single read may wait.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
use serde_json::json;

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn num(args: &[String], name: &str, default: u64) -> Result<u64> {
    arg(args, name).map_or(Ok(default), |v| {
        v.parse().with_context(|| format!("{name} {v}"))
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") => serve(&args),
        Some("send") => send(&args),
        Some("checks") => checks(&args),
        Some("uring-splice-serve") => uring_splice_serve(&args),
        Some("link-emu") => link_emu(&args),
        _ => Err(anyhow::anyhow!("usage: ml-probe serve|send ...")),
    };
    if let Err(e) = r {
        eprintln!("ml-probe: {e:#}");
        std::process::exit(2);
    }
}

fn serve(args: &[String]) -> Result<()> {
    let listen: SocketAddr = arg(args, "--listen").context("--listen")?.parse()?;
    let conns = num(args, "--conns", 1)?;
    let duplex = num(args, "--duplex", 0)?;
    let tag = arg(args, "--tag").unwrap_or("").to_string();
    let l = TcpListener::bind(listen)?;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let mut handles = Vec::new();
    for _ in 0..conns {
        let (s, _) = l.accept()?;
        let tag = tag.clone();
        handles.push(std::thread::spawn(move || serve_one(s, duplex, &tag)));
    }
    let (mut bytes, mut bad, mut errors) = (0u64, 0u64, Vec::new());
    for h in handles {
        match h.join().map_err(|_| anyhow::anyhow!("panic"))? {
            Ok(v) => {
                bytes += v.bytes;
                bad += (!v.pattern_ok) as u64;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    println!(
        "{}",
        json!({"role":"server","conns":conns,"bytes":bytes,"bad":bad,"errors":errors})
    );
    Ok(())
}

fn serve_one(mut s: TcpStream, duplex: u64, tag: &str) -> Result<Verdict> {
    let writer = if duplex > 0 {
        let mut w = s.try_clone()?;
        Some(std::thread::spawn(move || {
            write_pattern(&mut w, duplex, 64 << 10, 0)
        }))
    } else {
        None
    };
    let mut buf = vec![0u8; 256 << 10];
    let (mut off, mut ok) = (0u64, true);
    loop {
        let n = read_retrying(&mut s, &mut buf, READ_TIMEOUT)?;
        if n == 0 {
            break;
        }
        if ok && first_mismatch(&buf[..n], off).is_some() {
            ok = false;
        }
        off += n as u64;
    }
    if let Some(w) = writer {
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let v = Verdict {
        bytes: off,
        pattern_ok: ok,
        tag: tag.into(),
    };
    s.write_all(v.line().as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    Ok(v)
}

fn write_pattern(s: &mut TcpStream, n: u64, chunk: usize, pace_ms: u64) -> Result<()> {
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < n {
        let k = chunk.min((n - off) as usize);
        fill(&mut buf[..k], off);
        s.write_all(&buf[..k])?;
        off += k as u64;
        if pace_ms > 0 {
            std::thread::sleep(Duration::from_millis(pace_ms));
        }
    }
    Ok(())
}

fn send(args: &[String]) -> Result<()> {
    let to: SocketAddr = arg(args, "--to").context("--to")?.parse()?;
    let bytes = num(args, "--bytes", 1 << 20)?;
    let conns = num(args, "--conns", 1)?;
    let duplex = num(args, "--duplex", 0)?;
    let chunk = num(args, "--chunk", 64 << 10)? as usize;
    let pace = num(args, "--pace-ms", 0)?;
    let method = arg(args, "--method").unwrap_or("write").to_string();
    let bind: Option<SocketAddr> = arg(args, "--bind").map(str::parse).transpose()?;
    let expect_tag = arg(args, "--expect-tag").map(str::to_string);
    let parallel = args.iter().any(|a| a == "--parallel");

    let run_one = {
        let method = method.clone();
        move |i: u64| -> Result<()> {
            let mut s = connect(to, bind)?;
            let reader = {
                let mut r = s.try_clone()?;
                std::thread::spawn(move || read_reply(&mut r, duplex))
            };
            match method.as_str() {
                "write" => write_pattern(&mut s, bytes, chunk, pace)?,
                "writev" => send_writev(&s, bytes)?,
                "sendfile" => send_file(&s, bytes, false)?,
                "splice" => send_file(&s, bytes, true)?,
                "msg_more" => send_msg_more(&s, bytes)?,
                m => bail!("unknown --method {m}"),
            }
            s.shutdown(Shutdown::Write)?;
            let v = reader
                .join()
                .map_err(|_| anyhow::anyhow!("reader panicked"))??;
            if v.bytes != bytes || !v.pattern_ok {
                bail!(
                    "conn {i}: the server read {} of {bytes} bytes, pattern intact: {}",
                    v.bytes,
                    v.pattern_ok
                );
            }
            if let Some(t) = &expect_tag
                && *t != v.tag
            {
                bail!("conn {i}: answered by {:?}, expected {t:?}", v.tag);
            }
            Ok(())
        }
    };
    let results: Vec<Result<()>> = if parallel {
        let hs: Vec<_> = (0..conns)
            .map(|i| {
                let f = run_one.clone();
                std::thread::spawn(move || f(i))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panic"))))
            .collect()
    } else {
        (0..conns).map(&run_one).collect()
    };
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    println!(
        "{}",
        json!({"role":"client","method":method,"conns":conns,"bytes_each":bytes,
               "ok":conns as usize - failed.len(),"failed":failed})
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn connect(to: SocketAddr, bind: Option<SocketAddr>) -> Result<TcpStream> {
    let Some(b) = bind else {
        return Ok(TcpStream::connect_timeout(&to, Duration::from_secs(10))?);
    };
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind as nbind, connect as nconnect,
        setsockopt, socket, sockopt,
    };
    let fam = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    nbind(fd.as_raw_fd(), &SockaddrStorage::from(b))?;
    nconnect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

fn read_reply(r: &mut TcpStream, duplex: u64) -> Result<Verdict> {
    let mut off = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    while off < duplex {
        let k = buf.len().min((duplex - off) as usize);
        let n = read_retrying(r, &mut buf[..k], READ_TIMEOUT)?;
        if n == 0 {
            bail!("duplex stream ended after {off} of {duplex} bytes");
        }
        if let Some(at) = first_mismatch(&buf[..n], off) {
            bail!("duplex stream corrupt at byte {at}");
        }
        off += n as u64;
    }
    let mut raw = Vec::new();
    loop {
        let n = read_retrying(r, &mut buf, READ_TIMEOUT)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&raw);
    Verdict::parse(&rest).with_context(|| format!("server reply {rest:?}"))
}

fn send_writev(s: &TcpStream, n: u64) -> Result<()> {
    // Three iovecs of uneven sizes per call, so message boundaries fall at odd places.
    let mut data = vec![0u8; n as usize];
    fill(&mut data, 0);
    let mut off = 0usize;
    while off < data.len() {
        let rest = &data[off..];
        let a = rest.len().min(1000);
        let b = (rest.len() - a).min(7);
        let c = (rest.len() - a - b).min(60_000);
        let iov = [
            std::io::IoSlice::new(&rest[..a]),
            std::io::IoSlice::new(&rest[a..a + b]),
            std::io::IoSlice::new(&rest[a + b..a + b + c]),
        ];
        let w = nix::sys::uio::writev(s, &iov)?;
        off += w;
    }
    Ok(())
}

fn send_msg_more(s: &TcpStream, n: u64) -> Result<()> {
    let mut data = vec![0u8; n as usize];
    fill(&mut data, 0);
    let mut off = 0usize;
    let mut i = 0usize;
    while off < data.len() {
        let k = (data.len() - off).min(100 + (i % 7) * 300);
        // Every third piece flushes; the other two are corked with MSG_MORE.
        let flags = if i % 3 == 2 || off + k == data.len() {
            0
        } else {
            libc::MSG_MORE
        };
        // SAFETY: send(2) from a live buffer of k bytes.
        let w = unsafe { libc::send(s.as_raw_fd(), data[off..].as_ptr().cast(), k, flags) };
        if w < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        off += w as usize;
        i += 1;
    }
    Ok(())
}

/// A memfd holding the pattern, sent with sendfile(2) or spliced through a pipe.
fn send_file(s: &TcpStream, n: u64, via_splice: bool) -> Result<()> {
    // SAFETY: memfd_create with a static name; the fd is owned at once.
    let raw = unsafe { libc::memfd_create(c"ml-probe".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut f = std::fs::File::from(fd);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < n {
        let k = buf.len().min((n - off) as usize);
        fill(&mut buf[..k], off);
        f.write_all(&buf[..k])?;
        off += k as u64;
    }
    let mut pos: libc::off_t = 0;
    if !via_splice {
        while (pos as u64) < n {
            let left = (n - pos as u64).min(1 << 30) as usize;
            // SAFETY: valid fds; pos is updated by the kernel.
            let w = unsafe { libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), &mut pos, left) };
            if w < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            if w == 0 {
                bail!("sendfile wrote 0 bytes at {pos}");
            }
        }
        return Ok(());
    }
    let (pr, pw) = nix::unistd::pipe()?;
    let mut sent = 0u64;
    while sent < n {
        let left = (n - pos as u64).min(1 << 16) as usize;
        let mut filled = 0usize;
        if left > 0 {
            // SAFETY: splice between our own fds; pos is updated by the kernel.
            let r = unsafe {
                libc::splice(
                    f.as_raw_fd(),
                    &mut pos,
                    pw.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    0,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            filled = r as usize;
        }
        while filled > 0 {
            // SAFETY: as above.
            let w = unsafe {
                libc::splice(
                    pr.as_raw_fd(),
                    std::ptr::null_mut(),
                    s.as_raw_fd(),
                    std::ptr::null_mut(),
                    filled,
                    0,
                )
            };
            if w < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            filled -= w as usize;
            sent += w as u64;
        }
    }
    Ok(())
}

/// Runs the agent's socket checks (byte-exact, FIONREAD, MSG_PEEK, epoll) plus a poll(2) wakeup
/// check on a connection whose server end lives in another network namespace (another pod): a
/// thread of this process enters that namespace to listen. With `--hold`, prints `connected` once
/// the pair is established and waits for a line on stdin before the checks.
fn checks(args: &[String]) -> Result<()> {
    let listen: SocketAddr = arg(args, "--listen").context("--listen")?.parse()?;
    let netns = arg(args, "--server-netns")
        .context("--server-netns")?
        .to_string();
    let listener = std::thread::spawn(move || -> Result<TcpListener> {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpListener::bind(listen)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listener thread panicked"))??;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    if args.iter().any(|a| a == "--hold") {
        // The caller changes something (the kill switch) while the pair is established.
        println!("connected");
        std::io::stdout().flush()?;
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    }
    let mut checks = meshlane_sockcheck::socket_checks(&mut client, &mut server)?;

    // poll(2): the server must become readable within 100 ms of a write.
    let mut w = client.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<std::time::Instant> {
        std::thread::sleep(Duration::from_millis(20));
        let t = std::time::Instant::now();
        w.write_all(b"p")?;
        Ok(t)
    });
    let mut fds = [libc::pollfd {
        fd: server.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
    let woke = std::time::Instant::now();
    let t = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let waited = woke.saturating_duration_since(t);
    checks.push(meshlane_sockcheck::Check {
        name: "poll_wakeup".into(),
        ok: n == 1 && waited < Duration::from_millis(100),
        detail: format!("poll returned {n} after {} µs", waited.as_micros()),
    });
    println!("{}", serde_json::to_string(&checks)?);
    Ok(())
}

/// A server that reads every connection with io_uring's IORING_OP_SPLICE (socket → pipe), the
/// way an io_uring proxy moves bytes, and prints the bytes each connection carried.
fn uring_splice_serve(args: &[String]) -> Result<()> {
    use io_uring::{IoUring, opcode, types};
    let listen: SocketAddr = arg(args, "--listen").context("--listen")?.parse()?;
    let conns = num(args, "--conns", 1)?;
    let l = TcpListener::bind(listen)?;
    let mut ring = IoUring::new(8).context("io_uring_setup")?;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let (r, w) = nix::unistd::pipe()?;
    let mut sink = vec![0u8; 1 << 16];
    for _ in 0..conns {
        let (c, _) = l.accept()?;
        let mut total = 0u64;
        loop {
            let sqe = opcode::Splice::new(
                types::Fd(c.as_raw_fd()),
                -1,
                types::Fd(w.as_raw_fd()),
                -1,
                1 << 16,
            )
            .build();
            // SAFETY: the fds outlive the operation, which completes before the next loop.
            unsafe { ring.submission().push(&sqe) }.context("submission queue full")?;
            ring.submit_and_wait(1)?;
            let cqe = ring.completion().next().context("no completion")?;
            let n = cqe.result();
            if n < 0 {
                bail!("splice: {}", std::io::Error::from_raw_os_error(-n));
            }
            if n == 0 {
                break;
            }
            total += n as u64;
            let mut left = n as usize;
            while left > 0 {
                left -= nix::unistd::read(&r, &mut sink[..left.min(1 << 16)])?;
            }
        }
        println!("{total}");
        std::io::stdout().flush()?;
        drop(c);
    }
    Ok(())
}

/// `TUNSETIFF` (`_IOW('T', 202, int)`) and the flags of a layer-3 TUN device without the packet
/// information header.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: u16 = 0x0001;
const IFF_NO_PI: u16 = 0x1000;

/// Creates TUN device `name` in the network namespace at `netns` (by entering it on a thread of
/// its own, whose namespace dies with it; the device fd keeps working anywhere).
fn tun_in(netns: &str, name: &str) -> Result<std::fs::File> {
    let (netns, name) = (netns.to_string(), name.to_string());
    std::thread::spawn(move || -> Result<std::fs::File> {
        let ns = std::fs::File::open(&netns).with_context(|| netns.clone())?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // struct ifreq: the name (16 bytes), then the flags (a short) in the union.
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is large enough to hold.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
        if r < 0 {
            bail!(
                "TUNSETIFF {name} in {netns}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(tun)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("tun thread panicked"))?
}

/// One direction of the emulated link: every packet read from `from` is written to `to`
/// `delay` later (in order), except those dropped at `loss_pct` percent (a fixed-seed
/// xorshift, so a run is repeatable). `applied` accumulates (packets, total µs from read to
/// write): the delay as it really was, on a machine that may be busy.
fn forward(
    mut from: std::fs::File,
    mut to: std::fs::File,
    delay: Duration,
    loss_pct: f64,
    seed: u64,
    applied: std::sync::Arc<std::sync::Mutex<(u64, u64)>>,
) -> std::thread::JoinHandle<Result<()>> {
    use std::io::Read as _;
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    std::thread::spawn(move || -> Result<()> {
        while let Ok((read_at, pkt)) = rx.recv() {
            let due = read_at + delay;
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // A write refused (the device went down) only loses this packet, as a link would.
            let _lost_like_on_a_link = to.write(&pkt);
            if let Ok(mut a) = applied.lock() {
                a.0 += 1;
                a.1 += read_at.elapsed().as_micros() as u64;
            }
        }
        Ok(())
    });
    std::thread::spawn(move || -> Result<()> {
        let mut x = seed | 1;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = from.read(&mut buf)?;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (x % 1_000_000) as f64 / 10_000.0 < loss_pct {
                continue;
            }
            if tx
                .send((std::time::Instant::now(), buf[..n].to_vec()))
                .is_err()
            {
                return Ok(());
            }
        }
    })
}

fn link_emu(args: &[String]) -> Result<()> {
    let a = arg(args, "--a-netns").context("--a-netns")?;
    let b = arg(args, "--b-netns").context("--b-netns")?;
    let delay = Duration::from_millis(num(args, "--delay-ms", 0)?);
    let loss: f64 = arg(args, "--loss-b-to-a").unwrap_or("0").parse()?;
    let stats = arg(args, "--stats").map(std::path::PathBuf::from);
    let ta = tun_in(a, "mltun0")?;
    let tb = tun_in(b, "mltun0")?;
    let applied = [(); 2].map(|_| std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64))));
    let ab = forward(
        ta.try_clone()?,
        tb.try_clone()?,
        delay,
        0.0,
        1,
        applied[0].clone(),
    );
    let ba = forward(
        tb,
        ta,
        delay,
        loss,
        0x9e37_79b9_7f4a_7c15,
        applied[1].clone(),
    );
    if let Some(path) = stats {
        // The mean delay each way as applied, rewritten twice a second: "AB_US BA_US".
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let mean = |m: &std::sync::Mutex<(u64, u64)>| {
                    m.lock()
                        .map(|a| a.1.checked_div(a.0).unwrap_or(0))
                        .unwrap_or(0)
                };
                let line = format!("{} {}\n", mean(&applied[0]), mean(&applied[1]));
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, line).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        });
    }
    println!("ready");
    std::io::stdout().flush()?;
    ab.join().map_err(|_| anyhow::anyhow!("a→b panicked"))??;
    ba.join().map_err(|_| anyhow::anyhow!("b→a panicked"))??;
    Ok(())
}
