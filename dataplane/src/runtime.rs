//! What the agent does once it has started: serve the API and `/metrics`, re-read the services
//! file, apply the CNI queue, and stop on SIGTERM/SIGINT or after `uninstall`. Stopping leaves everything pinned and
//! attached, so established connections are not disturbed.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{Error, Result, agent::Agent, metrics, server};

/// How often the services file and the CNI queue are checked for changes.
pub const INPUTS_POLL: Duration = Duration::from_millis(500);
/// How often flow events are read at least (the ring holds several seconds of a busy node's
/// events).
pub const EVENTS_POLL: Duration = Duration::from_millis(100);
/// After the ring signals new events, how long the agent lets more gather before it reads them:
/// one read (and one checkpoint) per burst instead of one per event. At 150,000 events/s that
/// is about 3 MB, well inside the default 8 MiB ring.
pub const EVENTS_COALESCE: Duration = Duration::from_millis(20);

/// Where the running agent listens.
#[derive(Clone, Debug)]
pub struct Listen {
    pub api_socket: PathBuf,
    pub metrics_addr: SocketAddr,
}

/// Serves until a signal or `uninstall`; then removes the API socket and returns. The caller
/// exits the process without running destructors, so nothing the agent holds detaches what is
/// pinned.
pub fn run(agent: Agent, listen: &Listen) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", "tokio", e))?;
    rt.block_on(serve(agent, listen))
}

/// Reads flow events as the kernel adds them (it wakes the ring's epoll), and at least every
/// [`EVENTS_POLL`] in case a wakeup was missed.
async fn read_flow_events(
    agent: Arc<Mutex<Agent>>,
    ring: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
) {
    let mut more = false;
    loop {
        if !more {
            tokio::select! {
                ready = ring.readable() => match ready {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        tokio::time::sleep(EVENTS_COALESCE).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "waiting for flow events; polling instead");
                        tokio::time::sleep(EVENTS_POLL).await;
                    }
                },
                _ = tokio::time::sleep(EVENTS_POLL) => {}
            }
        }
        // Each round takes the lock for a bounded number of events, so API requests and
        // scrapes get their turn in between.
        let agent = agent.clone();
        let drained = tokio::task::spawn_blocking(move || match agent.lock() {
            Ok(mut a) => a.drain_telemetry(),
            Err(_) => {
                tracing::error!("agent state poisoned; flow events not read");
                false
            }
        })
        .await;
        more = match drained {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "reading flow events");
                false
            }
        };
        if more {
            tokio::task::yield_now().await;
        }
    }
}

async fn serve(agent: Agent, listen: &Listen) -> Result<()> {
    let agent = Arc::new(Mutex::new(agent));
    let api = server::bind(&listen.api_socket)?;
    let metrics_listener = tokio::net::TcpListener::bind(listen.metrics_addr)
        .await
        .map_err(|e| Error::io("binding --metrics-addr", listen.metrics_addr.to_string(), e))?;
    let metrics_at = metrics_listener.local_addr().map_err(|e| {
        Error::io(
            "reading the metrics address",
            listen.metrics_addr.to_string(),
            e,
        )
    })?;
    tracing::info!(api = %listen.api_socket.display(), metrics = %metrics_at, "serving");
    tokio::spawn(metrics::serve(metrics_listener, agent.clone()));
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server::serve(api, agent.clone(), done_tx));
    {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INPUTS_POLL);
            loop {
                tick.tick().await;
                let agent = agent.clone();
                let polled = tokio::task::spawn_blocking(move || match agent.lock() {
                    Ok(mut a) => {
                        a.poll_services();
                        a.drain_cni_queue();
                        a.reset_spliced();
                    }
                    Err(_) => tracing::error!("agent state poisoned; inputs not polled"),
                })
                .await;
                if let Err(e) = polled {
                    tracing::error!(error = %e, "polling the services file and the CNI queue");
                }
            }
        });
    }

    let ring_fd = {
        let a = agent
            .lock()
            .map_err(|_| Error::Internal("agent state poisoned".into()))?;
        a.telemetry
            .ring_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating the flow event ring's fd", "ML_EVENTS", e))?
    };
    let ring_ready = crate::sys::watch_readable(ring_fd)
        .map_err(|e| Error::io("watching the flow event ring", "ML_EVENTS", e))?;
    tokio::spawn(read_flow_events(agent.clone(), ring_ready));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", "signal", e))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping; programs and maps stay pinned"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping; programs and maps stay pinned"),
        _ = done_rx.wait_for(|d| *d) => tracing::info!("uninstalled; stopping"),
    }
    // What was counted since the last checkpoint is kept, so the next agent does not read it
    // again (after uninstall there is no ring left to checkpoint).
    if !*done_rx.borrow()
        && let Ok(mut a) = agent.lock()
        && let Err(e) = a.checkpoint_telemetry()
    {
        tracing::warn!(error = %e, "checkpointing flow telemetry at exit");
    }
    match std::fs::remove_file(&listen.api_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "removing the API socket"),
    }
    Ok(())
}
