//! Where the agent pins its maps and links under its bpffs directory, and how to remove them.
//! `meshlane uninstall` removes them without a running agent, so the layout lives here, beside
//! the agent's other defaults. Plain file operations only: no BPF syscalls.

use std::path::{Path, PathBuf};

/// Paths of everything the agent pins.
#[derive(Clone, Debug)]
pub struct PinPaths {
    pub root: PathBuf,
    pub maps: PathBuf,
    pub links: PathBuf,
}

impl PinPaths {
    pub fn new(bpffs: &Path) -> Self {
        let root = bpffs.join(format!("v{}", dataplane_common::ABI_VERSION));
        PinPaths {
            maps: root.join("maps"),
            links: root.join("links"),
            root,
        }
    }
    pub fn link(&self, program: &str) -> PathBuf {
        self.links.join(program)
    }
}

/// Removes everything pinned under `bpffs`: links first (which detaches sockops), then maps.
/// Sockets still in the SOCKHASH leave it when the map is freed; data they had been handed but
/// had not read yet is dropped by the kernel with the map, so callers switch redirect off and
/// wait before calling this.
pub fn unpin_all(bpffs: &Path) -> std::io::Result<Vec<PathBuf>> {
    let pins = PinPaths::new(bpffs);
    let mut removed = Vec::new();
    for dir in [&pins.links, &pins.maps] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries {
            let p = e?.path();
            std::fs::remove_file(&p).map_err(|e| {
                std::io::Error::new(e.kind(), format!("unpinning {}: {e}", p.display()))
            })?;
            removed.push(p);
        }
        // Best effort: a directory someone else put files into stays, and that is fine.
        let _not_empty_is_fine = std::fs::remove_dir(dir);
    }
    let _not_empty_is_fine = std::fs::remove_dir(&pins.root);
    Ok(removed)
}
