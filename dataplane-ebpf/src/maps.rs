//! Every map of the dataplane. All are pinned by name under `<bpffs>/v<ABI>/maps/` by the agent,
//! so they outlive agent restarts. Each static is declared from its row of
//! `dataplane_common::maps` (name, type, sizes and capacity), and the build fails if a static and
//! its row disagree or if a row has no static; nothing here may restate a name or a capacity.

use aya_ebpf::{
    bindings::bpf_map_type::{
        BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_SOCKHASH,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, Map, PerCpuArray, RingBuf, SockHash},
};
use dataplane_common::{
    Addr, BackendKey, Config, Endpoint, Flow, NetnsInfo, PortKey, ReaderPod, RevNatKey, Service,
    ServiceKey, ServiceStats, Sidecar, SockKey, SockStats,
    maps::{self, MapSpec},
};

/// The kernel map type an aya-ebpf map static is created with.
trait Typed: Map {
    const BPF_MAP_TYPE: u32;
}
impl<K> Typed for SockHash<K> {
    const BPF_MAP_TYPE: u32 = BPF_MAP_TYPE_SOCKHASH;
}
impl<K, V> Typed for HashMap<K, V> {
    const BPF_MAP_TYPE: u32 = BPF_MAP_TYPE_HASH;
}
impl<K, V> Typed for LruHashMap<K, V> {
    const BPF_MAP_TYPE: u32 = BPF_MAP_TYPE_LRU_HASH;
}
impl<T> Typed for Array<T> {
    const BPF_MAP_TYPE: u32 = BPF_MAP_TYPE_ARRAY;
}
impl<T> Typed for PerCpuArray<T> {
    const BPF_MAP_TYPE: u32 = BPF_MAP_TYPE_PERCPU_ARRAY;
}
impl Typed for RingBuf {
    const BPF_MAP_TYPE: u32 = BPF_MAP_TYPE_RINGBUF;
}

/// Fails the build unless the static `symbol` of type `M` is the map `spec` describes: its ELF
/// symbol (`#[map]` without `name` exports the static under its own name), kernel map type, key
/// and value sizes. The capacity is `spec.max_entries` by construction (see [`ml_maps!`]).
const fn check<M: Typed>(symbol: &str, spec: &MapSpec) {
    assert!(
        spec.is_named(symbol),
        "a map static is not named as its maps::ALL row"
    );
    assert!(
        M::BPF_MAP_TYPE == spec.kind.bpf_map_type(),
        "a map's type differs from maps::ALL"
    );
    assert!(
        size_of::<M::Key>() as u32 == spec.key_size,
        "a key size differs from maps::ALL"
    );
    assert!(
        size_of::<M::Value>() as u32 == spec.value_size,
        "a value size differs from maps::ALL"
    );
}

/// Declares pinned map statics from rows of `dataplane_common::maps`: capacity from the row, and
/// a compile-time [`check`] of everything else.
macro_rules! ml_maps {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $spec:expr;)*) => {
        $(
            $(#[$doc])*
            #[map]
            pub static $name: $ty = <$ty>::pinned($spec.max_entries, 0);
            const _: () = check::<$ty>(stringify!($name), &$spec);
        )*
        // Statics are distinct and each matches its own row by name, so equal counts mean every
        // row of the table has its static.
        const _: () = assert!(
            [$(stringify!($name)),*].len() == maps::ALL.len(),
            "maps::ALL has a row without a map static"
        );
    };
}

ml_maps! {
    /// Established sockets of enrolled namespaces. Written by `sockops` (insert on establishment);
    /// the kernel removes a socket when it closes; the agent deletes a pod's sockets when the pod
    /// is removed. Read by `sk_msg` (redirect lookup). The agent sets its capacity at load time.
    ML_SOCKS: SockHash<SockKey> = maps::SOCKHASH;

    /// Enrolled network namespaces. Written by the agent (pod add/del, self-test); read by
    /// `sockops`, `sk_msg`, connect and sendmsg.
    ML_NETNS: HashMap<u64, NetnsInfo> = maps::NETNS;

    /// Pod IPs on this node (IPv4-mapped IPv6) → their netns. Written by the agent; read by
    /// `sockops` and `sk_msg` to find the peer of a non-loopback connection, and by connect for
    /// sidecar capture.
    ML_ENDPOINTS: HashMap<[u32; 4], Endpoint> = maps::ENDPOINTS;

    /// Per-socket byte counters. Created by `sockops` when the socket enters the SOCKHASH (a
    /// socket without an entry is never redirected), deleted by `sockops` when it closes, updated
    /// by `sk_msg` under the socket lock; read by the agent. A plain hash, not an LRU: the entry
    /// also carries the "already sent through the stack" fact that keeps bytes in order, and that
    /// must not be evicted. The agent sets its capacity at load time (twice the SOCKHASH's).
    ML_SOCK_STATS: HashMap<SockKey, SockStats> = maps::SOCK_STATS;

    /// Per-CPU counters indexed by `dataplane_common::Counter`. Written by every program; summed
    /// by the agent.
    ML_COUNTERS: PerCpuArray<u64> = maps::COUNTERS;

    /// Runtime switches (index 0). Written by the agent; read by `sockops` and `sk_msg`.
    ML_CONFIG: Array<Config> = maps::CONFIG;

    /// The service table. Written by the agent (services file, later the controller); read by the
    /// connect and sendmsg programs.
    ML_SERVICES: HashMap<ServiceKey, Service> = maps::SERVICES;

    /// Backend sets. Written by the agent, new set before the service entry that points to it;
    /// read by the connect and sendmsg programs.
    ML_BACKENDS: HashMap<BackendKey, Addr> = maps::BACKENDS;

    /// Per-service counters indexed by `Service::id`. Written by the connect and sendmsg
    /// programs; read (and reset when an id is reused) by the agent.
    ML_SVC_STATS: PerCpuArray<ServiceStats> = maps::SVC_STATS;

    /// Sidecar settings per netns. Written by the agent (pod add with a sidecar); read by
    /// connect.
    ML_SIDECARS: HashMap<u64, Sidecar> = maps::SIDECARS;

    /// Captured connects waiting to be established: socket cookie → original destination.
    /// Written by connect, moved to `ML_ORIG_DST` by sockops when the connection is established.
    ML_ORIG_PENDING: LruHashMap<u64, Addr> = maps::ORIG_PENDING;

    /// Original destinations by the accepting socket's key. Written by sockops (active side),
    /// deleted by sockops when the accepting socket closes; read by getsockopt.
    ML_ORIG_DST: LruHashMap<SockKey, Addr> = maps::ORIG_DST;

    /// Reverse translation for getpeername and UDP recvmsg. Written by connect and sendmsg.
    ML_REVNAT: LruHashMap<RevNatKey, Addr> = maps::REVNAT;

    /// Ports pods keep out of the fast path. Written by the agent (pod add); read by sockops.
    ML_NOACCEL: HashMap<PortKey, u32> = maps::NOACCEL_PORTS;

    /// Threads inside splice/sendfile. Written and read by the splice guard's tracepoints.
    ML_SPLICING: HashMap<u64, u32> = maps::SPLICING;

    /// io_uring splice requests in flight and their processes. Written and read by the guard.
    ML_URING_REQS: LruHashMap<u64, u32> = maps::URING_REQS;
    ML_URING_TGIDS: HashMap<u32, u32> = maps::URING_TGIDS;

    /// Socket address → flow of enrolled pods' sockets. Created and closed by sockops, bytes
    /// added by the send/recv length tracepoints, sent and deleted by `tcp_destroy_sock`; read
    /// by the guard (which pod a socket belongs to) and the agent (open flows).
    ML_FLOWS: LruHashMap<u64, Flow> = maps::FLOWS;

    /// Sockets seen spliced. Written by the guard; read and emptied by the agent.
    ML_SPLICED: LruHashMap<SockKey, u32> = maps::SPLICED;

    /// Pods seen reading in ways the fast path cannot serve. Written by the guard; read by
    /// sockops and the agent.
    ML_READER_PODS: HashMap<u64, ReaderPod> = maps::READER_PODS;

    /// Flow open and close events. Written by sockops and `tcp_destroy_sock`; read by the
    /// agent. The agent sets its size at load time.
    ML_EVENTS: RingBuf = maps::EVENTS;

    /// Where the agent expects the next HTTP message per socket (cookie) and direction.
    /// Written by the agent; read by the length tracepoints.
    ML_HTTP_NEXT: LruHashMap<u64, [u64; 2]> = maps::HTTP_NEXT;
}

#[inline(always)]
pub fn count(counter: dataplane_common::Counter, n: u64) {
    if let Some(slot) = ML_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and programs are not preempted on a CPU mid-run.
        unsafe { *slot += n };
    }
}

/// The network namespace of a socket's peer, if the peer can be redirected to: loopback peers
/// live in the same netns; a pod IP resolves through `ML_ENDPOINTS` to an enrolled netns.
#[inline(always)]
pub fn peer_netns(key: &dataplane_common::SockKey) -> Result<u64, dataplane_common::Counter> {
    use dataplane_common::{Counter, is_loopback, netns_flags::ACCELERATE};
    if is_loopback(&key.remote_ip) {
        return Ok(key.netns);
    }
    // SAFETY: hash lookups; values are copied out at once.
    let ep = unsafe { ML_ENDPOINTS.get(&key.remote_ip) }.copied();
    let ep = ep.ok_or(Counter::PassPeerNotLocal)?;
    if ep.flags & ACCELERATE == 0 {
        return Err(Counter::PassPeerNotEnrolled);
    }
    // SAFETY: as above.
    match unsafe { ML_NETNS.get(&ep.netns) }.copied() {
        Some(info) if info.flags & ACCELERATE != 0 => Ok(ep.netns),
        _ => Err(Counter::PassPeerNotEnrolled),
    }
}

/// Whether redirect is allowed for a netns with these flags right now.
#[inline(always)]
pub fn accel_allowed(netns_flags: u32) -> bool {
    let on = ML_CONFIG.get(0).map(|c| c.accelerate != 0).unwrap_or(false);
    on || netns_flags & dataplane_common::netns_flags::SELFTEST != 0
}

/// Removes a socket from the SOCKHASH (and its statistics). Only used on a client whose accepted
/// peer never joined the map: nothing was ever redirected into it, so its redirect queue is empty
/// and no data can be lost; it goes back to the plain TCP code.
#[inline(always)]
pub fn evict(key: &dataplane_common::SockKey) {
    // SAFETY: map_delete_elem on our SOCKHASH (allowed for sockops since Linux 4.18) with a key
    // of the map's key type; SockHash is a transparent wrapper of the map definition.
    let _absent_is_fine = unsafe {
        aya_ebpf::helpers::generated::bpf_map_delete_elem(
            core::ptr::addr_of!(ML_SOCKS) as *mut core::ffi::c_void,
            core::ptr::from_ref(key).cast(),
        )
    };
    let _absent_is_fine: Result<(), i32> = ML_SOCK_STATS.remove(key);
}

/// Whether `port` is one the pod of `netns` keeps out of the fast path.
#[inline(always)]
pub fn port_excluded(netns: u64, port: u32) -> bool {
    let key = PortKey {
        netns,
        port,
        _pad: 0,
    };
    // SAFETY: a hash lookup; only its presence is used.
    unsafe { ML_NOACCEL.get(&key) }.is_some()
}

/// Records that the pod of netns `netns` read in a way the fast path cannot serve; `bump`
/// increments the kind's detections. Its new connections stay on the stack from then on.
#[inline(always)]
pub fn guard_pod(netns: u64, bump: fn(&mut ReaderPod)) {
    match ML_READER_PODS.get_ptr_mut(&netns) {
        // SAFETY: our map's value; a lost increment under a race only undercounts.
        Some(p) => bump(unsafe { &mut *p }),
        None => {
            let mut v = ReaderPod::default();
            bump(&mut v);
            if ML_READER_PODS
                .insert(&netns, &v, aya_ebpf::bindings::BPF_ANY as u64)
                .is_err()
            {
                count(dataplane_common::Counter::ReaderPodStoreError, 1);
            }
        }
    }
}
