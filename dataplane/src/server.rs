//! The API server: a unix socket (mode 0600, so only root on the node can enroll pods), one
//! request per line, one answer per line. Requests are handled one at a time under the agent's
//! lock. A request the agent cannot take gets a refusal with a kind, never a closed connection
//! without an answer.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
};

use meshlane_api::{
    ErrorKind, Refusal, Request, Response,
    wire::{MAX_DRAIN_BYTES, MAX_REQUEST_BYTES, parse_request},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::watch,
};

use crate::{Error, Result, agent::Agent};

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
                    // Read the rest of the line (bounded) before answering: a client still
                    // writing would otherwise get EPIPE instead of the refusal.
                    let drained = drain_line(&mut r).await;
                    let msg = format!(
                        "request longer than the {MAX_REQUEST_BYTES}-byte limit{}; closing",
                        if drained {
                            ""
                        } else {
                            " (and than the drain limit)"
                        }
                    );
                    (
                        Response::refused(Refusal::new(ErrorKind::InvalidInput, msg)),
                        false,
                    )
                } else {
                    handle_line(&agent, &line).await
                };
                let mut out = match serde_json::to_vec(&resp) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(error = %e, "encoding an API response");
                        return;
                    }
                };
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    return;
                }
                if uninstalled {
                    let _all_receivers_gone_is_fine = done.send(true);
                    return;
                }
                if too_long {
                    let _peer_may_be_gone = w.shutdown().await;
                    return;
                }
            }
        });
    }
}

/// Discards input up to the end of the current line, at most [`MAX_DRAIN_BYTES`]. Returns
/// whether the end of the line (or of the stream) was reached.
async fn drain_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> bool {
    let mut seen = 0usize;
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) => return true,
            Ok(b) => b,
            Err(_) => return false,
        };
        let (used, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        r.consume(used);
        seen += used;
        if found {
            return true;
        }
        if seen > MAX_DRAIN_BYTES {
            return false;
        }
    }
}

async fn handle_line(agent: &Arc<Mutex<Agent>>, line: &[u8]) -> (Response, bool) {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t.trim(),
        Err(e) => {
            return (
                Response::refused(Refusal::new(
                    ErrorKind::InvalidInput,
                    format!("request is not UTF-8: {e}"),
                )),
                false,
            );
        }
    };
    let req = match parse_request(text) {
        Ok(r) => r,
        Err(refusal) => return (Response::refused(refusal), false),
    };
    let is_uninstall = req == Request::Uninstall;
    let agent = agent.clone();
    // Map updates and netns lookups block briefly; keep them off the reactor threads.
    let res = tokio::task::spawn_blocking(move || {
        let mut a = agent
            .lock()
            .map_err(|_| Error::Internal("agent state poisoned".into()))?;
        a.handle(req)
    })
    .await;
    match res {
        Ok(Ok(v)) => (Response::ok(v), is_uninstall),
        Ok(Err(e)) => (Response::refused(e.refusal()), false),
        Err(e) => (
            Response::refused(Refusal::new(
                ErrorKind::Internal,
                format!("internal error: {e}"),
            )),
            false,
        ),
    }
}
