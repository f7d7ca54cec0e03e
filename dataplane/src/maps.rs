//! Typed access to the maps the agent writes and reads. Every operation names its map in its
//! error; a lookup or iteration that fails is returned, never skipped, so a status or a metrics
//! scrape can never show a partial table as if it were whole.

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash};
use dataplane_common::{
    Addr, BackendKey, Config, Counter, Endpoint, NetnsInfo, PortKey, ReaderPod, Service,
    ServiceKey, ServiceStats, Sidecar, SockKey, SockStats, map_names,
};

use crate::{Error, Result};

/// The maps, opened by [`crate::loader::load`].
pub struct Maps {
    pub(crate) netns: HashMap<MapData, u64, NetnsInfo>,
    pub(crate) endpoints: HashMap<MapData, [u32; 4], Endpoint>,
    pub(crate) stats: HashMap<MapData, SockKey, SockStats>,
    pub(crate) counters: PerCpuArray<MapData, u64>,
    pub(crate) config: Array<MapData, Config>,
    pub(crate) socks: SockHash<MapData, SockKey>,
    pub(crate) services: HashMap<MapData, ServiceKey, Service>,
    pub(crate) backends: HashMap<MapData, BackendKey, Addr>,
    pub(crate) svc_stats: PerCpuArray<MapData, ServiceStats>,
    pub(crate) sidecars: HashMap<MapData, u64, Sidecar>,
    pub(crate) noaccel: HashMap<MapData, PortKey, u32>,
    pub(crate) reader_pods: HashMap<MapData, u64, ReaderPod>,
    pub(crate) spliced: HashMap<MapData, SockKey, u32>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

/// Collects a map iteration, failing on the first error with the map's name.
fn collect<T>(it: impl Iterator<Item = Result<T, MapError>>, name: &'static str) -> Result<Vec<T>> {
    it.collect::<Result<Vec<T>, MapError>>()
        .map_err(|source| Error::Map { name, source })
}

fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(Error::Map { name, source }),
    }
}

impl Maps {
    pub fn accelerate(&self) -> Result<bool> {
        let c = self.config.get(&0, 0).map_err(|source| Error::Map {
            name: map_names::CONFIG,
            source,
        })?;
        Ok(c.accelerate != 0)
    }

    /// Switches new connections on or off; `move_established` (only meaningful with `on`
    /// false) sends connections already in the fast path through the stack too.
    pub fn set_accelerate(&mut self, on: bool, move_established: bool) -> Result<()> {
        let c = Config {
            accelerate: on as u32,
            move_established: (!on && move_established) as u32,
        };
        self.config.set(0, c, 0).map_err(|source| Error::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    pub fn netns_entries(&self) -> Result<Vec<(u64, NetnsInfo)>> {
        collect(self.netns.iter(), map_names::NETNS)
    }

    pub fn endpoint_entries(&self) -> Result<Vec<([u32; 4], Endpoint)>> {
        collect(self.endpoints.iter(), map_names::ENDPOINTS)
    }

    /// Makes a socket in the fast path send through the stack from now on, as if it had done so
    /// once (the sticky-stack rule). Only the self-test uses it, on its own socket.
    pub fn make_sticky(&mut self, key: &SockKey) -> Result<()> {
        let err = |source| Error::Map {
            name: map_names::SOCK_STATS,
            source,
        };
        let mut st = self.stats.get(key, 0).map_err(err)?;
        st.stack_msgs = st.stack_msgs.max(1);
        self.stats.insert(key, st, 0).map_err(err)
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
    pub fn sock_stats(&self) -> Result<Vec<(SockKey, SockStats)>> {
        collect(self.stats.iter(), map_names::SOCK_STATS)
    }

    pub fn service_entries(&self) -> Result<Vec<(ServiceKey, Service)>> {
        collect(self.services.iter(), map_names::SERVICES)
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

    pub fn backend_keys(&self) -> Result<Vec<BackendKey>> {
        collect(self.backends.keys(), map_names::BACKENDS)
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

    pub fn sidecar_entries(&self) -> Result<Vec<(u64, Sidecar)>> {
        collect(self.sidecars.iter(), map_names::SIDECARS)
    }

    /// Number of sockets currently in the SOCKHASH.
    pub fn sockhash_len(&self) -> Result<usize> {
        Ok(collect(self.socks.keys(), map_names::SOCKHASH)?.len())
    }

    pub fn put_noaccel(&mut self, key: PortKey) -> Result<()> {
        self.noaccel.insert(key, 1, 0).map_err(|source| Error::Map {
            name: map_names::NOACCEL_PORTS,
            source,
        })
    }

    pub fn del_noaccel(&mut self, key: &PortKey) -> Result<()> {
        ignore_missing(self.noaccel.remove(key), map_names::NOACCEL_PORTS)
    }

    pub fn noaccel_keys(&self) -> Result<Vec<PortKey>> {
        collect(self.noaccel.keys(), map_names::NOACCEL_PORTS)
    }

    /// Pods the reader guard caught, with their detections.
    pub fn reader_pods(&self) -> Result<Vec<(u64, ReaderPod)>> {
        collect(self.reader_pods.iter(), map_names::READER_PODS)
    }

    /// Sockets the reader guard saw spliced, not handled yet.
    pub fn spliced(&self) -> Result<Vec<SockKey>> {
        Ok(collect(self.spliced.iter(), map_names::SPLICED)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    pub fn del_spliced(&mut self, key: &SockKey) -> Result<()> {
        ignore_missing(self.spliced.remove(key), map_names::SPLICED)
    }

    /// Whether the socket is in the fast path (its statistics entry exists exactly then).
    pub fn in_fast_path(&self, key: &SockKey) -> Result<bool> {
        match self.stats.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(Error::Map {
                name: map_names::SOCK_STATS,
                source,
            }),
        }
    }

    pub fn del_reader_pod(&mut self, netns: u64) -> Result<()> {
        ignore_missing(self.reader_pods.remove(&netns), map_names::READER_PODS)
    }
}
