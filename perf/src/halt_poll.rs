//! The guest's halt-polling window, changed for the benchmark's "halt-polling" placement and
//! always put back: by the guard when the run ends, and, should the run die, by the next lab run
//! (the lab's knob guard records the old value in the lab's directory).

use anyhow::{Context as _, Result};
use meshlane_lab::{Knob, Lab};

/// How long (ns) the cpuidle `haltpoll` governor lets an idle vCPU poll before it halts.
/// Halting hands the vCPU back to the hypervisor, and waking it again costs tens of µs; the
/// kernel's default window is 200 µs, some hosts boot their guests with 0.
pub const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
const CPUIDLE_GOVERNOR: [&str; 2] = [
    "/sys/devices/system/cpu/cpuidle/current_governor",
    "/sys/devices/system/cpu/cpuidle/current_governor_ro",
];

/// The machine's halt-polling window changed for a measurement, put back when dropped.
pub struct HaltPoll(#[allow(dead_code, reason = "dropping it puts the window back")] Knob);

impl HaltPoll {
    /// The current window, if this machine is a guest whose idle vCPUs the `haltpoll`
    /// governor runs (elsewhere the knob does not exist or does nothing).
    pub fn current() -> Option<u64> {
        let governor = CPUIDLE_GOVERNOR
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())?;
        if governor.trim() != "haltpoll" {
            return None;
        }
        std::fs::read_to_string(HALT_POLL_NS)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Sets the window to `ns` until the guard is dropped, first recording the old value in
    /// the lab's directory.
    pub fn set(lab: &Lab, ns: u64) -> Result<HaltPoll> {
        HaltPoll::current()
            .context("no cpuidle haltpoll governor on this machine: halt-polling cannot be set")?;
        Ok(HaltPoll(lab.set_knob(HALT_POLL_NS, &ns.to_string())?))
    }

    /// Where a lab records the window to put back.
    pub fn record(lab_dir: &std::path::Path) -> std::path::PathBuf {
        meshlane_lab::knob_record(lab_dir, HALT_POLL_NS)
    }
}
