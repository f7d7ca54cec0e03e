//! cgroup/sock_ops: enrolls established TCP sockets of enrolled network namespaces into the
//! SOCKHASH, and forgets their statistics when they close.
//!
//! Attached to the agent's `--cgroup` (in tests, the lab's own subtree) in multi-attach mode, so
//! it runs beside other programs there. It must never fail a socket operation: every outcome
//! returns [`SOCKOPS_OK`].

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use dataplane_common::{
    Addr, Counter, Flow, NetnsInfo, SockKey, SockStats, flow_event, flow_flags, is_loopback,
    netns_flags,
};

use crate::{
    key::{raw_tuple, sock_key},
    maps::{
        ML_ENDPOINTS, ML_FLOWS, ML_NETNS, ML_ORIG_DST, ML_ORIG_PENDING, ML_READER_PODS,
        ML_SOCK_STATS, ML_SOCKS, accel_allowed, count, evict, peer_netns, port_excluded,
    },
    telemetry::emit,
};

/// The return value that tells the kernel the program ran fine; 0 would turn some operations
/// into -EPERM for the socket.
const SOCKOPS_OK: u32 = 1;
const E2BIG: i32 = 7;

#[sock_ops]
pub fn ml_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(()) => SOCKOPS_OK,
        Err(reason) => {
            count(reason, 1);
            SOCKOPS_OK
        }
    }
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), Counter> {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let orig = hand_over_original_dst(ctx);
            on_established(ctx, orig)
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let orig = watch_captured(ctx);
            on_established(ctx, orig)
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            on_close(ctx);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The connection reached TCP_CLOSE: its flow takes the close-time facts, and its statistics and
/// original destination go. Not inlined, for the verifier's stack limit (see [`open_flow`]).
#[inline(never)]
fn on_close(ctx: &SockOpsContext) {
    // sock_ops only sees TCP sockets, all IPv4 or IPv6: the key cannot be missing, so there is
    // nothing to count.
    if let Some(key) = key_of(ctx) {
        // Before the statistics go: the flow takes its redirected counts from them. The flow
        // itself stays until tcp_destroy_sock (the reader may still read).
        close_flow(ctx, &key);
        // Missing entries are fine: the socket may never have been inserted, or captured.
        let _absent_is_fine: Result<(), i32> = ML_SOCK_STATS.remove(&key);
        let _absent_is_fine: Result<(), i32> = ML_ORIG_DST.remove(&key);
    }
}

/// The socket's kernel address, the identity the reader guard's tracepoints report.
fn sk_address(ctx: &SockOpsContext) -> u64 {
    // SAFETY: `sk` of a live sock_ops context, read with one 8-byte load as the verifier
    // requires; only its value is used (a key), never dereferenced.
    unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) as u64 }
}

fn key_of(ctx: &SockOpsContext) -> Option<SockKey> {
    let ops = ctx.ops;
    let t = raw_tuple!(ops);
    // SAFETY: bpf_get_netns_cookie is allowed for sock_ops since Linux 5.15.
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    sock_key(netns, &t)
}

/// A captured connect is established: its original destination, kept by the connect program
/// under the socket cookie, moves to the key the accepting socket (the proxy's) will have, where
/// the getsockopt program finds it. The proxy is on loopback in this netns (outbound capture) or
/// a pod of this node (inbound capture). This runs before the accepting side can accept: the
/// client handles the SYN-ACK before its ACK completes the handshake.
#[inline(never)]
fn hand_over_original_dst(ctx: &SockOpsContext) -> Option<Addr> {
    // SAFETY: bpf_get_socket_cookie is allowed for sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: a hash lookup; the value is copied out at once.
    let orig = (unsafe { ML_ORIG_PENDING.get(&cookie) }).copied()?;
    let _gone_is_fine: Result<(), i32> = ML_ORIG_PENDING.remove(&cookie);
    let Some(key) = key_of(ctx) else {
        // Cannot happen (sock_ops only sees TCP sockets, all IPv4 or IPv6), but if it did the
        // original destination would be lost here, so it counts as not stored.
        count(Counter::OrigDstStoreError, 1);
        return Some(orig);
    };
    let peer_netns = if is_loopback(&key.remote_ip) {
        key.netns
    } else {
        // SAFETY: a hash lookup; the value is copied out at once.
        match unsafe { ML_ENDPOINTS.get(&key.remote_ip) }.copied() {
            Some(ep) => ep.netns,
            None => {
                count(Counter::OrigDstStoreError, 1);
                return Some(orig);
            }
        }
    };
    if ML_ORIG_DST
        .insert(&key.peer(peer_netns), &orig, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::OrigDstStoreError, 1);
    }
    Some(orig)
}

/// An accepted socket of a captured connection asks for its close callback, so its original
/// destination leaves the map with it (the map is an LRU as well, as a backstop). Returns the
/// original destination, for the flow.
#[inline(never)]
fn watch_captured(ctx: &SockOpsContext) -> Option<Addr> {
    let key = key_of(ctx)?;
    // SAFETY: a hash lookup; the value is copied out at once.
    let orig = unsafe { ML_ORIG_DST.get(&key) }.copied()?;
    let _kept_until_lru_eviction: Result<(), i32> =
        ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    Some(orig)
}

/// Records the flow of an established socket of an enrolled pod (every one: the reader guard
/// finds sockets through it). Returns whether it was recorded. Not inlined: its flow value
/// must not share a stack frame with the fast-path checks (the verifier allows 512 bytes).
#[inline(never)]
fn open_flow(ctx: &SockOpsContext, key: &SockKey, info: &NetnsInfo, orig: Option<Addr>) -> bool {
    let mut flags = 0;
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        flags |= flow_flags::ACTIVE;
    }
    if info.flags & netns_flags::TELEMETRY != 0 {
        flags |= flow_flags::OBSERVED;
    }
    let flow = Flow {
        key: *key,
        // SAFETY: helpers allowed for sock_ops.
        cookie: unsafe { bpf_get_socket_cookie(ctx.ops.cast()) },
        opened_ns: unsafe { bpf_ktime_get_ns() },
        flags,
        orig_dst: orig.unwrap_or_default(),
        ..Flow::default()
    };
    if ML_FLOWS
        .insert(&sk_address(ctx), &flow, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::FlowStoreError, 1);
        return false;
    }
    true
}

/// The connection reached TCP_CLOSE: the flow takes the facts only this moment has (RTT,
/// retransmits, the redirected byte counts of both sockets before their statistics go).
#[inline(never)]
fn close_flow(ctx: &SockOpsContext, key: &SockKey) {
    let Some(flow) = ML_FLOWS.get_ptr_mut(&sk_address(ctx)) else {
        // SAFETY: a hash lookup; the value is copied out at once.
        if let Some(info) = unsafe { ML_NETNS.get(&key.netns) }
            && info.flags & netns_flags::TELEMETRY != 0
        {
            count(Counter::FlowEvicted, 1);
        }
        return;
    };
    // SAFETY: a hash lookup; the value is copied out at once.
    let (sent_redirected, peer_redirected) = match unsafe { ML_SOCK_STATS.get(key) }.copied() {
        None => (0, 0),
        Some(own) => {
            let peer = match ML_SOCK_STATS.get_ptr_mut(&key.peer(own.peer_netns)) {
                // SAFETY: the peer's entry; only the peer's sockops writes
                // `peer_redirected_final` besides us, and it is closing after us.
                Some(p) => unsafe {
                    (*p).peer_redirected_final = own.redirected_bytes;
                    (*p).redirected_bytes
                },
                None => own.peer_redirected_final,
            };
            (own.redirected_bytes, peer)
        }
    };
    // SAFETY: `ops` is the live context; the flow is our map's value, written only here and by
    // the byte tracepoints (other fields).
    unsafe {
        let ops = &*ctx.ops;
        (*flow).sent_redirected = sent_redirected;
        (*flow).peer_redirected = peer_redirected;
        // The kernel keeps srtt in µs scaled by 8 (include/linux/tcp.h, srtt_us).
        (*flow).srtt_us = read_volatile(&ops.srtt_us) >> 3;
        (*flow).retransmits = read_volatile(&ops.total_retrans);
        (*flow).flags |= flow_flags::CLOSED;
    }
}

/// Puts an established socket into the SOCKHASH when its connection can be redirected.
///
/// Both ends of a connection must be in the map, or neither: a socket alone in the map gains
/// nothing, and while in the map it is served by tcp_bpf, whose blocking recvmsg returns EAGAIN
/// on a wakeup without data (net/ipv4/tcp_bpf.c) — harmless for poll-based servers, not for a
/// blocking reader beside a writer that waits for send space. So the client (active side, first
/// to be established) joins optimistically, and the accepted socket decides for both: it joins
/// only if the client is in the map and has sent nothing through the stack, and if it cannot
/// join it evicts the client again.
fn on_established(ctx: &SockOpsContext, orig: Option<Addr>) -> Result<(), Counter> {
    let mut key = key_of(ctx).ok_or(Counter::SockUnsupportedFamily)?;
    // SAFETY: a hash lookup; the value is copied out at once.
    let info = unsafe { ML_NETNS.get(&key.netns) }.copied();
    let Some(netns) = info else {
        return Err(Counter::SockNotEnrolled);
    };
    // Every socket of an enrolled pod, accelerated or not, gets a flow (telemetry, and the
    // reader guard's way to tell which pod a socket belongs to) and its close callback, which
    // closes the flow and forgets the socket's statistics if it joins the fast path below;
    // should asking for the callback fail, the LRU evicts the flow and the statistics go when
    // the same tuple is established again.
    let recorded = open_flow(ctx, &key, &netns, orig);
    let _kept_until_lru_eviction: Result<(), i32> =
        ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    let joined = join_fast_path(ctx, &mut key, &netns);
    if recorded && let Some(flow) = ML_FLOWS.get_ptr_mut(&sk_address(ctx)) {
        // SAFETY: our map's value, created just above.
        let flow = unsafe { &mut *flow };
        if joined.is_ok() {
            flow.flags |= flow_flags::ACCELERATED;
        }
        if flow.flags & flow_flags::OBSERVED != 0 {
            emit(flow_event::OPEN, flow);
        }
    }
    joined
}

/// Puts the socket of an enrolled pod into the SOCKHASH if its connection may be redirected
/// (see [`on_established`]). Not inlined, for the verifier's stack limit (see [`open_flow`]).
#[inline(never)]
fn join_fast_path(
    ctx: &SockOpsContext,
    key: &mut SockKey,
    info: &NetnsInfo,
) -> Result<(), Counter> {
    let flags = match Some(*info) {
        Some(info) if info.flags & netns_flags::ACCELERATE != 0 => info.flags,
        _ => return Err(Counter::SockNotEnrolled),
    };
    if !accel_allowed(flags) {
        return Err(Counter::SockAccelOff);
    }
    let peer = key.peer(peer_netns(key).map_err(|_| Counter::SockPeerNotLocal)?);
    let passive = ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    // A pod seen reading in a way redirected bytes cannot serve (or the peer's pod) never gets
    // redirected bytes again (see reader_guard.rs).
    for netns in [key.netns, peer.netns] {
        if let Some(p) = ML_READER_PODS.get_ptr_mut(&netns) {
            // SAFETY: our map's value; a lost increment under a race only undercounts.
            unsafe { (*p).excluded += 1 };
            return Err(Counter::SockReaderExcluded);
        }
    }
    // A port either pod keeps out of the fast path (a workload known to read with splice), at
    // either end: the connection stays on the stack. The active side is established first and
    // checks both pods, so it never joins alone.
    if port_excluded(key.netns, key.local_port)
        || port_excluded(key.netns, key.remote_port)
        || port_excluded(peer.netns, key.local_port)
        || port_excluded(peer.netns, key.remote_port)
    {
        return Err(Counter::SockPortExcluded);
    }
    if passive {
        // SAFETY: a hash lookup; the value is copied out at once.
        match unsafe { ML_SOCK_STATS.get(&peer) }.copied() {
            None => return Err(Counter::SockPeerNotInMap),
            Some(st) if st.stack_msgs != 0 => {
                evict(&peer);
                count(Counter::SockPeerEvicted, 1);
                return Err(Counter::SockPeerOnStack);
            }
            Some(_) => {}
        }
    }

    // The statistics entry first: a socket without one is never redirected (see maps.rs), so
    // inserting it before the SOCKHASH entry leaves no window where that rule is broken.
    if ML_SOCK_STATS
        .insert(
            &*key,
            &SockStats {
                peer_netns: peer.netns,
                ..SockStats::default()
            },
            BPF_ANY as u64,
        )
        .is_err()
    {
        if passive {
            evict(&peer);
            count(Counter::SockPeerEvicted, 1);
        }
        return Err(Counter::StatsInsertError);
    }

    // SAFETY: `ops` is the live sock_ops context of an established TCP socket.
    let ops = unsafe { &mut *ctx.ops };
    if let Err(err) = ML_SOCKS.update(&mut *key, ops, BPF_ANY as u64) {
        let _absent_is_fine: Result<(), i32> = ML_SOCK_STATS.remove(&*key);
        if passive {
            evict(&peer);
            count(Counter::SockPeerEvicted, 1);
        }
        return Err(if err == -E2BIG {
            Counter::SockMapFull
        } else {
            Counter::SockInsertError
        });
    }
    count(Counter::SockInserted, 1);
    // The state callbacks asked for above remove the statistics entry with the socket.
    Ok(())
}
