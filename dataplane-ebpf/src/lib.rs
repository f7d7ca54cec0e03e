//! Empty on purpose: `dataplane/build.rs` depends on this package so that cargo rebuilds the
//! agent when the kernel programs change; the programs themselves are the `dataplane` binary.
#![no_std]
