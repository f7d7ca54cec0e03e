//! The service table in force: what the agent wrote to the service maps, how it got there (the
//! services file, watched for changes), and how a new table replaces the old one without a
//! moment where a service has no valid backend set.
//!
//! Each service keeps a stable id (its counters' index) while it exists. Its backends live in one
//! of two backend sets (`id * 2` and `id * 2 + 1`): a change writes the other set, switches the
//! service entry to it in one map update, then deletes the old set. A connect sees the old
//! backends or the new ones, never a mix, and never an empty slot.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use dataplane_common::{Addr, BackendKey, Service, ServiceKey, service_flags};
use serde::Serialize;

use crate::{
    Result,
    dataplane::Dataplane,
    services::{self, Balance, LoadError, Protocol, ServiceSpec},
    state::ip_key,
};

/// A service as the agent wrote it to the maps.
#[derive(Clone, Debug)]
struct InForce {
    service: Service,
    /// None for a service adopted from the pinned maps of an earlier agent, until the file is
    /// loaded again.
    spec: Option<ServiceSpec>,
}

/// What `meshlane services` and `meshlane status` show of a service.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub name: Option<String>,
    pub frontend: String,
    pub balance: Option<Balance>,
    pub backends: Vec<SocketAddr>,
    pub connects: u64,
    pub datagrams: u64,
    pub refused: u64,
}

/// The services part of `meshlane status`.
#[derive(Clone, Debug, Serialize)]
pub struct ServicesSummary {
    pub file: Option<PathBuf>,
    /// Tables applied since the agent started.
    pub loads: u64,
    /// Unix time of the last applied table.
    pub loaded_at: Option<u64>,
    pub services: usize,
    pub backends: usize,
    /// Why the file's current contents are not in force (the previous table is).
    pub last_error: Option<String>,
}

/// Outcome of applying a table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Applied {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

pub struct ServiceTable {
    file: Option<PathBuf>,
    in_force: HashMap<ServiceKey, InForce>,
    free_ids: Vec<u32>,
    next_id: u32,
    loads: u64,
    loaded_at: Option<u64>,
    last_error: Option<String>,
    /// (modification time, length, content hash) of the file as last read, applied or not, so
    /// an unchanged bad file is not re-reported every poll.
    seen: Option<(Option<SystemTime>, u64, u64)>,
}

fn key_of(s: &ServiceSpec) -> ServiceKey {
    ServiceKey {
        ip: ip_key(&s.vip),
        port: s.port,
        proto: s.protocol.number(),
        _pad: 0,
    }
}

fn addr_of(a: &SocketAddr) -> Addr {
    Addr {
        ip: ip_key(&a.ip()),
        port: u32::from(a.port()),
    }
}

fn flags_of(s: &ServiceSpec) -> u32 {
    match s.balance {
        Balance::Random => 0,
        Balance::ClientAddress => service_flags::AFFINITY_CLIENT_ADDR,
    }
}

impl ServiceTable {
    /// Takes over the table an earlier agent left in the pinned maps, and removes backend sets
    /// no service points to (left by an agent killed in the middle of an update).
    pub fn adopt(dp: &mut Dataplane, file: Option<PathBuf>) -> Result<Self> {
        let mut in_force = HashMap::new();
        let mut used = std::collections::BTreeSet::new();
        for (key, service) in dp.service_entries() {
            used.insert(service.id);
            in_force.insert(
                key,
                InForce {
                    service,
                    spec: None,
                },
            );
        }
        let live: HashMap<u32, u32> = in_force
            .values()
            .map(|f| (f.service.backend_set, f.service.count))
            .collect();
        for k in dp.backend_keys() {
            if live.get(&k.set).is_none_or(|&count| k.index >= count) {
                dp.del_backend(&k)?;
            }
        }
        let next_id = used.iter().next_back().map_or(0, |m| m + 1);
        let free_ids = (0..next_id).filter(|i| !used.contains(i)).rev().collect();
        Ok(ServiceTable {
            file,
            in_force,
            free_ids,
            next_id,
            loads: 0,
            loaded_at: None,
            last_error: None,
            seen: None,
        })
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn alloc_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    /// Makes the maps hold exactly `specs` (already validated).
    pub fn apply(&mut self, dp: &mut Dataplane, specs: Vec<ServiceSpec>) -> Result<Applied> {
        let mut out = Applied::default();
        let mut wanted: HashMap<ServiceKey, ServiceSpec> = HashMap::with_capacity(specs.len());
        for s in specs {
            wanted.insert(key_of(&s), s);
        }
        // Removals first, so their ids and backend slots are free for the additions.
        let gone: Vec<ServiceKey> = self
            .in_force
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            if let Some(f) = self.in_force.remove(&key) {
                dp.del_service(&key)?;
                self.delete_set(dp, f.service.backend_set, f.service.count)?;
                self.free_ids.push(f.service.id);
                out.removed += 1;
            }
        }
        for (key, spec) in wanted {
            let flags = flags_of(&spec);
            let (id, set, old) = match self.in_force.get(&key) {
                Some(f) => {
                    let same = f
                        .spec
                        .as_ref()
                        .is_some_and(|old| old.backends == spec.backends && flags_of(old) == flags);
                    if same {
                        self.in_force.get_mut(&key).expect("present").spec = Some(spec);
                        out.unchanged += 1;
                        continue;
                    }
                    (f.service.id, f.service.backend_set ^ 1, Some(f.service))
                }
                None => {
                    let id = self.alloc_id();
                    dp.reset_service_stats(id)?;
                    (id, id * 2, None)
                }
            };
            for (i, b) in spec.backends.iter().enumerate() {
                dp.put_backend(
                    BackendKey {
                        set,
                        index: i as u32,
                    },
                    addr_of(b),
                )?;
            }
            let service = Service {
                id,
                backend_set: set,
                count: spec.backends.len() as u32,
                flags,
            };
            dp.put_service(key, service)?;
            match old {
                Some(o) => {
                    self.delete_set(dp, o.backend_set, o.count)?;
                    out.changed += 1;
                }
                None => out.added += 1,
            }
            self.in_force.insert(
                key,
                InForce {
                    service,
                    spec: Some(spec),
                },
            );
        }
        self.loads += 1;
        self.loaded_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        Ok(out)
    }

    fn delete_set(&self, dp: &mut Dataplane, set: u32, count: u32) -> Result<()> {
        for index in 0..count {
            dp.del_backend(&BackendKey { set, index })?;
        }
        Ok(())
    }

    /// Loads the services file if it changed since the last look. Returns what happened, for
    /// the log: `None` when there was nothing new.
    pub fn poll(&mut self, dp: &mut Dataplane) -> Option<Result<Applied, String>> {
        let path = self.file.clone()?;
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                let msg = format!(
                    "services file {}: {e}; the previous table stays in force",
                    path.display()
                );
                let changed = self.last_error.as_deref() != Some(msg.as_str());
                self.last_error = Some(msg.clone());
                self.seen = None;
                return changed.then_some(Err(msg));
            }
        };
        let quick = (meta.modified().ok(), meta.len());
        if self.seen.is_some_and(|(m, l, _)| (m, l) == quick) {
            return None;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("reading services file {}: {e}", path.display());
                self.last_error = Some(msg.clone());
                return Some(Err(msg));
            }
        };
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        let same_content = self.seen.is_some_and(|(_, _, h)| h == hash);
        self.seen = Some((quick.0, quick.1, hash));
        if same_content {
            return None;
        }
        Some(self.load_bytes(dp, &path, &bytes))
    }

    fn load_bytes(
        &mut self,
        dp: &mut Dataplane,
        path: &Path,
        bytes: &[u8],
    ) -> Result<Applied, String> {
        match services::parse_bytes(bytes) {
            Ok(specs) => match self.apply(dp, specs) {
                Ok(a) => {
                    self.last_error = None;
                    Ok(a)
                }
                Err(e) => {
                    let msg = format!("applying services file {}: {e}", path.display());
                    self.last_error = Some(msg.clone());
                    Err(msg)
                }
            },
            Err(rejected) => {
                let msg = LoadError::Rejected {
                    path: path.into(),
                    rejected,
                }
                .to_string();
                self.last_error = Some(msg.clone());
                Err(msg)
            }
        }
    }

    pub fn summary(&self) -> ServicesSummary {
        ServicesSummary {
            file: self.file.clone(),
            loads: self.loads,
            loaded_at: self.loaded_at,
            services: self.in_force.len(),
            backends: self
                .in_force
                .values()
                .map(|f| f.service.count as usize)
                .sum(),
            last_error: self.last_error.clone(),
        }
    }

    /// Every service with its counters, in file order (adopted, unnamed ones last).
    pub fn views(&self, dp: &Dataplane) -> Vec<ServiceView> {
        let mut all: Vec<(&ServiceKey, &InForce)> = self.in_force.iter().collect();
        all.sort_by_key(|(_, f)| f.spec.as_ref().map_or(usize::MAX, |s| s.index));
        all.into_iter()
            .map(|(key, f)| {
                let stats = dp.service_stats(f.service.id).unwrap_or_default();
                let (name, frontend, balance, backends) = match &f.spec {
                    Some(s) => (
                        Some(s.name.clone()),
                        s.frontend(),
                        Some(s.balance),
                        s.backends.clone(),
                    ),
                    None => {
                        let proto = if key.proto == Protocol::Udp.number() {
                            "UDP"
                        } else {
                            "TCP"
                        };
                        let a = crate::agent::key_addr(key.ip, u32::from(key.port));
                        (None, format!("{a}/{proto}"), None, Vec::new())
                    }
                };
                ServiceView {
                    name,
                    frontend,
                    balance,
                    backends,
                    connects: stats.connects,
                    datagrams: stats.datagrams,
                    refused: stats.refused,
                }
            })
            .collect()
    }
}
