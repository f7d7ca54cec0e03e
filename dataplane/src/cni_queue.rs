//! Applying the CNI plugin's queue ([`meshlane_api::queue`]): at start and while running, each
//! entry is handled like the request it holds, oldest first. An entry is removed only after it
//! took effect, so a crash between applying and removing applies it again, which CNI requests
//! allow (ADD of an enrolled attachment answers the pod, DEL of an unknown one is done).

use std::path::PathBuf;

use meshlane_api::{ErrorKind, Request, queue, types::QueueSummary};

use crate::agent::Agent;

#[derive(Debug)]
pub struct CniQueue {
    dir: PathBuf,
    applied: u64,
    failed: u64,
    last_error: Option<String>,
}

/// What became of one entry.
enum Outcome {
    Applied,
    /// Refused for good: kept in `failed/`.
    Refused(String),
    /// The agent could not apply it now: left for the next pass.
    Retry(String),
}

impl CniQueue {
    pub fn new(dir: PathBuf) -> Self {
        CniQueue {
            dir,
            applied: 0,
            failed: 0,
            last_error: None,
        }
    }

    pub fn summary(&self) -> QueueSummary {
        QueueSummary {
            dir: self.dir.clone(),
            pending: queue::entries(&self.dir).map_or(0, |e| e.len()),
            applied: self.applied,
            failed: self.failed,
            last_error: self.last_error.clone(),
        }
    }
}

impl Agent {
    /// Applies every entry waiting in the CNI queue, oldest first; stops at the first that has
    /// to wait, so later entries never overtake it. Returns how many were applied.
    pub fn drain_cni_queue(&mut self) -> usize {
        let entries = match queue::entries(&self.cni_queue.dir) {
            Ok(e) => e,
            Err(e) => {
                let msg = format!(
                    "reading the CNI queue {}: {e}",
                    self.cni_queue.dir.display()
                );
                if self.cni_queue.last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!("{msg}");
                }
                self.cni_queue.last_error = Some(msg);
                return 0;
            }
        };
        let mut applied = 0;
        for path in entries {
            let outcome = match queue::read(&path) {
                Ok(req) => self.apply_queued(req),
                Err(e) => Outcome::Refused(format!("unreadable entry {e}")),
            };
            match outcome {
                Outcome::Applied => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        // Applied but still there: the next pass applies it again, harmlessly.
                        tracing::warn!(entry = %path.display(), error = %e, "removing an applied CNI queue entry");
                    }
                    self.cni_queue.applied += 1;
                    applied += 1;
                }
                Outcome::Refused(why) => {
                    let kept = queue::set_aside(&path).map_or_else(
                        |e| format!("(could not move it aside: {e})"),
                        |p| format!("kept in {}", p.display()),
                    );
                    let msg = format!("CNI queue entry {} refused: {why}; {kept}", path.display());
                    tracing::error!("{msg}");
                    self.cni_queue.failed += 1;
                    self.cni_queue.last_error = Some(msg);
                }
                Outcome::Retry(why) => {
                    let msg = format!("CNI queue entry {} waits: {why}", path.display());
                    if self.cni_queue.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!("{msg}");
                    }
                    self.cni_queue.last_error = Some(msg);
                    break;
                }
            }
        }
        if applied > 0 {
            tracing::info!(applied, "CNI queue applied");
        }
        applied
    }

    fn apply_queued(&mut self, req: Request) -> Outcome {
        let is_del = matches!(req, Request::PodDel { .. });
        let cni_made = match &req {
            Request::PodAdd { cni, .. } => cni.is_some(),
            Request::PodDel { attachment, .. } => attachment.is_some(),
            Request::PodGc { .. } => true,
            _ => false,
        };
        if !cni_made {
            return Outcome::Refused(format!(
                "{} is not a request the CNI plugin queues",
                req.op()
            ));
        }
        match self.handle(req) {
            Ok(_) => Outcome::Applied,
            Err(e) => match e.kind() {
                // Removing what is already gone is done.
                ErrorKind::NotFound if is_del => Outcome::Applied,
                ErrorKind::InvalidInput | ErrorKind::NotFound | ErrorKind::Conflict => {
                    Outcome::Refused(e.to_string())
                }
                ErrorKind::Unavailable | ErrorKind::Internal => Outcome::Retry(e.to_string()),
            },
        }
    }
}
