//! `meshlane-agent`: the node agent. Parses flags and wires the library's parts together.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::Parser;
use meshlane_agent::{
    agent::{Agent, Config},
    defaults,
    runtime::{self, Listen},
    selftest,
};

/// meshlane node agent: loads the sockops/sk_msg fast path, enrolls pods, serves the local API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// cgroup v2 directory to attach to (default: the cgroup v2 root). Tests give their lab's
    /// own subtree here.
    #[arg(long, env = "MESHLANE_CGROUP")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pins (mounted if it is not on bpffs).
    #[arg(long, env = "MESHLANE_BPFFS", default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    /// Unix socket of the local API (mode 0600).
    #[arg(long, env = "MESHLANE_API_SOCKET", default_value = defaults::API_SOCKET)]
    api_socket: PathBuf,
    /// Where pods and the kill-switch setting are kept across restarts.
    #[arg(long, env = "MESHLANE_STATE_FILE", default_value = defaults::STATE_FILE)]
    state_file: PathBuf,
    /// Prometheus metrics address (`GET /metrics`).
    #[arg(long, env = "MESHLANE_METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    metrics_addr: SocketAddr,
    /// Capacity of the SOCKHASH; when it is full new connections use the stack (and are counted).
    #[arg(long, env = "MESHLANE_SOCKHASH_CAPACITY", default_value_t = dataplane_common::SOCKHASH_CAPACITY,
          value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    sockhash_capacity: u32,
    /// Size of the flow event ring buffer in bytes (a power of two, at least 4096). When the
    /// agent falls behind by more, events are dropped and counted (`events_lost`).
    #[arg(long, env = "MESHLANE_EVENTS_RING_BYTES", default_value_t = dataplane_common::EVENTS_RING_BYTES)]
    events_ring_bytes: u32,
    /// Services file (YAML, see the README): VIPs and their backends. Re-read when it changes;
    /// a file with errors is refused and the previous table stays in force.
    #[arg(long, env = "MESHLANE_SERVICES")]
    services: Option<PathBuf>,
    /// Skip the self-test and keep redirect off (diagnostics only).
    #[arg(long, env = "MESHLANE_NO_SELFTEST")]
    no_selftest: bool,
    /// Where the CNI plugin queues enrollments and removals while the agent is away (its
    /// `queueDir`); applied at start and every 0.5 s.
    #[arg(long, env = "MESHLANE_CNI_QUEUE_DIR", default_value = defaults::CNI_QUEUE_DIR)]
    cni_queue_dir: PathBuf,
}

fn main() {
    if let Err(e) = run() {
        // Display only: our errors already carry their cause in the message.
        eprintln!("meshlane-agent: {e:#}");
        std::process::exit(1);
    }
    // Leave without running destructors: nothing the agent holds may detach what is pinned.
    std::process::exit(0)
}

fn run() -> anyhow::Result<()> {
    // The self-test re-executes this binary; that child must not parse agent flags.
    let mut argv = std::env::args_os();
    if argv.nth(1).is_some_and(|a| a == selftest::CHILD_ARG) {
        let cg = argv
            .next()
            .context("the self-test child needs a cgroup path")?;
        selftest::child_main(std::path::Path::new(&cg));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let agent = Agent::start(&Config {
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        state_file: args.state_file,
        sockhash_capacity: args.sockhash_capacity,
        events_ring_bytes: args.events_ring_bytes,
        services: args.services,
        no_selftest: args.no_selftest,
        cni_queue_dir: args.cni_queue_dir,
    })?;
    runtime::run(
        agent,
        &Listen {
            api_socket: args.api_socket,
            metrics_addr: args.metrics_addr,
        },
    )?;
    Ok(())
}
