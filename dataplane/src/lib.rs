//! meshlane's node agent as a library: `meshlane-agent`'s `main` only parses flags and calls
//! [`runtime::run`].
//!
//! The agent owns the kernel programs and their maps on one node: it loads and pins them,
//! attaches them to one cgroup subtree, enrolls pods, proves the fast path with a self-test before
//! switching it on, and answers the local API. It must never enroll the host network namespace,
//! and stopping it (gracefully or not) must never disturb established connections.
//!
//! | module | job |
//! |---|---|
//! | [`loader`] | load the embedded ELF, check and reuse pins, attach, unpin |
//! | [`maps`] | typed access to every map |
//! | [`addr`] | IP ⇄ map key (IPv4-mapped IPv6) |
//! | [`pods`] | enroll, remove, reconcile pods |
//! | [`services`] | services file watcher and service-table writer |
//! | [`cni_queue`] | applying what the CNI plugin queued while the agent was away |
//! | [`state`] | what survives a restart (state file) |
//! | [`agent`] | start-up policy, request dispatch, status |
//! | [`server`] | the local API socket |
//! | [`metrics`] | `/metrics` |
//! | [`telemetry`] | flow events → totals, live counts, records for `observe` |
//! | `ring` | the flow event ring buffer, released only after a checkpoint |
//! | [`selftest`] | the start-up self-test |
//! | [`runtime`] | what runs after start-up, until a signal or `uninstall` |
//! | `sys`, `bpf_sys`, `ring` | the raw syscalls and the ring's mapping (the only modules with `unsafe`) |
#![deny(unsafe_code)]

pub mod addr;
pub mod agent;
#[allow(unsafe_code)]
mod bpf_sys;
pub mod cni_queue;
mod error;
pub mod http;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod pods;
#[allow(unsafe_code)]
mod ring;
pub mod runtime;
pub mod selftest;
pub mod server;
pub mod services;
pub mod state;
#[allow(unsafe_code)]
mod sys;
pub mod telemetry;

pub use error::{Error, Result};
pub use meshlane_api::defaults;
