//! Lab helpers for services and sidecars: `ml-svc` servers and clients, services files, HAProxy
//! sidecars running as the proxy uid, and Istio's iptables REDIRECT rules as the baseline.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use meshlane_api::Request;
use serde_json::Value;

use crate::{Lab, Pod, bin, spawn_piped, wait_for_line};

/// Istio's proxy uid.
pub const PROXY_UID: u32 = 1337;

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ml-svc whoami` in a pod and waits until it listens.
pub fn whoami(lab: &Lab, pod: &Pod, listen: &str, id: &str, udp: bool) -> Result<Proc> {
    let mut cmd = lab.cmd(pod, bin("ml-svc")?)?;
    cmd.args(["whoami", "--listen", listen, "--id", id]);
    if udp {
        cmd.arg("--udp");
    }
    let mut child = spawn_piped(&mut cmd)?;
    wait_for_line(&mut child, Duration::from_secs(10), |l| {
        l.starts_with("listening ")
    })
    .with_context(|| format!("whoami {id} on {listen} in {}", pod.name))?;
    Ok(Proc(child))
}

/// Runs `ml-svc ask` in a pod, as `uid` when given, and returns one JSON value per attempt.
pub fn ask(
    lab: &Lab,
    pod: &Pod,
    to: &str,
    n: u32,
    udp: bool,
    uid: Option<u32>,
) -> Result<Vec<Value>> {
    let svc = bin("ml-svc")?;
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = lab.cmd(pod, "setpriv")?;
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ])
            .arg(svc);
            c
        }
        None => lab.cmd(pod, svc)?,
    };
    cmd.args(["ask", "--to", to, "--n", &n.to_string()]);
    if udp {
        cmd.arg("--udp");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("ml-svc ask {to}: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("ml-svc output {l:?}")))
        .collect()
}

/// One successful `ask`: the reply, failing with the whole answer otherwise.
pub fn ask_one(lab: &Lab, pod: &Pod, to: &str, udp: bool, uid: Option<u32>) -> Result<Value> {
    let v = ask(lab, pod, to, 1, udp, uid)?.remove(0);
    if v["ok"] != true {
        bail!("ask {to} from {} (uid {uid:?}) failed: {v}", pod.name);
    }
    Ok(v)
}

/// `ip:port` with brackets for IPv6.
pub fn hostport(ip: impl Into<std::net::IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

/// Writes a services file atomically (the agent never reads half of it).
pub fn write_services(path: &Path, text: impl AsRef<[u8]>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The agent's services summary.
pub fn services_summary(lab: &Lab) -> Result<Value> {
    Ok(lab.call(&Request::Services)?["summary"].clone())
}

/// Waits until the agent applied a table after `loads_before` loads, failing on a rejection.
pub fn wait_applied(lab: &Lab, loads_before: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = services_summary(lab)?;
        if s["loads"].as_u64().unwrap_or(0) > loads_before && s["last_error"].is_null() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the agent did not apply the services file: {s:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent reports an error for the services file containing `needle`.
pub fn wait_rejected(lab: &Lab, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = services_summary(lab)?;
        if let Some(e) = s["last_error"].as_str()
            && e.contains(needle)
        {
            return Ok(e.to_string());
        }
        if Instant::now() > deadline {
            bail!("no services error containing {needle:?}: {s:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An HAProxy sidecar as Istio's Envoy would be: outbound listener 15001, inbound 15006, both
/// forwarding to `SO_ORIGINAL_DST` (`server orig 0.0.0.0:0`), running as the proxy uid.
pub fn haproxy_sidecar(lab: &Lab, pod: &Pod) -> Result<Proc> {
    let cfg = lab.dir.join(format!("haproxy-{}.cfg", pod.name));
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\n  uid {PROXY_UID}\n  gid {PROXY_UID}\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend outbound\n  bind 0.0.0.0:15001\n  bind :::15001 v6only\n  default_backend orig\n\
             frontend inbound\n  bind 0.0.0.0:15006\n  bind :::15006 v6only\n  default_backend orig\n\
             backend orig\n  server orig 0.0.0.0:0\n"
        ),
    )?;
    let mut cmd = lab.cmd(pod, "haproxy")?;
    cmd.args(["-db", "-f"]).arg(&cfg);
    let child = spawn_piped(&mut cmd)?;
    let mut p = Proc(child);
    // Ready when both listeners accept.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = p.0.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = p.0.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut err);
            }
            bail!("haproxy in {} exited ({st}): {err}", pod.name);
        }
        let listening = lab
            .cmd(pod, "ss")?
            .args(["-Hltn", "sport = :15001 or sport = :15006"])
            .output()?;
        let n = String::from_utf8_lossy(&listening.stdout).lines().count();
        if n >= 4 {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("haproxy in {} is not listening on 15001/15006", pod.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Istio's capture rules (istio-iptables) for a pod, minus the rules for its mTLS/health ports
/// that the lab does not use. The proxy's own connects to its pod's address are returned rather
/// than sent to 15006: Envoy marks those with the 127.0.0.6 source, HAProxy cannot.
pub const ISTIO_RULES: &str = "*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

/// Loads [`ISTIO_RULES`] into a pod (IPv4; the lab's sidecar comparisons use IPv4).
pub fn install_istio_iptables(lab: &Lab, pod: &Pod) -> Result<()> {
    iptables_restore(lab, pod, ISTIO_RULES)
}

/// Flushes every iptables table of a pod.
pub fn flush_iptables(lab: &Lab, pod: &Pod) -> Result<()> {
    for table in ["nat", "filter", "mangle"] {
        for op in ["-F", "-X"] {
            let out = lab.cmd(pod, "iptables")?.args(["-t", table, op]).output()?;
            if !out.status.success() {
                bail!(
                    "iptables -t {table} {op}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    Ok(())
}

/// The rules `iptables-save` prints for a pod (lines starting with `-A`).
pub fn iptables_rules(lab: &Lab, pod: &Pod) -> Result<Vec<String>> {
    let out = lab.cmd(pod, "iptables-save")?.output()?;
    if !out.status.success() {
        bail!("iptables-save: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A"))
        .map(str::to_owned)
        .collect())
}

/// kube-proxy's iptables rules for `n` services (`vip(i)`:80 → `backend`), as `iptables-restore`
/// input: KUBE-SERVICES matches each VIP in turn, a KUBE-SVC chain picks an endpoint, a
/// KUBE-SEP chain DNATs.
pub fn kube_proxy_rules(n: usize, vip: impl Fn(usize) -> String, backend: &str) -> String {
    let mut s = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..n {
        s += &format!(":KUBE-SVC-{i:06} - [0:0]\n:KUBE-SEP-{i:06} - [0:0]\n");
    }
    s += "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    for i in 0..n {
        s += &format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i:06}\n\
             -A KUBE-SVC-{i:06} -j KUBE-SEP-{i:06}\n\
             -A KUBE-SEP-{i:06} -p tcp -m tcp -j DNAT --to-destination {backend}\n",
            vip(i)
        );
    }
    s += "COMMIT\n";
    s
}

/// Loads `iptables-restore` input into a pod.
pub fn iptables_restore(lab: &Lab, pod: &Pod, rules: &str) -> Result<()> {
    let path: PathBuf = lab.dir.join(format!("rules-{}.txt", pod.name));
    std::fs::write(&path, rules)?;
    let out = lab.cmd(pod, "iptables-restore")?.arg(&path).output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore in {}: {}",
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs a command to completion in a pod, failing with its stderr.
pub fn run_in(lab: &Lab, pod: &Pod, program: &str, args: &[&str]) -> Result<String> {
    let out: std::process::Output = lab.cmd(pod, program)?.args(args).output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} in {}: {}",
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// nginx in a pod, serving `www` on `listen` (`IP:port`), run in the foreground as root. It
/// logs nothing per request (its stderr is a pipe nobody drains: a log line per 404 would fill
/// it and stall nginx), and keeps a keep-alive connection for as long as its client does (its
/// default closes it after 1,000 requests, so a load generator's connections would be new ones
/// every fraction of a second).
pub fn nginx(lab: &Lab, pod: &Pod, listen: &str, www: &Path) -> Result<Proc> {
    let dir = lab.dir.join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root; worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log stderr warn;
events {{ worker_connections 1024; }}
http {{ access_log off; log_not_found off; keepalive_requests 10000000; client_body_temp_path {dir}/cb; proxy_temp_path {dir}/pt;
  fastcgi_temp_path {dir}/ft; uwsgi_temp_path {dir}/ut; scgi_temp_path {dir}/st;
  server {{ listen {listen}; root {www}; }} }}
",
            dir = dir.display(),
            www = www.display()
        ),
    )?;
    let mut cmd = lab.cmd(pod, "nginx")?;
    cmd.arg("-p").arg(&dir).arg("-c").arg(&conf);
    let p = Proc(spawn_piped(&mut cmd)?);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab
            .cmd(pod, "ss")?
            .args([
                "-Hltn",
                &format!("sport = :{}", listen.rsplit(':').next().unwrap_or("0")),
            ])
            .output()?;
        if !out.stdout.is_empty() {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("nginx in {} is not listening on {listen}", pod.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
