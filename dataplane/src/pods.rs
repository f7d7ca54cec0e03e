//! Pods on this node: enrolling and removing them, and making the maps say what the state file
//! says after a restart. Every request is validated completely before anything changes; a change
//! that fails half-way is rolled back, so a refused request leaves maps and state as they were.
//! Never enrolls the host's network namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use dataplane_common::{Endpoint, NetnsInfo, PortKey, netns_flags};
use meshlane_api::types::{
    AccelSpec, AttachmentRef, CniAttachment, GcReport, Pod, PodMode, SidecarSpec, validate_pod_ip,
    validate_pod_name,
};

use crate::{
    Error, Result,
    addr::{ip_key, prefix_mask},
    agent::Agent,
    maps::Maps,
    sys,
};

/// The map form of a pod's sidecar settings, which the connect program reads.
pub fn sidecar_map(spec: &SidecarSpec) -> dataplane_common::Sidecar {
    let mut sc = dataplane_common::Sidecar {
        outbound_port: spec.outbound_port,
        inbound_port: spec.inbound_port,
        proxy_uid: spec.proxy_uid,
        cidr_count: spec.exclude_cidrs.len() as u32,
        ..Default::default()
    };
    for (slot, p) in sc
        .exclude_outbound_ports
        .iter_mut()
        .zip(&spec.exclude_outbound_ports)
    {
        *slot = *p;
    }
    for (slot, p) in sc
        .exclude_inbound_ports
        .iter_mut()
        .zip(&spec.exclude_inbound_ports)
    {
        *slot = *p;
    }
    for (slot, net) in sc.exclude_cidrs.iter_mut().zip(&spec.exclude_cidrs) {
        let net = net.trunc();
        slot.net = ip_key(&net.addr());
        slot.mask = prefix_mask(&net);
    }
    sc
}

fn port_key(netns: u64, port: u16) -> PortKey {
    PortKey {
        netns,
        port: u32::from(port),
        _pad: 0,
    }
}

/// Writes a pod's entries: sidecar settings first, then its endpoints, then the netns entry that
/// makes the programs act on its sockets.
fn enroll_maps(maps: &mut Maps, pod: &Pod) -> Result<()> {
    let accel = pod.accel.as_ref();
    let mut flags = if accel.is_none_or(|a| a.enabled) {
        netns_flags::ACCELERATE
    } else {
        0
    };
    // Excluded ports before the netns entry that lets sockops insert the pod's sockets.
    for &port in accel
        .map(|a| a.exclude_ports.as_slice())
        .unwrap_or_default()
    {
        maps.put_noaccel(port_key(pod.netns_cookie, port))?;
    }
    if pod.telemetry {
        flags |= netns_flags::TELEMETRY;
    }
    if let Some(sc) = &pod.sidecar {
        // Settings before the flag that makes the programs look for them.
        maps.put_sidecar(pod.netns_cookie, sidecar_map(sc))?;
        flags |= netns_flags::SIDECAR;
    }
    for ip in &pod.ips {
        maps.put_endpoint(
            ip_key(ip),
            Endpoint {
                netns: pod.netns_cookie,
                flags,
                pod_id: pod.id,
            },
        )?;
    }
    maps.put_netns(
        pod.netns_cookie,
        NetnsInfo {
            flags,
            pod_id: pod.id,
            addr: pod.ips.first().map(ip_key).unwrap_or_default(),
        },
    )
}

/// Removes a pod's entries. Its sockets stay in the SOCKHASH until they close: removing them
/// would free their redirect queues with unread data in them. Without the netns entry they send
/// through the stack from now on, which keeps bytes in order (see sk_msg.rs).
fn unenroll_maps(maps: &mut Maps, pod: &Pod) {
    if let Err(e) = maps.del_netns(pod.netns_cookie) {
        tracing::warn!(error = %e, "removing the netns entry");
    }
    for &port in pod
        .accel
        .as_ref()
        .map(|a| a.exclude_ports.as_slice())
        .unwrap_or_default()
    {
        if let Err(e) = maps.del_noaccel(&port_key(pod.netns_cookie, port)) {
            tracing::warn!(error = %e, "removing an excluded port");
        }
    }
    if let Err(e) = maps.del_sidecar(pod.netns_cookie) {
        tracing::warn!(error = %e, "removing the sidecar entry");
    }
    // A pod enrolled again starts with a clean slate; the guard catches it again if it still reads that way.
    if let Err(e) = maps.del_reader_pod(pod.netns_cookie) {
        tracing::warn!(error = %e, "removing the reader guard's entry");
    }
    for ip in &pod.ips {
        if let Err(e) = maps.del_endpoint(ip_key(ip)) {
            tracing::warn!(error = %e, "removing an endpoint");
        }
    }
}

/// What a `pod_add` asks for besides the pod's netns, IPs and name.
#[derive(Debug, Default)]
pub(crate) struct PodOptions {
    pub sidecar: Option<SidecarSpec>,
    pub accel: Option<AccelSpec>,
    /// Observe its connections; none: yes.
    pub telemetry: Option<bool>,
    pub cni: Option<CniAttachment>,
}

impl Agent {
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
        for (cookie, _) in self.maps.netns_entries()? {
            if !wanted.contains_key(&cookie) {
                tracing::info!(cookie, "removing an enrollment no pod owns");
                self.maps.del_netns(cookie)?;
            }
        }
        let wanted_ips: BTreeSet<[u32; 4]> = self
            .state
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().map(ip_key))
            .collect();
        for (ip, _) in self.maps.endpoint_entries()? {
            if !wanted_ips.contains(&ip) {
                self.maps.del_endpoint(ip)?;
            }
        }
        for (cookie, _) in self.maps.sidecar_entries()? {
            if wanted.get(&cookie).is_none_or(|p| p.sidecar.is_none()) {
                self.maps.del_sidecar(cookie)?;
            }
        }
        for (netns, _) in self.maps.reader_pods()? {
            if !wanted.contains_key(&netns) {
                self.maps.del_reader_pod(netns)?;
            }
        }
        for key in self.maps.noaccel_keys()? {
            let owned = wanted.get(&key.netns).is_some_and(|p| {
                p.accel.as_ref().is_some_and(|a| {
                    a.exclude_ports
                        .iter()
                        .any(|&port| u32::from(port) == key.port)
                })
            });
            if !owned {
                self.maps.del_noaccel(&key)?;
            }
        }
        for p in &self.state.pods {
            enroll_maps(&mut self.maps, p)?;
        }
        Ok(())
    }

    pub(crate) fn pod_add(
        &mut self,
        netns: &Path,
        ips: &[IpAddr],
        name: Option<String>,
        options: PodOptions,
    ) -> Result<Pod> {
        let PodOptions {
            sidecar,
            accel,
            telemetry,
            cni,
        } = options;
        let invalid = |m: String| Error::Invalid(format!("pod add: {m}"));
        let conflict = |m: String| Error::Conflict(format!("pod add: {m}"));
        if let Some(sc) = &sidecar {
            sc.validate().map_err(invalid)?;
        }
        if let Some(a) = &accel {
            a.validate().map_err(invalid)?;
        }
        if let Some(c) = &cni {
            validate_attachment(c).map_err(invalid)?;
            // CNI may call ADD again for an attachment it already added (a retried ADD, or the
            // agent applying a queued ADD it had applied before it died): the same attachment
            // on the same netns is the pod that exists.
            if let Some(p) = self.state.pods.iter().find(|p| p.is_attachment(&c.key())) {
                if p.netns == netns {
                    return Ok(p.clone());
                }
                return Err(conflict(format!(
                    "container {} interface {} is already enrolled with netns {}",
                    c.container_id,
                    c.ifname,
                    p.netns.display()
                )));
            }
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
                return Err(conflict(format!(
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
            return Err(conflict(format!(
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
                return Err(conflict(format!(
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
            mode: PodMode::of(sidecar.as_ref()),
            sidecar,
            cni,
            accel,
            telemetry: telemetry.unwrap_or(true),
        };
        if let Err(e) = enroll_maps(&mut self.maps, &pod) {
            unenroll_maps(&mut self.maps, &pod);
            return Err(e);
        }
        let before = self.state.clone();
        self.state.next_id = pod.id + 1;
        self.state.pods.push(pod.clone());
        if let Err(e) = self.state.save(&self.state_path) {
            self.state = before;
            unenroll_maps(&mut self.maps, &pod);
            return Err(e);
        }
        self.telemetry.set_pods(&self.state.pods);
        tracing::info!(id = pod.id, name = ?pod.name, netns = %pod.netns.display(), "pod enrolled");
        Ok(pod)
    }

    pub(crate) fn pod_del(
        &mut self,
        netns: Option<&Path>,
        name: Option<&str>,
        attachment: Option<&AttachmentRef>,
    ) -> Result<Pod> {
        let pods = &self.state.pods;
        let (idx, what) = match (netns, name, attachment) {
            (Some(path), None, None) => (
                pods.iter().position(|p| p.netns == path),
                format!("netns {}", path.display()),
            ),
            (None, Some(n), None) => (
                pods.iter().position(|p| p.name.as_deref() == Some(n)),
                format!("name {n}"),
            ),
            (None, None, Some(a)) => (
                pods.iter().position(|p| p.is_attachment(a)),
                format!("container {} interface {}", a.container_id, a.ifname),
            ),
            _ => {
                return Err(Error::Invalid(
                    "pod del: give exactly one of --netns, --name or a CNI attachment".into(),
                ));
            }
        };
        let Some(idx) = idx else {
            return Err(Error::NotFound(format!(
                "pod del: no enrolled pod has {what}"
            )));
        };
        self.remove_pod(idx)
    }

    /// Removes the pod at `idx`: state first (so a failed save changes nothing), then its map
    /// entries.
    fn remove_pod(&mut self, idx: usize) -> Result<Pod> {
        let before = self.state.clone();
        let pod = self.state.pods.remove(idx);
        if let Err(e) = self.state.save(&self.state_path) {
            self.state = before;
            return Err(e);
        }
        unenroll_maps(&mut self.maps, &pod);
        // Connections of the pod still open keep the names they were counted under.
        self.telemetry.set_pods(&self.state.pods);
        tracing::info!(id = pod.id, name = ?pod.name, "pod removed");
        Ok(pod)
    }

    /// CNI `GC`: removes every enrollment of `network` whose attachment is not in `valid`,
    /// keeping going past the ones that fail. Pods enrolled by hand, or by another network,
    /// stay.
    pub(crate) fn pod_gc(&mut self, network: &str, valid: &[AttachmentRef]) -> GcReport {
        let valid: BTreeSet<&AttachmentRef> = valid.iter().collect();
        let stale: Vec<u32> = self
            .state
            .pods
            .iter()
            .filter(|p| {
                p.cni
                    .as_ref()
                    .is_some_and(|c| c.network == network && !valid.contains(&c.key()))
            })
            .map(|p| p.id)
            .collect();
        let mut report = GcReport::default();
        for id in stale {
            let Some(idx) = self.state.pods.iter().position(|p| p.id == id) else {
                continue;
            };
            match self.remove_pod(idx) {
                Ok(p) => report.removed.push(p),
                Err(e) => report.errors.push(format!("pod {id}: {e}")),
            }
        }
        if !report.removed.is_empty() {
            tracing::info!(network, removed = report.removed.len(), "CNI GC");
        }
        report
    }
}

/// A container ID and interface name as CNI allows them (libcni's validators): the ID
/// alphanumeric plus `_.-`, starting alphanumeric; the name 1-15 bytes, not `.`/`..`, no `/`,
/// `:` or whitespace.
pub fn validate_attachment(a: &CniAttachment) -> Result<(), String> {
    let id = &a.container_id;
    let id_ok = id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if !id_ok {
        return Err(format!(
            "container ID {id:?} must start with a letter or digit and hold only letters, digits, '_', '.' or '-'"
        ));
    }
    let n = &a.ifname;
    if n.is_empty()
        || n.len() > 15
        || n == "."
        || n == ".."
        || n.bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(format!(
            "interface name {n:?} must be 1-15 bytes, not '.' or '..', without '/', ':' or spaces"
        ));
    }
    if a.network.is_empty() {
        return Err("the CNI network name is empty".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_settings_in_map_form() {
        let spec = SidecarSpec {
            exclude_outbound_ports: vec![22, 9090],
            exclude_inbound_ports: vec![15020],
            exclude_cidrs: vec!["10.96.0.1/16".parse().unwrap(), "fd00::/8".parse().unwrap()],
            ..SidecarSpec::default()
        };
        let m = sidecar_map(&spec);
        assert_eq!(
            (m.outbound_port, m.inbound_port, m.proxy_uid),
            (15001, 15006, 1337)
        );
        assert_eq!(&m.exclude_outbound_ports[..3], &[22, 9090, 0]);
        assert_eq!(&m.exclude_inbound_ports[..2], &[15020, 0]);
        assert_eq!(m.cidr_count, 2);
        // The network is truncated to its prefix.
        assert_eq!(
            m.exclude_cidrs[0].net,
            ip_key(&"10.96.0.0".parse().unwrap())
        );
        assert!(m.exclude_cidrs[0].contains(&ip_key(&"10.96.200.1".parse().unwrap())));
        assert!(!m.exclude_cidrs[0].contains(&ip_key(&"10.97.0.1".parse().unwrap())));
        assert!(m.exclude_cidrs[1].contains(&ip_key(&"fd12::1".parse().unwrap())));
    }
}
