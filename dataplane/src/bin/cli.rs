//! `meshlane`: the command-line client of the agent's local API.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshlane::{
    api::{Client, Request},
    defaults,
};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(version, about = "Control the meshlane node agent")]
struct Args {
    /// The agent's API socket.
    #[arg(long, global = true, env = "MESHLANE_API_SOCKET", default_value = defaults::API_SOCKET)]
    api_socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Enroll, remove and list pods.
    Pod {
        #[command(subcommand)]
        cmd: PodCmd,
    },
    /// Sockets in the fast path, with the bytes each sent by redirect and through the stack.
    Sockets {
        #[arg(long)]
        json: bool,
    },
    /// Programs, self-test, acceleration and every counter.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The kill switch: `accel off` sends all traffic through the stack at once.
    Accel {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Detach and unpin everything and stop the agent. Without a running agent, removes the
    /// pins under --bpffs directly.
    Uninstall {
        #[arg(long, env = "MESHLANE_BPFFS", default_value = defaults::BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PodCmd {
    /// Enroll a pod's network namespace and IPs.
    Add {
        #[arg(long)]
        netns: PathBuf,
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// NAMESPACE/NAME
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a pod by netns path or by name.
    Del {
        #[arg(long, conflicts_with = "name", required_unless_present = "name")]
        netns: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
    },
    /// List enrolled pods.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("meshlane: {e}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let connect = || Client::connect(&args.api_socket, Duration::from_secs(60));
    match args.cmd {
        Cmd::Pod { cmd } => match cmd {
            PodCmd::Add { netns, ips, name } => {
                let v = connect()?.call(&Request::PodAdd { netns, ips, name })?;
                println!("enrolled pod {}", v["id"]);
            }
            PodCmd::Del { netns, name } => {
                let v = connect()?.call(&Request::PodDel { netns, name })?;
                println!("removed pod {}", v["id"]);
            }
            PodCmd::List { json } => {
                let v = connect()?.call(&Request::PodList)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print_pods(&v);
                }
            }
        },
        Cmd::Sockets { json } => {
            let v = connect()?.call(&Request::Sockets)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<24} {:<44} {:<44} {:>14} {:>12}",
                    "POD", "LOCAL", "REMOTE", "REDIRECTED_B", "STACK_B"
                );
                for s in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<44} {:<44} {:>14} {:>12}",
                        s["pod"].as_str().unwrap_or("-"),
                        s["local"].as_str().unwrap_or("?"),
                        s["remote"].as_str().unwrap_or("?"),
                        s["redirected_bytes"],
                        s["stack_bytes"]
                    );
                }
            }
        }
        Cmd::Status { json } => {
            let v = connect()?.call(&Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
        }
        Cmd::Accel { state } => {
            let v = connect()?.call(&Request::Accel { on: state == "on" })?;
            println!(
                "acceleration {}",
                if v["accelerate"] == true { "on" } else { "off" }
            );
        }
        Cmd::Uninstall { bpffs } => match connect() {
            Ok(mut c) => {
                let v = c.call(&Request::Uninstall)?;
                let n = v["unpinned"].as_array().map_or(0, Vec::len);
                println!("uninstalled: {n} pins removed, agent stopping");
            }
            Err(e) => {
                eprintln!(
                    "meshlane: {e}; removing pins under {} directly",
                    bpffs.display()
                );
                let removed = meshlane::dataplane::unpin_all(&bpffs)
                    .with_context(|| format!("unpinning under {}", bpffs.display()))?;
                println!("uninstalled: {} pins removed", removed.len());
            }
        },
    }
    Ok(())
}

fn print_pods(v: &Value) {
    println!("{:<4} {:<32} {:<36} IPS", "ID", "NAME", "NETNS");
    for p in v.as_array().into_iter().flatten() {
        let ips: Vec<&str> = p["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{:<4} {:<32} {:<36} {}",
            p["id"],
            p["name"].as_str().unwrap_or("-"),
            p["netns"].as_str().unwrap_or("?"),
            ips.join(",")
        );
    }
}

fn print_status(v: &Value) {
    let onoff = |b: &Value| if b == true { "on" } else { "off" };
    println!(
        "meshlane agent {} (abi v{})",
        v["version"].as_str().unwrap_or("?"),
        v["abi"]
    );
    println!("cgroup:        {}", v["cgroup"].as_str().unwrap_or("?"));
    println!("bpffs:         {}", v["bpffs"].as_str().unwrap_or("?"));
    println!(
        "acceleration:  {} (wanted {}, self-test {})",
        onoff(&v["accelerate"]),
        onoff(&v["accel_wanted"]),
        if v["selftest"]["passed"] == true {
            "passed"
        } else {
            "FAILED"
        }
    );
    println!(
        "self-test:     {}",
        v["selftest"]["detail"].as_str().unwrap_or("")
    );
    println!("pods:          {}", v["pods"]);
    println!("sockets:       {} in the SOCKHASH", v["sockhash_sockets"]);
    println!("programs:");
    for p in v["programs"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} id {:<6} {}",
            p["name"].as_str().unwrap_or("?"),
            p["id"],
            p["attach"].as_str().unwrap_or("")
        );
    }
    println!("counters:");
    if let Some(m) = v["counters"].as_object() {
        for (k, n) in m {
            println!("  {k:<28} {n}");
        }
    }
}
