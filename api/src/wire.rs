//! The wire form: one JSON object per line over a unix socket (mode 0600), answered by one JSON
//! object per line. Small enough to drive with `socat` by hand.
//!
//! ```text
//! → {"op":"pod_add","netns":"/run/netns/a","ips":["10.0.0.2"],"name":"default/a"}
//! ← {"ok":true,"result":{"id":1,...}}
//! ← {"ok":false,"error":{"kind":"invalid_input","message":"pod add: netns /run/netns/x: No such file or directory"}}
//! ```
//!
//! Each request's answer has one type (see [`crate::types`]); [`crate::Client`] has one method
//! per request that returns it.

use std::{fmt, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    flows::FlowQuery,
    types::{AccelSpec, AttachmentRef, CniAttachment, SidecarSpec},
};

/// Largest request line the agent reads; longer ones are refused (and drained up to
/// [`MAX_DRAIN_BYTES`], so the refusal reaches a client that is still writing).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How much of an oversized request the agent reads and discards before it answers and closes.
pub const MAX_DRAIN_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Enroll a pod: its network namespace and its IPs on this node. Answer: [`crate::types::Pod`].
    PodAdd {
        netns: PathBuf,
        ips: Vec<IpAddr>,
        #[serde(default)]
        name: Option<String>,
        /// Capture the pod's traffic for its sidecar proxy (Istio's model); absent: no capture.
        #[serde(default)]
        sidecar: Option<SidecarSpec>,
        /// Keep all of the pod's traffic, or some ports, out of the fast path; absent: none.
        #[serde(default)]
        accel: Option<AccelSpec>,
        /// Observe the pod's connections (flow telemetry); absent: yes.
        #[serde(default)]
        telemetry: Option<bool>,
        /// Set by the CNI plugin: the attachment this enrollment belongs to. Adding the same
        /// attachment for the same netns again answers the existing pod (CNI retries ADD).
        #[serde(default)]
        cni: Option<CniAttachment>,
    },
    /// Remove a pod, by exactly one of netns path, NAMESPACE/NAME or CNI attachment. Answer:
    /// the removed [`crate::types::Pod`].
    PodDel {
        #[serde(default)]
        netns: Option<PathBuf>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        attachment: Option<AttachmentRef>,
    },
    /// Remove every enrollment the CNI plugin made for `network` that `valid` does not name
    /// (CNI `GC`); pods enrolled by hand stay. Answer: [`crate::types::GcReport`].
    PodGc {
        network: String,
        valid: Vec<AttachmentRef>,
    },
    /// Answer: every enrolled [`crate::types::Pod`].
    PodList,
    /// Sockets in the fast path with their byte counters. Answer: [`crate::types::SocketInfo`]s.
    Sockets,
    /// Answer: [`crate::types::Status`].
    Status,
    /// The whole service table with per-service counters. Answer: [`crate::types::Services`].
    Services,
    /// The kill switch. Answer: [`crate::types::Accel`].
    Accel {
        on: bool,
        /// With `on: false`: connections already in the fast path go through the stack too,
        /// at once (otherwise they stay in it until they close). Refused where the self-test
        /// found that a SOCKHASH socket receiving through the stack misreports to its reader.
        #[serde(default)]
        move_established: bool,
    },
    /// Detach and unpin everything, then stop the agent. Answer: [`crate::types::Uninstalled`].
    Uninstall,
    /// Recent flow records, filtered. Answer: [`crate::flows::Flows`].
    Flows {
        #[serde(default)]
        query: FlowQuery,
    },
}

impl Request {
    /// The `op` name, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::PodAdd { .. } => "pod_add",
            Request::PodDel { .. } => "pod_del",
            Request::PodGc { .. } => "pod_gc",
            Request::PodList => "pod_list",
            Request::Sockets => "sockets",
            Request::Status => "status",
            Request::Services => "services",
            Request::Accel { .. } => "accel",
            Request::Uninstall => "uninstall",
            Request::Flows { .. } => "flows",
        }
    }
}

/// What kind of refusal this is: what a caller can act on without reading the message (a CNI
/// plugin maps these to CNI error codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or a value in it is not acceptable; retrying it cannot help.
    InvalidInput,
    /// The pod (or other object) named does not exist.
    NotFound,
    /// The request clashes with what exists (a netns, IP or name already enrolled).
    Conflict,
    /// The agent cannot do it now (the self-test failed, so acceleration stays off).
    Unavailable,
    /// The agent failed (a map or file operation); the message says which.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal error",
        })
    }
}

/// A refused request: a kind and a message that says what was wrong and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }
}

/// One response line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            result,
        }
    }

    pub fn refused(r: Refusal) -> Self {
        Response {
            ok: false,
            error: Some(r),
            result: serde_json::Value::Null,
        }
    }
}

/// Parses one request line, with a refusal that says what was wrong.
pub fn parse_request(line: &str) -> Result<Request, Refusal> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(Refusal::new(
            ErrorKind::InvalidInput,
            format!(
                "request of {} bytes is larger than the {MAX_REQUEST_BYTES}-byte limit",
                line.len()
            ),
        ));
    }
    serde_json::from_str(line)
        .map_err(|e| Refusal::new(ErrorKind::InvalidInput, format!("malformed request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pod_add() {
        let r = parse_request(
            r#"{"op":"pod_add","netns":"/run/netns/a","ips":["10.1.0.2","fd00::2"]}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::PodAdd {
                netns: "/run/netns/a".into(),
                ips: vec!["10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
                name: None,
                sidecar: None,
                accel: None,
                telemetry: None,
                cni: None,
            }
        );
        assert_eq!(r.op(), "pod_add");
    }

    #[test]
    fn rejects_bad_requests_with_a_reason() {
        for (line, want) in [
            ("{", "EOF"),
            (r#"{"op":"launch"}"#, "unknown variant"),
            (
                r#"{"op":"pod_add","netns":"/x","ips":["10.0.0.300"]}"#,
                "invalid IP",
            ),
            (r#"{"op":"pod_add","ips":[]}"#, "missing field `netns`"),
            (r#"{"op":"accel","on":true,"force":1}"#, "unknown field"),
            (
                r#"{"op":"accel","on":false,"move_established":"yes"}"#,
                "invalid type",
            ),
        ] {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput);
            assert!(
                e.message.contains(want),
                "{line}: got {e:?}, wanted it to mention {want:?}"
            );
        }
        let big = format!(
            r#"{{"op":"status","x":"{}"}}"#,
            "a".repeat(MAX_REQUEST_BYTES)
        );
        assert!(parse_request(&big).unwrap_err().message.contains("limit"));
    }

    #[test]
    fn refusals_round_trip_with_their_kind() {
        for kind in [
            ErrorKind::InvalidInput,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ] {
            let line = serde_json::to_string(&Response::refused(Refusal::new(kind, "m"))).unwrap();
            let back: Response = serde_json::from_str(&line).unwrap();
            assert_eq!(back.error, Some(Refusal::new(kind, "m")), "{line}");
            assert!(!back.ok);
        }
        let text = serde_json::to_string(&ErrorKind::InvalidInput).unwrap();
        assert_eq!(text, "\"invalid_input\"");
    }
}
