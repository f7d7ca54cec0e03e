//! cgroup sock_addr programs: Service translation and sidecar capture at connect time, and the
//! reverse translation that keeps applications seeing the address they asked for.
//!
//! - `connect4/6`: for enrolled pods, (1) a sidecar pod's outbound TCP connect goes to its proxy's
//!   outbound port on loopback, with the original destination kept for `SO_ORIGINAL_DST`; (2)
//!   otherwise a connect to a service VIP goes to one of its backends (none: ECONNREFUSED); (3) a
//!   connect to a sidecar pod of this node then goes to that pod's inbound port, as Istio's
//!   PREROUTING rule does.
//! - `sendmsg4/6`: UDP datagrams to a service VIP go to a backend.
//! - `recvmsg4/6` and `getpeername4/6`: a backend or proxy address is shown as what the
//!   application asked for.
//!
//! Un-enrolled namespaces (the host included) pass untouched. Apart from the deliberate
//! ECONNREFUSED for a service without backends, every path returns [`ALLOW`]; a failure to record
//! an original destination leaves the connect going where the application sent it. Every connect
//! or datagram left untranslated for a reason other than "not a service address" counts why.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::BPF_ANY,
    cty::c_int,
    helpers::generated::{
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use dataplane_common::{
    Addr, BackendKey, Counter, IPPROTO_TCP, IPPROTO_UDP, NetnsInfo, RevNatKey, ServiceKey,
    ServiceStats, Sidecar, ipv4_mapped, is_ipv4_mapped, is_loopback, lb::choose_backend,
    netns_flags,
};

use crate::maps::{
    ML_BACKENDS, ML_ENDPOINTS, ML_NETNS, ML_ORIG_PENDING, ML_REVNAT, ML_SERVICES, ML_SIDECARS,
    ML_SVC_STATS, count,
};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[cgroup_sock_addr(connect4)]
pub fn ml_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn ml_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ml_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ml_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ml_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ml_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn ml_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn ml_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6);
    ALLOW
}

/// The user address of the call (destination for connect/sendmsg, peer for getpeername/recvmsg).
#[inline(always)]
fn read_addr(ctx: &SockAddrContext, fam: Family) -> Addr {
    let c = ctx.sock_addr;
    // SAFETY: `c` is the live context; every field is read with a 4-byte load as required.
    unsafe {
        let ip = match fam {
            Family::V4 => ipv4_mapped(read_volatile(&raw const (*c).user_ip4)),
            Family::V6 => crate::key::read_ip6(&raw const (*c).user_ip6),
        };
        // user_port holds the port in network byte order in its low 16 bits.
        let port = u16::from_be(read_volatile(&raw const (*c).user_port) as u16) as u32;
        Addr { ip, port }
    }
}

/// Writes the user address back. An IPv4 context can only take an IPv4(-mapped) address; the
/// agent never pairs an IPv4 VIP with an IPv6 backend, and callers check the family.
#[inline(always)]
fn write_addr(ctx: &SockAddrContext, fam: Family, a: &Addr) {
    let c = ctx.sock_addr;
    // SAFETY: the written fields are writable for connect, sendmsg, recvmsg and getpeername
    // programs, with 4-byte stores.
    unsafe {
        match fam {
            Family::V4 => write_volatile(&raw mut (*c).user_ip4, a.ip[3]),
            Family::V6 => {
                let p = (&raw mut (*c).user_ip6).cast::<u32>();
                write_volatile(p, a.ip[0]);
                write_volatile(p.add(1), a.ip[1]);
                write_volatile(p.add(2), a.ip[2]);
                write_volatile(p.add(3), a.ip[3]);
            }
        }
        write_volatile(&raw mut (*c).user_port, u32::from((a.port as u16).to_be()));
    }
}

#[inline(always)]
fn fits(fam: Family, a: &Addr) -> bool {
    fam == Family::V6 || is_ipv4_mapped(&a.ip)
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: `protocol` is readable in every sock_addr program, with a 4-byte load.
    unsafe { read_volatile(&raw const (*ctx.sock_addr).protocol) as u8 }
}

#[inline(always)]
fn netns_of(ctx: &SockAddrContext) -> (u64, Option<NetnsInfo>) {
    // SAFETY: bpf_get_netns_cookie is allowed for sock_addr programs since Linux 5.7.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: a hash lookup; the value is copied out at once.
    (netns, unsafe { ML_NETNS.get(&netns) }.copied())
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie is allowed for sock_addr programs.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Refuses the call with ECONNREFUSED (bpf_set_retval, Linux 5.18) instead of the default EPERM.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: bpf_set_retval is allowed for cgroup programs.
    let _always_zero: c_int = unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

// Inlined into each program so `fam` is a constant: the verifier only accepts context loads
// at a constant offset from the context pointer itself.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, fam: Family) -> i32 {
    let (netns, Some(info)) = netns_of(ctx) else {
        count(Counter::ConnectNotEnrolled, 1);
        return ALLOW;
    };
    let proto = protocol(ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        count(Counter::ConnectOtherProtocol, 1);
        return ALLOW;
    }
    let asked = read_addr(ctx, fam);
    let sock = cookie(ctx);

    if proto == IPPROTO_TCP && info.flags & netns_flags::SIDECAR != 0 {
        match outbound_capture(netns, &asked) {
            Ok(port) => {
                let proxy = Addr {
                    ip: loopback_like(&asked.ip),
                    port,
                };
                if remember_original(sock, &asked) {
                    count(Counter::CaptureOutbound, 1);
                    remember_reverse(sock, &proxy, &asked);
                    write_addr(ctx, fam, &proxy);
                }
                return ALLOW;
            }
            Err(reason) => count(reason, 1),
        }
    }

    // Compared field by field below rather than with `==` on the structs: LLVM turns a
    // 16-byte array comparison into 128-bit operations the BPF backend cannot lower.
    let mut dst = asked;
    let mut changed = false;
    match translate(&info, &asked, proto, false, fam) {
        Translation::None => {}
        Translation::Backend(b) => {
            dst = b;
            changed = true;
        }
        Translation::WrongFamily => return ALLOW,
        Translation::Refuse => return refuse(),
    }

    if proto == IPPROTO_TCP
        && let Some(port) = inbound_capture(netns, &dst)
        && remember_original(sock, &dst)
    {
        count(Counter::CaptureInbound, 1);
        dst.port = port;
        changed = true;
    }

    if changed {
        remember_reverse(sock, &dst, &asked);
        write_addr(ctx, fam, &dst);
    }
    ALLOW
}

// Inlined into each program so `fam` is a constant: the verifier only accepts context loads
// at a constant offset from the context pointer itself.
#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, fam: Family) -> i32 {
    let (_, Some(info)) = netns_of(ctx) else {
        count(Counter::DatagramNotEnrolled, 1);
        return ALLOW;
    };
    let asked = read_addr(ctx, fam);
    match translate(&info, &asked, IPPROTO_UDP, true, fam) {
        Translation::None | Translation::WrongFamily => ALLOW,
        Translation::Backend(b) => {
            remember_reverse(cookie(ctx), &b, &asked);
            write_addr(ctx, fam, &b);
            ALLOW
        }
        Translation::Refuse => refuse(),
    }
}

/// getpeername / recvmsg: shows the address the application asked for instead of the backend
/// or proxy it was sent to.
// Inlined into each program so `fam` is a constant: the verifier only accepts context loads
// at a constant offset from the context pointer itself.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, fam: Family) {
    let key = RevNatKey {
        cookie: cookie(ctx),
        peer: read_addr(ctx, fam),
        _pad: 0,
    };
    // A miss is the common case (a socket never translated) and is not counted: recvmsg runs
    // for every datagram.
    // SAFETY: a hash lookup; the value is copied out at once.
    if let Some(orig) = unsafe { ML_REVNAT.get(&key) }.copied() {
        if fits(fam, &orig) {
            write_addr(ctx, fam, &orig);
            count(Counter::RevNatApplied, 1);
        } else {
            count(Counter::RevNatWrongFamily, 1);
        }
    }
}

enum Translation {
    /// Not a service address.
    None,
    /// Send it to this backend (of the call's family).
    Backend(Addr),
    /// The chosen backend is of the other family: leave the call as it is (counted).
    WrongFamily,
    /// No backend: refuse the call (counted).
    Refuse,
}

/// The backend a connect or datagram to `dst` goes to, if `dst` is a service address; counts the
/// outcome (and the service's statistics) unless it is not a service address.
// Inlined: with `fam` and the returned address it would need more than the five argument
// registers a BPF call has.
#[inline(always)]
fn translate(info: &NetnsInfo, dst: &Addr, proto: u8, datagram: bool, fam: Family) -> Translation {
    let key = ServiceKey {
        ip: dst.ip,
        port: dst.port as u16,
        proto,
        _pad: 0,
    };
    // SAFETY: a hash lookup; the value is copied out at once.
    let Some(svc) = (unsafe { ML_SERVICES.get(&key) }).copied() else {
        return Translation::None;
    };
    let stats = ML_SVC_STATS.get_ptr_mut(svc.id);
    if svc.count == 0 {
        count(Counter::SvcNoBackend, 1);
        bump(stats, Stat::Refused);
        return Translation::Refuse;
    }
    // Drawn even when affinity ignores it: one cheap helper call keeps the choice in one pure,
    // host-tested function.
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = BackendKey {
        set: svc.backend_set,
        index: choose_backend(svc.flags, &info.addr, random, svc.count),
    };
    // SAFETY: a hash lookup; the value is copied out at once.
    match unsafe { ML_BACKENDS.get(&slot) }.copied() {
        Some(b) if !fits(fam, &b) => {
            count(Counter::SvcBackendWrongFamily, 1);
            Translation::WrongFamily
        }
        Some(b) => {
            if datagram {
                count(Counter::SvcDatagramTranslated, 1);
                bump(stats, Stat::Datagrams);
            } else {
                count(Counter::SvcConnectTranslated, 1);
                bump(stats, Stat::Connects);
            }
            Translation::Backend(b)
        }
        None => {
            count(Counter::SvcBackendMissing, 1);
            bump(stats, Stat::Refused);
            Translation::Refuse
        }
    }
}

enum Stat {
    Connects,
    Datagrams,
    Refused,
}

#[inline(always)]
fn bump(stats: Option<*mut ServiceStats>, which: Stat) {
    if let Some(s) = stats {
        // SAFETY: a per-CPU slot; programs are not preempted on a CPU mid-run.
        unsafe {
            match which {
                Stat::Connects => (*s).connects += 1,
                Stat::Datagrams => (*s).datagrams += 1,
                Stat::Refused => (*s).refused += 1,
            }
        }
    }
}

/// Loopback of the same family as `ip`: 127.0.0.1 (IPv4-mapped for IPv4) or ::1.
#[inline(always)]
fn loopback_like(ip: &[u32; 4]) -> [u32; 4] {
    if is_ipv4_mapped(ip) {
        ipv4_mapped(u32::from_be_bytes([127, 0, 0, 1]).to_be())
    } else {
        [0, 0, 0, 1u32.to_be()]
    }
}

#[inline(always)]
fn port_listed(ports: &[u16; dataplane_common::SIDECAR_MAX_PORTS], port: u32) -> bool {
    let mut i = 0;
    while i < ports.len() {
        if ports[i] != 0 && u32::from(ports[i]) == port {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether a sidecar pod's outbound connect is captured, and to which port.
fn outbound_capture(netns: u64, dst: &Addr) -> Result<u32, Counter> {
    // SAFETY: a hash lookup; the value is read in place (it is large) and never kept.
    let sc: &Sidecar = unsafe { ML_SIDECARS.get(&netns) }.ok_or(Counter::CaptureSkipNoSettings)?;
    // The low 32 bits are the uid.
    // SAFETY: a helper without arguments.
    let uid = unsafe { bpf_get_current_uid_gid() } as u32;
    if uid == sc.proxy_uid {
        return Err(Counter::CaptureSkipProxyUid);
    }
    if is_loopback(&dst.ip) {
        return Err(Counter::CaptureSkipLoopback);
    }
    if port_listed(&sc.exclude_outbound_ports, dst.port) {
        return Err(Counter::CaptureSkipExcludedPort);
    }
    let mut i = 0;
    while i < dataplane_common::SIDECAR_MAX_CIDRS {
        if (i as u32) < sc.cidr_count && sc.exclude_cidrs[i].contains(&dst.ip) {
            return Err(Counter::CaptureSkipExcludedCidr);
        }
        i += 1;
    }
    // SAFETY: a hash lookup; the value is copied out at once.
    if let Some(ep) = unsafe { ML_ENDPOINTS.get(&dst.ip) }.copied()
        && ep.netns == netns
    {
        return Err(Counter::CaptureSkipOwnPod);
    }
    Ok(u32::from(sc.outbound_port))
}

/// Whether a connect to `dst` goes to a sidecar pod of this node (other than the caller's own
/// pod), and if so the inbound port it is sent to.
fn inbound_capture(netns: u64, dst: &Addr) -> Option<u32> {
    // SAFETY: a hash lookup; the value is copied out at once.
    let ep = unsafe { ML_ENDPOINTS.get(&dst.ip) }.copied()?;
    if ep.flags & netns_flags::SIDECAR == 0 || ep.netns == netns {
        return None;
    }
    // SAFETY: as above, read in place and not kept.
    let Some(sc) = (unsafe { ML_SIDECARS.get(&ep.netns) }) else {
        count(Counter::CaptureSkipNoSettings, 1);
        return None;
    };
    if port_listed(&sc.exclude_inbound_ports, dst.port) {
        count(Counter::CaptureSkipExcludedInboundPort, 1);
        return None;
    }
    Some(u32::from(sc.inbound_port))
}

/// Keeps a captured connect's original destination until sockops moves it to the accepting
/// socket's key. Returns false (and counts) if it could not be kept: the caller then leaves the
/// connect uncaptured rather than let the proxy guess.
#[inline(always)]
fn remember_original(sock: u64, orig: &Addr) -> bool {
    if ML_ORIG_PENDING.insert(&sock, orig, BPF_ANY as u64).is_err() {
        count(Counter::OrigDstStoreError, 1);
        return false;
    }
    true
}

#[inline(always)]
fn remember_reverse(sock: u64, sent_to: &Addr, asked: &Addr) {
    let key = RevNatKey {
        cookie: sock,
        peer: *sent_to,
        _pad: 0,
    };
    if ML_REVNAT.insert(&key, asked, BPF_ANY as u64).is_err() {
        count(Counter::RevNatStoreError, 1);
    }
}
