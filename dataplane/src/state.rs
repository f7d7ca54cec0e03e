//! What the agent must remember across restarts that the maps cannot hold: pod names, netns
//! paths, the cgroup the programs are attached to, and whether the operator switched
//! acceleration off. Written atomically (temporary file + rename) after every change, so a
//! SIGKILL leaves either the old or the new state, never half of one.

use std::path::{Path, PathBuf};

use meshlane_api::types::Pod;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The cgroup the sockops link under this bpffs is attached to.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// False after `meshlane accel off`; a restart keeps the operator's choice.
    #[serde(default = "yes")]
    pub accel_wanted: bool,
    /// True after `meshlane accel off --move-established`, until `accel on`.
    #[serde(default)]
    pub move_established: bool,
    #[serde(default)]
    pub next_id: u32,
    #[serde(default)]
    pub pods: Vec<Pod>,
}

fn yes() -> bool {
    true
}

impl Default for State {
    fn default() -> Self {
        State {
            cgroup: None,
            accel_wanted: true,
            move_established: false,
            next_id: 1,
            pods: Vec::new(),
        }
    }
}

impl State {
    /// Reads the state file; a missing file is a fresh state, a corrupt one is an error (the
    /// agent refuses to start rather than forget pods silently).
    pub fn load(path: &Path) -> Result<State> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut s: State = serde_json::from_str(&text).map_err(|e| Error::State {
                    path: path.into(),
                    msg: format!("line {} column {}: {e}", e.line(), e.column()),
                })?;
                // State files from before the mode was recorded: it follows the sidecar.
                for p in &mut s.pods {
                    p.mode = meshlane_api::types::PodMode::of(p.sidecar.as_ref());
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(Error::io("reading the state file", path, e)),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("creating the state directory", dir, e))?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::State {
            path: path.into(),
            msg: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(|e| Error::io("writing the state file", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("replacing the state file", path, e))
    }

    pub fn find_by_name(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name.as_deref() == Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlane_api::types::SidecarSpec;

    #[test]
    fn state_round_trips_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("meshlane-state-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut s = State::default();
        s.pods.push(Pod {
            id: 1,
            name: Some("a/b".into()),
            netns: "/run/netns/x".into(),
            netns_cookie: 42,
            ips: vec!["10.0.0.2".parse().unwrap()],
            sidecar: Some(SidecarSpec::default()),
            mode: meshlane_api::types::PodMode::Sidecar,
            cni: None,
            accel: None,
            telemetry: true,
        });
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), s);
        std::fs::write(&path, "{\"pods\": 3}").unwrap();
        let e = State::load(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
