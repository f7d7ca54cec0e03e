//! Flow telemetry: every established socket of an enrolled pod has a [`Flow`] in `ML_FLOWS`
//! (keyed by its kernel address, the name tracepoints give it), and the pod's observed ones
//! produce an open and a close [`FlowEvent`] in the `ML_EVENTS` ring buffer.
//!
//! Where each fact comes from, so that the totals equal what the applications wrote and read on
//! either path (packet hooks never see redirected payload, and TCP's own byte counters stay 0
//! for redirected sockets):
//! - bytes written and read: `sock:sock_send_length` / `sock:sock_recv_length`, which fire in
//!   the socket layer after every sendmsg/recvmsg (so for tcp_bpf's redirected sockets too)
//!   with the call's result; MSG_PEEK reads are not counted;
//! - the redirected part: the sk_msg program's per-socket counter (`SockStats`), taken at
//!   TCP_CLOSE for this socket and for its peer (or the peer's final count, which the peer
//!   leaves in this socket's entry when it closes first);
//! - RTT and retransmits: the sockops context at TCP_CLOSE (`srtt_us`, `total_retrans`);
//! - the end: `tcp:tcp_destroy_sock`, after the application's last read (an active closer
//!   reaches TCP_CLOSE from FIN_WAIT2 while its reader may still have bytes queued).
//!
//! Nothing here changes a socket or a syscall, and nothing waits: a full ring drops the event
//! and counts it.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns, macros::raw_tracepoint, programs::RawTracePointContext,
};
use dataplane_common::{Counter, Flow, FlowEvent, flow_event, flow_flags};

use crate::maps::{ML_EVENTS, ML_FLOWS, count};

/// The flow of the socket at kernel address `sk`.
#[inline(always)]
pub fn flow_at(sk: u64) -> Option<*mut Flow> {
    ML_FLOWS.get_ptr_mut(&sk)
}

/// Adds `n` to a flow's byte counter atomically (two threads may use one socket at once, and
/// tracepoints run outside the socket lock); returns the count before, the stream offset of
/// the call's first byte. That offset is read just before the add: the fetching form of the
/// atomic add needs BPF ISA v3, and aya-build compiles for the generic CPU. Two threads moving
/// bytes the same way on one socket at the same moment can both see the same offset (the
/// count stays exact; only the payload capture's position may be off, for a stream that such
/// interleaving garbles anyway).
#[inline(always)]
pub fn add_bytes(counter: *mut u64, n: u64) -> u64 {
    // SAFETY: as below.
    let before = unsafe { core::ptr::read_volatile(counter) };
    // The bpf target has no atomic types (rustc lists only atomic loads and stores for it), but
    // LLVM lowers this intrinsic to the BPF atomic add (`lock *(u64 *) += `), which every
    // kernel with BPF has.
    // SAFETY: `counter` points into a live map value, 8-byte aligned (Flow is repr(C) with u64
    // fields).
    let _old: u64 = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
    before
}

/// Sends one event; a full ring drops it and counts the loss. The flow is copied from where it
/// is (a map value) straight into the ring: sockops has no stack to spare for a copy.
#[inline(always)]
pub fn emit(kind: u32, flow: *const Flow) {
    match ML_EVENTS.reserve::<FlowEvent>(0) {
        Some(mut slot) => {
            let ev = slot.as_mut_ptr();
            // SAFETY: `ev` is the reserved record, `flow` a live map value; both hold their
            // types' sizes.
            unsafe {
                (*ev).kind = kind;
                (*ev)._pad = 0;
                (*ev).at_ns = bpf_ktime_get_ns();
                core::ptr::copy_nonoverlapping(flow, &raw mut (*ev).flow, 1);
            }
            slot.submit(0);
        }
        None => count(Counter::EventsLost, 1),
    }
}

// Raw tracepoints: the arguments of the tracepoint's TP_PROTO, without the perf record a
// classic tracepoint assembles first (about half the cost per call, and these run on every
// send and receive of the machine). `sock_send_length` and `sock_recv_length` share
// `TP_PROTO(struct sock *sk, int ret, int flags)` (include/trace/events/sock.h);
// `tcp_destroy_sock` is `TP_PROTO(struct sock *sk)` (include/trace/events/tcp.h).

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn ml_send_length(ctx: RawTracePointContext) -> i32 {
    let ret = ctx.arg::<u64>(1) as i32;
    if ret <= 0 {
        return 0;
    }
    if let Some(flow) = flow_at(ctx.arg::<u64>(0))
        // SAFETY: our map's value.
        && unsafe { (*flow).flags } & flow_flags::OBSERVED != 0
    {
        // SAFETY: as above.
        let offset = add_bytes(unsafe { &raw mut (*flow).sent }, ret as u64);
        crate::payload::capture(flow, 0, offset, ret as u64);
    }
    0
}

#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn ml_destroy_sock(ctx: RawTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    let Some(flow) = ML_FLOWS.get_ptr(&sk) else {
        return 0;
    };
    // SAFETY: our map's value, alive until the remove below.
    if unsafe { (*flow).flags } & flow_flags::OBSERVED != 0 {
        emit(flow_event::CLOSE, flow);
    }
    // The address is free for another socket once this one is destroyed.
    let _gone_is_fine: Result<(), i64> = ML_FLOWS.remove(&sk).map_err(i64::from);
    0
}
