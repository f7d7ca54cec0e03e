//! `meshlane-agent`: the node agent. Wiring only; the logic is in the `meshlane` library.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::Parser;
use meshlane::{
    agent::Agent,
    dataplane::{Dataplane, DataplaneOptions},
    defaults, metrics, selftest, server,
    service_table::ServiceTable,
    state::State,
    sys,
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
    /// Services file (YAML, see the README): VIPs and their backends. Re-read when it changes;
    /// a file with errors is refused and the previous table stays in force.
    #[arg(long, env = "MESHLANE_SERVICES")]
    services: Option<PathBuf>,
    /// Skip the self-test and keep redirect off (diagnostics only).
    #[arg(long, env = "MESHLANE_NO_SELFTEST")]
    no_selftest: bool,
}

fn main() {
    if let Err(e) = run() {
        // Display only: our errors already carry their cause in the message.
        eprintln!("meshlane-agent: {e}");
        std::process::exit(1);
    }
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

    let cgroup = sys::resolve_cgroup(args.cgroup.as_deref())?;
    let mounted = sys::ensure_bpffs(&args.bpffs)?;
    if mounted {
        tracing::info!(dir = %args.bpffs.display(), "mounted bpffs");
    }
    let state = State::load(&args.state_file)?;
    if let Some(pinned) = &state.cgroup
        && *pinned != cgroup
        && meshlane::dataplane::PinPaths::new(&args.bpffs)
            .link(dataplane_common::program_names::SOCKOPS)
            .exists()
    {
        return Err(meshlane::Error::CgroupMismatch {
            bpffs: args.bpffs.clone(),
            pinned: pinned.clone(),
            requested: cgroup,
        }
        .into());
    }

    let mut dp = Dataplane::load(DataplaneOptions {
        bpffs: args.bpffs.clone(),
        cgroup: cgroup.clone(),
        sockhash_capacity: args.sockhash_capacity,
    })?;
    tracing::info!(
        cgroup = %cgroup.display(),
        reused_pins = dp.reused_pins,
        accelerate = dp.accelerate()?,
        "programs attached"
    );

    let report = if args.no_selftest {
        selftest::SelfTestReport {
            passed: false,
            detail: "skipped (--no-selftest)".into(),
            checks: vec![],
        }
    } else {
        selftest::run(&mut dp, &selftest::current_exe())
    };
    if report.passed {
        tracing::info!("self-test passed: {}", report.detail);
    } else {
        tracing::warn!(
            "self-test did not pass, redirect stays off: {}",
            report.detail
        );
        for c in report.checks.iter().filter(|c| !c.ok) {
            tracing::warn!(check = %c.name, "{}", c.detail);
        }
    }

    let mut state = state;
    state.cgroup = Some(cgroup);
    state.save(&args.state_file)?;
    if let Some(file) = &args.services
        && !file.exists()
    {
        anyhow::bail!("--services {}: no such file", file.display());
    }
    let services = ServiceTable::adopt(&mut dp, args.services.clone())?;
    let mut agent = Agent::new(dp, state, args.state_file.clone(), report, services);
    agent.reconcile()?;
    poll_services(&mut agent);
    let on = agent.apply_accel()?;
    tracing::info!(accelerate = on, pods = agent.state.pods.len(), "ready");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = Arc::new(Mutex::new(agent));
        let api = server::bind(&args.api_socket)?;
        let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
            .await
            .with_context(|| format!("binding --metrics-addr {}", args.metrics_addr))?;
        tracing::info!(api = %args.api_socket.display(), metrics = %metrics_listener.local_addr()?, "serving");
        let registry = Arc::new(metrics::registry(agent.clone()));
        tokio::spawn(metrics::serve(metrics_listener, registry));
        let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(server::serve(api, agent.clone(), done_tx));
        if args.services.is_some() {
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SERVICES_POLL);
                loop {
                    tick.tick().await;
                    let agent = agent.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Ok(mut a) = agent.lock() {
                            poll_services(&mut a);
                        }
                    })
                    .await;
                }
            });
        }

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping; programs and maps stay pinned"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping; programs and maps stay pinned"),
            _ = done_rx.wait_for(|d| *d) => tracing::info!("uninstalled; stopping"),
        }
        let _gone = std::fs::remove_file(&args.api_socket);
        Ok::<_, anyhow::Error>(())
    })?;
    // Leave without running destructors of the runtime's tasks: the dataplane handle is dropped
    // with the process, and nothing it owns detaches what is pinned.
    std::process::exit(0)
}

/// How often the services file is checked for changes.
const SERVICES_POLL: std::time::Duration = std::time::Duration::from_millis(500);

fn poll_services(agent: &mut Agent) {
    let Agent { dp, services, .. } = agent;
    match services.poll(dp) {
        None => {}
        Some(Ok(a)) => tracing::info!(
            added = a.added,
            changed = a.changed,
            removed = a.removed,
            unchanged = a.unchanged,
            "service table loaded"
        ),
        Some(Err(msg)) => tracing::error!("{msg}"),
    }
}
