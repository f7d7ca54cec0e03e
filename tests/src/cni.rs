//! The lab's CNI network: pods are made by a real CNI runtime (cnitool, on libcni) running a
//! real conflist — Debian's `bridge`, `host-local` and `portmap` plus `meshlane` — inside the
//! lab's node namespace, so the bridge lives there and never in the host's.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{Lab, bin, succeeded};

/// The lab network's name (the conflist's `name`).
pub const NETWORK: &str = "mlab";
/// Debian's plugins (containernetworking-plugins 1.1.1, spec ≤ 1.0.0).
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// Where the set-up keeps what it builds (deploy/setup/lib.sh).
fn cache() -> PathBuf {
    std::env::var_os("MESHLANE_CACHE").map_or_else(|| "/var/cache/meshlane".into(), PathBuf::from)
}

/// cnitool v1.3.1, built by `deploy/setup-tests.sh`.
pub fn cnitool() -> Result<PathBuf> {
    let p = cache().join("bin/cnitool-v1.3.1");
    if !p.exists() {
        bail!("{} is missing: run deploy/setup-tests.sh", p.display());
    }
    Ok(p)
}

/// The reference plugins v1.10.0 (spec 1.1.0: STATUS and GC), built by the set-up.
pub fn reference_plugins() -> Result<PathBuf> {
    let p = cache().join("cni/v1.10.0");
    if !p.join("bridge").exists() {
        bail!("{} is missing: run deploy/setup-tests.sh", p.display());
    }
    Ok(p)
}

/// A network configuration of the lab: its directories and the list it runs.
#[derive(Clone, Debug)]
pub struct Network {
    /// NETCONFPATH: holds the conflist.
    pub conf_dir: PathBuf,
    /// CNI_PATH: the plugins, `meshlane` among them.
    pub bin_dir: PathBuf,
    pub conflist: Value,
}

/// The conflist: `bridge` (no gateway, no masquerade: the lab's pods only talk to each other),
/// `host-local` handing out 10.77.0.10+ and fd77::a+ in order, `portmap`, then `meshlane` with
/// the lab agent's socket and queue.
pub fn conflist(lab: &Lab, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "br0",
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": lab.dir.join("cni/ipam"),
                    "ranges": [
                        [{"subnet": "10.77.0.0/24", "rangeStart": "10.77.0.10"}],
                        [{"subnet": "fd77::/64", "rangeStart": "fd77::a"}]
                    ]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {
                "type": "meshlane",
                "agentSocket": lab.dir.join("agent.sock"),
                "queueDir": lab.cni_queue_dir()
            }
        ]
    })
}

/// Writes a network into `<lab>/<name>/`: the conflist and a plugin dir with links to
/// `plugins` (bridge, host-local, portmap) and to the built `meshlane-cni` as `meshlane`.
pub fn write(lab: &Lab, name: &str, conflist: &Value, plugins: &Path) -> Result<Network> {
    let root = lab.dir.join(name);
    let conf_dir = root.join("net.d");
    let bin_dir = root.join("bin");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&bin_dir)?;
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        let from = plugins.join(p);
        let to = bin_dir.join(p);
        if from.exists() && !to.exists() {
            std::os::unix::fs::symlink(&from, &to)?;
        }
    }
    let me = bin_dir.join("meshlane");
    if !me.exists() {
        std::os::unix::fs::symlink(bin("meshlane-cni")?, &me)?;
    }
    std::fs::write(
        conf_dir.join(format!("10-{NETWORK}.conflist")),
        serde_json::to_vec_pretty(conflist)?,
    )?;
    Ok(Network {
        conf_dir,
        bin_dir,
        conflist: conflist.clone(),
    })
}

/// The lab's own network (spec 1.0.0, Debian's plugins), in `<lab>/cni/`.
pub(crate) fn write_network(lab: &Lab) -> Result<Network> {
    write(
        lab,
        "cni",
        &conflist(lab, "1.0.0"),
        Path::new(DEBIAN_PLUGINS),
    )
}

fn lab_network(lab: &Lab) -> Network {
    let root = lab.dir.join("cni");
    Network {
        conf_dir: root.join("net.d"),
        bin_dir: root.join("bin"),
        conflist: Value::Null,
    }
}

/// What ADD made of a pod.
#[derive(Clone, Debug)]
pub struct Added {
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The veth end on the bridge, in the node namespace.
    pub host_veth: String,
    /// The chain's result as cnitool printed it.
    pub result: Value,
}

/// Runs `cnitool <cmd> <network> <netns>` in the lab's node namespace.
pub fn cnitool_run(
    lab: &Lab,
    net: &Network,
    cmd: &str,
    netns: Option<&Path>,
    cni_args: &str,
) -> Result<Output> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.node_ns])
        .arg(cnitool()?)
        .arg(cmd)
        .arg(NETWORK);
    if let Some(ns) = netns {
        c.arg(ns);
    }
    c.env("NETCONFPATH", &net.conf_dir)
        .env("CNI_PATH", &net.bin_dir)
        .env("CNI_ARGS", cni_args)
        .stdin(Stdio::null());
    c.output().context("running cnitool")
}

/// `CNI_ARGS` as a Kubernetes runtime sends them, plus `extra`.
pub fn k8s_args(name: &str, extra: &[(&str, &str)]) -> String {
    let mut parts = vec![
        "IgnoreUnknown=1".to_string(),
        "K8S_POD_NAMESPACE=lab".to_string(),
        format!("K8S_POD_NAME={name}"),
    ];
    parts.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    parts.join(";")
}

/// ADD through the chain of `net`; fails with cnitool's output when the chain fails.
pub fn add_to(lab: &Lab, net: &Network, netns: &Path, cni_args: &str) -> Result<Added> {
    let out = succeeded(
        cnitool_run(lab, net, "add", Some(netns), cni_args)?,
        format!("cnitool add {}", netns.display()),
    )?;
    let result: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "cnitool add printed {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let host_veth = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty) && i["name"] != "br0")
        .and_then(|i| i["name"].as_str())
        .context("the result names no host-side veth")?
        .to_string();
    let mut ip4 = None;
    let mut ip6 = None;
    for ip in result["ips"].as_array().into_iter().flatten() {
        let addr = ip["address"].as_str().unwrap_or_default();
        let bare = addr.split('/').next().unwrap_or_default();
        if let Ok(a) = bare.parse::<Ipv4Addr>() {
            ip4 = Some(a);
        } else if let Ok(a) = bare.parse::<Ipv6Addr>() {
            ip6 = Some(a);
        }
    }
    Ok(Added {
        ip4: ip4.context("the result has no IPv4 address")?,
        ip6: ip6.context("the result has no IPv6 address")?,
        host_veth,
        result,
    })
}

pub(crate) fn add(lab: &Lab, netns: &Path, name: &str, extra: &[(&str, &str)]) -> Result<Added> {
    add_to(lab, &lab_network(lab), netns, &k8s_args(name, extra))
}

/// DEL of a lab pod through the lab's chain.
pub fn del_pod(lab: &Lab, pod: &crate::Pod) -> Result<()> {
    del(lab, &pod.netns_path)
}

/// DEL through the lab's chain.
pub(crate) fn del(lab: &Lab, netns: &Path) -> Result<()> {
    succeeded(
        cnitool_run(lab, &lab_network(lab), "del", Some(netns), "")?,
        format!("cnitool del {}", netns.display()),
    )
    .map(drop)
}
