//! The splice guard (tracepoints): detects a pod reading one of its sockets with splice(2) or
//! sendfile(2) and keeps that pod's new connections out of the fast path from then on.
//!
//! Why: redirected bytes wait in the receiving socket's psock queue (`ingress_msg`), and
//! `tcp_splice_read` reads only `sk_receive_queue` — a splice reader of an accelerated socket
//! sees a silent EOF (Go's `io.Copy` between two `*net.TCPConn` splices). Where BPF LSM or
//! `fmod_ret` load, a guard could fail such a read with EINVAL before any byte is consumed; this
//! kernel policy refuses both (and has no kprobes), so the guard observes instead:
//!
//! - `syscalls:sys_enter_splice` / `sys_enter_sendfile64` mark the calling thread, the matching
//!   exits unmark it;
//! - `tcp:tcp_rcv_space_adjust` fires inside `tcp_splice_read` (through `__tcp_read_sock`, even
//!   when nothing is copied) with the socket's cookie: on a marked thread, that socket is being
//!   spliced. Its pod (sockops recorded cookie → netns) goes into `ML_SPLICE_PODS`, and sockops
//!   inserts no socket of that pod, or connected to it, again.
//!
//! Connections already redirected at the moment of detection are not saved (their bytes are in
//! the psock queue, which splice never reads); at most those are affected. io_uring's splice
//! does not pass through the syscall tracepoints and is not detected.
//!
//! These programs only read their context and write our maps; they never change a syscall.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::generated::bpf_get_current_pid_tgid, macros::tracepoint,
    programs::TracePointContext,
};
use dataplane_common::{Counter, RCV_SPACE_COOKIE_OFFSET};

use crate::maps::{ML_COOKIE_NETNS, ML_SPLICE_PODS, ML_SPLICING, count};

#[inline(always)]
fn enter() {
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_pid_tgid() };
    // A full map only means a splice may go undetected (counted); the syscall is never
    // affected.
    if ML_SPLICING.insert(&id, &1, BPF_ANY as u64).is_err() {
        count(Counter::SpliceThreadStoreError, 1);
    }
}

#[inline(always)]
fn exit() {
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_pid_tgid() };
    let _absent_is_fine: Result<(), i64> = ML_SPLICING.remove(&id).map_err(i64::from);
}

#[tracepoint(category = "syscalls", name = "sys_enter_splice")]
pub fn ml_splice_in(_ctx: TracePointContext) -> u32 {
    enter();
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_splice")]
pub fn ml_splice_out(_ctx: TracePointContext) -> u32 {
    exit();
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendfile64")]
pub fn ml_sendfile_in(_ctx: TracePointContext) -> u32 {
    enter();
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_sendfile64")]
pub fn ml_sendfile_out(_ctx: TracePointContext) -> u32 {
    exit();
    0
}

#[tracepoint(category = "tcp", name = "tcp_rcv_space_adjust")]
pub fn ml_rcvspace(ctx: TracePointContext) -> u32 {
    // SAFETY: a helper without arguments; then hash lookups whose values are copied out.
    let id = unsafe { bpf_get_current_pid_tgid() };
    if unsafe { ML_SPLICING.get(&id) }.is_none() {
        return 0;
    }
    // SAFETY: the record's sock_cookie field (its offset is checked by the agent).
    let Ok(cookie) = (unsafe { ctx.read_at::<u64>(RCV_SPACE_COOKIE_OFFSET) }) else {
        return 0;
    };
    let Some(netns) = (unsafe { ML_COOKIE_NETNS.get(&cookie) }).copied() else {
        return 0;
    };
    count(Counter::SpliceDetected, 1);
    match ML_SPLICE_PODS.get_ptr_mut(&netns) {
        // SAFETY: our map's value; a lost increment under a race only undercounts.
        Some(n) => unsafe { *n += 1 },
        None => {
            if ML_SPLICE_PODS.insert(&netns, &1, BPF_ANY as u64).is_err() {
                count(Counter::SplicePodStoreError, 1);
            }
        }
    }
    0
}
