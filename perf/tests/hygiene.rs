//! The lab's own hygiene: what a benchmark run changes on the machine is put back, by the run
//! and, should it die, by the next lab run.
//!
//! Run as root: `cargo test -p meshlane-perf -- --test-threads=1`.

use std::process::Command;

use anyhow::{Context as _, Result};
use meshlane_lab::{Lab, cleanup_stale};
use meshlane_perf::halt_poll::HaltPoll;

const KNOB: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

#[test]
fn halt_polling_is_put_back_by_the_run_and_after_a_crash() -> Result<()> {
    let lab = Lab::new()?;
    let Some(orig) = HaltPoll::current() else {
        // Not a guest with the haltpoll governor: setting it is refused and nothing recorded.
        let err = HaltPoll::set(&lab, 200_000)
            .err()
            .context("halt-polling was set on a machine without the haltpoll governor")?;
        assert!(format!("{err:#}").contains("haltpoll"), "{err:#}");
        assert!(!HaltPoll::record(&lab.dir).exists());
        return Ok(());
    };
    let other = if orig == 123_000 { 124_000 } else { 123_000 };

    // The run's guard: set while it lives, refused twice, put back when dropped.
    {
        let _poll = HaltPoll::set(&lab, other)?;
        assert_eq!(HaltPoll::current(), Some(other));
        assert!(HaltPoll::record(&lab.dir).exists());
        assert!(HaltPoll::set(&lab, other).is_err());
    }
    assert_eq!(HaltPoll::current(), Some(orig));
    assert!(!HaltPoll::record(&lab.dir).exists());

    // A run that died with the window changed: its lab directory holds the record, and the
    // next lab run's clean-up puts the value back.
    let mut gone = Command::new("true").spawn()?;
    let dead = gone.id();
    gone.wait()?;
    let dir = std::env::temp_dir().join(format!("mlab-{dead}x0"));
    let record = HaltPoll::record(&dir);
    std::fs::create_dir_all(record.parent().context("the record is in a directory")?)?;
    std::fs::write(&record, orig.to_string())?;
    std::fs::write(KNOB, other.to_string())?;
    cleanup_stale();
    let now = HaltPoll::current();
    if now != Some(orig) {
        // Whatever the outcome, the machine gets its value back.
        std::fs::write(KNOB, orig.to_string())?;
    }
    assert_eq!(
        now,
        Some(orig),
        "cleanup_stale did not restore the dead run's window"
    );
    assert!(!dir.exists(), "the dead run's lab directory is still there");
    Ok(())
}
