//! Services on this node: the services file (its format and parser are
//! [`meshlane_api::services`], shared with the CLI's offline check), the watcher that notices
//! when it changes, and the table writer that puts a validated table into the service maps
//! without a moment where a service has no valid backend set.
//!
//! Each service keeps a stable id (its counters' index) while it exists. Its backends live in one
//! of two backend sets (`id * 2` and `id * 2 + 1`): a change writes the other set, switches the
//! service entry to it in one map update, then deletes the old set. A connect sees the old
//! backends or the new ones, never a mix, and never an empty slot.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use dataplane_common::{BackendKey, Service, ServiceKey, service_flags};
pub use meshlane_api::services::{
    Balance, LoadError, Protocol, Rejected, ServiceSpec, load, parse,
};
use meshlane_api::types::{ServiceView, ServicesSummary};
use serde::Serialize;

use crate::{
    Result,
    addr::{ip_key, key_socket_addr, map_addr},
    maps::Maps,
};

/// A service as the agent wrote it to the maps.
#[derive(Clone, Debug)]
struct InForce {
    service: Service,
    /// None for a service adopted from the pinned maps of an earlier agent, until the file is
    /// loaded again.
    spec: Option<ServiceSpec>,
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
    file: Option<ServicesFile>,
    in_force: HashMap<ServiceKey, InForce>,
    free_ids: Vec<u32>,
    next_id: u32,
    loads: u64,
    loaded_at: Option<u64>,
    last_error: Option<String>,
}

/// The services file as last seen: it is re-read when its modification time or length change,
/// and parsed only when its contents did.
#[derive(Debug)]
pub struct ServicesFile {
    path: PathBuf,
    /// (modification time, length, content hash) of the file as last read, applied or not, so
    /// an unchanged bad file is not re-reported every poll.
    seen: Option<(Option<SystemTime>, u64, u64)>,
    /// The last error reported for a file that could not be read, so it is reported once.
    unreadable: Option<String>,
}

impl ServicesFile {
    pub fn new(path: PathBuf) -> Self {
        ServicesFile {
            path,
            seen: None,
            unreadable: None,
        }
    }

    /// Reports a file that cannot be read once, not at every poll.
    fn unreadable(&mut self, why: String) -> Option<Result<Vec<ServiceSpec>, String>> {
        self.seen = None;
        let msg = format!("{why}; the previous table stays in force");
        let new = self.unreadable.as_deref() != Some(msg.as_str());
        self.unreadable = Some(msg.clone());
        new.then_some(Err(msg))
    }

    /// The file's table if the file changed since the last look (`None`: nothing new), or why
    /// it is refused.
    pub fn poll(&mut self) -> Option<Result<Vec<ServiceSpec>, String>> {
        let path = self.path.clone();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => return self.unreadable(format!("services file {}: {e}", path.display())),
        };
        let quick = (meta.modified().ok(), meta.len());
        if self.seen.is_some_and(|(m, l, _)| (m, l) == quick) {
            return None;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                return self.unreadable(format!("reading services file {}: {e}", path.display()));
            }
        };
        self.unreadable = None;
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
        Some(
            meshlane_api::services::parse_bytes(&bytes).map_err(|rejected| {
                LoadError::Rejected {
                    path: path.clone(),
                    rejected,
                }
                .to_string()
            }),
        )
    }
}

fn key_of(s: &ServiceSpec) -> ServiceKey {
    ServiceKey {
        ip: ip_key(&s.vip),
        port: s.port,
        proto: s.protocol.number(),
        _pad: 0,
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
    pub fn adopt(dp: &mut Maps, file: Option<PathBuf>) -> Result<Self> {
        let file = file.map(ServicesFile::new);
        let mut in_force = HashMap::new();
        let mut used = std::collections::BTreeSet::new();
        for (key, service) in dp.service_entries()? {
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
        for k in dp.backend_keys()? {
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
        })
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    fn alloc_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    /// Makes the maps hold exactly `specs` (already validated).
    pub fn apply(&mut self, dp: &mut Maps, specs: Vec<ServiceSpec>) -> Result<Applied> {
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
                    map_addr(b),
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

    fn delete_set(&self, dp: &mut Maps, set: u32, count: u32) -> Result<()> {
        for index in 0..count {
            dp.del_backend(&BackendKey { set, index })?;
        }
        Ok(())
    }

    /// Loads the services file if it changed since the last look, and applies it. Returns what
    /// happened, for the log: `None` when there was nothing new. A refused file (or a missing
    /// one) leaves the previous table in force and is reported once, not at every poll.
    pub fn poll(&mut self, dp: &mut Maps) -> Option<Result<Applied, String>> {
        let read = self.file.as_mut()?.poll()?;
        let path = self.file.as_ref()?.path.clone();
        let result = read.and_then(|specs| {
            self.apply(dp, specs)
                .map_err(|e| format!("applying services file {}: {e}", path.display()))
        });
        self.last_error = result.as_ref().err().cloned();
        Some(result)
    }

    pub fn summary(&self) -> ServicesSummary {
        ServicesSummary {
            file: self.file().map(Path::to_path_buf),
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
    pub fn views(&self, dp: &Maps) -> Result<Vec<ServiceView>> {
        let mut all: Vec<(&ServiceKey, &InForce)> = self.in_force.iter().collect();
        all.sort_by_key(|(_, f)| f.spec.as_ref().map_or(usize::MAX, |s| s.index));
        all.into_iter()
            .map(|(key, f)| {
                let stats = dp.service_stats(f.service.id)?;
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
                        let a = key_socket_addr(key.ip, u32::from(key.port));
                        (None, format!("{a}/{proto}"), None, Vec::new())
                    }
                };
                Ok(ServiceView {
                    name,
                    frontend,
                    balance,
                    backends,
                    connects: stats.connects,
                    datagrams: stats.datagrams,
                    refused: stats.refused,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    backends: [10.77.0.11:8080]\n";

    /// The watcher reports a new table once, a refused file once (with its line), an unchanged
    /// file never, and a vanished file once.
    #[test]
    fn the_watcher_reports_each_change_once() {
        let dir = std::env::temp_dir().join(format!("meshlane-svcfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        std::fs::write(&path, ONE).unwrap();
        let mut w = ServicesFile::new(path.clone());

        let specs = w.poll().expect("a new file is reported").expect("valid");
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name, "web");
        assert!(
            w.poll().is_none(),
            "an unchanged file is not reported again"
        );

        // Same length, other contents (the modification time may not change within a tick):
        // a changed length is what makes the watcher look, so change it.
        std::fs::write(&path, ONE.replace("port: 80", "port: 8080")).unwrap();
        let specs = w
            .poll()
            .expect("a changed file is reported")
            .expect("valid");
        assert_eq!(specs[0].port, 8080);

        std::fs::write(&path, "services:\n  - name: web\n    vip: nope\n").unwrap();
        let err = w.poll().expect("a bad file is reported").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("previous table stays in force"), "{err}");
        assert!(w.poll().is_none(), "a bad file is reported once");

        std::fs::remove_file(&path).unwrap();
        let err = w.poll().expect("a vanished file is reported").unwrap_err();
        assert!(err.contains("No such file"), "{err}");
        assert!(w.poll().is_none(), "a vanished file is reported once");

        std::fs::write(&path, ONE).unwrap();
        assert!(w.poll().expect("the file is back").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
