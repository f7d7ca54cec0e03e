//! `ml-svc`: the service and capture probes of the lab tests.
//!
//! ```text
//! ml-svc whoami --listen ADDR --id NAME [--udp]   answers every TCP connection (and, with
//!        --udp, every datagram) with one JSON line: its id, the local and peer addresses, and
//!        the connection's SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST (null when there is none)
//! ml-svc ask --to ADDR [--udp] [--n N]            one JSON line per attempt: the reply, the
//!        peer address (getpeername, or the source of the UDP reply), or the errno
//! ml-svc sink --listen ADDR                      accepts and closes, for connection-rate runs
//! ml-svc connrate --to ADDR --secs S             new connections per second (connect, EOF, close)
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn flag(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

fn addr(args: &[String], name: &str) -> Result<SocketAddr> {
    let v = arg(args, name).with_context(|| format!("{name} is required"))?;
    v.parse().with_context(|| format!("{name} {v}"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("whoami") => whoami(&args),
        Some("ask") => ask(&args),
        Some("sink") => sink(&args),
        Some("connrate") => connrate(&args),
        _ => Err(anyhow::anyhow!(
            "usage: ml-svc whoami|ask|sink|connrate ..."
        )),
    };
    if let Err(e) = r {
        eprintln!("ml-svc: {e:#}");
        std::process::exit(2);
    }
}

/// `SO_ORIGINAL_DST` the way proxies ask for it: SOL_IP first, then SOL_IPV6.
fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = s.as_raw_fd();
    // SAFETY: getsockopt into a zeroed sockaddr_storage of the length we pass.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let p = (&raw mut ss).cast::<libc::c_void>();
        if libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, p, &mut len) == 0
            && ss.ss_family == libc::AF_INET as libc::sa_family_t
        {
            let sin = &*(&raw const ss).cast::<libc::sockaddr_in>();
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            return Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)));
        }
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockopt(fd, libc::SOL_IPV6, SO_ORIGINAL_DST, p, &mut len) == 0
            && ss.ss_family == libc::AF_INET6 as libc::sa_family_t
        {
            let sin6 = &*(&raw const ss).cast::<libc::sockaddr_in6>();
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            return Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)));
        }
    }
    None
}

fn whoami(args: &[String]) -> Result<()> {
    let listen = addr(args, "--listen")?;
    let id = arg(args, "--id").unwrap_or("whoami").to_string();
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    if flag(args, "--udp") {
        let u = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
        let id = id.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let line = json!({"id": id, "local": listen.to_string(), "peer": from.to_string()});
                let _ = u.send_to(line.to_string().as_bytes(), from);
            }
        });
    }
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let line = json!({
            "id": id,
            "local": s.local_addr().map(|a| a.to_string()).ok(),
            "peer": s.peer_addr().map(|a| a.to_string()).ok(),
            "orig": original_dst(&s).map(|a| a.to_string()),
        });
        let _ = writeln!(s, "{line}");
    }
    Ok(())
}

fn ask(args: &[String]) -> Result<()> {
    let to = addr(args, "--to")?;
    let n: u32 = arg(args, "--n").map_or(Ok(1), str::parse)?;
    let udp = flag(args, "--udp");
    let mut out = std::io::stdout().lock();
    for _ in 0..n {
        let v = if udp { ask_udp(to) } else { ask_tcp(to) };
        writeln!(out, "{v}")?;
    }
    Ok(())
}

fn failure(e: &std::io::Error) -> Value {
    json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()})
}

fn ask_tcp(to: SocketAddr) -> Value {
    let s = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return failure(&e),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let peer = s.peer_addr().map(|a| a.to_string()).ok();
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(_) => {
            let reply: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
            json!({"ok": true, "peer": peer, "reply": reply})
        }
        Err(e) => failure(&e),
    }
}

fn ask_udp(to: SocketAddr) -> Value {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let r = (|| -> std::io::Result<Value> {
        let u = UdpSocket::bind(bind)?;
        u.set_read_timeout(Some(Duration::from_secs(3)))?;
        u.send_to(b"who?", to)?;
        let mut buf = [0u8; 2048];
        let (n, from) = u.recv_from(&mut buf)?;
        let reply: Value = serde_json::from_slice(&buf[..n]).unwrap_or(Value::Null);
        Ok(json!({"ok": true, "peer": from.to_string(), "reply": reply}))
    })();
    r.unwrap_or_else(|e| failure(&e))
}

fn sink(args: &[String]) -> Result<()> {
    let listen = addr(args, "--listen")?;
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    for s in l.incoming() {
        drop(s);
    }
    Ok(())
}

/// Opens connections one after the other for `--secs`: connect, wait for the server's close
/// (EOF), close — the short-connection pattern of HTTP/1.0 clients. The server closes first, so
/// TIME_WAIT stays on the server side, where the kernel lets a new SYN reuse the tuple.
fn connrate(args: &[String]) -> Result<()> {
    use std::io::Read as _;
    let to = addr(args, "--to")?;
    let secs: f64 = arg(args, "--secs").map_or(Ok(2.0), str::parse)?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut last_error = None;
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        let r = TcpStream::connect(to).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            while s.read(&mut buf)? > 0 {}
            Ok(())
        });
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                errors += 1;
                last_error = Some(e.to_string());
                if errors > 1000 && ok == 0 {
                    bail!("no connection succeeded: {e}");
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"connects": ok, "errors": errors, "secs": elapsed,
               "per_sec": ok as f64 / elapsed, "last_error": last_error})
    );
    Ok(())
}
