//! sk_msg on the SOCKHASH: redirects each message of a socket in the fast path to its peer
//! socket (sockops put both in, and recorded the peer's netns); otherwise the message goes
//! through the TCP/IP stack.
//!
//! This program must never return `SK_DROP`: a lookup that fails passes to the stack and counts
//! its reason.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use dataplane_common::{Counter, SockKey, SockStats, netns_flags};

use crate::{
    key::{raw_tuple, sock_key},
    maps::{ML_CONFIG, ML_NETNS, ML_SOCK_STATS, ML_SOCKS, accel_allowed, count, peer_netns},
};

#[sk_msg]
pub fn ml_sk_msg(ctx: SkMsgContext) -> u32 {
    let size = ctx.size() as u64;
    let Some(key) = key_of(&ctx) else {
        count(Counter::SockUnsupportedFamily, 1);
        return SK_PASS;
    };
    let stats = ML_SOCK_STATS.get_ptr_mut(&key);
    // SAFETY: the entry belongs to this socket and sk_msg runs under its socket lock.
    let stats: Option<&mut SockStats> = stats.map(|p| unsafe { &mut *p });
    match stats {
        None => {
            // Not inserted by us (or the entry is gone): never redirect such a socket.
            count(Counter::PassPeerSocketMissing, 1);
            count(Counter::BytesPassed, size);
        }
        Some(stats) => match try_redirect(&ctx, &key, stats) {
            Ok(()) => {
                stats.redirected_bytes += size;
                stats.redirected_msgs += 1;
                count(Counter::MsgRedirected, 1);
                count(Counter::BytesRedirected, size);
            }
            Err(reason) => {
                stats.stack_bytes += size;
                stats.stack_msgs += 1;
                count(reason, 1);
                count(Counter::BytesPassed, size);
            }
        },
    }
    SK_PASS
}

fn key_of(ctx: &SkMsgContext) -> Option<SockKey> {
    let md = ctx.msg;
    let t = raw_tuple!(md);
    // SAFETY: bpf_get_netns_cookie is allowed for sk_msg since Linux 5.15.
    let netns = unsafe { bpf_get_netns_cookie(md.cast()) };
    sock_key(netns, &t)
}

fn try_redirect(ctx: &SkMsgContext, key: &SockKey, stats: &SockStats) -> Result<(), Counter> {
    // Once a socket has sent through the stack it stays there: the receiver drains its redirect
    // queue before its TCP receive queue (net/ipv4/tcp_bpf.c, tcp_bpf_recvmsg), so a redirected
    // message could overtake bytes still queued by the stack. The usual case is a client that
    // writes before the server's socket reached the SOCKHASH.
    if stats.stack_msgs != 0 {
        return Err(Counter::PassStickyStack);
    }
    // A connection in the fast path stays there until it closes: both sockets joined under the
    // rules sockops checked, and moving one to the stack later would hand its peer (still a
    // SOCKHASH socket) bytes through the stack, which FIONREAD does not count on kernels without
    // 04af4efde58a. Only the operator's `accel off --move-established` moves them.
    // SAFETY: an array lookup; the value is copied out at once.
    let cfg = ML_CONFIG.get(0).copied().unwrap_or_default();
    let peer_netns = if cfg.accelerate == 0 && cfg.move_established != 0 {
        moving_established(key)?
    } else {
        stats.peer_netns
    };
    let mut peer = key.peer(peer_netns);
    if ML_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        Ok(())
    } else {
        Err(Counter::PassPeerSocketMissing)
    }
}

/// `accel off --move-established`: only the self-test's namespace (and pods still enrolled with
/// their peers) keep redirecting; everyone else goes through the stack.
#[inline(always)]
fn moving_established(key: &SockKey) -> Result<u64, Counter> {
    // SAFETY: a hash lookup; the value is copied out at once.
    let own = unsafe { ML_NETNS.get(&key.netns) }.copied();
    let own_flags = match own {
        Some(info) if info.flags & netns_flags::ACCELERATE != 0 => info.flags,
        _ => return Err(Counter::PassSelfNotEnrolled),
    };
    if !accel_allowed(own_flags) {
        return Err(Counter::PassAccelOff);
    }
    peer_netns(key)
}
