//! Types and constants shared by meshlane's kernel programs and its user space.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, because the same bytes are
//! written by one side and read by the other through BPF maps. A size assertion sits beside each
//! type so that a field added on one side only fails the build instead of corrupting a map.
//!
//! This crate must never depend on `std`: the kernel programs link it.
#![no_std]

use core::mem::size_of;

/// Map names, as they appear in the ELF and as pin file names under `<bpffs>/<ABI_VERSION>/maps/`.
pub mod map_names {
    /// SOCKHASH of established sockets of enrolled network namespaces, keyed by [`super::SockKey`].
    pub const SOCKHASH: &str = "ML_SOCKS";
    /// Network namespaces enrolled by the agent: netns cookie → [`super::NetnsInfo`].
    pub const NETNS: &str = "ML_NETNS";
    /// Pod IPs on this node: address (IPv4-mapped IPv6) → [`super::Endpoint`].
    pub const ENDPOINTS: &str = "ML_ENDPOINTS";
    /// Per-socket byte counters keyed by [`super::SockKey`] (LRU).
    pub const SOCK_STATS: &str = "ML_SOCK_STATS";
    /// Per-CPU counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "ML_COUNTERS";
    /// One-entry array holding the runtime [`super::Config`].
    pub const CONFIG: &str = "ML_CONFIG";
}

/// Program names (the kernel keeps 15 characters).
pub mod program_names {
    pub const SOCKOPS: &str = "ml_sockops";
    pub const SK_MSG: &str = "ml_sk_msg";
}

/// The layout version of the maps and of the programs' view of them. Pins live under
/// `<bpffs>/v<ABI_VERSION>/`; a new version never reuses an older directory's maps.
pub const ABI_VERSION: u32 = 1;

/// Default capacities. The SOCKHASH one can be changed at load time (`--sockhash-capacity`).
pub const SOCKHASH_CAPACITY: u32 = 65_536;
pub const NETNS_CAPACITY: u32 = 4_096;
pub const ENDPOINTS_CAPACITY: u32 = 16_384;
pub const SOCK_STATS_CAPACITY: u32 = 65_536;

/// A socket as the fast path sees it: its network namespace and its 4-tuple from its own side.
///
/// Addresses are IPv6, with IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`), in network byte order as
/// the kernel hands them over; ports are in host byte order. Carrying the netns cookie is what
/// keeps two pods apart: every sidecar pod has `127.0.0.1:x → 127.0.0.1:15001`, and Merbridge's
/// bare 4-tuple key let such sockets find each other across pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}
const _: () = assert!(size_of::<SockKey>() == 48);

impl SockKey {
    /// The key the peer socket has in the SOCKHASH, given the peer's network namespace.
    #[inline(always)]
    pub const fn peer(&self, peer_netns: u64) -> SockKey {
        SockKey {
            netns: peer_netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// An IPv4 address (network byte order, as `u32` read from the kernel) as IPv4-mapped IPv6.
#[inline(always)]
pub const fn ipv4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4_be]
}

/// Whether a key address (IPv4-mapped or IPv6) is loopback: 127.0.0.0/8 or ::1.
#[inline(always)]
pub const fn is_loopback(ip: &[u32; 4]) -> bool {
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff);
    if mapped {
        // 127.0.0.0/8: the first octet is the lowest-addressed byte of the big-endian word.
        (u32::from_be(ip[3]) >> 24) == 127
    } else {
        ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1)
    }
}

/// What the agent knows of an enrolled network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetnsInfo {
    /// [`netns_flags`] bits.
    pub flags: u32,
    /// A small id the agent assigns, for counters and logs.
    pub pod_id: u32,
}
const _: () = assert!(size_of::<NetnsInfo>() == 8);

/// Bits of [`NetnsInfo::flags`] and [`Endpoint::flags`].
pub mod netns_flags {
    /// Sockets of this netns go into the SOCKHASH and may be redirected.
    pub const ACCELERATE: u32 = 1 << 0;
    /// The agent's own self-test namespace: redirected even while acceleration is globally off,
    /// so the self-test can prove the path before anyone else uses it.
    pub const SELFTEST: u32 = 1 << 1;
}

/// A pod IP on this node and the network namespace it lives in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub netns: u64,
    pub flags: u32,
    pub pod_id: u32,
}
const _: () = assert!(size_of::<Endpoint>() == 16);

/// Bytes a socket sent, by path. Written only by the sk_msg program of that socket (under the
/// socket lock), read by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockStats {
    pub redirected_bytes: u64,
    pub stack_bytes: u64,
    pub redirected_msgs: u64,
    pub stack_msgs: u64,
}
const _: () = assert!(size_of::<SockStats>() == 32);

/// Runtime switches, in the one-entry [`map_names::CONFIG`] array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Non-zero: redirect is on for every enrolled netns (the agent sets it only after the
    /// self-test passed; `meshlane accel off` clears it — the kill switch).
    pub accelerate: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<Config>() == 8);

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident = $idx:literal, $metric:literal ;)*) => {
        /// Why a socket or a message took the path it took: indexes of the per-CPU counter array.
        /// Every way out of the fast path has its own reason (Cilium's drop reasons).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $( $(#[$doc])* $name = $idx, )* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// The snake_case name used in metrics and `meshlane status`.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$name => $metric,)* }
            }
        }
    };
}

counters! {
    /// Established sockets of enrolled namespaces put into the SOCKHASH.
    SockInserted = 0, "sock_inserted";
    /// Established sockets not inserted: their netns is not enrolled (host, un-enrolled pods).
    SockNotEnrolled = 1, "sock_not_enrolled";
    /// Insert failed because the SOCKHASH is full: the socket stays on the stack.
    SockMapFull = 2, "sock_map_full";
    /// Insert failed for another reason (the errno is not kept).
    SockInsertError = 3, "sock_insert_error";
    /// Address family other than IPv4/IPv6.
    SockUnsupportedFamily = 4, "sock_unsupported_family";
    /// Messages redirected to the peer socket.
    MsgRedirected = 5, "msg_redirected";
    /// Bytes redirected to the peer socket.
    BytesRedirected = 6, "bytes_redirected";
    /// Passed to the stack: the peer address is neither loopback nor a pod on this node.
    PassPeerNotLocal = 7, "pass_peer_not_local";
    /// Passed to the stack: the peer is a pod on this node that is not accelerated.
    PassPeerNotEnrolled = 8, "pass_peer_not_enrolled";
    /// Passed to the stack: the peer socket is not in the SOCKHASH (closed, opened before
    /// enrollment, or not inserted because the map was full).
    PassPeerSocketMissing = 9, "pass_peer_socket_missing";
    /// Passed to the stack: acceleration is off (kill switch, or the self-test has not passed).
    PassAccelOff = 10, "pass_accel_off";
    /// Passed to the stack: this socket's netns is no longer enrolled.
    PassSelfNotEnrolled = 11, "pass_self_not_enrolled";
    /// Passed to the stack: this socket already sent bytes through the stack. Redirecting now
    /// could let later bytes overtake earlier ones, because the receiver drains its redirect
    /// queue before its TCP receive queue.
    PassStickyStack = 12, "pass_sticky_stack";
    /// Bytes passed to the stack by sockets in the SOCKHASH, for any reason above.
    BytesPassed = 13, "bytes_passed";
    /// Per-socket statistics could not be recorded (the statistics map is full).
    StatsInsertError = 14, "stats_insert_error";
    /// Established sockets not inserted because acceleration is off (kill switch, self-test).
    SockAccelOff = 15, "sock_accel_off";
    /// Established sockets not inserted: the peer is not on this node (or not enrolled), so the
    /// connection could never be redirected and is left to the plain TCP stack.
    SockPeerNotLocal = 16, "sock_peer_not_local";
    /// Accepted sockets not inserted because their client is not in the SOCKHASH.
    SockPeerNotInMap = 17, "sock_peer_not_in_map";
    /// Accepted sockets not inserted because their client already sent through the stack.
    SockPeerOnStack = 18, "sock_peer_on_stack";
    /// Clients taken back out of the SOCKHASH because their accepted peer could not join it.
    SockPeerEvicted = 19, "sock_peer_evicted";
}

/// Size of the counter array; a new reason needs a new index below it.
pub const COUNTER_SLOTS: u32 = 32;
const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no padding (see the size assertions).
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for NetnsInfo {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for SockStats {}
    unsafe impl aya::Pod for Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_key_swaps_sides_and_takes_the_peer_netns() {
        let k = SockKey {
            netns: 7,
            local_ip: ipv4_mapped(u32::from_be_bytes([127, 0, 0, 1])),
            remote_ip: ipv4_mapped(u32::from_be_bytes([127, 0, 0, 2])),
            local_port: 40000,
            remote_port: 15001,
        };
        let p = k.peer(9);
        assert_eq!(p.netns, 9);
        assert_eq!(p.local_ip, k.remote_ip);
        assert_eq!(p.remote_port, 40000);
        assert_eq!(p.peer(7), k);
    }

    #[test]
    fn loopback_detection() {
        let be = |a: [u8; 4]| u32::from_ne_bytes(a);
        assert!(is_loopback(&ipv4_mapped(be([127, 0, 0, 1]))));
        assert!(is_loopback(&ipv4_mapped(be([127, 9, 8, 7]))));
        assert!(!is_loopback(&ipv4_mapped(be([10, 0, 0, 1]))));
        assert!(is_loopback(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]));
        assert!(!is_loopback(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 2])]));
    }

    #[test]
    fn counter_names_are_unique() {
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert_ne!(*a as u32, *b as u32);
            }
        }
    }
}
