//! `meshlane`: the command-line client of the agent's local API. It depends on the API crate
//! only, never on the agent or aya, so it builds without the eBPF toolchain. `--json` prints the
//! agent's answer as it came; the tables read the typed answers.
#![deny(unsafe_code)]

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshlane_api::{
    Client, Request, defaults,
    flows::{FlowKind, FlowQuery, FlowRecord},
    pins, services,
    types::{AccelSpec, Pod, ServiceView, ServicesSummary, SidecarSpec, Status},
};

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
    /// The kill switch: `accel off` keeps new connections out of the fast path at once;
    /// connections already in it stay there until they close, unless --move-established.
    Accel {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// With `off`: move connections already in the fast path to the stack too, at once
        /// (refused where the agent's self-test found that unsafe for their readers).
        #[arg(long)]
        move_established: bool,
    },
    /// Flows as the agent sees them (like `hubble observe`): the recent ones, then new ones as
    /// they come with --follow. --json prints one object per line (see the README for every
    /// field).
    Observe {
        /// Either end is this pod (NAMESPACE/NAME).
        #[arg(long)]
        pod: Option<String>,
        /// Either end is a pod of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only this protocol: tcp (connections) or http (requests).
        #[arg(long)]
        protocol: Option<String>,
        /// Only requests answered with this status.
        #[arg(long)]
        status: Option<u16>,
        /// How many recent records to print first (at most 10000).
        #[arg(long, default_value_t = 20)]
        last: usize,
        /// Keep printing new records until interrupted.
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
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
        /// Enroll without the fast path: Service translation and sidecar capture only (for
        /// workloads that read sockets with splice(2), such as Go's io.Copy proxies).
        #[arg(long)]
        no_accelerate: bool,
        /// Ports whose connections stay on the stack, at either end (comma-separated).
        #[arg(long, value_delimiter = ',', conflicts_with = "no_accelerate")]
        exclude_accel_ports: Vec<u16>,
        /// Do not observe the pod's connections (flow telemetry is on by default).
        #[arg(long)]
        no_telemetry: bool,
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

/// One record as `observe` prints it without --json.
fn flow_line(r: &FlowRecord) -> String {
    let end = |e: &meshlane_api::flows::FlowEnd| match &e.pod {
        Some(p) => format!("{p} ({})", std::net::SocketAddr::new(e.ip, e.port)),
        None => std::net::SocketAddr::new(e.ip, e.port).to_string(),
    };
    let time = {
        let secs = r.time_ms / 1000;
        format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            r.time_ms % 1000
        )
    };
    let mut line = format!(
        "{time} {:<5} {} {} -> {} reporter={}{}",
        match r.kind {
            FlowKind::Open => "OPEN",
            FlowKind::Close => "CLOSE",
            FlowKind::Request => "REQ",
        },
        r.protocol.to_uppercase(),
        end(&r.source),
        end(&r.destination),
        r.reporter.as_str(),
        if r.accelerated { " accelerated" } else { "" }
    );
    if let (Some(m), Some(p), Some(s)) = (&r.method, &r.path, r.status) {
        line.push_str(&format!(" {m} {p} {s}"));
    }
    if let Some(o) = r.original_destination {
        line.push_str(&format!(" original_destination={o}"));
    }
    if let (Some(s), Some(rv)) = (r.sent_bytes, r.received_bytes) {
        line.push_str(&format!(
            " sent={s}B (redirected {}) received={rv}B (redirected {})",
            r.sent_redirected_bytes.unwrap_or(0),
            r.received_redirected_bytes.unwrap_or(0)
        ));
    }
    if let Some(d) = r.duration_ms {
        line.push_str(&format!(" duration={d:.1}ms"));
    }
    if let Some(rtt) = r.srtt_us {
        line.push_str(&format!(" srtt={rtt}us"));
    }
    if let Some(n) = r.retransmits.filter(|n| *n > 0) {
        line.push_str(&format!(" retransmits={n}"));
    }
    line
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
    // `--json`: the answer as the agent sent it.
    let print_json = |req: &Request| -> anyhow::Result<()> {
        let v = connect()?.call_json(req)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    };
    match args.cmd {
        Cmd::Pod { cmd } => match cmd {
            PodCmd::Add {
                netns,
                ips,
                name,
                sidecar,
                no_accelerate,
                exclude_accel_ports,
                no_telemetry,
            } => {
                let wanted = no_accelerate || !exclude_accel_ports.is_empty();
                let accel = wanted.then_some(AccelSpec {
                    enabled: !no_accelerate,
                    exclude_ports: exclude_accel_ports,
                });
                let p = connect()?.call::<Pod>(&Request::PodAdd {
                    netns,
                    ips,
                    name,
                    sidecar: sidecar.spec(),
                    accel,
                    telemetry: no_telemetry.then_some(false),
                    cni: None,
                })?;
                println!("enrolled pod {}", p.id);
            }
            PodCmd::Del { netns, name } => {
                let p = connect()?.pod_del(netns, name)?;
                println!("removed pod {}", p.id);
            }
            PodCmd::List { json: true } => print_json(&Request::PodList)?,
            PodCmd::List { json: false } => print_pods(&connect()?.pod_list()?),
        },
        Cmd::Sockets { json: true } => print_json(&Request::Sockets)?,
        Cmd::Sockets { json: false } => {
            println!(
                "{:<24} {:<44} {:<44} {:>14} {:>12}",
                "POD", "LOCAL", "REMOTE", "REDIRECTED_B", "STACK_B"
            );
            for s in connect()?.sockets()? {
                println!(
                    "{:<24} {:<44} {:<44} {:>14} {:>12}",
                    s.pod.as_deref().unwrap_or("-"),
                    s.local.to_string(),
                    s.remote.to_string(),
                    s.redirected_bytes,
                    s.stack_bytes
                );
            }
        }
        Cmd::Status { json: true } => print_json(&Request::Status)?,
        Cmd::Status { json: false } => print_status(&connect()?.status()?),
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
        Cmd::Services {
            cmd: None,
            json: true,
        } => print_json(&Request::Services)?,
        Cmd::Services {
            cmd: None,
            json: false,
        } => {
            let s = connect()?.services()?;
            print_services_summary(&s.summary);
            print_services(&s.services);
        }
        Cmd::Accel {
            state,
            move_established,
        } => {
            let a = connect()?.accel(state == "on", move_established)?;
            println!(
                "acceleration {}{}",
                if a.accelerate { "on" } else { "off" },
                match (a.accelerate, a.established_moved) {
                    (true, _) => "",
                    (false, true) => "; established connections moved to the stack",
                    (false, false) =>
                        "; established connections stay in the fast path until they close",
                }
            );
        }
        Cmd::Observe {
            pod,
            namespace,
            protocol,
            status,
            last,
            follow,
            json,
        } => {
            let mut query = FlowQuery {
                since: None,
                last: Some(last),
                pod,
                namespace,
                protocol,
                status,
            };
            query
                .validate()
                .map_err(|e| anyhow::anyhow!("observe: {e}"))?;
            let mut client = connect()?;
            loop {
                let got = client.flows(query.clone())?;
                if got.missed > 0 {
                    eprintln!(
                        "meshlane: {} records were missed (the agent keeps the newest {})",
                        got.missed,
                        meshlane_api::flows::MAX_RECORDS
                    );
                }
                for r in &got.records {
                    if json {
                        println!("{}", serde_json::to_string(r)?);
                    } else {
                        println!("{}", flow_line(r));
                    }
                }
                if !follow {
                    break;
                }
                query.since = Some(got.next);
                query.last = Some(meshlane_api::flows::MAX_RECORDS);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Cmd::Uninstall { bpffs } => match connect() {
            Ok(mut c) => {
                let u = c.uninstall()?;
                println!(
                    "uninstalled: {} pins removed, agent stopping",
                    u.unpinned.len()
                );
            }
            Err(e) => {
                eprintln!(
                    "meshlane: {e}; removing pins under {} directly",
                    bpffs.display()
                );
                let removed = pins::unpin_all(&bpffs)
                    .with_context(|| format!("unpinning under {}", bpffs.display()))?;
                println!("uninstalled: {} pins removed", removed.len());
            }
        },
    }
    Ok(())
}

fn onoff(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn print_pods(pods: &[Pod]) {
    println!(
        "{:<4} {:<32} {:<10} {:<18} {:<36} {:<24} IPS",
        "ID", "NAME", "MODE", "FAST PATH", "NETNS", "CNI (CONTAINER/IFNAME)"
    );
    for p in pods {
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        let cni = p.cni.as_ref().map_or_else(
            || "-".to_string(),
            |c| {
                let short: String = c.container_id.chars().take(12).collect();
                format!("{short}/{}", c.ifname)
            },
        );
        let fast = match &p.accel {
            None => "yes".to_string(),
            Some(a) if !a.enabled => "no".to_string(),
            Some(a) if a.exclude_ports.is_empty() => "yes".to_string(),
            Some(a) => {
                let ports: Vec<String> = a.exclude_ports.iter().map(ToString::to_string).collect();
                format!("not {}", ports.join(","))
            }
        };
        println!(
            "{:<4} {:<32} {:<10} {:<18} {:<36} {:<24} {}",
            p.id,
            p.name.as_deref().unwrap_or("-"),
            p.mode.to_string(),
            fast,
            p.netns.display().to_string(),
            cni,
            ips.join(",")
        );
    }
}

fn print_status(v: &Status) {
    println!("meshlane agent {} (abi v{})", v.version, v.abi);
    println!("cgroup:        {}", v.cgroup.display());
    println!("bpffs:         {}", v.bpffs.display());
    println!(
        "acceleration:  {} (wanted {}, self-test {})",
        onoff(v.accelerate),
        onoff(v.accel_wanted),
        if v.selftest.passed {
            "passed"
        } else {
            "FAILED"
        }
    );
    println!("self-test:     {}", v.selftest.detail);
    println!(
        "kill switch:   {}",
        if v.accelerate {
            "off".to_string()
        } else if v.established_moved {
            "on; established connections moved to the stack".to_string()
        } else {
            "on; established connections stay in the fast path until they close".to_string()
        }
    );
    println!(
        "stack bytes on SOCKHASH sockets: {}",
        if v.selftest.stack_delivery_ok() {
            "read right (`accel off --move-established` allowed)".to_string()
        } else {
            format!(
                "misread ({}): `accel off --move-established` refused",
                v.selftest.stack_delivery_failures()
            )
        }
    );
    println!("pods:          {}", v.pods);
    println!("sockets:       {} in the SOCKHASH", v.sockhash_sockets);
    println!("programs:");
    for p in &v.programs {
        println!("  {:<16} id {:<6} {}", p.name, p.id, p.attach);
    }
    println!("sidecar pods:  {}", v.sidecar_pods);
    let t = &v.telemetry;
    println!(
        "telemetry:     {}; {} observed connections open, {} events read, {} lost (ring {} KiB)",
        if t.active { "on" } else { "off" },
        t.open_flows,
        t.events,
        t.events_lost,
        t.ring_bytes / 1024
    );
    let g = &v.reader_guard;
    println!(
        "reader guard:  {} — {}",
        if g.active { "active" } else { "OFF" },
        g.detail
    );
    for p in &g.pods {
        println!(
            "  {} reads with {}: its new connections stay on the stack ({} sockets so far)",
            p.pod,
            p.kinds(),
            p.excluded_sockets
        );
    }
    if g.reset_connections > 0 {
        println!(
            "  {} connections read with splice while in the fast path were reset (they would \
             have hung or ended short)",
            g.reset_connections
        );
    }
    let q = &v.cni_queue;
    println!(
        "CNI queue:     {} waiting in {}, {} applied, {} refused (kept in failed/)",
        q.pending,
        q.dir.display(),
        q.applied,
        q.failed
    );
    if let Some(e) = &q.last_error {
        println!("  last: {e}");
    }
    print_services_summary(&v.services);
    print_services(&v.service_table);
    println!("counters:");
    for (k, n) in &v.counters {
        println!("  {k:<28} {n}");
    }
}

fn print_services_summary(s: &ServicesSummary) {
    println!(
        "services:      {} services, {} backends, from {} ({} loads)",
        s.services,
        s.backends,
        s.file
            .as_ref()
            .map_or_else(|| "no file".to_string(), |f| f.display().to_string()),
        s.loads
    );
    if let Some(e) = &s.last_error {
        println!("  last error (previous table in force):");
        for l in e.lines() {
            println!("    {l}");
        }
    }
}

fn print_services(list: &[ServiceView]) {
    if list.is_empty() {
        return;
    }
    println!(
        "  {:<24} {:<28} {:<14} {:>9} {:>9} {:>8}  BACKENDS",
        "NAME", "FRONTEND", "BALANCE", "CONNECTS", "DGRAMS", "REFUSED"
    );
    for s in list {
        let backends: Vec<String> = s.backends.iter().map(ToString::to_string).collect();
        let balance = s.balance.map_or_else(|| "-".to_string(), |b| b.to_string());
        println!(
            "  {:<24} {:<28} {:<14} {:>9} {:>9} {:>8}  {}",
            s.name.as_deref().unwrap_or("(adopted)"),
            s.frontend,
            balance,
            s.connects,
            s.datagrams,
            s.refused,
            if backends.is_empty() {
                "(none: connects refused)".to_string()
            } else {
                backends.join(",")
            }
        );
    }
}
