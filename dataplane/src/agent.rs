//! The agent's state machine: requests in, map and state-file changes out. Every request is
//! validated completely before anything changes; a change that fails half-way is rolled back, so
//! a refused request leaves maps and state as they were.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use dataplane_common::{ABI_VERSION, Endpoint, NetnsInfo, netns_flags};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    Error, Result,
    api::Request,
    dataplane::{AttachedProgram, Dataplane},
    selftest::SelfTestReport,
    service_table::{ServiceTable, ServicesSummary},
    state::{Pod, SidecarSpec, State, ip_key, validate_pod_ip, validate_pod_name},
    sys,
};

pub struct Agent {
    pub dp: Dataplane,
    pub state: State,
    pub state_path: PathBuf,
    pub selftest: SelfTestReport,
    pub services: ServiceTable,
    /// Cookies of namespaces that must never be enrolled: the agent's own and PID 1's.
    host_cookies: Vec<u64>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("dp", &self.dp)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub abi: u32,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub programs: Vec<AttachedProgram>,
    pub selftest: SelfTestReport,
    /// Redirect is on right now.
    pub accelerate: bool,
    /// The operator's choice (kill switch); redirect is on only if this and the self-test agree.
    pub accel_wanted: bool,
    pub pods: usize,
    pub sockhash_sockets: usize,
    pub sidecar_pods: usize,
    pub services: ServicesSummary,
    /// The first services of the table with their counters (`meshlane services` lists all).
    pub service_table: Vec<crate::service_table::ServiceView>,
    pub counters: BTreeMap<&'static str, u64>,
}

/// Services shown in `status`; the full table is one `services` request away.
const STATUS_SERVICES: usize = 20;

/// A socket in the fast path, as `meshlane sockets` shows it.
#[derive(Debug, Serialize)]
pub struct SocketView {
    /// NAMESPACE/NAME of the pod, or `pod-<id>` when it was enrolled without a name.
    pub pod: Option<String>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub redirected_bytes: u64,
    pub stack_bytes: u64,
}

pub(crate) fn key_addr(ip: [u32; 4], port: u32) -> SocketAddr {
    let mut o = [0u8; 16];
    for (i, w) in ip.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, port as u16)
}

/// What `uninstall` did, for the caller.
#[derive(Debug, Serialize)]
pub struct Uninstalled {
    pub unpinned: Vec<PathBuf>,
}

impl Agent {
    pub fn new(
        dp: Dataplane,
        state: State,
        state_path: PathBuf,
        selftest: SelfTestReport,
        services: ServiceTable,
    ) -> Self {
        let mut host_cookies = Vec::new();
        if let Ok(c) = sys::current_netns_cookie() {
            host_cookies.push(c);
        }
        if let Ok(c) = sys::netns_cookie(Path::new("/proc/1/ns/net")) {
            host_cookies.push(c);
        }
        Agent {
            dp,
            state,
            state_path,
            selftest,
            services,
            host_cookies,
        }
    }

    /// Makes the maps say what the state file says: re-enrolls known pods, removes netns and
    /// endpoint entries nobody owns (a pod deleted while the agent was down, or the self-test's
    /// namespace of a killed agent). Sockets already in the fast path are not touched.
    pub fn reconcile(&mut self) -> Result<()> {
        let wanted: BTreeMap<u64, &Pod> = self
            .state
            .pods
            .iter()
            .map(|p| (p.netns_cookie, p))
            .collect();
        for (cookie, _) in self.dp.netns_entries() {
            if !wanted.contains_key(&cookie) {
                tracing::info!(cookie, "removing an enrollment no pod owns");
                self.dp.del_netns(cookie)?;
            }
        }
        let wanted_ips: BTreeMap<[u32; 4], ()> = self
            .state
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().map(|ip| (ip_key(ip), ())))
            .collect();
        for (ip, _) in self.dp.endpoint_entries() {
            if !wanted_ips.contains_key(&ip) {
                self.dp.del_endpoint(ip)?;
            }
        }
        for (cookie, _) in self.dp.sidecar_entries() {
            if wanted.get(&cookie).is_none_or(|p| p.sidecar.is_none()) {
                self.dp.del_sidecar(cookie)?;
            }
        }
        let pods = self.state.pods.clone();
        for p in &pods {
            self.enroll_maps(p)?;
        }
        Ok(())
    }

    /// Switches redirect on exactly when the operator wants it and the self-test passed.
    pub fn apply_accel(&mut self) -> Result<bool> {
        let on = self.state.accel_wanted && self.selftest.passed;
        self.dp.set_accelerate(on)?;
        Ok(on)
    }

    pub fn handle(&mut self, req: Request) -> Result<Value> {
        match req {
            Request::PodAdd {
                netns,
                ips,
                name,
                sidecar,
            } => {
                let pod = self.pod_add(&netns, &ips, name, sidecar)?;
                Ok(json!(pod))
            }
            Request::PodDel { netns, name } => {
                let pod = self.pod_del(netns.as_deref(), name.as_deref())?;
                Ok(json!(pod))
            }
            Request::PodList => Ok(json!(self.state.pods)),
            Request::Sockets => Ok(json!(self.sockets())),
            Request::Status => Ok(json!(self.status()?)),
            Request::Services => Ok(json!({
                "summary": self.services.summary(),
                "services": self.services.views(&self.dp),
            })),
            Request::Accel { on } => {
                let before = self.state.accel_wanted;
                self.state.accel_wanted = on;
                if let Err(e) = self.state.save(&self.state_path) {
                    self.state.accel_wanted = before;
                    return Err(e);
                }
                let now = self.apply_accel()?;
                if on && !now {
                    return Err(Error::Invalid(format!(
                        "acceleration stays off: the self-test failed ({})",
                        self.selftest.detail
                    )));
                }
                Ok(json!({ "accelerate": now }))
            }
            Request::Uninstall => Ok(json!(self.uninstall()?)),
        }
    }

    fn pod_add(
        &mut self,
        netns: &Path,
        ips: &[IpAddr],
        name: Option<String>,
        sidecar: Option<SidecarSpec>,
    ) -> Result<Pod> {
        let invalid = |m: String| Error::Invalid(format!("pod add: {m}"));
        if let Some(sc) = &sidecar {
            sc.validate().map_err(invalid)?;
        }
        if !netns.is_absolute() {
            return Err(invalid(format!(
                "netns path {} must be absolute",
                netns.display()
            )));
        }
        if ips.is_empty() {
            return Err(invalid("at least one --ip is required".into()));
        }
        for ip in ips {
            validate_pod_ip(ip).map_err(invalid)?;
        }
        for (i, a) in ips.iter().enumerate() {
            if ips[i + 1..].iter().any(|b| ip_key(a) == ip_key(b)) {
                return Err(invalid(format!("IP {a} is given twice")));
            }
        }
        if let Some(n) = &name {
            validate_pod_name(n).map_err(invalid)?;
            if let Some(p) = self.state.find_by_name(n) {
                return Err(invalid(format!(
                    "a pod named {n} is already enrolled (netns {})",
                    p.netns.display()
                )));
            }
        }
        let cookie = sys::netns_cookie(netns).map_err(|e| invalid(e.to_string()))?;
        if self.host_cookies.contains(&cookie) {
            return Err(invalid(format!(
                "{} is the host's network namespace; meshlane never enrolls it",
                netns.display()
            )));
        }
        if let Some(p) = self.state.pods.iter().find(|p| p.netns_cookie == cookie) {
            return Err(invalid(format!(
                "netns {} is already enrolled as pod {} ({})",
                netns.display(),
                p.id,
                p.name.as_deref().unwrap_or("unnamed")
            )));
        }
        for ip in ips {
            if let Some(p) = self
                .state
                .pods
                .iter()
                .find(|p| p.ips.iter().any(|x| ip_key(x) == ip_key(ip)))
            {
                return Err(invalid(format!(
                    "IP {ip} already belongs to pod {} (netns {})",
                    p.name.as_deref().unwrap_or("unnamed"),
                    p.netns.display()
                )));
            }
        }

        let pod = Pod {
            id: self.state.next_id.max(1),
            name,
            netns: netns.to_path_buf(),
            netns_cookie: cookie,
            ips: ips.to_vec(),
            sidecar,
        };
        if let Err(e) = self.enroll_maps(&pod) {
            self.unenroll_maps(&pod);
            return Err(e);
        }
        let before = self.state.clone();
        self.state.next_id = pod.id + 1;
        self.state.pods.push(pod.clone());
        if let Err(e) = self.state.save(&self.state_path) {
            self.state = before;
            self.unenroll_maps(&pod);
            return Err(e);
        }
        tracing::info!(id = pod.id, name = ?pod.name, netns = %pod.netns.display(), "pod enrolled");
        Ok(pod)
    }

    fn pod_del(&mut self, netns: Option<&Path>, name: Option<&str>) -> Result<Pod> {
        let idx = match (netns, name) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(Error::Invalid(
                    "pod del: give exactly one of --netns or --name".into(),
                ));
            }
            (Some(path), None) => self.state.pods.iter().position(|p| p.netns == path),
            (None, Some(n)) => self
                .state
                .pods
                .iter()
                .position(|p| p.name.as_deref() == Some(n)),
        };
        let Some(idx) = idx else {
            return Err(Error::Invalid(format!(
                "pod del: no enrolled pod has {}",
                match (netns, name) {
                    (Some(p), _) => format!("netns {}", p.display()),
                    (_, Some(n)) => format!("name {n}"),
                    _ => unreachable!("checked above"),
                }
            )));
        };
        let before = self.state.clone();
        let pod = self.state.pods.remove(idx);
        if let Err(e) = self.state.save(&self.state_path) {
            self.state = before;
            return Err(e);
        }
        self.unenroll_maps(&pod);
        tracing::info!(id = pod.id, name = ?pod.name, "pod removed");
        Ok(pod)
    }

    fn enroll_maps(&mut self, pod: &Pod) -> Result<()> {
        let mut flags = netns_flags::ACCELERATE;
        if let Some(sc) = &pod.sidecar {
            // Settings before the flag that makes the programs look for them.
            self.dp.put_sidecar(pod.netns_cookie, sc.to_map())?;
            flags |= netns_flags::SIDECAR;
        }
        for ip in &pod.ips {
            self.dp.put_endpoint(
                ip_key(ip),
                Endpoint {
                    netns: pod.netns_cookie,
                    flags,
                    pod_id: pod.id,
                },
            )?;
        }
        self.dp.put_netns(
            pod.netns_cookie,
            NetnsInfo {
                flags,
                pod_id: pod.id,
                addr: pod.ips.first().map(ip_key).unwrap_or_default(),
            },
        )
    }

    /// Removes a pod's entries. Its sockets stay in the SOCKHASH until they close: removing
    /// them would free their redirect queues with unread data in them. Without the netns entry
    /// they send through the stack from now on, which keeps bytes in order (see sk_msg.rs).
    fn unenroll_maps(&mut self, pod: &Pod) {
        if let Err(e) = self.dp.del_netns(pod.netns_cookie) {
            tracing::warn!(error = %e, "removing the netns entry");
        }
        if let Err(e) = self.dp.del_sidecar(pod.netns_cookie) {
            tracing::warn!(error = %e, "removing the sidecar entry");
        }
        for ip in &pod.ips {
            if let Err(e) = self.dp.del_endpoint(ip_key(ip)) {
                tracing::warn!(error = %e, "removing an endpoint");
            }
        }
    }

    pub fn sockets(&self) -> Vec<SocketView> {
        let mut v: Vec<SocketView> = self
            .dp
            .sock_stats()
            .into_iter()
            .map(|(k, st)| SocketView {
                pod: self
                    .state
                    .pods
                    .iter()
                    .find(|p| p.netns_cookie == k.netns)
                    .map(|p| p.name.clone().unwrap_or_else(|| format!("pod-{}", p.id))),
                local: key_addr(k.local_ip, k.local_port),
                remote: key_addr(k.remote_ip, k.remote_port),
                redirected_bytes: st.redirected_bytes,
                stack_bytes: st.stack_bytes,
            })
            .collect();
        v.sort_by(|a, b| (&a.pod, a.local, a.remote).cmp(&(&b.pod, b.local, b.remote)));
        v
    }

    pub fn status(&self) -> Result<Status> {
        Ok(Status {
            version: env!("CARGO_PKG_VERSION"),
            abi: ABI_VERSION,
            cgroup: self.dp.options.cgroup.clone(),
            bpffs: self.dp.options.bpffs.clone(),
            programs: self.dp.programs.clone(),
            selftest: self.selftest.clone(),
            accelerate: self.dp.accelerate()?,
            accel_wanted: self.state.accel_wanted,
            pods: self.state.pods.len(),
            sockhash_sockets: self.dp.sockhash_len(),
            sidecar_pods: self
                .state
                .pods
                .iter()
                .filter(|p| p.sidecar.is_some())
                .count(),
            services: self.services.summary(),
            service_table: {
                let mut v = self.services.views(&self.dp);
                v.truncate(STATUS_SERVICES);
                v
            },
            counters: self
                .dp
                .counters()?
                .into_iter()
                .map(|(c, v)| (c.name(), v))
                .collect(),
        })
    }

    /// Switches redirect off, unenrolls everything, waits for receivers to drain what was already
    /// handed to them, then unpins maps and links. The caller exits afterwards.
    fn uninstall(&mut self) -> Result<Uninstalled> {
        self.dp.set_accelerate(false)?;
        for (cookie, _) in self.dp.netns_entries() {
            self.dp.del_netns(cookie)?;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let unpinned = crate::dataplane::unpin_all(&self.dp.options.bpffs)?;
        match std::fs::remove_file(&self.state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing the state file", &self.state_path, e)),
        }
        Ok(Uninstalled { unpinned })
    }
}
