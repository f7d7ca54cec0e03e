//! The API server: a unix socket (mode 0600, so only root on the node can enroll pods), one
//! request per line. Requests are handled one at a time under the agent's lock.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::watch,
};

use crate::{
    Error, Result,
    agent::Agent,
    api::{MAX_REQUEST_BYTES, Request, Response, parse_request},
};

/// Binds the API socket: removes a stale socket file, creates the directory, sets mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io("creating the API directory", dir, e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("removing the old API socket", path, e)),
    }
    let l = UnixListener::bind(path).map_err(|e| Error::io("binding the API socket", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("setting the API socket's mode", path, e))?;
    Ok(l)
}

/// Serves until an `uninstall` succeeds, then signals `done`.
pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>, done: watch::Sender<bool>) {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an API connection");
                continue;
            }
        };
        let agent = agent.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            loop {
                line.clear();
                // Read at most one byte past the limit so an endless line cannot grow memory.
                let mut limited = (&mut r).take(MAX_REQUEST_BYTES as u64 + 1);
                let n = match limited.read_until(b'\n', &mut line).await {
                    Ok(n) => n,
                    Err(_) => return,
                };
                if n == 0 {
                    return;
                }
                let too_long = line.len() > MAX_REQUEST_BYTES && line.last() != Some(&b'\n');
                let (resp, uninstalled) = if too_long {
                    (
                        Response::err(format!(
                            "request longer than the {MAX_REQUEST_BYTES}-byte limit; closing"
                        )),
                        false,
                    )
                } else {
                    handle_line(&agent, &line).await
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    return;
                }
                if uninstalled {
                    let _all_receivers_gone_is_fine = done.send(true);
                    return;
                }
                if too_long {
                    return;
                }
            }
        });
    }
}

async fn handle_line(agent: &Arc<Mutex<Agent>>, line: &[u8]) -> (Response, bool) {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t.trim(),
        Err(e) => return (Response::err(format!("request is not UTF-8: {e}")), false),
    };
    let req = match parse_request(text) {
        Ok(r) => r,
        Err(e) => return (Response::err(e), false),
    };
    let is_uninstall = req == Request::Uninstall;
    let agent = agent.clone();
    // Map updates and netns lookups block briefly; keep them off the reactor threads.
    let res = tokio::task::spawn_blocking(move || {
        let mut a = agent
            .lock()
            .map_err(|_| Error::Invalid("agent state poisoned".into()))?;
        a.handle(req)
    })
    .await;
    match res {
        Ok(Ok(v)) => (Response::ok(v), is_uninstall),
        Ok(Err(e)) => (Response::err(e.to_string()), false),
        Err(e) => (Response::err(format!("internal error: {e}")), false),
    }
}
