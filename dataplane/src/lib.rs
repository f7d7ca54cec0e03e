//! meshlane's node agent as a library: `meshlane-agent` and `meshlane` only parse flags and wire
//! these modules together.
//!
//! The agent owns the kernel programs and their maps on one node: it loads and pins them,
//! attaches them to one cgroup subtree, enrolls pods, proves the fast path with a self-test before
//! switching it on, and answers the local API. It must never enroll the host network namespace,
//! and stopping it (gracefully or not) must never disturb established connections.

pub mod agent;
pub mod api;
mod bpf_sys;
pub mod dataplane;
mod error;
pub mod metrics;
pub mod selftest;
pub mod server;
pub mod service_table;
pub mod services;
pub mod state;
pub mod sys;

pub use error::{Error, Result};

/// The kernel programs, built by `build.rs` from `dataplane-ebpf`.
pub static EBPF_ELF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

/// Defaults shared by the agent and the CLI.
pub mod defaults {
    pub const API_SOCKET: &str = "/run/meshlane/agent.sock";
    pub const BPFFS: &str = "/sys/fs/bpf/meshlane";
    pub const STATE_FILE: &str = "/run/meshlane/state.json";
    pub const METRICS_ADDR: &str = "127.0.0.1:9464";
}
