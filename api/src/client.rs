//! A blocking client of the agent API: the CLI and the CNI plugin are synchronous programs.
//! Every call has a timeout; a refusal comes back as [`ClientError::Refused`] with its kind.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;

use crate::{
    types::{
        Accel, AccelSpec, AttachmentRef, GcReport, Pod, Services, SidecarSpec, SocketInfo, Status,
        Uninstalled,
    },
    wire::{ErrorKind, Refusal, Request, Response},
};

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
    Refused(Refusal),
}

impl ClientError {
    /// The refusal's kind, if the agent refused the request.
    pub fn refusal_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Refused(r) => Some(r.kind),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

pub struct Client {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
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

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn protocol(&self, msg: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// Sends a raw line (tests use it to send malformed requests) and returns the response.
    /// If the agent stops reading before the line is written (it refuses an oversized request
    /// and closes), the answer it sent is still read and returned.
    pub fn call_raw(&mut self, line: &str) -> Result<Response> {
        let s = self.stream.get_mut();
        let written = s
            .write_all(line.as_bytes())
            .and_then(|()| s.write_all(b"\n"));
        let mut resp = String::new();
        let n = match self.stream.read_line(&mut resp) {
            Ok(n) => n,
            // The write error is the more useful one when both failed.
            Err(e) => return Err(self.io(written.err().unwrap_or(e))),
        };
        if n == 0 {
            return Err(match written {
                Err(e) => self.io(e),
                Ok(()) => self.protocol("connection closed without a response"),
            });
        }
        serde_json::from_str(&resp).map_err(|e| self.protocol(e.to_string()))
    }

    /// Sends a request and returns its untyped result (what `--json` prints).
    pub fn call_json(&mut self, req: &Request) -> Result<serde_json::Value> {
        let line = serde_json::to_string(req).map_err(|e| self.protocol(e.to_string()))?;
        let resp = self.call_raw(&line)?;
        match (resp.ok, resp.error) {
            (true, _) => Ok(resp.result),
            (false, Some(r)) => Err(ClientError::Refused(r)),
            (false, None) => Err(ClientError::Refused(Refusal::new(
                ErrorKind::Internal,
                "refused without a reason",
            ))),
        }
    }

    /// Sends a request and decodes its answer as `T`.
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T> {
        let v = self.call_json(req)?;
        serde_json::from_value(v).map_err(|e| {
            self.protocol(format!(
                "the answer to {} is not what was expected: {e}",
                req.op()
            ))
        })
    }

    pub fn pod_add(
        &mut self,
        netns: PathBuf,
        ips: Vec<IpAddr>,
        name: Option<String>,
        sidecar: Option<SidecarSpec>,
        accel: Option<AccelSpec>,
    ) -> Result<Pod> {
        self.call(&Request::PodAdd {
            netns,
            ips,
            name,
            sidecar,
            accel,
            telemetry: None,
            cni: None,
        })
    }

    pub fn pod_del(&mut self, netns: Option<PathBuf>, name: Option<String>) -> Result<Pod> {
        self.call(&Request::PodDel {
            netns,
            name,
            attachment: None,
        })
    }

    pub fn pod_gc(&mut self, network: String, valid: Vec<AttachmentRef>) -> Result<GcReport> {
        self.call(&Request::PodGc { network, valid })
    }

    pub fn pod_list(&mut self) -> Result<Vec<Pod>> {
        self.call(&Request::PodList)
    }

    pub fn sockets(&mut self) -> Result<Vec<SocketInfo>> {
        self.call(&Request::Sockets)
    }

    pub fn status(&mut self) -> Result<Status> {
        self.call(&Request::Status)
    }

    pub fn services(&mut self) -> Result<Services> {
        self.call(&Request::Services)
    }

    pub fn accel(&mut self, on: bool, move_established: bool) -> Result<Accel> {
        self.call(&Request::Accel {
            on,
            move_established,
        })
    }

    pub fn flows(&mut self, query: crate::flows::FlowQuery) -> Result<crate::flows::Flows> {
        self.call(&Request::Flows { query })
    }

    pub fn uninstall(&mut self) -> Result<Uninstalled> {
        self.call(&Request::Uninstall)
    }
}
