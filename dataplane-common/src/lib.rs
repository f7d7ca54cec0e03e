//! Types and constants shared by meshlane's kernel programs and its user space.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, because the same bytes are
//! written by one side and read by the other through BPF maps. A size assertion sits beside each
//! type so that a field added on one side only fails the build instead of corrupting a map.
//!
//! Besides the types it owns the map table ([`maps`]) and the pure logic both sides need, kept
//! where the host can unit-test it: the backend choice ([`lb`]).
//!
//! This crate must never depend on `std`: the kernel programs link it.
#![no_std]
#![deny(unsafe_code)]

use core::mem::size_of;

pub mod lb;
pub mod maps;

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
    /// Service table: [`super::ServiceKey`] → [`super::Service`].
    pub const SERVICES: &str = "ML_SERVICES";
    /// Backends of every service: [`super::BackendKey`] → [`super::Addr`].
    pub const BACKENDS: &str = "ML_BACKENDS";
    /// Per-CPU [`super::ServiceStats`] indexed by [`super::Service::id`].
    pub const SVC_STATS: &str = "ML_SVC_STATS";
    /// Sidecar settings of sidecar pods: netns cookie → [`super::Sidecar`].
    pub const SIDECARS: &str = "ML_SIDECARS";
    /// Original destinations of captured connects not yet established: socket cookie →
    /// [`super::Addr`] (LRU).
    pub const ORIG_PENDING: &str = "ML_ORIG_PENDING";
    /// Original destinations of captured connections, keyed by the *accepting* socket's
    /// [`super::SockKey`] (LRU); read by the getsockopt program for `SO_ORIGINAL_DST`.
    pub const ORIG_DST: &str = "ML_ORIG_DST";
    /// Reverse translation: [`super::RevNatKey`] (socket cookie + translated peer) → the address
    /// the application asked for (LRU); read by getpeername and UDP recvmsg.
    pub const REVNAT: &str = "ML_REVNAT";
    /// Ports a pod keeps out of the fast path: [`super::PortKey`] → 1. Connections of that pod
    /// with that port at either end are left to the stack (workloads that read with splice).
    pub const NOACCEL_PORTS: &str = "ML_NOACCEL";
    /// Threads inside a splice(2) or sendfile(2) call right now: pid_tgid → 1. Written by the
    /// syscall tracepoints, read by the `tcp_rcv_space_adjust` tracepoint.
    pub const SPLICING: &str = "ML_SPLICING";
    /// io_uring splice requests in flight: request address → tgid of the submitter (LRU).
    /// Written by the `io_uring_submit_req` / `io_uring_complete` tracepoints.
    pub const URING_REQS: &str = "ML_URING_REQS";
    /// Processes with io_uring splice requests in flight: tgid → how many. Read by the
    /// `tcp_rcv_space_adjust` tracepoint (the splice runs in the submitter or an io-wq worker of
    /// its process, so the thread is not known in advance).
    pub const URING_TGIDS: &str = "ML_URING_TGIDS";
    /// Every established socket of an enrolled pod: the socket's kernel address (`struct sock
    /// *`, as the tracepoints report it) → its [`super::Flow`] (netns, tuple, byte counts;
    /// LRU). Written by sockops at establishment, removed when the socket closes; bytes added
    /// by the send/recv length tracepoints; read by the reader guard and the agent (open
    /// flows' bytes).
    pub const FLOWS: &str = "ML_FLOWS";
    /// Flow open and close events ([`super::FlowEvent`]), a ring buffer: written by sockops,
    /// read by the agent. A full ring drops the event and counts it (`events_lost`).
    pub const EVENTS: &str = "ML_EVENTS";
    /// Per observed socket (cookie), the stream offsets (write, read) where the agent expects
    /// the next HTTP message: the kernel copies nothing of a call that ends before it (a body),
    /// and starts copying there. `u64::MAX`: not HTTP, copy nothing. Written by the agent.
    pub const HTTP_NEXT: &str = "ML_HTTP_NEXT";
    /// Sockets seen read with a splice: [`super::SockKey`] → 1 (LRU). Written by the reader
    /// guard; the agent resets those still in the fast path (their redirected bytes can never
    /// reach the reader) and removes the entry.
    pub const SPLICED: &str = "ML_SPLICED";
    /// Pods seen reading in a way the fast path cannot serve: netns cookie →
    /// [`super::ReaderPod`]. Written by the reader guard; read by sockops (their new connections
    /// stay on the stack) and the agent (which removes a pod's entry with the pod).
    pub const READER_PODS: &str = "ML_READER_PODS";
}

/// Program names (the kernel keeps 15 characters).
pub mod program_names {
    /// The splice guard's tracepoints.
    pub const SPLICE_ENTER: &str = "ml_splice_in";
    pub const SPLICE_EXIT: &str = "ml_splice_out";
    pub const SENDFILE_ENTER: &str = "ml_sendfile_in";
    pub const SENDFILE_EXIT: &str = "ml_sendfile_out";
    pub const RCV_SPACE: &str = "ml_rcvspace";
    pub const RECV_LENGTH: &str = "ml_recv_length";
    /// Telemetry: bytes the applications of enrolled pods write, and the end of their flows.
    pub const SEND_LENGTH: &str = "ml_send_length";
    pub const DESTROY_SOCK: &str = "ml_destroy_sock";
    pub const URING_SUBMIT: &str = "ml_uring_submit";
    pub const URING_DONE: &str = "ml_uring_done";
    pub const SETSOCKOPT: &str = "ml_setsockopt";
    pub const SOCKOPS: &str = "ml_sockops";
    pub const SK_MSG: &str = "ml_sk_msg";
    pub const CONNECT4: &str = "ml_connect4";
    pub const CONNECT6: &str = "ml_connect6";
    pub const SENDMSG4: &str = "ml_sendmsg4";
    pub const SENDMSG6: &str = "ml_sendmsg6";
    pub const RECVMSG4: &str = "ml_recvmsg4";
    pub const RECVMSG6: &str = "ml_recvmsg6";
    pub const GETPEERNAME4: &str = "ml_getpeername4";
    pub const GETPEERNAME6: &str = "ml_getpeername6";
    pub const GETSOCKOPT: &str = "ml_getsockopt";
}

/// The layout version of the maps and of the programs' view of them. Pins live under
/// `<bpffs>/v<ABI_VERSION>/`; a new version never reuses an older directory's maps.
pub const ABI_VERSION: u32 = 3;

/// Default capacities. The SOCKHASH one can be changed at load time (`--sockhash-capacity`), and
/// the per-socket statistics follow it ([`sock_stats_capacity`]); see [`maps::Sizing`].
pub const SOCKHASH_CAPACITY: u32 = 65_536;
pub const NETNS_CAPACITY: u32 = 4_096;
pub const ENDPOINTS_CAPACITY: u32 = 16_384;
pub const SOCK_STATS_CAPACITY: u32 = sock_stats_capacity(SOCKHASH_CAPACITY);
pub const SERVICES_CAPACITY: u32 = 16_384;
/// Twice the largest total number of backends a table may have: a service's new backends are
/// written beside its old ones and the service entry is switched over in one update.
pub const BACKENDS_CAPACITY: u32 = 2 * MAX_TOTAL_BACKENDS;
pub const MAX_TOTAL_BACKENDS: u32 = 65_536;
pub const MAX_BACKENDS_PER_SERVICE: u32 = 4_096;
pub const ORIG_CAPACITY: u32 = 65_536;
pub const REVNAT_CAPACITY: u32 = 131_072;
/// Excluded ports of all pods of a node.
pub const NOACCEL_PORTS_CAPACITY: u32 = 16_384;
/// Threads in splice/sendfile at once, and sockets whose netns the detector can find.
pub const SPLICING_CAPACITY: u32 = 16_384;
/// Sockets of enrolled pods (their telemetry and reader-guard state), twice the SOCKHASH's
/// default: every socket of an enrolled pod has one, accelerated or not.
pub const FLOWS_CAPACITY: u32 = 131_072;
/// Default size of the flow event ring buffer in bytes (`--events-ring-bytes`): about 7,500
/// payload records (HTTP messages) or 55,000 open/close events, 100 ms of a node serving
/// 20,000 requests/s, should the agent stall that long.
pub const EVENTS_RING_BYTES: u32 = 8 << 20;
pub const SPLICED_CAPACITY: u32 = 4_096;
/// Offset of the socket's address (`skaddr`, `sk`) in the `tcp:tcp_rcv_space_adjust` record
/// (read by the guard; the agent checks it against the tracepoint's format before attaching)
/// and in the `sock_*_length` and `tcp_destroy_sock` records.
pub const TP_SK_OFFSET: usize = 8;
/// `ret` and `flags` in the `sock:sock_send_length` / `sock:sock_recv_length` records. The
/// programs on them are raw tracepoints that read the TP_PROTO arguments instead; the agent
/// checks these fields to know the arguments are `(sk, ret, flags)` on this kernel.
pub const LENGTH_RET_OFFSET: usize = 20;
pub const LENGTH_FLAGS_OFFSET: usize = 24;
/// `req` in the `io_uring:io_uring_submit_req` and `io_uring_complete` records, and `opcode` in
/// the former.
pub const URING_REQ_OFFSET: usize = 16;
pub const URING_OPCODE_OFFSET: usize = 32;
/// Excluded ports one pod may have.
pub const MAX_NOACCEL_PORTS: usize = 64;

/// Capacity of the per-socket statistics for a given SOCKHASH capacity. A socket's statistics
/// entry is created just before its SOCKHASH entry, so with equal capacities a full node would
/// report "statistics map full" instead of "SOCKHASH full"; twice the room keeps the SOCKHASH the
/// limit that is hit.
pub const fn sock_stats_capacity(sockhash_capacity: u32) -> u32 {
    sockhash_capacity.saturating_mul(2)
}

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

/// Whether a key address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_ipv4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff)
}

/// What the agent knows of an enrolled network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetnsInfo {
    /// [`netns_flags`] bits.
    pub flags: u32,
    /// A small id the agent assigns, for counters and logs.
    pub pod_id: u32,
    /// The pod's first address (IPv4-mapped or IPv6): the "client address" that client-address
    /// affinity hashes, since a socket has no source address yet when it connects.
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<NetnsInfo>() == 24);

/// Bits of [`NetnsInfo::flags`] and [`Endpoint::flags`].
pub mod netns_flags {
    /// Sockets of this netns go into the SOCKHASH and may be redirected.
    pub const ACCELERATE: u32 = 1 << 0;
    /// The agent's own self-test namespace: redirected even while acceleration is globally off,
    /// so the self-test can prove the path before anyone else uses it.
    pub const SELFTEST: u32 = 1 << 1;
    /// The pod runs a sidecar proxy: its outbound TCP connects are captured to the proxy, and
    /// connects from other pods of this node to it go to the proxy's inbound port. Its settings
    /// are in [`super::map_names::SIDECARS`].
    pub const SIDECAR: u32 = 1 << 2;
    /// The pod's connections are observed: open and close events with bytes, RTT and
    /// retransmits go to the agent (`FlowEvent`).
    pub const TELEMETRY: u32 = 1 << 3;
}

/// An address: IPv6, IPv4 stored IPv4-mapped, network byte order as the kernel hands it over;
/// the port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Addr {
    pub ip: [u32; 4],
    pub port: u32,
}
const _: () = assert!(size_of::<Addr>() == 20);

/// IP protocol numbers used in [`ServiceKey::proto`].
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A service's virtual address as a connect or sendmsg sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// A service: where its backends are and how to choose one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index into [`map_names::SVC_STATS`]; stable across reloads while the service exists.
    pub id: u32,
    /// The [`BackendKey::set`] holding this service's current backends.
    pub backend_set: u32,
    /// Number of backends (indexes `0..count` of the set). Zero: connects are refused.
    pub count: u32,
    /// [`service_flags`] bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<Service>() == 16);

pub mod service_flags {
    /// Choose the backend by hashing the client's address instead of at random.
    pub const AFFINITY_CLIENT_ADDR: u32 = 1 << 0;
}

/// One backend slot of a backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendKey {
    pub set: u32,
    pub index: u32,
}
const _: () = assert!(size_of::<BackendKey>() == 8);

/// Per-service counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// TCP connects and connected-UDP connects translated to a backend.
    pub connects: u64,
    /// UDP datagrams translated at sendmsg.
    pub datagrams: u64,
    /// Connects or datagrams refused because the service had no backend.
    pub refused: u64,
}
const _: () = assert!(size_of::<ServiceStats>() == 24);

/// Slots in [`Sidecar`]'s exclusion lists.
pub const SIDECAR_MAX_PORTS: usize = 8;
pub const SIDECAR_MAX_CIDRS: usize = 8;

/// A CIDR as a network and a mask, both in [`Addr`]'s address form.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cidr {
    pub net: [u32; 4],
    pub mask: [u32; 4],
}
const _: () = assert!(size_of::<Cidr>() == 32);

impl Cidr {
    #[inline(always)]
    pub const fn contains(&self, ip: &[u32; 4]) -> bool {
        ip[0] & self.mask[0] == self.net[0]
            && ip[1] & self.mask[1] == self.net[1]
            && ip[2] & self.mask[2] == self.net[2]
            && ip[3] & self.mask[3] == self.net[3]
    }
}

/// How a sidecar pod's traffic is captured (Istio's defaults: 15001, 15006, uid 1337).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sidecar {
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Connects made by this uid (the proxy's) are never captured outbound.
    pub proxy_uid: u32,
    /// Destination ports never captured outbound; 0 = unused slot.
    pub exclude_outbound_ports: [u16; SIDECAR_MAX_PORTS],
    /// Pod ports never captured inbound; 0 = unused slot.
    pub exclude_inbound_ports: [u16; SIDECAR_MAX_PORTS],
    /// Number of used slots in `exclude_cidrs`.
    pub cidr_count: u32,
    pub _pad: u32,
    /// Destinations never captured outbound.
    pub exclude_cidrs: [Cidr; SIDECAR_MAX_CIDRS],
}
const _: () = assert!(size_of::<Sidecar>() == 8 + 32 + 8 + 32 * SIDECAR_MAX_CIDRS);

/// Key of the reverse-translation map: a socket and the peer address the kernel sees.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatKey {
    pub cookie: u64,
    pub peer: Addr,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RevNatKey>() == 32);

/// A port of a pod's network namespace (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub netns: u64,
    pub port: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PortKey>() == 16);

/// A pod IP on this node and the network namespace it lives in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub netns: u64,
    pub flags: u32,
    pub pod_id: u32,
}
const _: () = assert!(size_of::<Endpoint>() == 16);

/// A socket in the fast path: where its messages go, and the bytes it sent by path. sockops
/// creates it when the socket joins the SOCKHASH; only the sk_msg program of that socket (under
/// the socket lock) writes the counters; the agent reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockStats {
    pub redirected_bytes: u64,
    pub stack_bytes: u64,
    pub redirected_msgs: u64,
    pub stack_msgs: u64,
    /// The netns of the peer socket, decided when both joined: the peer's key is
    /// `key.peer(peer_netns)`, so a message needs no endpoint lookup.
    pub peer_netns: u64,
    /// The peer's `redirected_bytes` when the peer closed (written by sockops at the peer's
    /// close, so this socket's close event can still say how much of what it read was
    /// redirected).
    pub peer_redirected_final: u64,
}
const _: () = assert!(size_of::<SockStats>() == 48);

/// A socket of an enrolled pod as telemetry (and the reader guard) know it, keyed by the
/// socket's kernel address in [`map_names::FLOWS`]: tracepoints name sockets by that address.
/// sockops creates it at establishment and fills in the close-time facts when the connection
/// reaches TCP_CLOSE; the `sock_send_length` / `sock_recv_length` tracepoints add the bytes the
/// application wrote and read; `tcp_destroy_sock` (after the application's last read, which
/// can come after TCP_CLOSE) sends it as the close event and deletes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub key: SockKey,
    /// The socket cookie: unique for the boot, the flow's identity for the agent.
    pub cookie: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at establishment.
    pub opened_ns: u64,
    /// Bytes the application wrote (send, write, sendmsg, sendfile, splice into the socket).
    pub sent: u64,
    /// Bytes the application read (recv, read, recvmsg; not MSG_PEEK).
    pub received: u64,
    /// Of `sent`, the bytes redirected socket to socket (the rest went through the stack). Set
    /// at TCP_CLOSE.
    pub sent_redirected: u64,
    /// The bytes the peer socket redirected into this one, set at TCP_CLOSE. Redirected bytes
    /// always come first in the stream (a socket that sent through the stack never redirects
    /// again), so `min(received, peer_redirected)` of what was read came redirected.
    pub peer_redirected: u64,
    /// [`flow_flags`] bits.
    pub flags: u32,
    /// Smoothed RTT in µs at TCP_CLOSE (0: no sample).
    pub srtt_us: u32,
    /// Retransmitted segments (`tcp_sock.total_retrans`) at TCP_CLOSE.
    pub retransmits: u32,
    /// For a captured connection (the app's connect to its proxy, both sockets): where the
    /// application meant to go. Zero otherwise.
    pub orig_dst: Addr,
}
const _: () = assert!(size_of::<Flow>() == 128);

/// Bytes of an application read or write copied into a [`DataEvent`] at most.
pub const DATA_CAPTURE: usize = 1024;

/// The first bytes of one application write (`dir` 0) or read (`dir` 1) on an observed socket,
/// for the agent's HTTP parser: a record of the [`map_names::EVENTS`] ring with `kind`
/// [`flow_event::DATA`]. The kernel skips what the agent said is inside a body
/// ([`map_names::HTTP_NEXT`]). Records are as long as their bytes need: `N` is 0, 208 or
/// [`DATA_CAPTURE`] (the agent reads the header, then `len` bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataEventOf<const N: usize> {
    pub kind: u32,
    /// 0: the application wrote; 1: it read.
    pub dir: u32,
    pub cookie: u64,
    pub at_ns: u64,
    /// Stream offset (bytes of this direction before it) of `data[0]`.
    pub offset: u64,
    /// Stream offset after this call.
    pub end: u64,
    /// Bytes of `data` filled (0: nothing the agent asked for, or no buffer known).
    pub len: u32,
    /// Non-zero: the call's buffer was not known (not a read/write/send/recv family syscall).
    pub no_buffer: u32,
    pub data: [u8; N],
}
/// The largest data record.
pub type DataEvent = DataEventOf<DATA_CAPTURE>;
/// Bytes of a data record before its data.
pub const DATA_HEAD: usize = 48;
const _: () = assert!(size_of::<DataEvent>() == DATA_HEAD + DATA_CAPTURE);
const _: () = assert!(size_of::<DataEventOf<0>>() == DATA_HEAD);

/// Bits of [`Flow::flags`].
pub mod flow_flags {
    /// This socket connected (the client side); otherwise it was accepted.
    pub const ACTIVE: u32 = 1 << 0;
    /// The pod has telemetry on: the flow's open and close become events.
    pub const OBSERVED: u32 = 1 << 1;
    /// The socket joined the SOCKHASH (its messages may be redirected).
    pub const ACCELERATED: u32 = 1 << 2;
    /// The connection reached TCP_CLOSE: the close-time fields are set.
    pub const CLOSED: u32 = 1 << 3;
}

/// What a [`FlowEvent`] reports.
pub mod flow_event {
    /// Established; the flow as sockops created it.
    pub const OPEN: u32 = 1;
    /// Destroyed; the flow's final counts.
    pub const CLOSE: u32 = 2;
    /// A [`super::DataEvent`].
    pub const DATA: u32 = 3;
}

/// One record of the flow event ring buffer ([`map_names::EVENTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// A [`flow_event`] value.
    pub kind: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when the event was made.
    pub at_ns: u64,
    pub flow: Flow,
}
const _: () = assert!(size_of::<FlowEvent>() == 144);

/// What the reader guard saw a pod do, by kind (detections).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReaderPod {
    /// splice(2) or sendfile(2) from one of its sockets.
    pub splice: u32,
    /// `recv(MSG_WAITALL)` on one of its TCP sockets.
    pub waitall: u32,
    /// `SO_RCVLOWAT` above 1 on one of its TCP sockets.
    pub rcvlowat: u32,
    /// Established sockets kept off the fast path since, because of this pod (its own, and its
    /// peers').
    pub excluded: u32,
}
const _: () = assert!(size_of::<ReaderPod>() == 16);

/// Runtime switches, in the one-entry [`map_names::CONFIG`] array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Non-zero: new connections of enrolled pods enter the fast path (the agent sets it only
    /// after the self-test passed; `meshlane accel off` clears it — the kill switch).
    pub accelerate: u32,
    /// Non-zero: while `accelerate` is off, connections already in the fast path send through
    /// the stack too (`meshlane accel off --move-established`). Zero: they stay in the fast path
    /// until they close, so no SOCKHASH socket ever receives bytes through the stack (kernels
    /// without 04af4efde58a under-report FIONREAD for those).
    pub move_established: u32,
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
    /// Connects (TCP, connected UDP) to a service VIP translated to a backend.
    SvcConnectTranslated = 20, "svc_connect_translated";
    /// UDP datagrams to a service VIP translated to a backend at sendmsg.
    SvcDatagramTranslated = 21, "svc_datagram_translated";
    /// Connects or datagrams to a service without backends, refused with ECONNREFUSED.
    SvcNoBackend = 22, "svc_no_backend";
    /// A backend slot was missing (the table changed under the lookup); refused.
    SvcBackendMissing = 23, "svc_backend_missing";
    /// Outbound TCP connects of sidecar pods sent to their proxy's outbound port.
    CaptureOutbound = 24, "capture_outbound";
    /// Connects to a sidecar pod of this node sent to its proxy's inbound port.
    CaptureInbound = 25, "capture_inbound";
    /// Not captured: the connect came from the proxy's uid.
    CaptureSkipProxyUid = 26, "capture_skip_proxy_uid";
    /// Not captured: the destination port is excluded.
    CaptureSkipExcludedPort = 27, "capture_skip_excluded_port";
    /// Not captured: the destination is in an excluded CIDR.
    CaptureSkipExcludedCidr = 28, "capture_skip_excluded_cidr";
    /// Not captured: the destination is loopback.
    CaptureSkipLoopback = 29, "capture_skip_loopback";
    /// Not captured: the destination is the pod itself.
    CaptureSkipOwnPod = 30, "capture_skip_own_pod";
    /// Not captured inbound: the pod's port is excluded.
    CaptureSkipExcludedInboundPort = 31, "capture_skip_excluded_inbound_port";
    /// Not captured: the sidecar pod has no sidecar settings (enrollment in progress).
    CaptureSkipNoSettings = 32, "capture_skip_no_settings";
    /// The original destination of a captured connect could not be stored; the connect goes
    /// to its original destination instead (fail open).
    OrigDstStoreError = 33, "orig_dst_store_error";
    /// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` answered from the map.
    OrigDstServed = 34, "orig_dst_served";
    /// `SO_ORIGINAL_DST` asked on a socket meshlane knows nothing of (left to the kernel).
    OrigDstMiss = 35, "orig_dst_miss";
    /// A reverse-translation entry could not be stored (getpeername / UDP replies would show
    /// the backend).
    RevNatStoreError = 36, "revnat_store_error";
    /// getpeername or UDP recvmsg addresses turned back into the address the app asked for.
    RevNatApplied = 37, "revnat_applied";
    /// Not translated: the chosen backend is of the other address family than the socket (an
    /// IPv6 backend for an IPv4 connect or datagram); it goes to the VIP as the app sent it. The
    /// agent never pairs them, so this means a table written by something else.
    SvcBackendWrongFamily = 38, "svc_backend_wrong_family";
    /// Connects in an enrolled netns with a protocol other than TCP or UDP (such as ICMP ping
    /// sockets): left alone.
    ConnectOtherProtocol = 39, "connect_other_protocol";
    /// Connects from a netns that is not enrolled (the host, un-enrolled pods): left alone. A pod
    /// whose service connects are not translated shows up here.
    ConnectNotEnrolled = 40, "connect_not_enrolled";
    /// UDP datagrams with a destination (sendmsg) from a netns that is not enrolled: left alone.
    DatagramNotEnrolled = 41, "datagram_not_enrolled";
    /// `SO_ORIGINAL_DST` asked without a socket the program can read: left to the kernel.
    OrigDstNoSocket = 42, "orig_dst_no_socket";
    /// `SO_ORIGINAL_DST` asked on a socket that is neither IPv4 nor IPv6: left to the kernel.
    OrigDstUnsupportedFamily = 43, "orig_dst_unsupported_family";
    /// `SO_ORIGINAL_DST` known, but the caller's buffer is too small for the address: left to
    /// the kernel's answer.
    OrigDstShortBuffer = 44, "orig_dst_short_buffer";
    /// `SO_ORIGINAL_DST` known, but asked at the other level (`SOL_IP` for an IPv6 destination or
    /// `SOL_IPV6` for an IPv4 one): left to the kernel's error, as conntrack does. Usually a proxy
    /// trying both levels.
    OrigDstWrongLevel = 45, "orig_dst_wrong_level";
    /// A reverse-translation entry was found but holds an address of the other family than the
    /// call (getpeername, recvmsg): the kernel's address is shown.
    RevNatWrongFamily = 46, "revnat_wrong_family";
    /// Established sockets not inserted: a port of the connection is one its pod (or the peer's
    /// pod) keeps out of the fast path.
    SockPortExcluded = 47, "sock_port_excluded";
    /// A socket of an enrolled pod was read with splice(2) or sendfile(2): the pod's new
    /// connections stay on the stack from now on.
    SpliceDetected = 48, "splice_detected";
    /// Established sockets not inserted: their pod, or the peer's, reads in a way the fast path
    /// cannot serve (splice, MSG_WAITALL, SO_RCVLOWAT).
    SockReaderExcluded = 49, "sock_reader_excluded";
    /// A socket could not be recorded for the reader guard (its map is full of live entries): a
    /// guarded read on it would go undetected, or a spliced socket would not be reset.
    SkKeyStoreError = 50, "sk_key_store_error";
    /// A guarded read was detected but its pod could not be recorded (the map is full).
    ReaderPodStoreError = 51, "reader_pod_store_error";
    /// A thread entering splice/sendfile could not be marked (the map is full): a splice by it
    /// would go undetected.
    SpliceThreadStoreError = 52, "splice_thread_store_error";
    /// A TCP socket of an enrolled pod was read with `MSG_WAITALL` (which redirected bytes do
    /// not honour): the pod's new connections stay on the stack from now on.
    WaitallDetected = 53, "waitall_detected";
    /// A TCP socket of an enrolled pod was given `SO_RCVLOWAT` above 1 (which redirected bytes
    /// do not honour): the pod's new connections stay on the stack from now on.
    RcvlowatDetected = 54, "rcvlowat_detected";
    /// A flow event was dropped: the ring buffer was full (the agent is behind or stopped).
    /// The flow's bytes still reach the totals when it closes if the close event gets through;
    /// a lost close is counted by the agent.
    EventsLost = 55, "events_lost";
    /// A socket of an enrolled pod could not be given its flow entry (map update failed):
    /// it is neither observed nor guarded.
    FlowStoreError = 56, "flow_store_error";
    /// A socket of an enrolled pod closed without its flow entry: the entry was evicted (the
    /// flow map is full of open connections), so its bytes are lost to telemetry.
    FlowEvicted = 57, "flow_evicted";
}

/// Size of the counter array; a new reason needs a new index below it.
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod user {
    use super::*;

    impl From<maps::MapKind> for aya::maps::MapType {
        fn from(kind: maps::MapKind) -> Self {
            use aya::maps::MapType;
            match kind {
                maps::MapKind::Hash => MapType::Hash,
                maps::MapKind::Array => MapType::Array,
                maps::MapKind::PerCpuArray => MapType::PerCpuArray,
                maps::MapKind::LruHash => MapType::LruHash,
                maps::MapKind::SockHash => MapType::SockHash,
                maps::MapKind::RingBuf => MapType::RingBuf,
            }
        }
    }

    // SAFETY: all of these are repr(C), Copy, and have no padding (see the size assertions).
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for NetnsInfo {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for SockStats {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for Sidecar {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for ReaderPod {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl<const N: usize> aya::Pod for DataEventOf<N> {}
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

    #[cfg(feature = "user")]
    #[test]
    fn map_kinds_are_aya_map_types() {
        for s in maps::ALL {
            let ty = aya::maps::MapType::from(s.kind);
            assert_eq!(
                ty as u32,
                s.kind.bpf_map_type(),
                "{}: {ty:?} vs {:?}",
                s.name,
                s.kind
            );
        }
    }

    #[test]
    fn counter_indexes_are_dense_and_names_snake_case() {
        // Existing indexes never move (dashboards and `meshlane status` key on them); new reasons
        // take the next free index.
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(
                *c as u32, i as u32,
                "{c:?} is not at its position in Counter::ALL"
            );
            let name = c.name();
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{c:?}: metric name {name:?} is not snake_case"
            );
        }
        assert_eq!(Counter::RevNatApplied as u32, 37);
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
