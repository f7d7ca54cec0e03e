//! The meshlane agent's API, as every other program speaks it: the CLI, the CNI plugin and the
//! controller depend on this crate, never on the agent or on aya, so none of them needs the
//! eBPF toolchain to build.
//!
//! It owns:
//! - [`wire`]: requests, responses and refusals (with an [`ErrorKind`] a caller can map to its
//!   own error codes, e.g. CNI's), one JSON object per line over the agent's unix socket;
//! - [`types`]: the typed answers (pods, sockets, status, services) and the inputs they carry
//!   (sidecar settings, pod names and IPs) with their validators;
//! - [`client`]: a small blocking client with timeouts;
//! - [`services`]: the services file format (what the agent reads with `--services` and
//!   `meshlane services check` validates offline) and [`services::ServiceSpec`], the typed
//!   service table.
//!
//! - [`flows`]: flow telemetry records (`meshlane observe`) and their query;
//! - [`pins`]: where the agent pins its maps and links, and their removal without an agent;
//! - [`queue`]: the CNI plugin's queue of requests for an agent that is away.
//!
//! It must never make BPF syscalls or enter namespaces: it is plain data, files and one socket.
#![deny(unsafe_code)]

pub mod client;
pub mod flows;
pub mod pins;
pub mod queue;
pub mod services;
pub mod types;
pub mod wire;

pub use client::{Client, ClientError};
pub use wire::{ErrorKind, Refusal, Request, Response};

/// Defaults shared by the agent and its clients.
pub mod defaults {
    /// The agent's API socket.
    pub const API_SOCKET: &str = "/run/meshlane/agent.sock";
    /// The agent's bpffs directory (pins live under `v<ABI>/` inside it).
    pub const BPFFS: &str = "/sys/fs/bpf/meshlane";
    /// The agent's state file.
    pub const STATE_FILE: &str = "/run/meshlane/state.json";
    /// The agent's Prometheus endpoint.
    pub const METRICS_ADDR: &str = "127.0.0.1:9464";
    /// Where the CNI plugin queues requests while the agent is away.
    pub const CNI_QUEUE_DIR: &str = "/var/lib/meshlane/cni-queue";
}
