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

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", "signal", e))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping; programs and maps stay pinned"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping; programs and maps stay pinned"),
        _ = done_rx.wait_for(|d| *d) => tracing::info!("uninstalled; stopping"),
    }
    match std::fs::remove_file(&listen.api_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "removing the API socket"),
    }
    Ok(())
}
