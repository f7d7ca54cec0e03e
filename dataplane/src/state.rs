//! What the agent must remember across restarts that the maps cannot hold: pod names, netns
//! paths, the cgroup the programs are attached to, and whether the operator switched
//! acceleration off. Written atomically (temporary file + rename) after every change, so a
//! SIGKILL leaves either the old or the new state, never half of one.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
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

    /// The map form the connect program reads.
    pub fn to_map(&self) -> dataplane_common::Sidecar {
        let mut sc = dataplane_common::Sidecar {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_uid: self.proxy_uid,
            cidr_count: self.exclude_cidrs.len() as u32,
            ..Default::default()
        };
        for (slot, p) in sc
            .exclude_outbound_ports
            .iter_mut()
            .zip(&self.exclude_outbound_ports)
        {
            *slot = *p;
        }
        for (slot, p) in sc
            .exclude_inbound_ports
            .iter_mut()
            .zip(&self.exclude_inbound_ports)
        {
            *slot = *p;
        }
        for (slot, net) in sc.exclude_cidrs.iter_mut().zip(&self.exclude_cidrs) {
            let net = net.trunc();
            let mask = match net {
                ipnet::IpNet::V4(n) => IpAddr::V4(n.netmask()),
                ipnet::IpNet::V6(n) => IpAddr::V6(n.netmask()),
            };
            let mut m = ip_key(&mask);
            if net.addr().is_ipv4() {
                // The IPv4-mapped prefix (::ffff:0:0/96) must match exactly too.
                m[0] = u32::MAX;
                m[1] = u32::MAX;
                m[2] = u32::MAX;
            }
            slot.net = ip_key(&net.addr());
            slot.mask = m;
        }
        sc
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The cgroup the sockops link under this bpffs is attached to.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// False after `meshlane accel off`; a restart keeps the operator's choice.
    #[serde(default = "yes")]
    pub accel_wanted: bool,
    #[serde(default)]
    pub next_id: u32,
    #[serde(default)]
    pub pods: Vec<Pod>,
}

fn yes() -> bool {
    true
}

impl Default for State {
    fn default() -> Self {
        State {
            cgroup: None,
            accel_wanted: true,
            next_id: 1,
            pods: Vec::new(),
        }
    }
}

impl State {
    /// Reads the state file; a missing file is a fresh state, a corrupt one is an error (the
    /// agent refuses to start rather than forget pods silently).
    pub fn load(path: &Path) -> Result<State> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::State {
                path: path.into(),
                msg: format!("line {} column {}: {e}", e.line(), e.column()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(Error::io("reading the state file", path, e)),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("creating the state directory", dir, e))?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::State {
            path: path.into(),
            msg: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(|e| Error::io("writing the state file", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("replacing the state file", path, e))
    }

    pub fn find_by_name(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name.as_deref() == Some(name))
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

/// The map key form of an address: IPv6 words as the kernel stores them, IPv4 IPv4-mapped.
pub fn ip_key(ip: &IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(*v6, |v4| v4.to_ipv6_mapped()),
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_match_the_kernel_form() {
        let k = ip_key(&"10.1.2.3".parse().unwrap());
        assert_eq!(
            k,
            dataplane_common::ipv4_mapped(u32::from_ne_bytes([10, 1, 2, 3]))
        );
        // A v4-mapped v6 address is the same pod as its v4 form.
        assert_eq!(ip_key(&"::ffff:10.1.2.3".parse().unwrap()), k);
    }

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
    fn state_round_trips_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("meshlane-state-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut s = State::default();
        s.pods.push(Pod {
            id: 1,
            name: Some("a/b".into()),
            netns: "/run/netns/x".into(),
            netns_cookie: 42,
            ips: vec!["10.0.0.2".parse().unwrap()],
            sidecar: Some(SidecarSpec::default()),
        });
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), s);
        std::fs::write(&path, "{\"pods\": 3}").unwrap();
        let e = State::load(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
