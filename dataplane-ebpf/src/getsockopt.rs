//! cgroup/getsockopt: answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for connections meshlane captured, the way
//! netfilter's conntrack answers them for iptables REDIRECT, so an unmodified proxy finds where
//! the application wanted to go.
//!
//! The program runs after the kernel's own handler. For any other option, or a socket meshlane
//! knows nothing of, it leaves the kernel's answer alone (so iptables-captured pods keep working).
//! Other options are not counted (they are not ours, and some applications ask often); every
//! `SO_ORIGINAL_DST` question counts how it was answered.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::bpf_sock, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use dataplane_common::{Counter, SockKey, ipv4_mapped, is_ipv4_mapped};

use crate::{
    key::{AF_INET, AF_INET6},
    maps::{ML_ORIG_DST, count},
};

/// The only return value a getsockopt program may give without failing the call.
const PASS: i32 = 1;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the number.
const SO_ORIGINAL_DST: i32 = 80;

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[cgroup_sockopt(getsockopt)]
pub fn ml_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: `so` is the live context; level and optname are readable 4-byte fields.
    let (level, optname) = unsafe { (read_volatile(&(*so).level), read_volatile(&(*so).optname)) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return PASS;
    }
    let outcome = original_dst(&ctx, level);
    count(outcome, 1);
    PASS
}

/// Answers an `SO_ORIGINAL_DST` question at `level` if meshlane captured the connection; the
/// counter says how it went. Whatever it says, the call passes: unanswered, it keeps the
/// kernel's own answer.
// Inlined: this was the entry function's body, and the verifier has only seen it that way.
#[inline(always)]
fn original_dst(ctx: &SockoptContext, level: i32) -> Counter {
    let key = match key_of(ctx) {
        Ok(key) => key,
        Err(reason) => return reason,
    };
    // SAFETY: a hash lookup; the value is copied out at once.
    let Some(orig) = (unsafe { ML_ORIG_DST.get(&key) }).copied() else {
        return Counter::OrigDstMiss;
    };
    let v4 = is_ipv4_mapped(&orig.ip);
    // Like conntrack: an IPv4 destination is answered at SOL_IP, an IPv6 one at SOL_IPV6; the
    // other level keeps the kernel's error so a proxy that tries both picks the right one.
    let written = match (level, v4) {
        (SOL_IP, true) => put(
            ctx,
            SockaddrIn {
                family: AF_INET as u16,
                port_be: (orig.port as u16).to_be(),
                addr: orig.ip[3],
                zero: [0; 8],
            },
        ),
        (SOL_IPV6, false) => put(
            ctx,
            SockaddrIn6 {
                family: AF_INET6 as u16,
                port_be: (orig.port as u16).to_be(),
                flowinfo: 0,
                addr: orig.ip,
                scope_id: 0,
            },
        ),
        _ => return Counter::OrigDstWrongLevel,
    };
    if written {
        Counter::OrigDstServed
    } else {
        Counter::OrigDstShortBuffer
    }
}

/// The key the socket has as the accepting side of a captured connection.
fn key_of(ctx: &SockoptContext) -> Result<SockKey, Counter> {
    let so = ctx.sockopt;
    // SAFETY: `sk` is a socket pointer (8-byte load) that the verifier tracks as nullable.
    let sk: *const bpf_sock = unsafe { read_volatile(&(*so).__bindgen_anon_1.sk) }.cast_const();
    if sk.is_null() {
        return Err(Counter::OrigDstNoSocket);
    }
    // SAFETY: bpf_get_netns_cookie is allowed for sockopt programs since Linux 5.15. Every
    // socket field is read unconditionally, each with its own volatile load at a constant offset
    // from `sk`: the verifier refuses pointer arithmetic on a socket pointer, which is what the
    // compiler would emit to pick between the IPv4 and IPv6 fields.
    unsafe {
        let netns = bpf_get_netns_cookie(so.cast());
        let family = read_volatile(&raw const (*sk).family);
        let src4 = read_volatile(&raw const (*sk).src_ip4);
        let dst4 = read_volatile(&raw const (*sk).dst_ip4);
        let src6 = [
            read_volatile(&raw const (*sk).src_ip6[0]),
            read_volatile(&raw const (*sk).src_ip6[1]),
            read_volatile(&raw const (*sk).src_ip6[2]),
            read_volatile(&raw const (*sk).src_ip6[3]),
        ];
        let dst6 = [
            read_volatile(&raw const (*sk).dst_ip6[0]),
            read_volatile(&raw const (*sk).dst_ip6[1]),
            read_volatile(&raw const (*sk).dst_ip6[2]),
            read_volatile(&raw const (*sk).dst_ip6[3]),
        ];
        let local_port = read_volatile(&raw const (*sk).src_port);
        let remote_port = u32::from(u16::from_be(read_volatile(&raw const (*sk).dst_port)));
        let (local_ip, remote_ip) = match family {
            AF_INET => (ipv4_mapped(src4), ipv4_mapped(dst4)),
            AF_INET6 => (src6, dst6),
            _ => return Err(Counter::OrigDstUnsupportedFamily),
        };
        Ok(SockKey {
            netns,
            local_ip,
            remote_ip,
            local_port,
            remote_port,
        })
    }
}

/// Writes `value` as the option's result: optval, optlen, and a zero return value. False if the
/// caller's buffer is too small for it (the kernel's answer then stays).
fn put<T>(ctx: &SockoptContext, value: T) -> bool {
    let so = ctx.sockopt;
    let len = core::mem::size_of::<T>();
    // SAFETY: optval/optval_end delimit the kernel's copy of the caller's buffer; the write is
    // bounds-checked against them, which is also what the verifier demands.
    unsafe {
        let start = read_volatile(&(*so).__bindgen_anon_2.optval).cast::<u8>();
        let end = read_volatile(&(*so).__bindgen_anon_3.optval_end).cast::<u8>();
        if start.add(len) > end {
            return false;
        }
        core::ptr::write_unaligned(start.cast::<T>(), value);
        (*so).optlen = len as i32;
        (*so).retval = 0;
    }
    true
}
