//! The agent's local API: one JSON object per line over a unix socket (mode 0600), answered by
//! one JSON object per line. The CLI and, later, the CNI plugin speak it; it is small enough to
//! drive with `socat` by hand.
//!
//! ```text
//! → {"op":"pod_add","netns":"/run/netns/a","ips":["10.0.0.2"],"name":"default/a"}
//! ← {"ok":true,"result":{...}}
//! ← {"ok":false,"error":"pod_add: netns /run/netns/x: No such file or directory"}
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Largest request line the agent reads; longer ones are refused before parsing.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Enroll a pod: its network namespace and its IPs on this node.
    PodAdd {
        netns: PathBuf,
        ips: Vec<IpAddr>,
        #[serde(default)]
        name: Option<String>,
        /// Capture the pod's traffic for its sidecar proxy (Istio's model); absent: no capture.
        #[serde(default)]
        sidecar: Option<crate::state::SidecarSpec>,
    },
    /// Remove a pod, by netns path or by NAMESPACE/NAME.
    PodDel {
        #[serde(default)]
        netns: Option<PathBuf>,
        #[serde(default)]
        name: Option<String>,
    },
    PodList,
    /// Sockets in the fast path with their byte counters.
    Sockets,
    Status,
    /// The whole service table with per-service counters.
    Services,
    /// The kill switch.
    Accel {
        on: bool,
    },
    /// Detach and unpin everything, then stop the agent.
    Uninstall,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            result: serde_json::Value::Null,
        }
    }
}

/// Parses one request line, with an error that says what was wrong.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request of {} bytes is larger than the {MAX_REQUEST_BYTES}-byte limit",
            line.len()
        ));
    }
    serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source} (is meshlane-agent running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} sent an invalid response: {msg}")]
    Protocol { path: PathBuf, msg: String },
    #[error("{0}")]
    Refused(String),
}

/// A blocking client: the CLI and the CNI plugin are synchronous programs.
pub struct Client {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.into(),
            source,
        })?;
        let io = |source| ClientError::Io {
            path: path.into(),
            source,
        };
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(Client {
            path: path.into(),
            stream: BufReader::new(s),
        })
    }

    /// Sends a raw line (used by tests to send malformed requests) and returns the response.
    pub fn call_raw(&mut self, line: &str) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let s = self.stream.get_mut();
        s.write_all(line.as_bytes()).map_err(io)?;
        s.write_all(b"\n").map_err(io)?;
        let mut resp = String::new();
        let n = self
            .stream
            .read_line(&mut resp)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Protocol {
                path: self.path.clone(),
                msg: "connection closed without a response".into(),
            });
        }
        serde_json::from_str(&resp).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    /// Sends a request; a refusal by the agent becomes `ClientError::Refused`.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let line = serde_json::to_string(req).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        let resp = self.call_raw(&line)?;
        if resp.ok {
            Ok(resp.result)
        } else {
            Err(ClientError::Refused(
                resp.error
                    .unwrap_or_else(|| "refused without a reason".into()),
            ))
        }
    }
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
            }
        );
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
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(
                e.contains(want),
                "{line}: got {e:?}, wanted it to mention {want:?}"
            );
        }
        let big = format!(
            r#"{{"op":"status","x":"{}"}}"#,
            "a".repeat(MAX_REQUEST_BYTES)
        );
        assert!(parse_request(&big).unwrap_err().contains("limit"));
    }
}
