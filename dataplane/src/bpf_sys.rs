//! The two BPF commands aya 0.14 does not expose for our use: opening a pinned object as a plain
//! fd, and atomically replacing the program behind a link (`BPF_LINK_UPDATE`, Linux 5.7), which is
//! how a restarted or upgraded agent swaps in its programs without a moment of detachment.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` as used by BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` as used by BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of union bpf_attr of the size we pass; the kernel
    // zero-extends the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned BPF object (map, program or link).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of `link` with `prog`, atomically.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
