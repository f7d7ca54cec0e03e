//! Every map of the dataplane. All are pinned by name under `<bpffs>/v<ABI>/maps/` by the agent,
//! so they outlive agent restarts; their names and layouts come from `dataplane-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use dataplane_common::{
    Addr, BACKENDS_CAPACITY, BackendKey, COUNTER_SLOTS, Config, ENDPOINTS_CAPACITY, Endpoint,
    NETNS_CAPACITY, NetnsInfo, ORIG_CAPACITY, REVNAT_CAPACITY, RevNatKey, SERVICES_CAPACITY,
    SOCK_STATS_CAPACITY, SOCKHASH_CAPACITY, Service, ServiceKey, ServiceStats, Sidecar, SockKey,
    SockStats,
};

/// Established sockets of enrolled namespaces. Written by `sockops` (insert on establishment);
/// the kernel removes a socket when it closes; the agent deletes a pod's sockets when the pod is
/// removed. Read by `sk_msg` (redirect lookup).
#[map(name = "ML_SOCKS")]
pub static ML_SOCKS: SockHash<SockKey> = SockHash::pinned(SOCKHASH_CAPACITY, 0);

/// Enrolled network namespaces. Written by the agent (pod add/del, self-test); read by both
/// programs.
#[map(name = "ML_NETNS")]
pub static ML_NETNS: HashMap<u64, NetnsInfo> = HashMap::pinned(NETNS_CAPACITY, 0);

/// Pod IPs on this node (IPv4-mapped IPv6) → their netns. Written by the agent; read by `sk_msg`
/// to find the peer of a non-loopback connection.
#[map(name = "ML_ENDPOINTS")]
pub static ML_ENDPOINTS: HashMap<[u32; 4], Endpoint> = HashMap::pinned(ENDPOINTS_CAPACITY, 0);

/// Per-socket byte counters. Created by `sockops` when the socket enters the SOCKHASH (a socket
/// without an entry is never redirected), deleted by `sockops` when it closes, updated by
/// `sk_msg` under the socket lock; read by the agent. A plain hash, not an LRU: the entry also
/// carries the "already sent through the stack" fact that keeps bytes in order, and that must not
/// be evicted.
#[map(name = "ML_SOCK_STATS")]
pub static ML_SOCK_STATS: HashMap<SockKey, SockStats> = HashMap::pinned(SOCK_STATS_CAPACITY, 0);

/// Per-CPU counters indexed by `dataplane_common::Counter`. Written by both programs; summed by
/// the agent.
#[map(name = "ML_COUNTERS")]
pub static ML_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// Runtime switches (index 0). Written by the agent; read by `sk_msg`.
#[map(name = "ML_CONFIG")]
pub static ML_CONFIG: Array<Config> = Array::pinned(1, 0);

/// The service table. Written by the agent (services file, later the controller); read by the
/// connect and sendmsg programs.
#[map(name = "ML_SERVICES")]
pub static ML_SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(SERVICES_CAPACITY, 0);

/// Backend sets. Written by the agent, new set before the service entry that points to it;
/// read by the connect and sendmsg programs.
#[map(name = "ML_BACKENDS")]
pub static ML_BACKENDS: HashMap<BackendKey, Addr> = HashMap::pinned(BACKENDS_CAPACITY, 0);

/// Per-service counters indexed by `Service::id`. Written by the connect and sendmsg programs;
/// read (and reset when an id is reused) by the agent.
#[map(name = "ML_SVC_STATS")]
pub static ML_SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(SERVICES_CAPACITY, 0);

/// Sidecar settings per netns. Written by the agent (pod add with a sidecar); read by connect.
#[map(name = "ML_SIDECARS")]
pub static ML_SIDECARS: HashMap<u64, Sidecar> = HashMap::pinned(NETNS_CAPACITY, 0);

/// Captured connects waiting to be established: socket cookie → original destination. Written
/// by connect, moved to `ML_ORIG_DST` by sockops when the connection is established.
#[map(name = "ML_ORIG_PENDING")]
pub static ML_ORIG_PENDING: LruHashMap<u64, Addr> = LruHashMap::pinned(ORIG_CAPACITY, 0);

/// Original destinations by the accepting socket's key. Written by sockops (active side),
/// deleted by sockops when the accepting socket closes; read by getsockopt.
#[map(name = "ML_ORIG_DST")]
pub static ML_ORIG_DST: LruHashMap<SockKey, Addr> = LruHashMap::pinned(ORIG_CAPACITY, 0);

/// Reverse translation for getpeername and UDP recvmsg. Written by connect and sendmsg.
#[map(name = "ML_REVNAT")]
pub static ML_REVNAT: LruHashMap<RevNatKey, Addr> = LruHashMap::pinned(REVNAT_CAPACITY, 0);

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
