//! The map table: every map of the kernel programs, with its type, key and value sizes and
//! capacity, in one place.
//!
//! The kernel crate declares its map statics from these rows (and checks at compile time that the
//! static's symbol, type and sizes agree with its row); the agent checks existing pins against
//! them and sets the load-time capacities from them. So a map added, resized or retyped on one side
//! only fails a build or a host test instead of a program load on a node.
//!
//! Sizes are `size_of` of the types the kernel side declares; this module must never hard-code a
//! size that has a type.

use core::mem::size_of;

use crate::{
    Addr, BACKENDS_CAPACITY, BackendKey, COUNTER_SLOTS, Config, ENDPOINTS_CAPACITY,
    EVENTS_RING_BYTES, Endpoint, FLOWS_CAPACITY, Flow, NETNS_CAPACITY, NOACCEL_PORTS_CAPACITY,
    NetnsInfo, ORIG_CAPACITY, PortKey, REVNAT_CAPACITY, ReaderPod, RevNatKey, SERVICES_CAPACITY,
    SOCK_STATS_CAPACITY, SOCKHASH_CAPACITY, SPLICED_CAPACITY, SPLICING_CAPACITY, Service,
    ServiceKey, ServiceStats, Sidecar, SockKey, SockStats, map_names, sock_stats_capacity,
};

/// The kind of a map; the discriminant is the kernel's `enum bpf_map_type` value (what the ELF's
/// map definition and `bpftool map show` carry).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash = 1,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array = 2,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`; the value size is that of one CPU's value.
    PerCpuArray = 6,
    /// `BPF_MAP_TYPE_LRU_HASH`.
    LruHash = 9,
    /// `BPF_MAP_TYPE_SOCKHASH`.
    SockHash = 18,
    /// `BPF_MAP_TYPE_RINGBUF`; no key or value, the capacity is its size in bytes.
    RingBuf = 27,
}

impl MapKind {
    /// The kernel's `enum bpf_map_type` value.
    pub const fn bpf_map_type(self) -> u32 {
        self as u32
    }
}

/// Who decides a map's capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// [`MapSpec::max_entries`] as compiled into the ELF; the agent never changes it.
    Fixed,
    /// The agent's `--sockhash-capacity`, set at load time.
    SockhashCapacity,
    /// [`sock_stats_capacity`] of the agent's `--sockhash-capacity`, set at load time.
    SockStatsCapacity,
    /// The agent's `--events-ring-bytes`, set at load time.
    EventsRingBytes,
}

/// The capacities the agent chooses at load time (its flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSizes {
    pub sockhash: u32,
    /// A power of two, at least a page.
    pub events_ring_bytes: u32,
}

impl LoadSizes {
    /// The compiled defaults.
    pub const DEFAULT: LoadSizes = LoadSizes {
        sockhash: SOCKHASH_CAPACITY,
        events_ring_bytes: EVENTS_RING_BYTES,
    };
}

/// One map as the kernel programs declare it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The ELF symbol, the map's kernel name and its pin file name (a [`map_names`] constant).
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// Capacity as compiled into the ELF. For a map whose [`MapSpec::sizing`] is not
    /// [`Sizing::Fixed`] this is the default the agent loads with; use
    /// [`MapSpec::max_entries_at_load`] for the capacity a running agent gives it.
    pub max_entries: u32,
    pub sizing: Sizing,
}

impl MapSpec {
    const fn new<K, V>(name: &'static str, kind: MapKind, max_entries: u32) -> MapSpec {
        MapSpec {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
            sizing: Sizing::Fixed,
        }
    }

    const fn sized(self, sizing: Sizing) -> MapSpec {
        MapSpec { sizing, ..self }
    }

    /// Whether the agent overrides [`MapSpec::max_entries`] when it loads the programs.
    pub const fn adjustable(&self) -> bool {
        !matches!(self.sizing, Sizing::Fixed)
    }

    /// The capacity the agent loads this map with, given its flags.
    pub const fn max_entries_at_load(&self, sizes: LoadSizes) -> u32 {
        match self.sizing {
            Sizing::Fixed => self.max_entries,
            Sizing::SockhashCapacity => sizes.sockhash,
            Sizing::SockStatsCapacity => sock_stats_capacity(sizes.sockhash),
            Sizing::EventsRingBytes => sizes.events_ring_bytes,
        }
    }

    /// Whether this is the map called `name` (usable in constants, unlike `==` on `str`).
    pub const fn is_named(&self, name: &str) -> bool {
        let (a, b) = (self.name.as_bytes(), name.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

use MapKind::{
    Array as A, Hash as H, LruHash as Lru, PerCpuArray as Pc, RingBuf as Rb, SockHash as Sh,
};

/// The SOCKHASH's value is what user space passes to update it: a socket fd (`u32`).
pub const SOCKHASH: MapSpec =
    MapSpec::new::<SockKey, u32>(map_names::SOCKHASH, Sh, SOCKHASH_CAPACITY)
        .sized(Sizing::SockhashCapacity);
pub const NETNS: MapSpec = MapSpec::new::<u64, NetnsInfo>(map_names::NETNS, H, NETNS_CAPACITY);
pub const ENDPOINTS: MapSpec =
    MapSpec::new::<[u32; 4], Endpoint>(map_names::ENDPOINTS, H, ENDPOINTS_CAPACITY);
pub const SOCK_STATS: MapSpec =
    MapSpec::new::<SockKey, SockStats>(map_names::SOCK_STATS, H, SOCK_STATS_CAPACITY)
        .sized(Sizing::SockStatsCapacity);
pub const COUNTERS: MapSpec = MapSpec::new::<u32, u64>(map_names::COUNTERS, Pc, COUNTER_SLOTS);
/// One entry: the runtime [`Config`].
pub const CONFIG: MapSpec = MapSpec::new::<u32, Config>(map_names::CONFIG, A, 1);
pub const SERVICES: MapSpec =
    MapSpec::new::<ServiceKey, Service>(map_names::SERVICES, H, SERVICES_CAPACITY);
pub const BACKENDS: MapSpec =
    MapSpec::new::<BackendKey, Addr>(map_names::BACKENDS, H, BACKENDS_CAPACITY);
/// Indexed by [`Service::id`], so as many slots as services.
pub const SVC_STATS: MapSpec =
    MapSpec::new::<u32, ServiceStats>(map_names::SVC_STATS, Pc, SERVICES_CAPACITY);
/// One entry per enrolled netns at most.
pub const SIDECARS: MapSpec = MapSpec::new::<u64, Sidecar>(map_names::SIDECARS, H, NETNS_CAPACITY);
pub const ORIG_PENDING: MapSpec =
    MapSpec::new::<u64, Addr>(map_names::ORIG_PENDING, Lru, ORIG_CAPACITY);
pub const ORIG_DST: MapSpec =
    MapSpec::new::<SockKey, Addr>(map_names::ORIG_DST, Lru, ORIG_CAPACITY);
pub const REVNAT: MapSpec =
    MapSpec::new::<RevNatKey, Addr>(map_names::REVNAT, Lru, REVNAT_CAPACITY);
pub const NOACCEL_PORTS: MapSpec =
    MapSpec::new::<PortKey, u32>(map_names::NOACCEL_PORTS, H, NOACCEL_PORTS_CAPACITY);
pub const SPLICING: MapSpec = MapSpec::new::<u64, u32>(map_names::SPLICING, H, SPLICING_CAPACITY);
pub const URING_REQS: MapSpec =
    MapSpec::new::<u64, u32>(map_names::URING_REQS, Lru, SPLICING_CAPACITY);
pub const URING_TGIDS: MapSpec =
    MapSpec::new::<u32, u32>(map_names::URING_TGIDS, H, SPLICING_CAPACITY);
pub const FLOWS: MapSpec = MapSpec::new::<u64, Flow>(map_names::FLOWS, Lru, FLOWS_CAPACITY);
pub const EVENTS: MapSpec =
    MapSpec::new::<(), ()>(map_names::EVENTS, Rb, EVENTS_RING_BYTES).sized(Sizing::EventsRingBytes);
pub const HTTP_NEXT: MapSpec =
    MapSpec::new::<u64, [u64; 2]>(map_names::HTTP_NEXT, Lru, FLOWS_CAPACITY);
pub const SPLICED: MapSpec =
    MapSpec::new::<SockKey, u32>(map_names::SPLICED, Lru, SPLICED_CAPACITY);
pub const READER_PODS: MapSpec =
    MapSpec::new::<u64, ReaderPod>(map_names::READER_PODS, H, NETNS_CAPACITY);

/// Every map of the ELF, one row each.
pub const ALL: &[MapSpec] = &[
    SOCKHASH,
    NETNS,
    ENDPOINTS,
    SOCK_STATS,
    COUNTERS,
    CONFIG,
    SERVICES,
    BACKENDS,
    SVC_STATS,
    SIDECARS,
    ORIG_PENDING,
    ORIG_DST,
    REVNAT,
    NOACCEL_PORTS,
    SPLICING,
    URING_REQS,
    URING_TGIDS,
    FLOWS,
    SPLICED,
    READER_PODS,
    EVENTS,
    HTTP_NEXT,
];

/// The row of the map called `name`.
pub const fn by_name(name: &str) -> Option<&'static MapSpec> {
    let mut i = 0;
    while i < ALL.len() {
        if ALL[i].is_named(name) {
            return Some(&ALL[i]);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `map_names` constant, to prove the table has a row for each and nothing else.
    const NAMES: &[&str] = &[
        map_names::SOCKHASH,
        map_names::NETNS,
        map_names::ENDPOINTS,
        map_names::SOCK_STATS,
        map_names::COUNTERS,
        map_names::CONFIG,
        map_names::SERVICES,
        map_names::BACKENDS,
        map_names::SVC_STATS,
        map_names::SIDECARS,
        map_names::ORIG_PENDING,
        map_names::ORIG_DST,
        map_names::REVNAT,
        map_names::NOACCEL_PORTS,
        map_names::SPLICING,
        map_names::URING_REQS,
        map_names::URING_TGIDS,
        map_names::FLOWS,
        map_names::SPLICED,
        map_names::READER_PODS,
        map_names::EVENTS,
        map_names::HTTP_NEXT,
    ];

    #[test]
    fn one_row_per_map_name() {
        assert_eq!(ALL.len(), NAMES.len(), "rows: {ALL:?}");
        for name in NAMES {
            let rows = ALL.iter().filter(|s| s.name == *name).count();
            assert_eq!(rows, 1, "{name} has {rows} rows in maps::ALL");
            let found = by_name(name).unwrap_or_else(|| panic!("by_name({name}) found nothing"));
            assert_eq!(found.name, *name);
        }
        assert_eq!(by_name("ML_NO_SUCH_MAP"), None);
        assert_eq!(
            by_name("ML_SOCK"),
            None,
            "a prefix of ML_SOCKS must not match"
        );
    }

    #[test]
    fn names_fit_the_kernel_name_field() {
        // BPF_OBJ_NAME_LEN is 16 with the NUL: a longer name would be cut short in the kernel
        // (and in `bpftool map show`), though not in its pin path.
        for s in ALL {
            assert!(
                s.name.len() <= 15,
                "{} is {} bytes long",
                s.name,
                s.name.len()
            );
        }
    }

    #[test]
    fn layouts_are_those_of_the_shared_types() {
        assert_eq!(
            (SOCKHASH.kind, SOCKHASH.key_size, SOCKHASH.value_size),
            (Sh, 48, 4)
        );
        assert_eq!(
            (SOCK_STATS.kind, SOCK_STATS.key_size, SOCK_STATS.value_size),
            (H, 48, 48)
        );
        assert_eq!(
            (FLOWS.kind, FLOWS.key_size, FLOWS.value_size),
            (Lru, 8, 128)
        );
        assert_eq!(
            (EVENTS.kind, EVENTS.key_size, EVENTS.value_size),
            (Rb, 0, 0)
        );
        assert_eq!((SIDECARS.key_size, SIDECARS.value_size), (8, 304));
        assert_eq!(
            (REVNAT.kind, REVNAT.key_size, REVNAT.value_size),
            (Lru, 32, 20)
        );
        for s in ALL {
            if matches!(s.kind, A | Pc) {
                assert_eq!(s.key_size, 4, "{}: array keys are u32", s.name);
            }
            // A ring buffer has neither key nor value; its capacity is in bytes.
            let sized = matches!(s.kind, Rb) || (s.key_size > 0 && s.value_size > 0);
            assert!(sized && s.max_entries > 0, "{s:?}");
        }
        assert_eq!(COUNTERS.max_entries, COUNTER_SLOTS);
    }

    #[test]
    fn only_the_socket_maps_and_the_ring_are_sized_at_load() {
        let adjustable: [&str; 3] = [
            map_names::SOCKHASH,
            map_names::SOCK_STATS,
            map_names::EVENTS,
        ];
        let small = |sockhash| LoadSizes {
            sockhash,
            events_ring_bytes: 4096,
        };
        for s in ALL {
            assert_eq!(s.adjustable(), adjustable.contains(&s.name), "{}", s.name);
            // The compiled capacity is the one the agent loads with by default.
            assert_eq!(
                s.max_entries_at_load(LoadSizes::DEFAULT),
                s.max_entries,
                "{}",
                s.name
            );
            if !s.adjustable() {
                assert_eq!(s.max_entries_at_load(small(8)), s.max_entries, "{}", s.name);
            }
        }
        assert_eq!(SOCKHASH.max_entries_at_load(small(8)), 8);
        assert_eq!(SOCK_STATS.max_entries_at_load(small(8)), 16);
        assert_eq!(SOCK_STATS.max_entries_at_load(small(u32::MAX)), u32::MAX);
        assert_eq!(EVENTS.max_entries_at_load(small(8)), 4096);
    }

    #[test]
    fn kinds_are_kernel_map_types() {
        // include/uapi/linux/bpf.h, enum bpf_map_type.
        assert_eq!(MapKind::Hash.bpf_map_type(), 1);
        assert_eq!(MapKind::Array.bpf_map_type(), 2);
        assert_eq!(MapKind::PerCpuArray.bpf_map_type(), 6);
        assert_eq!(MapKind::LruHash.bpf_map_type(), 9);
        assert_eq!(MapKind::SockHash.bpf_map_type(), 18);
        assert_eq!(MapKind::RingBuf.bpf_map_type(), 27);
    }
}
