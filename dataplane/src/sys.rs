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
    fn unescapes_spaces_in_mount_points() {
        let text = "41 35 0:38 / /mnt/with\\040space rw shared:1 - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo_fs(text, "cgroup2"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
