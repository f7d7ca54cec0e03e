//! Small system facts the agent needs: where cgroup v2 is mounted, making sure a directory is on
//! bpffs, and a network namespace's cookie. Nothing here changes the caller's own namespaces:
//! entering a netns is done on a short-lived thread of its own.

use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// The first cgroup2 mount point in `/proc/self/mountinfo`. On hybrid hosts this is usually
/// `/sys/fs/cgroup/unified`, on unified hosts `/sys/fs/cgroup`; never assume either.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading mountinfo", "/proc/self/mountinfo", e))?;
    parse_mountinfo_fs(&text, "cgroup2").ok_or(Error::NoCgroup2)
}

/// Mount point of the first filesystem of type `fstype` in mountinfo text.
pub fn parse_mountinfo_fs(text: &str, fstype: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let (left, right) = line.split_once(" - ")?;
        let ty = right.split_whitespace().next()?;
        if ty != fstype {
            return None;
        }
        let mountpoint = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mountpoint)))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Resolves `--cgroup`: absolute paths must lie inside the cgroup v2 mount; `None` means the
/// mount's root.
pub fn resolve_cgroup(requested: Option<&Path>) -> Result<PathBuf> {
    let mount = cgroup2_mount()?;
    let Some(requested) = requested else {
        return Ok(mount);
    };
    let path = std::fs::canonicalize(requested)
        .map_err(|e| Error::io("opening --cgroup", requested, e))?;
    if !path.starts_with(&mount) {
        return Err(Error::CgroupOutsideMount { path, mount });
    }
    Ok(path)
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const TRACEFS_MAGIC: i64 = 0x7472_6163;

/// Mounts a fresh `fstype` at `dir` unless `dir` is already one (by its statfs magic). Returns
/// whether this call mounted it.
fn ensure_mounted(dir: &Path, fstype: &'static str, magic: i64) -> Result<bool> {
    let st = nix::sys::statfs::statfs(dir).map_err(|e| Error::io("statfs", dir, e.into()))?;
    if st.filesystem_type().0 == magic {
        return Ok(false);
    }
    nix::mount::mount(
        Some(fstype),
        dir,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        Error::io(
            "mounting a filesystem of its type",
            format!("{fstype} at {}", dir.display()),
            e.into(),
        )
    })?;
    Ok(true)
}

/// Makes sure `dir` is on a bpffs, mounting a fresh instance there if it is not. Returns whether
/// this call mounted it.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating the bpffs directory", dir, e))?;
    ensure_mounted(dir, "bpf", BPF_FS_MAGIC)
}

/// Where tracefs is mounted, mounting it at /sys/kernel/tracing if it is not (tracepoints attach
/// through it; mounting it changes nothing else).
pub fn ensure_tracefs() -> Result<PathBuf> {
    let dir = Path::new("/sys/kernel/tracing");
    ensure_mounted(dir, "tracefs", TRACEFS_MAGIC)?;
    Ok(dir.into())
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the same 64-bit id `bpf_get_netns_cookie` returns.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens `path` and checks that it is a network namespace (a bind mount under /run/netns, or
/// /proc/PID/ns/net).
pub fn open_netns(path: &Path) -> Result<OwnedFd> {
    let file = File::open(path).map_err(|e| Error::io("opening the network namespace", path, e))?;
    // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
    let ty = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if ty < 0 {
        return Err(Error::Invalid(format!(
            "{} is not a namespace file (NS_GET_NSTYPE: {})",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    if ty != libc::CLONE_NEWNET {
        return Err(Error::Invalid(format!(
            "{} is a namespace of type {ty:#x}, not a network namespace",
            path.display()
        )));
    }
    Ok(file.into())
}

/// The cookie of the network namespace `path`, read from a socket created inside it on a thread
/// of its own (setns only moves the calling thread).
pub fn netns_cookie(path: &Path) -> Result<u64> {
    let fd = open_netns(path)?;
    let path_owned = path.to_path_buf();
    std::thread::spawn(move || -> Result<u64> {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io("entering the network namespace", &path_owned, e.into()))?;
        current_netns_cookie().map_err(|e| Error::io("reading SO_NETNS_COOKIE", &path_owned, e))
    })
    .join()
    .map_err(|_| Error::Internal("the netns cookie thread panicked".into()))?
}

/// The cookie of the calling thread's network namespace.
pub fn current_netns_cookie() -> std::io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and len says so.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Aborts the established TCP socket `local` ↔ `remote` of the network namespace `netns`, as
/// `ss -K` does (sock_diag `SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY): its owner's pending and
/// later calls fail with ECONNABORTED and the peer gets a reset. On a thread of its own, which
/// enters the namespace.
pub fn destroy_tcp(
    netns: &Path,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> std::io::Result<()> {
    let fd = File::open(netns)?;
    std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        sock_destroy(local, remote)
    })
    .join()
    .map_err(|_| std::io::Error::other("the SOCK_DESTROY thread panicked"))?
}

/// `SOCK_DESTROY` (linux/sock_diag.h) and the sizes of the request it takes.
const SOCK_DESTROY: u16 = 21;
const NLMSG_HDR: usize = 16;
const INET_DIAG_REQ_V2: usize = 56;

/// The request: `nlmsghdr` + `inet_diag_req_v2` (linux/inet_diag.h), native endian except the
/// ports and addresses, which are in network order.
fn sock_destroy_request(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Vec<u8> {
    use std::net::IpAddr;
    let v4 = |a: IpAddr| match a {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(v) => v.to_ipv4_mapped(),
    };
    // IPv4 (and IPv4-mapped) sockets are found through the IPv4 tables.
    let (family, src, dst) = match (v4(local.ip()), v4(remote.ip())) {
        (Some(s), Some(d)) => {
            let mut a = [0u8; 16];
            let mut b = [0u8; 16];
            a[..4].copy_from_slice(&s.octets());
            b[..4].copy_from_slice(&d.octets());
            (libc::AF_INET as u8, a, b)
        }
        _ => {
            let six = |a: IpAddr| match a {
                IpAddr::V6(v) => v.octets(),
                IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
            };
            (libc::AF_INET6 as u8, six(local.ip()), six(remote.ip()))
        }
    };
    let len = NLMSG_HDR + INET_DIAG_REQ_V2;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DESTROY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    m.extend_from_slice(&src);
    m.extend_from_slice(&dst);
    m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    debug_assert_eq!(m.len(), len);
    m
}

fn sock_destroy(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> std::io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
    };
    let s = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let req = sock_destroy_request(local, remote);
    sendto(
        s.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        nix::sys::socket::MsgFlags::empty(),
    )?;
    // The answer is an NLMSG_ERROR whose error field (after the 16-byte header) is 0 or -errno.
    let mut buf = [0u8; 256];
    let n = recv(s.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty())?;
    if n < NLMSG_HDR + 4 {
        return Err(std::io::Error::other(format!(
            "short sock_diag answer ({n} bytes)"
        )));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty != libc::NLMSG_ERROR as u16 {
        return Err(std::io::Error::other(format!(
            "unexpected sock_diag answer type {ty}"
        )));
    }
    let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if err == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(-err))
    }
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

/// A clock's time in ns (CLOCK_MONOTONIC is what `bpf_ktime_get_ns` reads).
pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Registers an fd the caller owns with the async runtime, for readiness to read.
pub fn watch_readable(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd owns `fd` (it is moved in) and never replaces or closes it while
    // registered: tokio's requirement (tokio-rs/tokio#8587).
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            .map_err(|e| e.into_parts().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let text = "\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            parse_mountinfo_fs(text, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_mountinfo_fs(text, "bpf"), None);
    }

    #[test]
    fn sock_destroy_requests_are_laid_out_like_inet_diag_req_v2() {
        let r = sock_destroy_request(
            "10.0.0.2:8080".parse().unwrap(),
            "[::ffff:10.0.0.3]:40000".parse().unwrap(),
        );
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 21);
        // Family and protocol: a mapped peer of an IPv4 socket is looked up as IPv4.
        assert_eq!((r[16], r[17]), (libc::AF_INET as u8, 6));
        assert_eq!(&r[24..26], &8080u16.to_be_bytes());
        assert_eq!(&r[26..28], &40000u16.to_be_bytes());
        assert_eq!(&r[28..32], &[10, 0, 0, 2]);
        assert_eq!(&r[44..48], &[10, 0, 0, 3]);
        assert_eq!(&r[64..72], &[0xff; 8]);
        let r = sock_destroy_request(
            "[fd00::2]:1".parse().unwrap(),
            "[fd00::3]:2".parse().unwrap(),
        );
        assert_eq!(r[16], libc::AF_INET6 as u8);
        assert_eq!(r[28], 0xfd);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let text = "41 35 0:38 / /mnt/with\\040space rw shared:1 - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo_fs(text, "cgroup2"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
