//! `meshlane-cni`: the chained CNI plugin that hands pods to the meshlane agent, and the node
//! install that puts it in the chain.
//!
//! It is small and synchronous: it reads the network configuration and `CNI_*` environment
//! (through `rscni-plugin`, which applies libcni's validators and error codes and owns stdout),
//! talks to the agent through `meshlane-api` — never the agent's library, never aya — and
//! prints only the result or error JSON on stdout; its log lines go to stderr.
//!
//! It must never make a pod fail to start because of the agent: when the agent is away, `ADD`
//! succeeds without acceleration and the enrollment is queued on disk for the agent to apply;
//! `DEL` and `GC` are queued likewise. Only a broken configuration or environment is an error.

#![deny(unsafe_code)]

pub mod config;
pub mod install;
pub mod plugin;
