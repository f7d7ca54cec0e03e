//! The CNI queue: requests the CNI plugin could not hand to the agent (it was down or
//! restarting) wait here as files, and the agent applies them in order when it can. A pod never
//! fails to start because the agent is away, and nothing the plugin decided is lost.
//!
//! One request per file, named `<unix nanoseconds, 20 digits>-<pid>-<n>.json` so that names
//! sort in the order they were written; a file is written under a dot-name and renamed into
//! place, so the agent never sees half of one. Entries the agent refuses for good move to
//! `failed/` beside them (kept for the operator, never applied again).

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::wire::Request;

/// At most this many entries wait; past it the plugin logs and goes on without queueing.
pub const MAX_ENTRIES: usize = 4096;
/// Where refused entries are kept.
pub const FAILED_DIR: &str = "failed";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Writes `req` as a new entry (atomically) and returns its path.
pub fn enqueue(dir: &Path, req: &Request) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let pending = entries(dir)?.len();
    if pending >= MAX_ENTRIES {
        return Err(std::io::Error::other(format!(
            "the CNI queue {} holds {pending} entries, the limit is {MAX_ENTRIES}",
            dir.display()
        )));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!(
        "{nanos:020}-{}-{}.json",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);
    let line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&line)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The entries waiting, oldest first.
pub fn entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut v = Vec::new();
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".json") && e.file_type()?.is_file() {
            v.push(e.path());
        }
    }
    v.sort();
    Ok(v)
}

/// Reads an entry back.
pub fn read(path: &Path) -> Result<Request, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::wire::parse_request(text.trim())
        .map_err(|r| format!("{}: {}", path.display(), r.message))
}

/// Moves a refused entry to `failed/`, where it stays for the operator.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a queue entry without a directory"))?
        .join(FAILED_DIR);
    std::fs::create_dir_all(&dir)?;
    let to = dir.join(path.file_name().unwrap_or_default());
    std::fs::rename(path, &to)?;
    Ok(to)
}

/// Whether the plugin could queue here now: the directory exists or can be made, and a file
/// can be written in it.
pub fn writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_in_order_and_whole() {
        let dir = std::env::temp_dir().join(format!("meshlane-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reqs: Vec<Request> = (0..5)
            .map(|i| Request::PodGc {
                network: format!("net{i}"),
                valid: vec![],
            })
            .collect();
        for r in &reqs {
            enqueue(&dir, r).unwrap();
        }
        // A half-written entry (a plugin killed before its rename) is not an entry.
        std::fs::write(dir.join(".00000000000000000000-1-0.json.tmp"), b"{\"op\"").unwrap();
        let got: Vec<Request> = entries(&dir)
            .unwrap()
            .iter()
            .map(|p| read(p).unwrap())
            .collect();
        assert_eq!(got, reqs);
        let first = entries(&dir).unwrap().remove(0);
        let kept = set_aside(&first).unwrap();
        assert!(kept.starts_with(dir.join(FAILED_DIR)) && kept.exists());
        assert_eq!(entries(&dir).unwrap().len(), 4);
        writable(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
