//! `meshlane`: the command-line client of the agent's local API.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshlane::{
    api::{Client, Request},
    defaults, services,
    state::SidecarSpec,
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
    /// The service table in force, with connects per service; `services check FILE` validates a
    /// services file without an agent.
    Services {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: Option<ServicesCmd>,
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
enum ServicesCmd {
    /// Validate a services file and print its table (or every error, with line and field).
    Check { file: PathBuf },
}

/// Sidecar capture settings of `pod add` (Istio's defaults).
#[derive(Debug, clap::Args)]
struct SidecarArgs {
    /// Capture the pod's TCP traffic for a sidecar proxy, without iptables.
    #[arg(long)]
    sidecar: bool,
    /// The proxy's outbound listener.
    #[arg(long, default_value_t = 15001, requires = "sidecar")]
    outbound_port: u16,
    /// The proxy's inbound listener.
    #[arg(long, default_value_t = 15006, requires = "sidecar")]
    inbound_port: u16,
    /// The proxy's uid; its connects are not captured.
    #[arg(long, default_value_t = 1337, requires = "sidecar")]
    proxy_uid: u32,
    /// Destination ports not captured (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "sidecar")]
    exclude_outbound_ports: Vec<u16>,
    /// Pod ports not captured inbound (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "sidecar")]
    exclude_inbound_ports: Vec<u16>,
    /// Destination CIDRs not captured (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "sidecar")]
    exclude_cidrs: Vec<ipnet::IpNet>,
}

impl SidecarArgs {
    fn spec(self) -> Option<SidecarSpec> {
        self.sidecar.then_some(SidecarSpec {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_uid: self.proxy_uid,
            exclude_outbound_ports: self.exclude_outbound_ports,
            exclude_inbound_ports: self.exclude_inbound_ports,
            exclude_cidrs: self.exclude_cidrs,
        })
    }
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
        #[command(flatten)]
        sidecar: SidecarArgs,
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
            PodCmd::Add {
                netns,
                ips,
                name,
                sidecar,
            } => {
                let v = connect()?.call(&Request::PodAdd {
                    netns,
                    ips,
                    name,
                    sidecar: sidecar.spec(),
                })?;
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
        Cmd::Services {
            cmd: Some(ServicesCmd::Check { file }),
            json,
        } => {
            let table = services::load(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&table)?);
            } else {
                let n: usize = table.iter().map(|s| s.backends.len()).sum();
                println!(
                    "{}: {} services, {n} backends, valid",
                    file.display(),
                    table.len()
                );
            }
        }
        Cmd::Services { cmd: None, json } => {
            let v = connect()?.call(&Request::Services)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_services_summary(&v["summary"]);
                print_services(&v["services"]);
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
            "  {:<16} id {:<6} {}",
            p["name"].as_str().unwrap_or("?"),
            p["id"],
            p["attach"].as_str().unwrap_or("")
        );
    }
    println!("sidecar pods:  {}", v["sidecar_pods"]);
    print_services_summary(&v["services"]);
    print_services(&v["service_table"]);
    println!("counters:");
    if let Some(m) = v["counters"].as_object() {
        for (k, n) in m {
            println!("  {k:<28} {n}");
        }
    }
}

fn print_services_summary(s: &Value) {
    println!(
        "services:      {} services, {} backends, from {} ({} loads)",
        s["services"],
        s["backends"],
        s["file"].as_str().unwrap_or("no file"),
        s["loads"]
    );
    if let Some(e) = s["last_error"].as_str() {
        println!("  last error (previous table in force):");
        for l in e.lines() {
            println!("    {l}");
        }
    }
}

fn print_services(v: &Value) {
    let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return;
    }
    println!(
        "  {:<24} {:<28} {:<14} {:>9} {:>9} {:>8}  BACKENDS",
        "NAME", "FRONTEND", "BALANCE", "CONNECTS", "DGRAMS", "REFUSED"
    );
    for s in list {
        let backends: Vec<&str> = s["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  {:<24} {:<28} {:<14} {:>9} {:>9} {:>8}  {}",
            s["name"].as_str().unwrap_or("(adopted)"),
            s["frontend"].as_str().unwrap_or("?"),
            s["balance"].as_str().unwrap_or("-"),
            s["connects"],
            s["datagrams"],
            s["refused"],
            if backends.is_empty() {
                "(none: connects refused)".to_string()
            } else {
                backends.join(",")
            }
        );
    }
}
