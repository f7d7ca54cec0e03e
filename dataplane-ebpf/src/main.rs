//! meshlane's kernel programs, one module per attach point, all in one ELF so they share maps.
//!
//! - `sockops` (cgroup/sock_ops): puts established TCP sockets of enrolled network namespaces into
//!   the SOCKHASH.
//! - `sk_msg` (sk_msg on the SOCKHASH): hands each message to the peer socket when the peer is a
//!   local, enrolled socket; everything else goes to the stack.
//! - `sock_addr` (cgroup connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6): Service
//!   translation and sidecar capture at connect time, and the reverse view for the application.
//! - `getsockopt` (cgroup/getsockopt): `SO_ORIGINAL_DST` for captured connections.
//! - `reader_guard` (tracepoints on splice/sendfile, `tcp_rcv_space_adjust` and
//!   `sock_recv_length`; cgroup/setsockopt): finds pods reading with splice(2), sendfile(2),
//!   `MSG_WAITALL` or `SO_RCVLOWAT`, which redirected bytes cannot serve, so sockops keeps them
//!   off the fast path.
//! - `telemetry` (tracepoints `sock_send_length`, `tcp_destroy_sock`; with sockops and
//!   `sock_recv_length`): per-connection flows with exact bytes by path, RTT and retransmits,
//!   as open/close events in a ring buffer.
//! - `payload` (inside the length tracepoints, from the syscall's saved user registers): the
//!   first bytes of application reads and writes where an HTTP message can start, for the agent.
//!
//! These programs must never drop traffic: every error path passes to the stack and counts why.
#![no_std]
#![no_main]
// The BPF atomic add for byte counters (telemetry.rs); this crate builds with the pinned nightly.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod getsockopt;
mod key;
mod maps;
mod payload;
mod reader_guard;
mod sk_msg;
mod sock_addr;
mod sockops;
mod telemetry;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
