//! `meshlane-cni`: run by a container runtime as the CNI plugin `meshlane` (CNI_COMMAND set),
//! or by the node's DaemonSet as `meshlane-cni install|uninstall`.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Parser, Subcommand};
use meshlane_cni::{install, plugin::MeshlaneCni};
use rscni_plugin::{cni::Plugin, version::SpecVersion};

#[derive(Debug, Parser)]
#[command(version, about = "meshlane's chained CNI plugin and its node install")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Copy this binary into the CNI bin dir as `meshlane` and chain it into the primary
    /// conflist (the first in lexical order); with --watch, stay and put the entry back if
    /// something rewrites the file, until SIGTERM.
    Install {
        #[arg(long, env = "MESHLANE_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, env = "MESHLANE_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long)]
        watch: bool,
        /// The plugin's `agentSocket`.
        #[arg(long, default_value = meshlane_api::defaults::API_SOCKET)]
        agent_socket: PathBuf,
        /// The plugin's `queueDir`.
        #[arg(long, default_value = meshlane_api::defaults::CNI_QUEUE_DIR)]
        queue_dir: PathBuf,
        /// The plugin's default `mode` for pods of the network.
        #[arg(long, default_value = "accelerate", value_parser = ["accelerate", "sidecar", "off"])]
        mode: String,
    },
    /// Take the entry out of the conflist (the original back when nothing else changed it) and
    /// remove the binary.
    Uninstall {
        #[arg(long, env = "MESHLANE_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, env = "MESHLANE_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
}

fn main() {
    // A runtime calls the plugin with CNI_COMMAND set and the network configuration on stdin;
    // stdout then carries only the result or error JSON (rscni-plugin writes it).
    if std::env::var_os("CNI_COMMAND").is_some() {
        let plugin = Plugin::new(
            SpecVersion::new(1, 1, 0),
            vec![SpecVersion::new(1, 0, 0), SpecVersion::new(1, 1, 0)],
        )
        .msg("meshlane-cni: hands pods to the meshlane agent");
        let code = match plugin.run(&MeshlaneCni) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("meshlane-cni: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    if let Err(e) = run(Args::parse()) {
        eprintln!("meshlane-cni: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    match args.cmd {
        Cmd::Install {
            conf_dir,
            bin_dir,
            watch,
            agent_socket,
            queue_dir,
            mode,
        } => {
            let opts = install::InstallOptions {
                conf_dir,
                bin_dir,
                binary: std::env::current_exe()?,
                entry: serde_json::json!({
                    "type": install::PLUGIN_TYPE,
                    "agentSocket": agent_socket,
                    "queueDir": queue_dir,
                    "mode": mode,
                }),
            };
            let done = install::install(&opts)?;
            match &done.conf {
                Some(c) => eprintln!(
                    "meshlane-cni: {} {} (binary {})",
                    if done.changed {
                        "chained into"
                    } else {
                        "already in"
                    },
                    c.display(),
                    done.binary.display()
                ),
                None => eprintln!(
                    "meshlane-cni: no network configuration in {} yet{}",
                    opts.conf_dir.display(),
                    if watch { "; waiting for one" } else { "" }
                ),
            }
            if watch {
                let stop = stop_on_signal()?;
                install::watch(&opts, &stop, Duration::from_millis(200))?;
                eprintln!("meshlane-cni: stopping; the entry stays in place");
            }
        }
        Cmd::Uninstall { conf_dir, bin_dir } => {
            let done = install::uninstall(&conf_dir, &bin_dir)?;
            match done.conf {
                Some(c) => eprintln!(
                    "meshlane-cni: removed from {}{}",
                    c.display(),
                    if done.restored_original {
                        " (original restored)"
                    } else {
                        ""
                    }
                ),
                None => eprintln!(
                    "meshlane-cni: no conflist in {} holds it",
                    conf_dir.display()
                ),
            }
        }
    }
    Ok(())
}

/// A flag set when SIGTERM or SIGINT arrives: both are blocked here and taken by a thread of
/// their own, so the watch loop ends between two polls, never in the middle of a write.
fn stop_on_signal() -> Result<Arc<AtomicBool>, Box<dyn std::error::Error>> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    Ok(stop)
}
