//! Payload capture for HTTP telemetry: the first bytes of what applications of observed pods
//! write and read, wherever a message can start.
//!
//! The socket layer's length tracepoints know the socket and how many bytes a call moved, but
//! not the application's buffer; the syscall tracepoints know the buffer but not the socket. So
//! the enter tracepoints of the read/write family (`read`, `write`, `recvfrom`, `sendto`,
//! `readv`, `writev`, `recvmsg`, `sendmsg`) keep the thread's buffer (its first segment) until
//! the exit tracepoint, and the length tracepoint of a call on an observed socket copies from
//! it: after a write the bytes are still in the buffer, after a read they are already there.
//! Only threads in the agent's cgroup subtree are considered (one helper call for everyone
//! else).
//!
//! What is copied is bounded: at most [`DATA_CAPTURE`] bytes per call, starting where the agent
//! expects the next message on that socket and direction (`ML_HTTP_NEXT`), and nothing of a
//! call that ends inside a body the agent has already measured, or on a socket it found not
//! to speak HTTP. A call that ends exactly where the next message is expected still produces
//! an empty record: it tells the agent when the message's last byte moved.
//!
//! Bytes moved by other means (sendfile, splice, io_uring, sendmmsg) produce a record without
//! data (`no_buffer`), so the agent knows the stream moved past what it could see.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_user,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use dataplane_common::{Counter, DATA_CAPTURE, DataEvent, Flow, SysBuf, flow_event};

use crate::maps::{ML_CAPTURE, ML_EVENTS, ML_HTTP_NEXT, ML_SPLICING, ML_SYSBUF, count};

/// Offsets in the `syscalls:sys_enter_*` records of the read/write family: the buffer (or
/// iovec array, or msghdr) and the length (checked by the agent against the formats).
const ARG_BUF: usize = 24;
const ARG_LEN: usize = 32;
/// `struct user_msghdr`: `msg_iov` (include/linux/socket.h).
const MSGHDR_IOV: u64 = 16;

/// Whether the current thread is one the capture watches (in the agent's cgroup subtree).
#[inline(always)]
fn watched() -> bool {
    let Some(cfg) = ML_CAPTURE.get(0) else {
        return false;
    };
    if cfg.on == 0 {
        return false;
    }
    // SAFETY: a helper allowed in tracepoint programs; it only reads the current task.
    let id = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.cgroup_level as i32) };
    id == cfg.cgroup_id
}

#[inline(always)]
fn keep(ptr: u64, len: u64) {
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_pid_tgid() };
    if ML_SYSBUF
        .insert(&id, &SysBuf { ptr, len }, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::SysBufStoreError, 1);
    }
}

/// Reads a user-space u64 at `at`; `None` if it cannot be read.
#[inline(always)]
fn user_u64(at: u64) -> Option<u64> {
    let mut v = 0u64;
    // SAFETY: bpf_probe_read_user copies 8 bytes from a user address into our stack value, or
    // fails without touching anything.
    let r = unsafe { bpf_probe_read_user((&raw mut v).cast(), 8, at as *const core::ffi::c_void) };
    (r == 0).then_some(v)
}

/// `read`, `write`, `recvfrom`, `sendto`: the buffer and its length are arguments.
#[tracepoint]
pub fn ml_sys_buf(ctx: TracePointContext) -> u32 {
    if watched() {
        // SAFETY: fields of the record (offsets checked by the agent).
        let ptr = unsafe { ctx.read_at::<u64>(ARG_BUF) }.unwrap_or(0);
        let len = unsafe { ctx.read_at::<u64>(ARG_LEN) }.unwrap_or(0);
        keep(ptr, len);
    }
    0
}

/// `readv`, `writev`: the first iovec of the array.
#[tracepoint]
pub fn ml_sys_iov(ctx: TracePointContext) -> u32 {
    if watched() {
        // SAFETY: a field of the record (offset checked by the agent).
        let iov = unsafe { ctx.read_at::<u64>(ARG_BUF) }.unwrap_or(0);
        if let (Some(ptr), Some(len)) = (user_u64(iov), user_u64(iov + 8)) {
            keep(ptr, len);
        }
    }
    0
}

/// `recvmsg`, `sendmsg`: the first iovec of the message header's array.
#[tracepoint]
pub fn ml_sys_msg(ctx: TracePointContext) -> u32 {
    if watched() {
        // SAFETY: a field of the record (offset checked by the agent).
        let msg = unsafe { ctx.read_at::<u64>(ARG_BUF) }.unwrap_or(0);
        if let Some(iov) = user_u64(msg + MSGHDR_IOV)
            && let (Some(ptr), Some(len)) = (user_u64(iov), user_u64(iov + 8))
        {
            keep(ptr, len);
        }
    }
    0
}

/// The end of any of them: the buffer is no longer the thread's current one.
#[tracepoint]
pub fn ml_sys_done(_ctx: TracePointContext) -> u32 {
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_pid_tgid() };
    let _absent_is_fine: Result<(), i64> = ML_SYSBUF.remove(&id).map_err(i64::from);
    0
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
    // SAFETY: helpers without arguments, and a hash lookup copied out at once.
    let id = unsafe { bpf_get_current_pid_tgid() };
    let buf = unsafe { ML_SYSBUF.get(&id) }.copied();
    // A splice or sendfile moves bytes from a pipe or a file, not the buffer of an earlier
    // read or write this thread left behind.
    let buf = buf.filter(|_| unsafe { ML_SPLICING.get(&id) }.is_none());
    let Some(mut slot) = ML_EVENTS.reserve::<DataEvent>(0) else {
        count(Counter::EventsLost, 1);
        return;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` is the reserved record; every field is written before it is submitted.
    unsafe {
        (*ev).kind = flow_event::DATA;
        (*ev).dir = dir;
        (*ev).cookie = cookie;
        (*ev).at_ns = bpf_ktime_get_ns();
        (*ev).offset = start;
        (*ev).end = end;
        (*ev).len = 0;
        (*ev).no_buffer = buf.is_none() as u32;
    }
    if let Some(b) = buf {
        let skip = start - offset;
        let mut len = end - start;
        if skip + len > b.len {
            len = b.len.saturating_sub(skip);
        }
        if len > DATA_CAPTURE as u64 {
            len = DATA_CAPTURE as u64;
        }
        // The verifier needs the bound on the value it sees, not only the comparisons above.
        let len = (len as u32) & (DATA_CAPTURE as u32 * 2 - 1);
        if len > 0 && len <= DATA_CAPTURE as u32 {
            // SAFETY: copies at most DATA_CAPTURE bytes from the application's buffer into the
            // record's data array, or fails leaving it unfilled (len stays 0).
            let r = unsafe {
                bpf_probe_read_user(
                    (&raw mut (*ev).data).cast(),
                    len,
                    (b.ptr + skip) as *const core::ffi::c_void,
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
