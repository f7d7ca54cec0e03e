//! The typed answers of the agent API and the inputs requests carry, with their validators.
//! Validators live here so a caller (the CLI, the CNI plugin) can check input before it reaches
//! the agent; the agent runs the same checks again, because it trusts no caller.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::services::Balance;

/// An enrolled pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    /// A small id the agent assigns (counters, logs, `pod-<id>` when unnamed).
    pub id: u32,
    /// NAMESPACE/NAME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
    /// What the pod is enrolled for (follows `sidecar`; shown in `pod list`).
    #[serde(default)]
    pub mode: PodMode,
    /// The CNI attachment that enrolled the pod; none for a pod enrolled by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniAttachment>,
    /// What of the pod's traffic may take the fast path; none: all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<AccelSpec>,
    /// Its connections are observed (flow telemetry).
    #[serde(default = "telemetry_on")]
    pub telemetry: bool,
}

fn telemetry_on() -> bool {
    true
}

/// How much of a pod's same-node traffic may skip the stack. Workloads that read sockets with
/// splice(2) (Go's `io.Copy` between TCP connections, for one) must be kept out: redirected
/// bytes never reach a splice reader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccelSpec {
    /// False: the pod is enrolled (Service translation, sidecar capture) but none of its
    /// connections are redirected.
    #[serde(default = "accel_enabled")]
    pub enabled: bool,
    /// Connections of the pod with one of these ports at either end stay on the stack.
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
}

fn accel_enabled() -> bool {
    true
}

impl AccelSpec {
    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let ports = &self.exclude_ports;
        let max = dataplane_common::MAX_NOACCEL_PORTS;
        if ports.len() > max {
            return Err(format!(
                "accel.exclude_ports has {} ports; at most {max} are supported",
                ports.len()
            ));
        }
        for (i, p) in ports.iter().enumerate() {
            if *p == 0 {
                return Err(format!("accel.exclude_ports[{i}] is 0; ports are 1-65535"));
            }
            if ports[..i].contains(p) {
                return Err(format!("accel.exclude_ports[{i}]: port {p} is given twice"));
            }
        }
        Ok(())
    }
}

impl Pod {
    /// How the pod is shown in tables: its name, or `pod-<id>` when it has none.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("pod-{}", self.id))
    }

    /// Whether this pod is the enrollment of that container's interface.
    pub fn is_attachment(&self, a: &AttachmentRef) -> bool {
        self.cni
            .as_ref()
            .is_some_and(|c| c.container_id == a.container_id && c.ifname == a.ifname)
    }
}

/// What an enrolled pod gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodMode {
    /// Same-node traffic skips the TCP/IP stack.
    #[default]
    Accelerate,
    /// Accelerated, and its traffic captured for its sidecar proxy.
    Sidecar,
}

impl PodMode {
    pub fn of(sidecar: Option<&SidecarSpec>) -> Self {
        if sidecar.is_some() {
            PodMode::Sidecar
        } else {
            PodMode::Accelerate
        }
    }
}

impl std::fmt::Display for PodMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PodMode::Accelerate => "accelerate",
            PodMode::Sidecar => "sidecar",
        })
    }
}

/// A container's interface as CNI names it: the key of a CNI enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRef {
    pub container_id: String,
    pub ifname: String,
}

/// The CNI attachment an enrollment was made for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CniAttachment {
    pub container_id: String,
    pub ifname: String,
    /// The CNI network (the conflist's `name`); `GC` of a network touches only its own.
    pub network: String,
}

impl CniAttachment {
    pub fn key(&self) -> AttachmentRef {
        AttachmentRef {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// The answer to `pod_gc`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    /// Enrollments removed because no valid attachment names them.
    pub removed: Vec<Pod>,
    /// Enrollments that could not be removed, with why (GC keeps going past them).
    pub errors: Vec<String>,
}

/// How a sidecar pod's traffic is captured. The defaults are Istio's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarSpec {
    /// The proxy's outbound listener, where the application's connects are sent.
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// The proxy's inbound listener, where connects from other pods of the node are sent.
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    /// The proxy's uid: its own connects are never captured.
    #[serde(default = "default_proxy_uid")]
    pub proxy_uid: u32,
    /// Destination ports the application reaches directly.
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Pod ports other pods reach directly.
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destinations the application reaches directly.
    #[serde(default)]
    pub exclude_cidrs: Vec<ipnet::IpNet>,
}

fn default_outbound_port() -> u16 {
    15001
}
fn default_inbound_port() -> u16 {
    15006
}
fn default_proxy_uid() -> u32 {
    1337
}

impl Default for SidecarSpec {
    fn default() -> Self {
        SidecarSpec {
            outbound_port: default_outbound_port(),
            inbound_port: default_inbound_port(),
            proxy_uid: default_proxy_uid(),
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
        }
    }
}

impl SidecarSpec {
    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        use dataplane_common::{SIDECAR_MAX_CIDRS, SIDECAR_MAX_PORTS};
        for (field, port) in [
            ("outbound_port", self.outbound_port),
            ("inbound_port", self.inbound_port),
        ] {
            if port == 0 {
                return Err(format!("sidecar.{field} must be 1-65535, not 0"));
            }
        }
        if self.outbound_port == self.inbound_port {
            return Err(format!(
                "sidecar.outbound_port and sidecar.inbound_port are both {}; they must differ",
                self.outbound_port
            ));
        }
        if self.proxy_uid == 0 {
            return Err(
                "sidecar.proxy_uid must not be 0: root's connects would never be captured".into(),
            );
        }
        for (field, ports) in [
            ("exclude_outbound_ports", &self.exclude_outbound_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
        ] {
            if ports.len() > SIDECAR_MAX_PORTS {
                return Err(format!(
                    "sidecar.{field} has {} ports; at most {SIDECAR_MAX_PORTS} are supported",
                    ports.len()
                ));
            }
            if let Some(i) = ports.iter().position(|&p| p == 0) {
                return Err(format!("sidecar.{field}[{i}] is 0; ports are 1-65535"));
            }
        }
        if self.exclude_cidrs.len() > SIDECAR_MAX_CIDRS {
            return Err(format!(
                "sidecar.exclude_cidrs has {} entries; at most {SIDECAR_MAX_CIDRS} are supported",
                self.exclude_cidrs.len()
            ));
        }
        Ok(())
    }
}

/// `NAMESPACE/NAME` with Kubernetes' DNS-label rules for each half.
pub fn validate_pod_name(name: &str) -> Result<(), String> {
    let Some((ns, n)) = name.split_once('/') else {
        return Err(format!("pod name {name:?} must be NAMESPACE/NAME"));
    };
    for (what, part, max) in [("namespace", ns, 63), ("name", n, 253)] {
        let ok = !part.is_empty()
            && part.len() <= max
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && part.as_bytes()[0].is_ascii_alphanumeric()
            && part.as_bytes()[part.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return Err(format!(
                "pod {what} {part:?} in {name:?} must be 1-{max} lowercase letters, digits, '-' or '.', \
                 starting and ending with a letter or digit"
            ));
        }
    }
    Ok(())
}

/// A pod IP must be a unicast address a socket can use.
pub fn validate_pod_ip(ip: &IpAddr) -> Result<(), String> {
    let bad = match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast(),
    };
    if bad {
        Err(format!(
            "pod IP {ip} is not a unicast pod address (loopback, unspecified, multicast and broadcast are refused)"
        ))
    } else {
        Ok(())
    }
}

/// A socket in the fast path, as `meshlane sockets` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    /// NAMESPACE/NAME of the pod, or `pod-<id>` when it was enrolled without a name; none for a
    /// socket of a namespace no pod owns any more.
    pub pod: Option<String>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub redirected_bytes: u64,
    pub stack_bytes: u64,
}

/// A kernel program as `meshlane status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProgram {
    pub name: String,
    pub id: u32,
    pub attach: String,
    pub pinned_link: Option<PathBuf>,
}

/// One check of the start-up self-test.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The start-up self-test's outcome: redirect is switched on only if it passed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestReport {
    pub passed: bool,
    pub detail: String,
    pub checks: Vec<Check>,
    /// The reader checks again on a SOCKHASH socket whose peer sends through the stack — what
    /// moving established connections off the fast path would do to them. They decide whether
    /// `accel off --move-established` is allowed; they never keep redirect off.
    #[serde(default)]
    pub stack_delivery: Vec<Check>,
    /// Bytes the self-test itself sent through the stack in that phase; they are part of the
    /// `bytes_passed` counter.
    #[serde(default)]
    pub stack_bytes: u64,
}

impl SelfTestReport {
    pub fn failed(detail: impl Into<String>, checks: Vec<Check>) -> Self {
        SelfTestReport {
            passed: false,
            detail: detail.into(),
            checks,
            stack_delivery: Vec::new(),
            stack_bytes: 0,
        }
    }

    /// Whether a SOCKHASH socket that receives through the stack was shown to be read right.
    pub fn stack_delivery_ok(&self) -> bool {
        !self.stack_delivery.is_empty() && self.stack_delivery.iter().all(|c| c.ok)
    }

    /// The failed stack-delivery checks, in words.
    pub fn stack_delivery_failures(&self) -> String {
        if self.stack_delivery.is_empty() {
            return "the self-test did not get that far".into();
        }
        self.stack_delivery
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What `meshlane services` and `meshlane status` show of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// None for a service adopted from the pinned maps of an earlier agent, until the
    /// services file is loaded again.
    pub name: Option<String>,
    /// `VIP:port/PROTO`.
    pub frontend: String,
    pub balance: Option<Balance>,
    pub backends: Vec<SocketAddr>,
    pub connects: u64,
    pub datagrams: u64,
    pub refused: u64,
}

/// The services part of `meshlane status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// The answer to `services`: the whole table with per-service counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    pub summary: ServicesSummary,
    pub services: Vec<ServiceView>,
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub abi: u32,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub programs: Vec<AttachedProgram>,
    pub selftest: SelfTestReport,
    /// Redirect is on right now.
    pub accelerate: bool,
    /// The operator's choice (kill switch); redirect is on only if this and the self-test agree.
    pub accel_wanted: bool,
    /// `accel off --move-established` is in effect: connections already in the fast path send
    /// through the stack. False with acceleration off: they stay in it until they close.
    #[serde(default)]
    pub established_moved: bool,
    pub pods: usize,
    pub sockhash_sockets: usize,
    pub sidecar_pods: usize,
    pub services: ServicesSummary,
    /// The first services of the table with their counters (`meshlane services` lists all).
    pub service_table: Vec<ServiceView>,
    /// Every kernel counter by its reason name (`dataplane_common::Counter::name`).
    pub counters: BTreeMap<String, u64>,
    /// The CNI plugin's queue, as the agent applies it.
    pub cni_queue: QueueSummary,
    /// Whether pods that read in ways redirected bytes cannot serve (splice(2), sendfile(2),
    /// `MSG_WAITALL`, `SO_RCVLOWAT`) are detected and kept off the fast path.
    pub reader_guard: ReaderGuardStatus,
    /// Flow telemetry.
    #[serde(default)]
    pub telemetry: crate::flows::TelemetryStatus,
}

/// The reader guard in `meshlane status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderGuardStatus {
    pub active: bool,
    /// Which guard runs, and why the stronger ones do not.
    pub detail: String,
    /// Pods caught: their new connections stay on the stack.
    pub pods: Vec<GuardedPod>,
    /// Connections reset since the agent started because they were read with splice while in
    /// the fast path (their readers would otherwise wait forever or see a silent EOF).
    #[serde(default)]
    pub reset_connections: u64,
}

/// A pod the reader guard caught, with its detections by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardedPod {
    /// NAMESPACE/NAME, `pod-<id>`, or the netns cookie of a pod no longer enrolled.
    pub pod: String,
    /// Reads with splice(2) or sendfile(2).
    pub splice: u64,
    /// Reads with `MSG_WAITALL`.
    pub waitall: u64,
    /// `SO_RCVLOWAT` set above 1.
    pub rcvlowat: u64,
    /// Established sockets kept off the fast path because of this pod since (its own and its
    /// peers'; two per connection between two enrolled pods).
    pub excluded_sockets: u64,
}

impl GuardedPod {
    /// What the pod was seen doing, in words: "splice (2), MSG_WAITALL (1)".
    pub fn kinds(&self) -> String {
        [
            ("splice", self.splice),
            ("MSG_WAITALL", self.waitall),
            ("SO_RCVLOWAT", self.rcvlowat),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// The CNI queue in `meshlane status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSummary {
    pub dir: PathBuf,
    /// Entries waiting now.
    pub pending: usize,
    /// Entries applied since the agent started.
    pub applied: u64,
    /// Entries refused for good since the agent started (kept in `failed/`).
    pub failed: u64,
    /// The last problem met, if any.
    pub last_error: Option<String>,
}

/// The answer to `accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accel {
    /// New connections enter the fast path now.
    pub accelerate: bool,
    /// Connections already in the fast path send through the stack now
    /// (`accel off --move-established`); false: they stay in it until they close.
    #[serde(default)]
    pub established_moved: bool,
}

/// The answer to `uninstall`: what was unpinned. The agent stops after answering.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uninstalled {
    pub unpinned: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        assert!(validate_pod_name("default/web-1").is_ok());
        assert!(validate_pod_name("web").is_err());
        assert!(validate_pod_name("Default/web").is_err());
        assert!(validate_pod_name("default/").is_err());
        assert!(validate_pod_name("default/-web").is_err());
    }

    #[test]
    fn pod_ips() {
        assert!(validate_pod_ip(&"10.0.0.1".parse().unwrap()).is_ok());
        assert!(validate_pod_ip(&"127.0.0.1".parse().unwrap()).is_err());
        assert!(validate_pod_ip(&"0.0.0.0".parse().unwrap()).is_err());
        assert!(validate_pod_ip(&"ff02::1".parse().unwrap()).is_err());
    }

    #[test]
    fn sidecar_validation_names_the_field() {
        assert!(SidecarSpec::default().validate().is_ok());
        let bad = SidecarSpec {
            exclude_inbound_ports: vec![80, 0],
            ..SidecarSpec::default()
        };
        let e = bad.validate().unwrap_err();
        assert!(e.contains("exclude_inbound_ports[1]"), "{e}");
        let same = SidecarSpec {
            inbound_port: 15001,
            ..SidecarSpec::default()
        };
        assert!(same.validate().unwrap_err().contains("must differ"));
    }
}
