//! The plugin's configuration and the per-pod policy: which keys the network configuration may
//! carry, what `CNI_ARGS` may override, and the one place that decides a pod's mode (the
//! controller will add Kubernetes labels as a source here).

use std::{collections::HashMap, path::PathBuf};

use meshlane_api::types::{AccelSpec, SidecarSpec};
use rscni_plugin::error::Error;
use serde_json::Value;

/// What the plugin does with a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Enroll it: same-node traffic skips the stack.
    Accelerate,
    /// Enroll it with sidecar capture (the configuration's `sidecar` settings).
    Sidecar,
    /// Leave it alone.
    Off,
}

impl Mode {
    fn parse(v: &str, field: &str) -> Result<Mode, Error> {
        match v {
            "accelerate" => Ok(Mode::Accelerate),
            "sidecar" => Ok(Mode::Sidecar),
            "off" => Ok(Mode::Off),
            other => Err(Error::InvalidNetworkConfig(format!(
                "{field}: {other:?} is not a mode; expected \"accelerate\", \"sidecar\" or \"off\""
            ))),
        }
    }
}

/// The plugin's own keys of its network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginConf {
    /// `agentSocket`: the agent's API socket.
    pub agent_socket: PathBuf,
    /// `queueDir`: where requests wait while the agent is away.
    pub queue_dir: PathBuf,
    /// `mode`: the default for pods of this network.
    pub mode: Mode,
    /// `sidecar`: capture settings for `sidecar` mode (Istio's defaults when absent).
    pub sidecar: SidecarSpec,
    /// `accel`: what of the network's pods' traffic may take the fast path (all when absent).
    pub accel: Option<AccelSpec>,
}

/// Keys of our plugin object besides the CNI standard ones.
const KEYS: [&str; 5] = ["agentSocket", "queueDir", "mode", "sidecar", "accel"];
/// Keys the CNI runtime itself adds (the GC attachments' older spelling).
const RUNTIME_PREFIX: &str = "cni.dev/";

impl PluginConf {
    /// Reads our keys from the configuration's extra fields, with an error naming the field.
    pub fn from_custom(custom: &HashMap<String, Value>) -> Result<PluginConf, Error> {
        let mut unknown: Vec<&str> = custom
            .keys()
            .map(String::as_str)
            .filter(|k| !KEYS.contains(k) && !k.starts_with(RUNTIME_PREFIX))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(Error::InvalidNetworkConfig(format!(
                "unknown key(s) {} in the meshlane plugin's configuration; it knows {}",
                unknown.join(", "),
                KEYS.join(", ")
            )));
        }
        let string = |key: &str| -> Result<Option<String>, Error> {
            match custom.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(other) => Err(Error::InvalidNetworkConfig(format!(
                    "{key}: expected a non-empty string, found {other}"
                ))),
            }
        };
        let path = |key: &str, default: &str| -> Result<PathBuf, Error> {
            let p = PathBuf::from(string(key)?.unwrap_or_else(|| default.to_string()));
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(Error::InvalidNetworkConfig(format!(
                    "{key}: {} must be an absolute path",
                    p.display()
                )))
            }
        };
        let mode = match string("mode")? {
            Some(m) => Mode::parse(&m, "mode")?,
            None => Mode::Accelerate,
        };
        let sidecar = match custom.get("sidecar") {
            None | Some(Value::Null) => SidecarSpec::default(),
            Some(v) => {
                let sc: SidecarSpec = serde_json::from_value(v.clone())
                    .map_err(|e| Error::InvalidNetworkConfig(format!("sidecar: {e}")))?;
                sc.validate().map_err(Error::InvalidNetworkConfig)?;
                sc
            }
        };
        let accel = match custom.get("accel") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let a: AccelSpec = serde_json::from_value(v.clone())
                    .map_err(|e| Error::InvalidNetworkConfig(format!("accel: {e}")))?;
                a.validate().map_err(Error::InvalidNetworkConfig)?;
                Some(a)
            }
        };
        Ok(PluginConf {
            agent_socket: path("agentSocket", meshlane_api::defaults::API_SOCKET)?,
            queue_dir: path("queueDir", meshlane_api::defaults::CNI_QUEUE_DIR)?,
            mode,
            sidecar,
            accel,
        })
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`. Runtimes send more keys than a plugin
/// knows (`IgnoreUnknown=1;K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;K8S_POD_INFRA_CONTAINER_ID=…`),
/// so unknown keys are accepted; a pair without `=` is an error.
pub fn parse_cni_args(args: Option<&str>) -> Result<HashMap<String, String>, Error> {
    let mut out = HashMap::new();
    for pair in args
        .unwrap_or_default()
        .split(';')
        .filter(|p| !p.is_empty())
    {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(Error::InvalidEnvValue(format!(
                "CNI_ARGS: {pair:?} is not KEY=VALUE"
            )));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The pod's NAMESPACE/NAME from `CNI_ARGS`, when the runtime gave both.
pub fn pod_name(args: &HashMap<String, String>) -> Option<String> {
    match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
        (Some(ns), Some(n)) if !ns.is_empty() && !n.is_empty() => Some(format!("{ns}/{n}")),
        _ => None,
    }
}

/// The one place a pod's mode is decided: the network's default, overridden per pod by
/// `CNI_ARGS` `MESHLANE_MODE`.
pub fn effective_mode(conf: &PluginConf, args: &HashMap<String, String>) -> Result<Mode, Error> {
    match args.get("MESHLANE_MODE") {
        Some(m) => Mode::parse(m, "CNI_ARGS MESHLANE_MODE"),
        None => Ok(conf.mode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom(v: Value) -> HashMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_overrides() {
        let c = PluginConf::from_custom(&custom(serde_json::json!({}))).unwrap();
        assert_eq!(c.mode, Mode::Accelerate);
        assert_eq!(
            c.agent_socket,
            PathBuf::from(meshlane_api::defaults::API_SOCKET)
        );
        let args = parse_cni_args(Some(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc;MESHLANE_MODE=off",
        ))
        .unwrap();
        assert_eq!(pod_name(&args).as_deref(), Some("default/web-1"));
        assert_eq!(effective_mode(&c, &args).unwrap(), Mode::Off);
        let c = PluginConf::from_custom(&custom(serde_json::json!({
            "mode": "sidecar", "agentSocket": "/run/x.sock", "queueDir": "/var/q",
            "sidecar": {"exclude_outbound_ports": [22]}
        })))
        .unwrap();
        assert_eq!(
            (c.mode, c.sidecar.exclude_outbound_ports.clone()),
            (Mode::Sidecar, vec![22])
        );
        assert_eq!(effective_mode(&c, &HashMap::new()).unwrap(), Mode::Sidecar);
    }

    #[test]
    fn bad_values_name_their_field() {
        for (conf, field) in [
            (serde_json::json!({"mode": "turbo"}), "mode"),
            (serde_json::json!({"mode": 3}), "mode"),
            (
                serde_json::json!({"agentSocket": "relative.sock"}),
                "agentSocket",
            ),
            (serde_json::json!({"queueDir": ""}), "queueDir"),
            (
                serde_json::json!({"sidecar": {"proxy_uid": 0}}),
                "proxy_uid",
            ),
            (serde_json::json!({"sidecar": {"bogus": 1}}), "sidecar"),
            (serde_json::json!({"agentsocket": "/x"}), "agentsocket"),
            (
                serde_json::json!({"accel": {"exclude_ports": [0]}}),
                "exclude_ports[0]",
            ),
            (serde_json::json!({"accel": {"enabled": "no"}}), "accel"),
        ] {
            let e = PluginConf::from_custom(&custom(conf.clone())).unwrap_err();
            assert!(matches!(e, Error::InvalidNetworkConfig(_)), "{conf}: {e:?}");
            assert!(format!("{e:?}").contains(field), "{conf}: {e:?}");
        }
        let e = parse_cni_args(Some("K8S_POD_NAME=a;garbage")).unwrap_err();
        assert!(matches!(e, Error::InvalidEnvValue(_)), "{e:?}");
        let c = PluginConf::from_custom(&HashMap::new()).unwrap();
        let args = parse_cni_args(Some("MESHLANE_MODE=fast")).unwrap();
        assert!(format!("{:?}", effective_mode(&c, &args).unwrap_err()).contains("MESHLANE_MODE"));
    }
}
