//! Payload capture for HTTP telemetry: the first bytes of what applications of observed pods
//! write and read, wherever a message can start.
//!
//! The socket layer's length tracepoints know the socket and how many bytes a call moved, but
//! not the application's buffer. The syscall the thread is in does: its arguments are in the
//! user registers the kernel saved at entry (`bpf_task_pt_regs`), untouched until it returns.
//! So the length tracepoint of a call on an observed socket reads the buffer argument of the
//! syscall in progress — after a write the bytes are still in the buffer, after a read they are
//! already there — and copies from it. No hook on the syscalls themselves: a process that is
//! not observed pays nothing, and an observed one pays only on calls that can start a message.
//!
//! What is copied is bounded: at most [`DATA_CAPTURE`] bytes per call, starting where the agent
//! expects the next message on that socket and direction (`ML_HTTP_NEXT`), and nothing of a
//! call that ends inside a body the agent has already measured, or on a socket it found not
//! to speak HTTP. A call that ends exactly where the next message is expected still produces
//! an empty record: it tells the agent when the message's last byte moved. Records are as long
//! as what they carry (three sizes), not always [`DATA_CAPTURE`].
//!
//! Bytes moved by other syscalls (sendfile, splice, io_uring, sendmmsg), by a 32-bit process or
//! by a kernel thread produce a record without data (`no_buffer`), so the agent knows the
//! stream moved past what it could see.
//!
//! x86-64 only: the register layout and syscall numbers below are that architecture's ABI.

use aya_ebpf::helpers::generated::{
    bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
    bpf_task_pt_regs,
};
use dataplane_common::{Counter, DATA_CAPTURE, DataEventOf, Flow, flow_event};

use crate::maps::{ML_EVENTS, ML_HTTP_NEXT, count};

/// `struct pt_regs` (arch/x86/include/uapi/asm/ptrace.h, the layout ptrace's user_regs_struct
/// shares): the slice from `dx` to `cs`, read in one call.
const REGS_FROM: u64 = 12 * 8;
#[repr(C)]
#[derive(Default)]
struct Regs {
    dx: u64,
    si: u64,
    di: u64,
    orig_ax: u64,
    ip: u64,
    cs: u64,
}
/// `__USER_CS`: a 64-bit process (a 32-bit one has other syscall numbers).
const USER_CS_64: u64 = 0x33;
/// arch/x86/entry/syscalls/syscall_64.tbl.
const NR_READ: u64 = 0;
const NR_WRITE: u64 = 1;
const NR_READV: u64 = 19;
const NR_WRITEV: u64 = 20;
const NR_SENDTO: u64 = 44;
const NR_RECVFROM: u64 = 45;
const NR_SENDMSG: u64 = 46;
const NR_RECVMSG: u64 = 47;
/// `struct user_msghdr`: `msg_iov` (include/linux/socket.h).
const MSGHDR_IOV: u64 = 16;

/// Reads a user-space u64 at `at`; `None` if it cannot be read.
#[inline(always)]
fn user_u64(at: u64) -> Option<u64> {
    let mut v = 0u64;
    // SAFETY: bpf_probe_read_user copies 8 bytes from a user address into our stack value, or
    // fails without touching anything.
    let r = unsafe { bpf_probe_read_user((&raw mut v).cast(), 8, at as *const core::ffi::c_void) };
    (r == 0).then_some(v)
}

/// The buffer (its first segment) of the read/write family syscall the current thread is in:
/// (address, length), or `None` for anything else.
#[inline(never)]
fn syscall_buffer() -> Option<(u64, u64)> {
    let mut r = Regs::default();
    // SAFETY: helpers that only read the current task; bpf_probe_read_kernel copies the
    // register slice into our stack value or fails leaving it zeroed.
    let ok = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64;
        bpf_probe_read_kernel(
            (&raw mut r).cast(),
            size_of::<Regs>() as u32,
            (regs + REGS_FROM) as *const core::ffi::c_void,
        ) == 0
    };
    // Kernel threads (io_uring's workers among them) have no user registers (zeroed: cs 0).
    if !ok || r.cs & 0xffff != USER_CS_64 {
        return None;
    }
    match r.orig_ax {
        NR_READ | NR_WRITE | NR_RECVFROM | NR_SENDTO => Some((r.si, r.dx)),
        NR_READV | NR_WRITEV => Some((user_u64(r.si)?, user_u64(r.si + 8)?)),
        NR_RECVMSG | NR_SENDMSG => {
            let iov = user_u64(r.si + MSGHDR_IOV)?;
            Some((user_u64(iov)?, user_u64(iov + 8)?))
        }
        _ => None,
    }
}

/// A call moved `n` bytes of `flow`'s direction `dir` (0 write, 1 read), starting at stream
/// offset `offset`: copies what the agent may need of it into a record.
#[inline(always)]
pub fn capture(flow: *const Flow, dir: u32, offset: u64, n: u64) {
    // SAFETY: our map's value.
    let cookie = unsafe { (*flow).cookie };
    let end = offset + n;
    // SAFETY: a hash lookup; the value is copied out at once.
    let next = unsafe { ML_HTTP_NEXT.get(&cookie) }.map_or(0, |v| v[(dir & 1) as usize]);
    if end < next {
        // Inside a body the agent has measured, or not HTTP at all (u64::MAX).
        return;
    }
    let start = if next > offset { next } else { offset };
    let buf = syscall_buffer();
    let mut len = 0;
    if let Some((_, blen)) = buf {
        let skip = start - offset;
        len = end - start;
        if skip + len > blen {
            len = blen.saturating_sub(skip);
        }
        if len > DATA_CAPTURE as u64 {
            len = DATA_CAPTURE as u64;
        }
    }
    let h = Head {
        dir,
        cookie,
        start,
        end,
        src: buf.map_or(0, |(ptr, _)| ptr + (start - offset)),
        no_buffer: buf.is_none() as u32,
    };
    // The smallest record that holds the bytes (most requests and response heads fit 208).
    if len == 0 {
        emit::<0>(&h, 0);
    } else if len <= 208 {
        emit::<208>(&h, len as u32);
    } else {
        emit::<DATA_CAPTURE>(&h, len as u32);
    }
}

/// What a record says besides its bytes.
struct Head {
    dir: u32,
    cookie: u64,
    start: u64,
    end: u64,
    /// Where the bytes are in the application's memory.
    src: u64,
    no_buffer: u32,
}

#[inline(always)]
fn emit<const N: usize>(h: &Head, len: u32) {
    let Some(mut slot) = ML_EVENTS.reserve::<DataEventOf<N>>(0) else {
        count(Counter::EventsLost, 1);
        return;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` is the reserved record; every field is written before it is submitted.
    unsafe {
        (*ev).kind = flow_event::DATA;
        (*ev).dir = h.dir;
        (*ev).cookie = h.cookie;
        (*ev).at_ns = bpf_ktime_get_ns();
        (*ev).offset = h.start;
        (*ev).end = h.end;
        (*ev).len = 0;
        (*ev).no_buffer = h.no_buffer;
    }
    if N > 0 {
        // The verifier needs the bound on the value it sees, not only the comparisons above.
        let len = len & (N.next_power_of_two() as u32 * 2 - 1);
        if len > 0 && len <= N as u32 {
            // SAFETY: copies at most N bytes from the application's buffer into the record's
            // data array, or fails leaving it unfilled (len stays 0).
            let r = unsafe {
                bpf_probe_read_user(
                    (&raw mut (*ev).data).cast(),
                    len,
                    h.src as *const core::ffi::c_void,
                )
            };
            if r == 0 {
                // SAFETY: as above.
                unsafe { (*ev).len = len };
            }
        }
    }
    slot.submit(0);
}
