//! The reader guard (tracepoints and cgroup/setsockopt): detects a pod reading its sockets in a
//! way redirected bytes cannot serve, and keeps that pod's new connections out of the fast path
//! from then on. Redirected bytes wait in the receiving socket's psock queue (`ingress_msg`) and
//! `tcp_bpf_recvmsg` serves them, so:
//!
//! - **splice(2) / sendfile(2)** from the socket see none of them: `tcp_splice_read` reads only
//!   `sk_receive_queue`, and the reader gets a silent EOF (Go's `io.Copy` between two
//!   `*net.TCPConn` splices);
//! - **`recv(MSG_WAITALL)`** returns what the psock queue holds, short of the length asked for;
//! - **`SO_RCVLOWAT`** is not honoured (a blocking read returns before the low-water mark).
//!
//! Where BPF LSM or `fmod_ret` load, a guard could fail such a read with EINVAL before any byte
//! is consumed; this kernel policy refuses both (and has no kprobes), so the guard observes:
//!
//! - `syscalls:sys_enter_splice` / `sys_enter_sendfile64` mark the calling thread, the matching
//!   exits unmark it; `tcp:tcp_rcv_space_adjust` fires inside `tcp_splice_read` (through
//!   `__tcp_read_sock`, even when nothing is copied) with the socket's address: on a marked
//!   thread, that socket is being spliced;
//! - io_uring's `IORING_OP_SPLICE` makes no splice syscall and may run in an io-wq worker of the
//!   submitting process: `io_uring:io_uring_submit_req` / `io_uring_complete` count such
//!   requests in flight per process, and a `tcp_rcv_space_adjust` in that process meanwhile
//!   names the socket (another thread of it reading a TCP socket at that moment is taken for
//!   the splice: a false detection costs the pod speed, never bytes);
//! - `sock:sock_recv_length` fires after every `recvmsg` with the socket's address and the
//!   caller's flags: `MSG_WAITALL` on a TCP socket;
//! - cgroup/setsockopt sees `SO_RCVLOWAT` before the kernel applies it (on a listening socket:
//!   before any connection it accepts exists).
//!
//! sockops recorded every enrolled socket's address → flow (`ML_FLOWS`), so the pod is found;
//! it goes into `ML_READER_PODS`, and sockops inserts no socket of that pod, or connected to it,
//! again. Connections already in the fast path at the moment of detection are not saved (their
//! bytes are already queued where such a reader never looks); at most those are affected. A
//! socket spliced by a splice(2)/sendfile(2) call is also recorded in `ML_SPLICED`: if it is in
//! the fast path the agent resets it, so its reader and peer get an error instead of waiting
//! forever for bytes splice cannot see (an io_uring detection is a guess and never resets; a
//! MSG_WAITALL reader's connection goes on working after its short read and is left alone).
//!
//! These programs only read their context and write our maps; they never change a syscall or a
//! socket option.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::generated::{bpf_get_current_pid_tgid, bpf_get_netns_cookie},
    macros::{cgroup_sockopt, raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, SockoptContext, TracePointContext},
};
use dataplane_common::{
    Counter, ReaderPod, SockKey, TP_SK_OFFSET, URING_OPCODE_OFFSET, URING_REQ_OFFSET, flow_flags,
};

use crate::{
    maps::{ML_NETNS, ML_SPLICED, ML_SPLICING, ML_URING_REQS, ML_URING_TGIDS, count, guard_pod},
    telemetry::{add_bytes, flow_at},
};

const IPPROTO_TCP: u16 = 6;
/// `IORING_OP_SPLICE` (include/uapi/linux/io_uring.h).
const IORING_OP_SPLICE: u8 = 30;
const MSG_WAITALL: i32 = 0x100;
const MSG_PEEK: i32 = 0x2;
const SOL_SOCKET: i32 = 1;
const SO_RCVLOWAT: i32 = 18;
/// The only return value a setsockopt program may give without failing the call.
const PASS: i32 = 1;

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

/// The key of the enrolled socket at `sk` (a `struct sock *` from a tracepoint record).
#[inline(always)]
fn socket_of(ctx: &TracePointContext) -> Option<SockKey> {
    // SAFETY: the record's socket address field (its offset is checked by the agent).
    let sk = unsafe { ctx.read_at::<u64>(TP_SK_OFFSET) }.ok()?;
    // SAFETY: the flow is our map's value; the key is copied out at once.
    flow_at(sk).map(|f| unsafe { (*f).key })
}

#[tracepoint(category = "io_uring", name = "io_uring_submit_req")]
pub fn ml_uring_submit(ctx: TracePointContext) -> u32 {
    // SAFETY: fields of the record (offsets checked by the agent).
    if unsafe { ctx.read_at::<u8>(URING_OPCODE_OFFSET) } != Ok(IORING_OP_SPLICE) {
        return 0;
    }
    let Ok(req) = (unsafe { ctx.read_at::<u64>(URING_REQ_OFFSET) }) else {
        return 0;
    };
    // SAFETY: a helper without arguments.
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    if ML_URING_REQS.insert(&req, &tgid, BPF_ANY as u64).is_err() {
        count(Counter::SpliceThreadStoreError, 1);
        return 0;
    }
    match ML_URING_TGIDS.get_ptr_mut(&tgid) {
        // SAFETY: our map's value; a lost increment under a race only undercounts.
        Some(n) => unsafe { *n += 1 },
        None => {
            if ML_URING_TGIDS.insert(&tgid, &1, BPF_ANY as u64).is_err() {
                count(Counter::SpliceThreadStoreError, 1);
            }
        }
    }
    0
}

#[tracepoint(category = "io_uring", name = "io_uring_complete")]
pub fn ml_uring_done(ctx: TracePointContext) -> u32 {
    // SAFETY: a field of the record (offset checked by the agent).
    let Ok(req) = (unsafe { ctx.read_at::<u64>(URING_REQ_OFFSET) }) else {
        return 0;
    };
    // SAFETY: a hash lookup; the value is copied out at once.
    let Some(tgid) = (unsafe { ML_URING_REQS.get(&req) }).copied() else {
        return 0;
    };
    let _gone_is_fine: Result<(), i64> = ML_URING_REQS.remove(&req).map_err(i64::from);
    if let Some(n) = ML_URING_TGIDS.get_ptr_mut(&tgid) {
        // SAFETY: our map's value.
        let left = unsafe { (*n).saturating_sub(1) };
        if left == 0 {
            let _gone_is_fine: Result<(), i64> = ML_URING_TGIDS.remove(&tgid).map_err(i64::from);
        } else {
            // SAFETY: as above.
            unsafe { *n = left };
        }
    }
    0
}

/// How sure the guard is that the current thread is splicing the socket it reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Splicing {
    No,
    /// An io_uring splice of this process is in flight: the read may be it, or another TCP
    /// read of the process.
    Maybe,
    /// The thread is inside splice(2)/sendfile(2), which reads only the socket it was given.
    Surely,
}

#[inline(always)]
fn splicing() -> Splicing {
    // SAFETY: a helper without arguments; then hash lookups used for presence only.
    let id = unsafe { bpf_get_current_pid_tgid() };
    if unsafe { ML_SPLICING.get(&id) }.is_some() {
        Splicing::Surely
    } else if unsafe { ML_URING_TGIDS.get(&((id >> 32) as u32)) }.is_some() {
        Splicing::Maybe
    } else {
        Splicing::No
    }
}

#[tracepoint(category = "tcp", name = "tcp_rcv_space_adjust")]
pub fn ml_rcvspace(ctx: TracePointContext) -> u32 {
    let how = splicing();
    if how == Splicing::No {
        return 0;
    }
    if let Some(key) = socket_of(&ctx) {
        count(Counter::SpliceDetected, 1);
        guard_pod(key.netns, |p: &mut ReaderPod| p.splice += 1);
        // Only a certain detection may cost a connection (the agent resets it); a guess only
        // costs the pod the fast path.
        if how == Splicing::Surely && ML_SPLICED.insert(&key, &1, BPF_ANY as u64).is_err() {
            count(Counter::SkKeyStoreError, 1);
        }
    }
    0
}

/// `sock_recv_length` fires after every recvmsg on the machine: a raw tracepoint (see
/// telemetry.rs), `TP_PROTO(struct sock *sk, int ret, int flags)`. It counts the bytes read
/// (telemetry) and catches `MSG_WAITALL` (the guard); one flow lookup serves both.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn ml_recv_length(ctx: RawTracePointContext) -> i32 {
    let ret = ctx.arg::<u64>(1) as i32;
    let flags = ctx.arg::<u64>(2) as i32;
    let counts = ret > 0 && flags & MSG_PEEK == 0;
    if !counts && flags & MSG_WAITALL == 0 {
        return 0;
    }
    // Only TCP sockets of enrolled pods have a flow.
    let Some(flow) = flow_at(ctx.arg::<u64>(0)) else {
        return 0;
    };
    // SAFETY: our map's value; the add is atomic (two threads may read one socket).
    if counts && unsafe { (*flow).flags } & flow_flags::OBSERVED != 0 {
        let offset = add_bytes(unsafe { &raw mut (*flow).received }, ret as u64);
        crate::payload::capture(flow, 1, offset, ret as u64);
    }
    if flags & MSG_WAITALL != 0 {
        count(Counter::WaitallDetected, 1);
        // SAFETY: our map's value.
        guard_pod(unsafe { (*flow).key.netns }, |p: &mut ReaderPod| {
            p.waitall += 1
        });
    }
    0
}

#[cgroup_sockopt(setsockopt)]
pub fn ml_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: `so` is the live context; level and optname are readable 4-byte fields.
    let (level, optname) = unsafe { (read_volatile(&(*so).level), read_volatile(&(*so).optname)) };
    if level != SOL_SOCKET || optname != SO_RCVLOWAT {
        return PASS;
    }
    // SAFETY: the context's socket (never null for sockopt programs) and its buffer bounds.
    let (sk, start, end) = unsafe {
        (
            read_volatile(&(*so).__bindgen_anon_1.sk),
            read_volatile(&(*so).__bindgen_anon_2.optval) as *const u8,
            read_volatile(&(*so).__bindgen_anon_3.optval_end) as *const u8,
        )
    };
    // SAFETY: the socket's protocol field.
    if sk.is_null() || unsafe { read_volatile(&(*sk).protocol) } != u32::from(IPPROTO_TCP) {
        return PASS;
    }
    // The value is an int; the verifier wants the bounds proven before the read.
    if start.wrapping_add(4) > end {
        return PASS;
    }
    // SAFETY: four bytes inside [optval, optval_end), checked just above.
    let lowat = unsafe { core::ptr::read_unaligned(start as *const i32) };
    if lowat <= 1 {
        return PASS;
    }
    // SAFETY: bpf_get_netns_cookie is allowed for sockopt programs.
    let netns = unsafe { bpf_get_netns_cookie(so.cast()) };
    // SAFETY: a hash lookup used for presence only.
    if unsafe { ML_NETNS.get(&netns) }.is_some() {
        count(Counter::RcvlowatDetected, 1);
        guard_pod(netns, |p: &mut ReaderPod| p.rcvlowat += 1);
    }
    PASS
}
