//! The loaded dataplane: the kernel programs, their pinned maps and links, and typed access to
//! the maps for the rest of the agent.
//!
//! Pins live under `<bpffs>/v<ABI_VERSION>/{maps,links}`. A pinned map is reused only when its
//! type, key size, value size and capacity match what this build expects (aya itself reuses a pin
//! without looking). Links are pinned so that neither SIGTERM nor SIGKILL of the agent detaches
//! anything; a restarted agent swaps its fresh programs into the pinned links atomically.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapInfo, MapType, PerCpuArray, SockHash},
    programs::SkMsg,
};
use dataplane_common::{
    ABI_VERSION, Addr, BACKENDS_CAPACITY, BackendKey, COUNTER_SLOTS, Config, Counter,
    ENDPOINTS_CAPACITY, Endpoint, NETNS_CAPACITY, NetnsInfo, ORIG_CAPACITY, REVNAT_CAPACITY,
    RevNatKey, SERVICES_CAPACITY, Service, ServiceKey, ServiceStats, Sidecar, SockKey, SockStats,
    map_names, program_names,
};
use serde::Serialize;

use crate::{EBPF_ELF, Error, Result, bpf_sys};

/// Where the dataplane lives and how big it is.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// The bpffs directory given with `--bpffs`; pins go under `v<ABI_VERSION>/` inside it.
    pub bpffs: PathBuf,
    /// The cgroup v2 directory the sockops program attaches to.
    pub cgroup: PathBuf,
    /// Capacity of the SOCKHASH and of the per-socket statistics.
    pub sockhash_capacity: u32,
}

/// One expected map layout.
#[derive(Clone, Copy, Debug)]
struct Layout {
    name: &'static str,
    ty: MapType,
    key: u32,
    value: u32,
    max_entries: u32,
}

impl Layout {
    fn describe(ty: MapType, key: u32, value: u32, max: u32) -> String {
        format!("{ty:?} key {key} B, value {value} B, {max} entries")
    }
}

/// The statistics entry of a socket is created just before its SOCKHASH entry, so with equal
/// capacities a full node would report "statistics map full" instead of "SOCKHASH full". Twice
/// the room keeps the SOCKHASH the limit that is hit.
fn stats_capacity(sockhash_capacity: u32) -> u32 {
    sockhash_capacity.saturating_mul(2)
}

fn layouts(sockhash_capacity: u32) -> [Layout; 13] {
    use std::mem::size_of;
    const fn l<K, V>(name: &'static str, ty: MapType, max_entries: u32) -> Layout {
        Layout {
            name,
            ty,
            key: size_of::<K>() as u32,
            value: size_of::<V>() as u32,
            max_entries,
        }
    }
    use MapType::{Array as A, Hash as H, LruHash as Lru, PerCpuArray as Pc, SockHash as Sh};
    [
        // A SOCKHASH value is the socket's fd (4 bytes) on the user side.
        l::<SockKey, u32>(map_names::SOCKHASH, Sh, sockhash_capacity),
        l::<u64, NetnsInfo>(map_names::NETNS, H, NETNS_CAPACITY),
        l::<[u32; 4], Endpoint>(map_names::ENDPOINTS, H, ENDPOINTS_CAPACITY),
        l::<SockKey, SockStats>(map_names::SOCK_STATS, H, stats_capacity(sockhash_capacity)),
        l::<u32, u64>(map_names::COUNTERS, Pc, COUNTER_SLOTS),
        l::<u32, Config>(map_names::CONFIG, A, 1),
        l::<ServiceKey, Service>(map_names::SERVICES, H, SERVICES_CAPACITY),
        l::<BackendKey, Addr>(map_names::BACKENDS, H, BACKENDS_CAPACITY),
        l::<u32, ServiceStats>(map_names::SVC_STATS, Pc, SERVICES_CAPACITY),
        l::<u64, Sidecar>(map_names::SIDECARS, H, NETNS_CAPACITY),
        l::<u64, Addr>(map_names::ORIG_PENDING, Lru, ORIG_CAPACITY),
        l::<SockKey, Addr>(map_names::ORIG_DST, Lru, ORIG_CAPACITY),
        l::<RevNatKey, Addr>(map_names::REVNAT, Lru, REVNAT_CAPACITY),
    ]
}

/// Paths of everything the agent pins.
#[derive(Clone, Debug)]
pub struct PinPaths {
    pub root: PathBuf,
    pub maps: PathBuf,
    pub links: PathBuf,
}

impl PinPaths {
    pub fn new(bpffs: &Path) -> Self {
        let root = bpffs.join(format!("v{ABI_VERSION}"));
        PinPaths {
            maps: root.join("maps"),
            links: root.join("links"),
            root,
        }
    }
    pub fn link(&self, program: &str) -> PathBuf {
        self.links.join(program)
    }
}

/// A program as `meshlane status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AttachedProgram {
    pub name: String,
    pub id: u32,
    pub attach: String,
    pub pinned_link: Option<PathBuf>,
}

pub struct Dataplane {
    // Holds the program fds; dropping it would detach the sk_msg program (see `attach_sk_msg`).
    _ebpf: Ebpf,
    pub pins: PinPaths,
    pub options: DataplaneOptions,
    netns: HashMap<MapData, u64, NetnsInfo>,
    endpoints: HashMap<MapData, [u32; 4], Endpoint>,
    stats: HashMap<MapData, SockKey, SockStats>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    socks: SockHash<MapData, SockKey>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: HashMap<MapData, BackendKey, Addr>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    sidecars: HashMap<MapData, u64, Sidecar>,
    pub programs: Vec<AttachedProgram>,
    /// Whether maps from an earlier agent were found and reused.
    pub reused_pins: bool,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pins", &self.pins)
            .field("programs", &self.programs)
            .finish_non_exhaustive()
    }
}

/// Checks every existing pin against the layout this build expects. Returns whether any pin
/// exists.
fn check_pins(pins: &PinPaths, sockhash_capacity: u32) -> Result<bool> {
    let mut any = false;
    for l in layouts(sockhash_capacity) {
        let path = pins.maps.join(l.name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapInfo::from_pin(&path).map_err(|source| Error::Map {
            name: l.name,
            source,
        })?;
        let ty = info.map_type().map_err(|source| Error::Map {
            name: l.name,
            source,
        })?;
        let found = (ty, info.key_size(), info.value_size(), info.max_entries());
        if found != (l.ty, l.key, l.value, l.max_entries) {
            return Err(Error::PinMismatch {
                path,
                expected: Layout::describe(l.ty, l.key, l.value, l.max_entries),
                found: Layout::describe(found.0, found.1, found.2, found.3),
            });
        }
    }
    Ok(any)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

impl Dataplane {
    /// Loads the programs, reusing matching pins, and attaches them. Redirect stays as the
    /// CONFIG map says (off on a fresh install); the caller switches it after the self-test.
    pub fn load(options: DataplaneOptions) -> Result<Self> {
        let pins = PinPaths::new(&options.bpffs);
        for dir in [&pins.maps, &pins.links] {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("creating the pin directory", dir, e))?;
        }
        let reused_pins = check_pins(&pins, options.sockhash_capacity)?;

        let mut loader = EbpfLoader::new();
        if std::env::var_os("MESHLANE_VERIFIER_LOG").is_some() {
            // Full verifier logs in load errors, for diagnosing a kernel that refuses a program.
            loader
                .verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
        }
        let mut ebpf = loader
            .default_map_pin_directory(&pins.maps)
            .map_max_entries(map_names::SOCKHASH, options.sockhash_capacity)
            .map_max_entries(
                map_names::SOCK_STATS,
                stats_capacity(options.sockhash_capacity),
            )
            .load(EBPF_ELF)?;

        let mut programs = Vec::new();
        for p in CGROUP_PROGRAMS {
            programs.push(attach_cgroup(&mut ebpf, &pins, &options.cgroup, p)?);
        }

        let netns = take(&mut ebpf, map_names::NETNS)?;
        let endpoints = take(&mut ebpf, map_names::ENDPOINTS)?;
        let stats = take(&mut ebpf, map_names::SOCK_STATS)?;
        let counters = take(&mut ebpf, map_names::COUNTERS)?;
        let config = take(&mut ebpf, map_names::CONFIG)?;
        let socks: SockHash<MapData, SockKey> = take(&mut ebpf, map_names::SOCKHASH)?;
        programs.push(attach_sk_msg(&mut ebpf, &socks)?);
        let services = take(&mut ebpf, map_names::SERVICES)?;
        let backends = take(&mut ebpf, map_names::BACKENDS)?;
        let svc_stats = take(&mut ebpf, map_names::SVC_STATS)?;
        let sidecars = take(&mut ebpf, map_names::SIDECARS)?;

        Ok(Dataplane {
            _ebpf: ebpf,
            pins,
            options,
            netns,
            endpoints,
            stats,
            counters,
            config,
            socks,
            services,
            backends,
            svc_stats,
            sidecars,
            programs,
            reused_pins,
        })
    }

    pub fn accelerate(&self) -> Result<bool> {
        let c = self.config.get(&0, 0).map_err(|source| Error::Map {
            name: map_names::CONFIG,
            source,
        })?;
        Ok(c.accelerate != 0)
    }

    pub fn set_accelerate(&mut self, on: bool) -> Result<()> {
        let c = Config {
            accelerate: on as u32,
            _reserved: 0,
        };
        self.config.set(0, c, 0).map_err(|source| Error::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    pub fn netns_entries(&self) -> Vec<(u64, NetnsInfo)> {
        self.netns.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn endpoint_entries(&self) -> Vec<([u32; 4], Endpoint)> {
        self.endpoints.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn put_netns(&mut self, cookie: u64, info: NetnsInfo) -> Result<()> {
        self.netns
            .insert(cookie, info, 0)
            .map_err(|source| Error::Map {
                name: map_names::NETNS,
                source,
            })
    }

    pub fn del_netns(&mut self, cookie: u64) -> Result<()> {
        match self.netns.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map {
                name: map_names::NETNS,
                source,
            }),
        }
    }

    pub fn put_endpoint(&mut self, ip: [u32; 4], ep: Endpoint) -> Result<()> {
        self.endpoints
            .insert(ip, ep, 0)
            .map_err(|source| Error::Map {
                name: map_names::ENDPOINTS,
                source,
            })
    }

    pub fn del_endpoint(&mut self, ip: [u32; 4]) -> Result<()> {
        match self.endpoints.remove(&ip) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map {
                name: map_names::ENDPOINTS,
                source,
            }),
        }
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let mut out = Vec::with_capacity(Counter::ALL.len());
        for &c in Counter::ALL {
            let v = self
                .counters
                .get(&(c as u32), 0)
                .map_err(|source| Error::Map {
                    name: map_names::COUNTERS,
                    source,
                })?;
            out.push((c, v.iter().sum()));
        }
        Ok(out)
    }

    pub fn counter(&self, which: Counter) -> Result<u64> {
        Ok(self
            .counters()?
            .into_iter()
            .find(|(c, _)| *c == which)
            .map(|(_, v)| v)
            .unwrap_or(0))
    }

    /// Byte counters of every socket in the fast path (sockets leave with their connection).
    pub fn sock_stats(&self) -> Vec<(SockKey, SockStats)> {
        self.stats.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn service_entries(&self) -> Vec<(ServiceKey, Service)> {
        self.services.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn put_service(&mut self, key: ServiceKey, svc: Service) -> Result<()> {
        self.services
            .insert(key, svc, 0)
            .map_err(|source| Error::Map {
                name: map_names::SERVICES,
                source,
            })
    }

    pub fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        ignore_missing(self.services.remove(key), map_names::SERVICES)
    }

    pub fn put_backend(&mut self, key: BackendKey, addr: Addr) -> Result<()> {
        self.backends
            .insert(key, addr, 0)
            .map_err(|source| Error::Map {
                name: map_names::BACKENDS,
                source,
            })
    }

    pub fn del_backend(&mut self, key: &BackendKey) -> Result<()> {
        ignore_missing(self.backends.remove(key), map_names::BACKENDS)
    }

    pub fn backend_keys(&self) -> Vec<BackendKey> {
        self.backends.keys().filter_map(|r| r.ok()).collect()
    }

    /// A service's counters summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Result<ServiceStats> {
        let per_cpu = self.svc_stats.get(&id, 0).map_err(|source| Error::Map {
            name: map_names::SVC_STATS,
            source,
        })?;
        Ok(per_cpu
            .iter()
            .fold(ServiceStats::default(), |a, s| ServiceStats {
                connects: a.connects + s.connects,
                datagrams: a.datagrams + s.datagrams,
                refused: a.refused + s.refused,
            }))
    }

    /// Zeroes a service id's counters before the id is given to another service.
    pub fn reset_service_stats(&mut self, id: u32) -> Result<()> {
        let n = aya::util::nr_cpus()
            .map_err(|(_, e)| Error::io("counting CPUs", "/sys/devices/system/cpu/possible", e))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![ServiceStats::default(); n])
            .map_err(|e| Error::io("building per-CPU values", map_names::SVC_STATS, e))?;
        self.svc_stats
            .set(id, zero, 0)
            .map_err(|source| Error::Map {
                name: map_names::SVC_STATS,
                source,
            })
    }

    pub fn put_sidecar(&mut self, netns: u64, sc: Sidecar) -> Result<()> {
        self.sidecars
            .insert(netns, sc, 0)
            .map_err(|source| Error::Map {
                name: map_names::SIDECARS,
                source,
            })
    }

    pub fn del_sidecar(&mut self, netns: u64) -> Result<()> {
        ignore_missing(self.sidecars.remove(&netns), map_names::SIDECARS)
    }

    pub fn sidecar_entries(&self) -> Vec<(u64, Sidecar)> {
        self.sidecars.iter().filter_map(|r| r.ok()).collect()
    }

    /// Number of sockets currently in the SOCKHASH.
    pub fn sockhash_len(&self) -> usize {
        self.socks.keys().filter(|k| k.is_ok()).count()
    }
}

/// The cgroup programs, where they attach, and how `meshlane status` describes them.
const CGROUP_PROGRAMS: [(&str, u32, &str); 10] = {
    use bpf_sys::attach_type as at;
    [
        (
            program_names::SOCKOPS,
            at::CGROUP_SOCK_OPS,
            "cgroup_sock_ops",
        ),
        (
            program_names::CONNECT4,
            at::CGROUP_INET4_CONNECT,
            "cgroup/connect4",
        ),
        (
            program_names::CONNECT6,
            at::CGROUP_INET6_CONNECT,
            "cgroup/connect6",
        ),
        (
            program_names::SENDMSG4,
            at::CGROUP_UDP4_SENDMSG,
            "cgroup/sendmsg4",
        ),
        (
            program_names::SENDMSG6,
            at::CGROUP_UDP6_SENDMSG,
            "cgroup/sendmsg6",
        ),
        (
            program_names::RECVMSG4,
            at::CGROUP_UDP4_RECVMSG,
            "cgroup/recvmsg4",
        ),
        (
            program_names::RECVMSG6,
            at::CGROUP_UDP6_RECVMSG,
            "cgroup/recvmsg6",
        ),
        (
            program_names::GETPEERNAME4,
            at::CGROUP_INET4_GETPEERNAME,
            "cgroup/getpeername4",
        ),
        (
            program_names::GETPEERNAME6,
            at::CGROUP_INET6_GETPEERNAME,
            "cgroup/getpeername6",
        ),
        (
            program_names::GETSOCKOPT,
            at::CGROUP_GETSOCKOPT,
            "cgroup/getsockopt",
        ),
    ]
};

/// Loads a cgroup program and attaches it through a pinned bpf_link, or, when an earlier agent
/// left the link, swaps the new program into it in one step (BPF_LINK_UPDATE), so sockets
/// connecting right now are handled by one program or the other, never by neither. A cgroup
/// bpf_link coexists with other programs on the cgroup.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    pins: &PinPaths,
    cgroup: &Path,
    (name, attach_type, what): (&'static str, u32, &str),
) -> Result<AttachedProgram> {
    use aya::programs::Program;
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Invalid(format!("the ELF has no program {name}")))?;
    match prog {
        Program::SockOps(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        other => {
            return Err(Error::Invalid(format!(
                "program {name} has unexpected type {:?}",
                other.prog_type()
            )));
        }
    }
    .map_err(|source| Error::Program { name, source })?;
    let id = prog
        .info()
        .map_err(|source| Error::Program { name, source })?
        .id();
    let prog_fd = prog
        .fd()
        .map_err(|source| Error::Program { name, source })?;
    let link_path = pins.link(name);
    if link_path.exists() {
        let link = bpf_sys::obj_get(&link_path)
            .map_err(|e| Error::io("opening the pinned link", &link_path, e))?;
        bpf_sys::link_update(link.as_fd(), prog_fd.as_fd())
            .map_err(|e| Error::io("BPF_LINK_UPDATE", &link_path, e))?;
        tracing::debug!(link = %link_path.display(), "reused the pinned link");
    } else {
        let cg = File::open(cgroup).map_err(|e| Error::io("opening the cgroup", cgroup, e))?;
        let link = bpf_sys::link_create(prog_fd.as_fd(), cg.as_fd(), attach_type)
            .map_err(|e| Error::io("attaching a program to the cgroup", cgroup, e))?;
        bpf_sys::obj_pin(link.as_fd(), &link_path)
            .map_err(|e| Error::io("pinning the link", &link_path, e))?;
        tracing::debug!(cgroup = %cgroup.display(), program = name, "attached");
    }
    Ok(AttachedProgram {
        name: name.into(),
        id,
        attach: format!("{what} {} (bpf_link)", cgroup.display()),
        pinned_link: Some(link_path),
    })
}

fn ignore_missing(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(Error::Map { name, source }),
    }
}

/// Attaches sk_msg to the SOCKHASH. This is a map attachment, not a link: the map keeps the
/// program for as long as the map lives (it is pinned), so a killed agent leaves it in place. A
/// new attach simply replaces the program for sockets inserted from then on.
fn attach_sk_msg(ebpf: &mut Ebpf, socks: &SockHash<MapData, SockKey>) -> Result<AttachedProgram> {
    let name = program_names::SK_MSG;
    let prog: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Invalid(format!("the ELF has no program {name}")))?
        .try_into()
        .map_err(|source| Error::Program { name, source })?;
    prog.load()
        .map_err(|source| Error::Program { name, source })?;
    let id = prog
        .info()
        .map_err(|source| Error::Program { name, source })?
        .id();
    let link_id = prog
        .attach(socks.fd())
        .map_err(|source| Error::Program { name, source })?;
    // aya detaches on drop; we must not, or stopping the agent would stop the fast path for new
    // sockets. Forgetting the handle leaves the attachment owned by the pinned map; `uninstall`
    // removes the map and with it the attachment.
    let link = prog
        .take_link(link_id)
        .map_err(|source| Error::Program { name, source })?;
    std::mem::forget(link);
    Ok(AttachedProgram {
        name: name.into(),
        id,
        attach: format!("sk_msg_verdict on {}", map_names::SOCKHASH),
        pinned_link: None,
    })
}

/// Removes everything pinned under `bpffs`: links first (which detaches sockops), then maps.
/// Sockets still in the SOCKHASH leave it when the map is freed; data they had been handed but
/// had not read yet is dropped by the kernel with the map, so callers switch redirect off and
/// wait before calling this.
pub fn unpin_all(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let pins = PinPaths::new(bpffs);
    let mut removed = Vec::new();
    for dir in [&pins.links, &pins.maps] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|e| Error::io("unpinning", &p, e))?;
            removed.push(p);
        }
        // Best effort: a directory someone else put files into stays, and that is fine.
        let _not_empty_is_fine = std::fs::remove_dir(dir);
    }
    let _not_empty_is_fine = std::fs::remove_dir(&pins.root);
    Ok(removed)
}
