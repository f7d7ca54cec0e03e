//! The meshlane lab: a Kubernetes node on one machine, for tests, the demo and benchmarks. It
//! knows pods, agents and the machine's hygiene; it knows nothing of benchmarks.
//!
//! A **node** is this kernel plus a private "node" network namespace holding a bridge. A **pod**
//! is a network namespace joined to that bridge by a veth, plus a cgroup v2 directory below the
//! lab's own cgroup. The agent under test attaches to the lab's cgroup only, pins into the lab's
//! own bpffs mount, and never sees the host namespace's sockets unless a test puts a process in
//! the lab cgroup on purpose.
//!
//! The lab uses the agent as a user does: its binary and its API (`meshlane-api`), never its
//! library.
//!
//! Everything the lab creates is named `mlab-<pid>x<n>…`; [`Lab`] removes it on drop, and
//! [`Lab::new`] first removes what labs of dead processes left behind.
#![deny(unsafe_code)]

use std::{
    fs::File,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use meshlane_api::{Client, Request};
use serde_json::Value;

pub mod cni;
pub mod metrics;
pub mod probe;
pub mod svc;

const PREFIX: &str = "mlab-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The lab's pod subnet; every lab has its own node namespace, so labs never collide.
pub const SUBNET4: &str = "10.77.0";
pub const SUBNET6: &str = "fd77::";

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// `ip netns` name.
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The veth end in the node namespace.
    pub host_veth: String,
}

pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    pub cgroup: PathBuf,
    pub node_ns: String,
    pub pods: Vec<Pod>,
    agent: Option<Agent>,
}

/// A running `meshlane-agent` for this lab.
pub struct Agent {
    pub child: Child,
    pub api: PathBuf,
    pub bpffs: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    succeeded(out, format!("{cmd:?}"))
}

/// A finished command's output, or an error with its status, stdout and stderr.
pub fn succeeded(out: Output, what: impl std::fmt::Display) -> Result<Output> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// The cgroup v2 mount (on hybrid hosts `/sys/fs/cgroup/unified`): the mount point of the first
/// `cgroup2` line of `/proc/self/mountinfo`, as the agent finds it too.
pub fn cgroup2_root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let line = text
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|r| r.starts_with("cgroup2 "))
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")?;
    let point = line
        .split(' ')
        .nth(4)
        .context("a mountinfo line without a mount point")?;
    // Mount points escape space as \040; the lab's never have one.
    if point.contains('\\') {
        bail!(
            "the cgroup2 mount point {point:?} has escaped characters; the lab does not handle them"
        );
    }
    Ok(point.into())
}

/// Whether `dir` is on a bpffs.
fn is_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(dir).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Where the workspace's binaries are: next to the running test binary (target/<profile>/deps
/// → target/<profile>), or `MESHLANE_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MESHLANE_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is not built; run `cargo build --workspace --bins` (or set MESHLANE_BIN_DIR)",
            p.display()
        );
    }
    Ok(p)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

/// Kills every process in a cgroup subtree and removes its directories, deepest first.
fn remove_cgroup_tree(cg: &Path) {
    if !cg.exists() {
        return;
    }
    let _ = std::fs::write(cg.join("cgroup.kill"), "1");
    let mut dirs = Vec::new();
    collect_dirs(cg, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        for _ in 0..100 {
            if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Where a lab records the value a knob had before the lab changed it.
pub fn knob_record(lab_dir: &Path, knob: &str) -> PathBuf {
    lab_dir
        .join("knobs")
        .join(knob.trim_start_matches('/').replace('/', "%"))
}

/// A kernel knob (a sysfs or procfs file) a lab run changed: put back when dropped and, should
/// the run die first, by the next lab run's clean-up, from the record in the lab's directory.
pub struct Knob {
    path: PathBuf,
    orig: String,
    record: PathBuf,
}

impl Drop for Knob {
    fn drop(&mut self) {
        match std::fs::write(&self.path, &self.orig) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.record);
            }
            Err(e) => eprintln!(
                "could not put {} back to {} ({e}); the next lab run retries",
                self.path.display(),
                self.orig
            ),
        }
    }
}

/// Puts back every knob a dead run recorded in its lab directory.
fn restore_knobs(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir.join("knobs")) else {
        return;
    };
    for e in rd.flatten() {
        let knob = format!("/{}", e.file_name().to_string_lossy().replace('%', "/"));
        if let Ok(orig) = std::fs::read_to_string(e.path())
            && std::fs::write(&knob, orig.trim()).is_ok()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn remove_lab_dir(dir: &Path) {
    restore_knobs(dir);
    // The agent's bpffs is mounted inside; unmount it (with everything pinned there) first.
    let bpffs = dir.join("bpffs");
    if is_bpffs(&bpffs) {
        let _ = meshlane_api::pins::unpin_all(&bpffs);
        let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes what labs of processes that no longer exist left behind.
pub fn cleanup_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if owner_pid(name).is_some_and(|p| !pid_alive(p)) {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(rd) = std::fs::read_dir(&root)
    {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|p| !pid_alive(p)) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let mut live_labs = 0;
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match owner_pid(&name) {
                Some(p) if !pid_alive(p) => remove_lab_dir(&e.path()),
                Some(_) => live_labs += 1,
                None => {}
            }
        }
    }
    // cnitool keeps libcni's result cache in the host's /var/lib/cni (it has no flag for
    // another place); a lab's DEL removes its entries, a crashed lab's stay. With no lab alive,
    // every entry of the lab network is stale.
    if live_labs == 0
        && let Ok(rd) = std::fs::read_dir("/var/lib/cni/results")
    {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{}-", cni::NETWORK))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Lab {
    /// A new, empty lab: its node namespace, its cgroup, its directory, and its CNI network
    /// (the bridge appears with the first pod).
    pub fn new() -> Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab needs root (network namespaces, cgroups, BPF)");
        }
        cleanup_stale();
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let cgroup = cgroup2_root()?.join(&id);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating the lab cgroup {}", cgroup.display()))?;
        let node_ns = format!("{id}-node");
        let lab = Lab {
            id,
            dir,
            cgroup,
            node_ns,
            pods: Vec::new(),
            agent: None,
        };
        ip(&["netns", "add", &lab.node_ns])?;
        ip(&["-n", &lab.node_ns, "link", "set", "lo", "up"])?;
        cni::write_network(&lab)?;
        Ok(lab)
    }

    /// Sets a kernel knob (a sysfs or procfs file) to `value` until the guard is dropped,
    /// first recording its old value in the lab's directory.
    pub fn set_knob(&self, knob: &str, value: &str) -> Result<Knob> {
        let orig = std::fs::read_to_string(knob)
            .with_context(|| format!("reading {knob}"))?
            .trim()
            .to_string();
        let record = knob_record(&self.dir, knob);
        if record.exists() {
            bail!(
                "{knob} is already changed by this lab ({})",
                record.display()
            );
        }
        if let Some(d) = record.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(&record, &orig).with_context(|| format!("writing {}", record.display()))?;
        let guard = Knob {
            path: knob.into(),
            orig,
            record,
        };
        std::fs::write(knob, value).with_context(|| format!("writing {value} to {knob}"))?;
        Ok(guard)
    }

    /// Adds a pod through the lab's CNI chain (bridge + host-local + portmap + meshlane, run
    /// by cnitool, the libcni runtime): its addresses come from host-local in order
    /// (10.77.0.10+n, fd77::a+n). The meshlane plugin leaves it alone (`MESHLANE_MODE=off`);
    /// tests enroll it through the API when they want to.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        self.add_pod_with(name, &[("MESHLANE_MODE", "off")])
    }

    /// Adds a pod through the lab's CNI chain with these `CNI_ARGS` (besides the pod's
    /// Kubernetes namespace `lab` and name).
    pub fn add_pod_with(&mut self, name: &str, cni_args: &[(&str, &str)]) -> Result<Pod> {
        let netns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &netns])?;
        let netns_path = PathBuf::from("/run/netns").join(&netns);
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        // No duplicate address detection: a pod's IPv6 address is usable at once, as in a
        // cluster whose runtime sets the same sysctls.
        for conf in ["all", "default"] {
            run(Command::new("ip").args([
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{conf}.accept_dad=0"),
            ]))?;
        }
        let added = cni::add(self, &netns_path, name, cni_args)?;
        let cgroup = self.cgroup.join(name);
        std::fs::create_dir_all(&cgroup)?;
        let pod = Pod {
            name: name.into(),
            netns_path,
            netns,
            cgroup,
            ip: added.ip4,
            ip6: added.ip6,
            host_veth: added.host_veth,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// A command that runs inside `pod`: it joins the pod's cgroup, then its network namespace
    /// (in that order: after entering the netns, /sys may show another world).
    pub fn cmd(&self, pod: &Pod, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        in_cgroup_and_netns(program, &pod.cgroup, Some(&pod.netns_path))
    }

    /// A command in a cgroup of the lab but in the host network namespace — to prove such
    /// sockets are left alone. Only loopback traffic is ever sent from there.
    pub fn host_cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let cg = self.cgroup.join("host-probe");
        std::fs::create_dir_all(&cg)?;
        in_cgroup_and_netns(program, &cg, None)
    }

    /// Interface byte counters `(rx, tx)` of `dev` in network namespace `ns`, read with `ip -s`.
    pub fn link_bytes(ns: &str, dev: &str) -> Result<(u64, u64)> {
        let out = ip(&["-n", ns, "-s", "-j", "link", "show", "dev", dev])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let s = &v[0]["stats64"];
        Ok((
            s["rx"]["bytes"].as_u64().context("rx bytes")?,
            s["tx"]["bytes"].as_u64().context("tx bytes")?,
        ))
    }

    /// The CNI queue of this lab's agent (and of the plugin in this lab's chain).
    pub fn cni_queue_dir(&self) -> PathBuf {
        self.dir.join("cni-queue")
    }

    /// Starts an agent on this lab's cgroup with its own bpffs, API socket and state file.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        if self.agent.is_some() {
            bail!("the lab's agent is already running");
        }
        let bpffs = self.dir.join("bpffs");
        let api = self.dir.join("agent.sock");
        let state = self.dir.join("state.json");
        let log = self.dir.join("agent.log");
        let mut args: Vec<String> = vec![
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--bpffs".into(),
            bpffs.display().to_string(),
            "--api-socket".into(),
            api.display().to_string(),
            "--state-file".into(),
            state.display().to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--cni-queue-dir".into(),
            self.cni_queue_dir().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let _ = std::fs::remove_file(&api);
        let logf = File::options().create(true).append(true).open(&log)?;
        let child = Command::new(bin("meshlane-agent")?)
            .args(&args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting meshlane-agent")?;
        self.agent = Some(Agent {
            child,
            api,
            bpffs,
            state,
            log,
            args,
        });
        self.wait_agent_ready(Duration::from_secs(60))
    }

    fn wait_agent_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let agent = self.agent.as_mut().context("no agent")?;
            if let Some(st) = agent.child.try_wait()? {
                let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
                self.agent = None;
                bail!("meshlane-agent exited ({st}) while starting:\n{log}");
            }
            if let Ok(mut c) = Client::connect(&agent.api, Duration::from_secs(5))
                && c.call_json(&Request::Status).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
                bail!("meshlane-agent not ready after {timeout:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A lab with `names` pods and a running agent whose self-test passed; the pods are
    /// enrolled (without sidecars) if `enroll`.
    pub fn with_agent(names: &[&str], enroll: bool, agent_args: &[&str]) -> Result<Lab> {
        let mut lab = Lab::new()?;
        for n in names {
            lab.add_pod(n)?;
        }
        lab.start_agent(agent_args)?;
        let st = lab.call(&Request::Status)?;
        if st["selftest"]["passed"] != true {
            bail!("the agent's self-test failed on this kernel: {st:#}");
        }
        if enroll {
            for p in lab.pods.clone() {
                lab.enroll(&p)?;
            }
        }
        Ok(lab)
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the lab's agent is not running")
    }

    /// A client of the lab agent's API.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.agent().api, Duration::from_secs(60))?)
    }

    /// Calls the API, failing on a refusal; the answer as the agent sent it (what `--json`
    /// prints), so tests check the wire form users see.
    pub fn call(&self, req: &Request) -> Result<Value> {
        Ok(self.client()?.call_json(req)?)
    }

    /// Runs the `meshlane` CLI against this lab's agent.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(bin("meshlane")?)
            .arg("--api-socket")
            .arg(&self.agent().api)
            .args(args)
            .output()?;
        Ok(out)
    }

    /// Enrolls a pod through the API.
    pub fn enroll(&self, pod: &Pod) -> Result<Value> {
        self.enroll_with(pod, None)
    }

    /// Enrolls a pod, with sidecar capture when `sidecar` is given.
    pub fn enroll_with(
        &self,
        pod: &Pod,
        sidecar: Option<meshlane_api::types::SidecarSpec>,
    ) -> Result<Value> {
        self.call(&Request::PodAdd {
            netns: pod.netns_path.clone(),
            ips: vec![pod.ip.into(), pod.ip6.into()],
            name: Some(format!("lab/{}", pod.name)),
            sidecar,
            accel: None,
            telemetry: None,
            cni: None,
        })
    }

    /// Enrolls a pod in the fast path without flow telemetry.
    pub fn enroll_unobserved(&self, pod: &Pod) -> Result<Value> {
        self.call(&Request::PodAdd {
            netns: pod.netns_path.clone(),
            ips: vec![pod.ip.into(), pod.ip6.into()],
            name: Some(format!("lab/{}", pod.name)),
            sidecar: None,
            accel: None,
            telemetry: Some(false),
            cni: None,
        })
    }

    pub fn unenroll(&self, pod: &Pod) -> Result<Value> {
        self.call(&Request::PodDel {
            netns: Some(pod.netns_path.clone()),
            name: None,
            attachment: None,
        })
    }

    /// The agent's counters by name.
    pub fn counters(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let st = self.call(&Request::Status)?;
        let m = st["counters"]
            .as_object()
            .context("status has counters")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
            .collect();
        Ok(m)
    }

    pub fn counter(&self, name: &str) -> Result<u64> {
        self.counters()?
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("no counter {name}"))
    }

    /// SIGKILLs the agent (no clean-up of any kind runs).
    pub fn kill_agent(&mut self) -> Result<()> {
        let mut a = self.agent.take().context("no agent")?;
        a.child.kill()?;
        a.child.wait()?;
        Ok(())
    }

    /// SIGTERMs the agent and waits for it.
    pub fn stop_agent(&mut self) -> Result<()> {
        let mut a = self.agent.take().context("no agent")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                a.child.kill()?;
                bail!("the agent did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts the agent again with the arguments it had.
    pub fn restart_agent(&mut self, extra: &[&str]) -> Result<()> {
        self.start_agent(extra)
    }

    /// The address the agent's metrics server listens on, from its log.
    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr> {
        let log = self.agent_log();
        let at = log
            .rfind("metrics=")
            .with_context(|| format!("no metrics address in the agent log:\n{log}"))?;
        let addr: String = log[at + "metrics=".len()..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        Ok(addr.parse()?)
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Programs attached to the lab cgroup, as bpftool sees them (evidence we don't produce).
    pub fn bpftool_cgroup(&self) -> Result<String> {
        let out = run(Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.cgroup))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Uninstalls the agent (if it runs), then removes everything the lab made.
    pub fn teardown(&mut self) {
        if let Some(mut a) = self.agent.take() {
            if let Ok(mut c) = Client::connect(&a.api, Duration::from_secs(20)) {
                let _ = c.call_json(&Request::Uninstall);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while a.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        remove_cgroup_tree(&self.cgroup);
        for p in std::mem::take(&mut self.pods) {
            if let Err(e) = cni::del(self, &p.netns_path) {
                eprintln!("lab teardown: CNI DEL of pod {}: {e:#}", p.name);
            }
            let _ = Command::new("ip").args(["netns", "del", &p.netns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node_ns])
            .output();
        remove_lab_dir(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

// The one raw syscall site: a pre-exec hook that joins the cgroup and the netns.
#[allow(unsafe_code)]
fn in_cgroup_and_netns(
    program: impl AsRef<std::ffi::OsStr>,
    cgroup: &Path,
    netns: Option<&Path>,
) -> Result<Command> {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let ns = match netns {
        Some(p) => Some(File::open(p).with_context(|| format!("opening {}", p.display()))?),
        None => None,
    };
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes async-signal-safe syscalls (write, setns) on fds opened
    // before the fork; both fds are close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            let zero = b"0";
            if libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ns) = &ns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Entries of one of the lab agent's pinned maps, as bpftool dumps them (evidence we do not
/// produce ourselves).
pub fn map_entries(lab: &Lab, name: &str) -> Result<usize> {
    let path = meshlane_api::pins::PinPaths::new(&lab.agent().bpffs)
        .maps
        .join(name);
    let out = run(Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path))?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array().map_or(0, Vec::len))
}

/// Reads lines from a child's stdout until one satisfies `f`, or the timeout passes. Returns the
/// line and a receiver of the lines that follow (the reader thread keeps draining stdout, so the
/// child never blocks on, or dies of, a full or closed pipe).
pub fn wait_for_line(
    child: &mut Child,
    timeout: Duration,
    f: impl Fn(&str) -> bool,
) -> Result<(String, std::sync::mpsc::Receiver<String>)> {
    let out = child.stdout.take().context("stdout not piped")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if f(&line) => return Ok((line, rx)),
            Ok(_) => continue,
            Err(_) => bail!("no matching line within {timeout:?}"),
        }
    }
}

/// Spawns a command with piped stdout/stderr.
pub fn spawn_piped(cmd: &mut Command) -> Result<Child> {
    Ok(cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}
