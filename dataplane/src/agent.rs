//! The agent: start-up policy (cgroup and pin checks, self-test, state, services file), the
//! request dispatcher, and the views the API answers with. Requests that change something are in
//! [`crate::pods`]; what runs after start-up (API, metrics, services polling) is in
//! [`crate::runtime`].

use std::path::{Path, PathBuf};

use dataplane_common::{ABI_VERSION, program_names};
use meshlane_api::{
    Request,
    types::{
        Accel, GuardedPod, ReaderGuardStatus, SelfTestReport, SocketInfo, Status, Uninstalled,
    },
};
use serde_json::{Value, json};

use dataplane_common::maps::LoadSizes;
use meshlane_api::flows::TelemetryStatus;

use crate::{
    Error, Result,
    addr::key_socket_addr,
    cni_queue::CniQueue,
    loader::{self, LoadOptions, Loaded, PinPaths},
    maps::Maps,
    selftest,
    services::ServiceTable,
    state::State,
    sys,
    telemetry::Telemetry,
};

/// Everything the agent is started with (the flags of `meshlane-agent`).
#[derive(Clone, Debug)]
pub struct Config {
    /// cgroup v2 directory to attach to; `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub state_file: PathBuf,
    pub sockhash_capacity: u32,
    /// Size of the flow event ring buffer in bytes (a power of two, at least a page).
    pub events_ring_bytes: u32,
    pub services: Option<PathBuf>,
    /// Skip the self-test; redirect stays off.
    pub no_selftest: bool,
    /// Where the CNI plugin queues requests while the agent is away.
    pub cni_queue_dir: PathBuf,
}

pub struct Agent {
    pub(crate) loaded: Loaded,
    pub(crate) maps: Maps,
    pub(crate) state: State,
    pub(crate) state_path: PathBuf,
    pub(crate) selftest: SelfTestReport,
    pub(crate) services: ServiceTable,
    pub(crate) cni_queue: CniQueue,
    /// Cookies of namespaces that must never be enrolled: the agent's own and PID 1's.
    pub(crate) host_cookies: Vec<u64>,
    /// Spliced connections reset since the agent started (see [`Agent::reset_spliced`]).
    pub(crate) spliced_resets: u64,
    pub(crate) telemetry: Telemetry,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("loaded", &self.loaded)
            .finish_non_exhaustive()
    }
}

/// Services shown in `status`; the full table is one `services` request away.
const STATUS_SERVICES: usize = 20;

/// Refuses to attach to another cgroup than the one the pinned programs are attached to: the
/// pinned links would keep the old one, and the agent would report a cgroup it does not serve.
pub fn check_pinned_cgroup(
    bpffs: &Path,
    pinned: Option<&Path>,
    requested: &Path,
    links_pinned: bool,
) -> Result<()> {
    match pinned {
        Some(p) if p != requested && links_pinned => Err(Error::CgroupMismatch {
            bpffs: bpffs.into(),
            pinned: p.into(),
            requested: requested.into(),
        }),
        _ => Ok(()),
    }
}

/// The ring buffer's size must be what the kernel accepts: a power of two, a whole number of
/// pages.
pub fn check_ring_size(bytes: u32) -> Result<()> {
    if bytes.is_power_of_two() && bytes >= 4096 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "--events-ring-bytes {bytes}: the ring buffer must be a power of two of at least \
             4096 bytes (e.g. 65536, 2097152)"
        )))
    }
}

/// A services file given at start must exist (a typo must not start an agent with no services);
/// once running, a file that disappears keeps the previous table.
pub fn check_services_file(file: Option<&Path>) -> Result<()> {
    match file {
        Some(f) if !f.exists() => Err(Error::Invalid(format!(
            "--services {}: no such file",
            f.display()
        ))),
        _ => Ok(()),
    }
}

impl Agent {
    /// Starts the agent: resolves and checks the cgroup, mounts bpffs if needed, loads and
    /// attaches the programs (reusing pins), runs the self-test, takes over the state file and
    /// the pinned service table, re-enrolls known pods, loads the services file, and switches
    /// redirect on if the self-test passed and the operator wants it.
    pub fn start(config: &Config) -> Result<Agent> {
        let cgroup = sys::resolve_cgroup(config.cgroup.as_deref())?;
        if sys::ensure_bpffs(&config.bpffs)? {
            tracing::info!(dir = %config.bpffs.display(), "mounted bpffs");
        }
        let mut state = State::load(&config.state_file)?;
        check_pinned_cgroup(
            &config.bpffs,
            state.cgroup.as_deref(),
            &cgroup,
            PinPaths::new(&config.bpffs)
                .link(program_names::SOCKOPS)
                .exists(),
        )?;
        check_services_file(config.services.as_deref())?;

        let sizes = LoadSizes {
            sockhash: config.sockhash_capacity,
            events_ring_bytes: config.events_ring_bytes,
        };
        check_ring_size(sizes.events_ring_bytes)?;
        let (loaded, mut maps, telemetry_maps) = loader::load(LoadOptions {
            bpffs: config.bpffs.clone(),
            cgroup: cgroup.clone(),
            sizes,
        })?;
        let telemetry = Telemetry::new(
            telemetry_maps.ring,
            sizes.events_ring_bytes,
            telemetry_maps.flows,
            telemetry_maps.http_next,
            crate::telemetry::checkpoint_path(&config.state_file),
        )?;
        tracing::info!(
            cgroup = %cgroup.display(),
            reused_pins = loaded.reused_pins,
            accelerate = maps.accelerate()?,
            "programs attached"
        );

        let report = if config.no_selftest {
            SelfTestReport::failed("skipped (--no-selftest)", vec![])
        } else {
            selftest::run(&mut maps, &cgroup, &selftest::current_exe())
        };
        if report.passed {
            tracing::info!("self-test passed: {}", report.detail);
        } else {
            tracing::warn!(
                "self-test did not pass, redirect stays off: {}",
                report.detail
            );
            for c in report.checks.iter().filter(|c| !c.ok) {
                tracing::warn!(check = %c.name, "{}", c.detail);
            }
        }

        state.cgroup = Some(cgroup);
        state.save(&config.state_file)?;
        let services = ServiceTable::adopt(&mut maps, config.services.clone())?;
        let mut host_cookies = Vec::new();
        if let Ok(c) = sys::current_netns_cookie() {
            host_cookies.push(c);
        }
        if let Ok(c) = sys::netns_cookie(Path::new("/proc/1/ns/net")) {
            host_cookies.push(c);
        }
        let mut agent = Agent {
            loaded,
            maps,
            state,
            state_path: config.state_file.clone(),
            selftest: report,
            services,
            cni_queue: CniQueue::new(config.cni_queue_dir.clone()),
            host_cookies,
            spliced_resets: 0,
            telemetry,
        };
        agent.reconcile()?;
        agent.telemetry.set_pods(&agent.state.pods);
        // Events that came while no agent ran, before the first scrape can be answered.
        agent.drain_telemetry();
        agent.poll_services();
        agent.drain_cni_queue();
        let on = agent.apply_accel()?;
        tracing::info!(accelerate = on, pods = agent.state.pods.len(), "ready");
        Ok(agent)
    }

    /// Switches redirect on exactly when the operator wants it and the self-test passed.
    pub fn apply_accel(&mut self) -> Result<bool> {
        let on = self.state.accel_wanted && self.selftest.passed;
        self.maps.set_accelerate(on, self.established_moved())?;
        Ok(on)
    }

    /// Whether connections already in the fast path are sent through the stack now.
    fn established_moved(&self) -> bool {
        !self.state.accel_wanted && self.state.move_established
    }

    /// Resets the connections the reader guard saw spliced while they were in the fast path: their
    /// redirected bytes wait where splice never reads, so the reader would wait forever (or see
    /// a silent EOF when the peer closes). A reset makes both ends fail loudly instead. Sockets
    /// no longer in the fast path are only forgotten.
    pub fn reset_spliced(&mut self) {
        let keys = match self.maps.spliced() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "reading the spliced sockets");
                return;
            }
        };
        for key in keys {
            let doomed = self.maps.in_fast_path(&key).unwrap_or(false);
            let pod = self.state.pods.iter().find(|p| p.netns_cookie == key.netns);
            if let (true, Some(pod)) = (doomed, pod) {
                let local = crate::addr::key_socket_addr(key.local_ip, key.local_port);
                let remote = crate::addr::key_socket_addr(key.remote_ip, key.remote_port);
                match sys::destroy_tcp(&pod.netns, local, remote) {
                    Ok(()) => {
                        self.spliced_resets += 1;
                        tracing::warn!(
                            pod = %pod.label(), %local, %remote,
                            "reset a connection read with splice while in the fast path"
                        );
                    }
                    // Gone already (closed meanwhile) is fine.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => tracing::warn!(
                        pod = %pod.label(), %local, %remote, error = %e,
                        "could not reset a spliced connection"
                    ),
                }
            }
            if let Err(e) = self.maps.del_spliced(&key) {
                tracing::warn!(error = %e, "forgetting a spliced socket");
            }
        }
    }

    /// Counts a bounded number of the flow events waiting; returns whether more are waiting.
    pub fn drain_telemetry(&mut self) -> bool {
        if let Err(e) = self.telemetry.drain() {
            tracing::error!(error = %e, "reading flow events");
        }
        self.telemetry.pending()
    }

    /// Makes what telemetry counted so far durable (at exit).
    pub fn checkpoint_telemetry(&mut self) -> Result<()> {
        self.telemetry.checkpoint()
    }

    /// The flow series as a scrape shows them (closed totals plus open connections now).
    pub fn flow_series(
        &mut self,
    ) -> Result<std::collections::BTreeMap<crate::telemetry::Labels, crate::telemetry::Series>>
    {
        self.telemetry.series(&self.maps.stats)
    }

    /// Applies the services file if it changed, and logs what happened.
    pub fn poll_services(&mut self) {
        match self.services.poll(&mut self.maps) {
            None => {}
            Some(Ok(a)) => tracing::info!(
                added = a.added,
                changed = a.changed,
                removed = a.removed,
                unchanged = a.unchanged,
                "service table loaded"
            ),
            Some(Err(msg)) => tracing::error!("{msg}"),
        }
    }

    /// Handles one request. The answer's type is the one documented on the request.
    pub fn handle(&mut self, req: Request) -> Result<Value> {
        let v = match req {
            Request::PodAdd {
                netns,
                ips,
                name,
                sidecar,
                accel,
                telemetry,
                cni,
            } => json!(self.pod_add(
                &netns,
                &ips,
                name,
                crate::pods::PodOptions {
                    sidecar,
                    accel,
                    telemetry,
                    cni,
                },
            )?),
            Request::PodDel {
                netns,
                name,
                attachment,
            } => json!(self.pod_del(netns.as_deref(), name.as_deref(), attachment.as_ref())?),
            Request::PodGc { network, valid } => json!(self.pod_gc(&network, &valid)),
            Request::PodList => json!(self.state.pods),
            Request::Sockets => json!(self.sockets()?),
            Request::Status => json!(self.status()?),
            Request::Services => json!(meshlane_api::types::Services {
                summary: self.services.summary(),
                services: self.services.views(&self.maps)?,
            }),
            Request::Accel {
                on,
                move_established,
            } => json!(self.accel(on, move_established)?),
            Request::Uninstall => json!(self.uninstall()?),
            Request::Flows { query } => {
                query
                    .validate()
                    .map_err(|e| Error::Invalid(format!("flows: {e}")))?;
                self.drain_telemetry();
                json!(self.telemetry.query(&query))
            }
        };
        Ok(v)
    }

    fn accel(&mut self, on: bool, move_established: bool) -> Result<Accel> {
        if on && move_established {
            return Err(Error::Invalid(
                "move_established applies to `accel off` only; nothing changed".into(),
            ));
        }
        if move_established && !self.selftest.stack_delivery_ok() {
            return Err(Error::Unavailable(format!(
                "established connections cannot be moved off the fast path on this kernel: \
                 their peers would receive through the stack while still in the SOCKHASH, and \
                 the self-test found that wrong for readers ({}; kernels with 929e30f93125 \
                 but not 04af4efde58a under-report FIONREAD so). Nothing changed; `accel off` \
                 without --move-established keeps new connections out and lets established \
                 ones finish in the fast path",
                self.selftest.stack_delivery_failures()
            )));
        }
        let before = (self.state.accel_wanted, self.state.move_established);
        self.state.accel_wanted = on;
        self.state.move_established = move_established;
        if let Err(e) = self.state.save(&self.state_path) {
            (self.state.accel_wanted, self.state.move_established) = before;
            return Err(e);
        }
        let now = self.apply_accel()?;
        if on && !now {
            return Err(Error::Unavailable(format!(
                "acceleration stays off: the self-test failed ({})",
                self.selftest.detail
            )));
        }
        Ok(Accel {
            accelerate: now,
            established_moved: self.established_moved(),
        })
    }

    pub fn sockets(&self) -> Result<Vec<SocketInfo>> {
        let mut v: Vec<SocketInfo> = self
            .maps
            .sock_stats()?
            .into_iter()
            .map(|(k, st)| SocketInfo {
                pod: self
                    .state
                    .pods
                    .iter()
                    .find(|p| p.netns_cookie == k.netns)
                    .map(|p| p.label()),
                local: key_socket_addr(k.local_ip, k.local_port),
                remote: key_socket_addr(k.remote_ip, k.remote_port),
                redirected_bytes: st.redirected_bytes,
                stack_bytes: st.stack_bytes,
            })
            .collect();
        v.sort_by(|a, b| (&a.pod, a.local, a.remote).cmp(&(&b.pod, b.local, b.remote)));
        Ok(v)
    }

    pub fn status(&self) -> Result<Status> {
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            abi: ABI_VERSION,
            cgroup: self.loaded.options.cgroup.clone(),
            bpffs: self.loaded.options.bpffs.clone(),
            programs: self.loaded.programs.clone(),
            selftest: self.selftest.clone(),
            accelerate: self.maps.accelerate()?,
            accel_wanted: self.state.accel_wanted,
            established_moved: self.established_moved(),
            pods: self.state.pods.len(),
            sockhash_sockets: self.maps.sockhash_len()?,
            sidecar_pods: self
                .state
                .pods
                .iter()
                .filter(|p| p.sidecar.is_some())
                .count(),
            services: self.services.summary(),
            service_table: {
                let mut v = self.services.views(&self.maps)?;
                v.truncate(STATUS_SERVICES);
                v
            },
            counters: self
                .maps
                .counters()?
                .into_iter()
                .map(|(c, v)| (c.name().to_string(), v))
                .collect(),
            cni_queue: self.cni_queue.summary(),
            reader_guard: ReaderGuardStatus {
                active: self.loaded.reader_guard.active,
                detail: self.loaded.reader_guard.detail.clone(),
                pods: self
                    .maps
                    .reader_pods()?
                    .into_iter()
                    .map(|(netns, seen)| GuardedPod {
                        pod: self
                            .state
                            .pods
                            .iter()
                            .find(|p| p.netns_cookie == netns)
                            .map_or_else(|| format!("netns {netns}"), |p| p.label()),
                        splice: seen.splice.into(),
                        waitall: seen.waitall.into(),
                        rcvlowat: seen.rcvlowat.into(),
                        excluded_sockets: seen.excluded.into(),
                    })
                    .collect(),
                reset_connections: self.spliced_resets,
            },
            telemetry: TelemetryStatus {
                active: true,
                detail: format!(
                    "sockops opens and closes flows; sock_send_length/sock_recv_length count \
                     the bytes applications write and read (both paths); tcp_destroy_sock ends \
                     them; sk_msg's per-socket counters split them by path{}",
                    self.telemetry
                        .problem()
                        .map(|p| format!(". {p}"))
                        .unwrap_or_default()
                ),
                ring_bytes: self.telemetry.ring_bytes,
                events: self.telemetry.events,
                events_lost: self
                    .maps
                    .counters()?
                    .into_iter()
                    .find(|(c, _)| *c == dataplane_common::Counter::EventsLost)
                    .map_or(0, |(_, v)| v),
                open_flows: self.telemetry.open_flows(),
                backlog_bytes: self.telemetry.backlog(),
            },
        })
    }

    /// Switches redirect off, unenrolls everything, waits for receivers to drain what was already
    /// handed to them, then unpins maps and links. The caller exits afterwards.
    fn uninstall(&mut self) -> Result<Uninstalled> {
        // Everything goes through the stack before the maps go: bytes redirected now would be
        // dropped with the SOCKHASH.
        self.maps.set_accelerate(false, true)?;
        for (cookie, _) in self.maps.netns_entries()? {
            self.maps.del_netns(cookie)?;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let bpffs = &self.loaded.options.bpffs;
        let unpinned =
            loader::unpin_all(bpffs).map_err(|e| Error::io("removing the pins", bpffs, e))?;
        match std::fs::remove_file(&self.state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing the state file", &self.state_path, e)),
        }
        Ok(Uninstalled { unpinned })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_cgroup_is_kept_unless_nothing_is_pinned() {
        let (bpffs, a, b) = (
            Path::new("/sys/fs/bpf/m"),
            Path::new("/cg/a"),
            Path::new("/cg/b"),
        );
        assert!(check_pinned_cgroup(bpffs, None, a, true).is_ok());
        assert!(check_pinned_cgroup(bpffs, Some(a), a, true).is_ok());
        // The state file remembers another cgroup, but its links are gone: nothing to keep.
        assert!(check_pinned_cgroup(bpffs, Some(b), a, false).is_ok());
        let e = check_pinned_cgroup(bpffs, Some(b), a, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/cg/b") && e.contains("/cg/a") && e.contains("uninstall"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_services_file_is_refused_at_start() {
        assert!(check_services_file(None).is_ok());
        let e = check_services_file(Some(Path::new("/nonexistent/services.yaml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--services /nonexistent/services.yaml"), "{e}");
        assert!(check_services_file(Some(Path::new("/proc/self/status"))).is_ok());
    }
}
