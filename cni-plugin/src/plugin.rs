//! The CNI operations. Each talks to the agent once, with a short timeout; when the agent
//! cannot be reached, the request goes to the queue instead and the operation succeeds.

use std::{net::IpAddr, time::Duration};

use meshlane_api::{
    Client, ClientError, ErrorKind, Request, queue,
    types::{AttachmentRef, CniAttachment},
};
use rscni_plugin::{
    cni::Cni,
    error::Error,
    types::{Args, CNIResult, GcAttachment},
};

use crate::config::{Mode, PluginConf, effective_mode, parse_cni_args, pod_name};

/// How long one call to the agent may take. ADD runs on a pod's start path: a slow agent must
/// not hold a pod for long; past this the request is queued.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The plugin.
#[derive(Debug, Default)]
pub struct MeshlaneCni;

fn log(msg: impl std::fmt::Display) {
    eprintln!("meshlane-cni: {msg}");
}

/// Whether an error means the agent is away (so the request is queued), not that it refused.
fn agent_away(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connect { .. } | ClientError::Io { .. } | ClientError::Protocol { .. }
    ) || e.refusal_kind() == Some(ErrorKind::Unavailable)
}

fn connect(conf: &PluginConf) -> Result<Client, ClientError> {
    Client::connect(&conf.agent_socket, AGENT_TIMEOUT)
}

/// Whether requests are waiting in the queue: then a new one must wait behind them, or it could
/// overtake them (a DEL sent at once while its container's ADD still waits would leave the ADD
/// to enroll a deleted pod).
fn queue_busy(conf: &PluginConf) -> bool {
    queue::entries(&conf.queue_dir).is_ok_and(|e| !e.is_empty())
}

fn enqueue(conf: &PluginConf, req: &Request, why: &str) -> Result<(), String> {
    match queue::enqueue(&conf.queue_dir, req) {
        Ok(p) => {
            log(format!("{why}; {} queued as {}", req.op(), p.display()));
            Ok(())
        }
        Err(q) => Err(format!("{why}; and queueing {} failed: {q}", req.op())),
    }
}

/// Sends `req` to the agent, or queues it when the agent is away or requests already wait.
fn send_or_queue(conf: &PluginConf, req: &Request) -> Result<(), String> {
    if queue_busy(conf) {
        return enqueue(conf, req, "earlier requests wait in the queue");
    }
    let sent = connect(conf).and_then(|mut c| c.call_json(req));
    match sent {
        Ok(_) => Ok(()),
        Err(e) if agent_away(&e) => enqueue(conf, req, &e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn attachment(args: &Args) -> Result<AttachmentRef, Error> {
    Ok(AttachmentRef {
        container_id: args
            .container_id()
            .ok_or_else(|| Error::missing_env(&["CNI_CONTAINERID"]))?
            .to_string(),
        ifname: args
            .ifname()
            .ok_or_else(|| Error::missing_env(&["CNI_IFNAME"]))?
            .to_string(),
    })
}

/// The pod's addresses from the previous plugin's result: those of interfaces inside the
/// container (`sandbox` set), or all of them when the result names no interface.
pub fn pod_ips(prev: &CNIResult) -> Vec<IpAddr> {
    prev.ips
        .iter()
        .filter(|ip| match ip.interface {
            None => true,
            Some(i) => prev
                .interfaces
                .get(i as usize)
                .is_some_and(|itf| itf.sandbox.as_ref().is_some_and(|s| !s.is_empty())),
        })
        .map(|ip| ip.address.addr())
        .collect()
}

fn plugin_conf(args: &Args) -> Result<PluginConf, Error> {
    PluginConf::from_custom(&args.config().custom)
}

impl Cni for MeshlaneCni {
    fn add(&self, args: Args) -> Result<CNIResult, Error> {
        let conf = plugin_conf(&args)?;
        let prev = args.config().prev_result.clone().ok_or_else(|| {
            Error::InvalidNetworkConfig(
                "prevResult is required: meshlane is a chained plugin and goes after the plugin that creates the pod's interface".into(),
            )
        })?;
        let cni_args = parse_cni_args(args.args())?;
        let mode = effective_mode(&conf, &cni_args)?;
        let key = attachment(&args)?;
        let netns = args
            .netns()
            .cloned()
            .ok_or_else(|| Error::missing_env(&["CNI_NETNS"]))?;
        if mode == Mode::Off {
            return Ok(prev);
        }
        let ips = pod_ips(&prev);
        if ips.is_empty() {
            log(format!(
                "container {}: the previous result has no pod address; not enrolled",
                key.container_id
            ));
            return Ok(prev);
        }
        let req = Request::PodAdd {
            netns,
            ips,
            name: pod_name(&cni_args),
            sidecar: (mode == Mode::Sidecar).then(|| conf.sidecar.clone()),
            accel: conf.accel.clone(),
            telemetry: None,
            cni: Some(CniAttachment {
                container_id: key.container_id,
                ifname: key.ifname,
                network: args.config().name.clone(),
            }),
        };
        // Never fail a pod because of the agent: whatever happens, the pod starts (through the
        // stack if it could not be enrolled), and the log says why.
        if let Err(e) = send_or_queue(&conf, &req) {
            log(format!("pod not accelerated: {e}"));
        }
        Ok(prev)
    }

    fn del(&self, args: Args) -> Result<(), Error> {
        let conf = plugin_conf(&args)?;
        let key = attachment(&args)?;
        let req = Request::PodDel {
            netns: None,
            name: None,
            attachment: Some(key),
        };
        if queue_busy(&conf) {
            // Nothing may be lost: the runtime retries a failed DEL.
            return enqueue(&conf, &req, "earlier requests wait in the queue")
                .map_err(Error::TryAgainLater);
        }
        let sent = connect(&conf).and_then(|mut c| c.call_json(&req));
        match sent {
            Ok(_) => Ok(()),
            // Unknown containers, a second DEL, pods never enrolled: nothing to do.
            Err(e) if e.refusal_kind() == Some(ErrorKind::NotFound) => Ok(()),
            Err(e) if agent_away(&e) => {
                enqueue(&conf, &req, &e.to_string()).map_err(Error::TryAgainLater)
            }
            Err(e) => Err(Error::Custom(
                100,
                "the agent refused the DEL".into(),
                e.to_string(),
            )),
        }
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        let conf = plugin_conf(&args)?;
        let cni_args = parse_cni_args(args.args())?;
        if effective_mode(&conf, &cni_args)? == Mode::Off {
            return Ok(());
        }
        let key = attachment(&args)?;
        let pods = connect(&conf)
            .and_then(|mut c| c.pod_list())
            .map_err(|e| Error::TryAgainLater(e.to_string()))?;
        if pods.iter().any(|p| p.is_attachment(&key)) {
            Ok(())
        } else {
            Err(Error::Custom(
                101,
                "pod not enrolled".into(),
                format!(
                    "the agent at {} has no enrollment for container {} interface {}",
                    conf.agent_socket.display(),
                    key.container_id,
                    key.ifname
                ),
            ))
        }
    }

    fn status(&self, args: Args) -> Result<(), Error> {
        let conf = plugin_conf(&args)?;
        // Ready while pods can be taken: by the agent, or by the queue while it restarts. A
        // failing STATUS marks the node's network not ready, so a restarting agent must not.
        let agent = connect(&conf).and_then(|mut c| c.status());
        match agent {
            Ok(_) => Ok(()),
            Err(e) => queue::writable(&conf.queue_dir).map_err(|q| {
                Error::PluginNotAvailable(format!(
                    "{e}; and the queue {} is not writable: {q}",
                    conf.queue_dir.display()
                ))
            }),
        }
    }

    fn gc(&self, args: Args) -> Result<(), Error> {
        let conf = plugin_conf(&args)?;
        let valid = valid_attachments(&args)?;
        let network = args.config().name.clone();
        let req = Request::PodGc {
            network: network.clone(),
            valid: valid.clone(),
        };
        if queue_busy(&conf) {
            return enqueue(&conf, &req, "earlier requests wait in the queue")
                .map_err(Error::TryAgainLater);
        }
        let sent = connect(&conf).and_then(|mut c| c.pod_gc(network, valid));
        match sent {
            Ok(report) => {
                for e in &report.errors {
                    log(format!("GC: {e}"));
                }
                Ok(())
            }
            Err(e) if agent_away(&e) => {
                enqueue(&conf, &req, &e.to_string()).map_err(Error::TryAgainLater)
            }
            Err(e) => Err(Error::Custom(
                100,
                "the agent refused the GC".into(),
                e.to_string(),
            )),
        }
    }
}

/// `cni.dev/valid-attachments` (spec 1.1.0), or its older spelling `cni.dev/attachments`.
fn valid_attachments(args: &Args) -> Result<Vec<AttachmentRef>, Error> {
    let conf = args.config();
    let list: Vec<GcAttachment> = match (
        &conf.valid_attachments,
        conf.custom.get("cni.dev/attachments"),
    ) {
        (Some(v), _) => v.clone(),
        (None, Some(v)) => serde_json::from_value(v.clone())
            .map_err(|e| Error::FailedToDecode(format!("cni.dev/attachments: {e}")))?,
        (None, None) => Vec::new(),
    };
    Ok(list
        .into_iter()
        .map(|a| AttachmentRef {
            container_id: a.container_id,
            ifname: a.ifname,
        })
        .collect())
}
