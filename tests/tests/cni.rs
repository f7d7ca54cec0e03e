//! The chained CNI plugin, driven the way a container runtime drives it: cnitool (libcni, the
//! library containerd and CRI-O use) running real conflists — Debian's plugins at spec 1.0.0,
//! the reference plugins v1.10.0 at 1.1.0 — and, where a runtime would pass what cnitool cannot
//! (valid attachments, bad input), the plugin called directly with the runtime's environment.
//!
//! Run as root: `cargo test -p meshlane-lab --test cni -- --test-threads=1`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use meshlane_api::{Request, queue};
use meshlane_lab::{
    Lab, bin,
    cni::{self, NETWORK},
    map_entries,
    probe::transfer,
};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn pods(lab: &Lab) -> Result<Vec<Value>> {
    Ok(lab
        .call(&Request::PodList)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Waits until `f` holds, up to `timeout`; returns how long it took.
fn wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The plugin called as a runtime calls it: `CNI_*` in the environment, the configuration on
/// stdin.
fn invoke(command: &str, env: &[(&str, &str)], stdin: &str) -> Result<Output> {
    let mut child = Command::new(bin("meshlane-cni")?)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/usr/lib/cni")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // A plugin that refuses its environment exits before reading stdin, as a runtime's plugin
    // may: the broken pipe is not the test's concern, the plugin's answer is.
    match child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(child.wait_with_output()?)
}

/// The plugin's object of the lab network at `version`, standalone (as libcni hands it to the
/// plugin: with the list's name and version).
fn plugin_conf(lab: &Lab, version: &str, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": NETWORK,
        "type": "meshlane",
        "agentSocket": lab.dir.join("agent.sock"),
        "queueDir": lab.cni_queue_dir(),
    });
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    c
}

fn prev_result(ip4: &str, ip6: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "veth0", "mac": "aa:bb:cc:dd:ee:01"},
                       {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/x"}],
        "ips": [{"interface": 1, "address": format!("{ip4}/24")},
                {"interface": 1, "address": format!("{ip6}/64")}]
    })
}

fn netns_add(lab: &Lab, name: &str) -> Result<PathBuf> {
    let ns = format!("{}-{name}", lab.id);
    meshlane_lab::run(Command::new("ip").args(["netns", "add", &ns]))?;
    Ok(PathBuf::from("/run/netns").join(ns))
}

fn netns_del(path: &Path) {
    if let Some(n) = path.file_name() {
        let _ = Command::new("ip").arg("netns").arg("del").arg(n).output();
    }
}

fn cnitool_ok(out: Output, what: &str) -> Result<Output> {
    meshlane_lab::succeeded(out, what)
}

/// The plugin called as a runtime calls it, failing with its output unless it succeeded.
fn invoke_ok(command: &str, env: &[(&str, &str)], stdin: &str) -> Result<Output> {
    meshlane_lab::succeeded(invoke(command, env, stdin)?, command)
}

/// GC as libcni calls it, with `extra` (the valid attachments, in either spelling).
fn gc(lab: &Lab, extra: Value) -> Result<()> {
    invoke_ok("GC", &[], &plugin_conf(lab, "1.1.0", extra).to_string()).map(drop)
}

/// ADD → accelerated between two CNI-made pods (the bridge veths carry almost nothing) →
/// CHECK → DEL in reverse order → DEL again; the agent's pods and maps follow every step.
#[test]
fn the_chain_enrolls_checks_and_deletes_pods() -> Result<()> {
    let mut lab = Lab::with_agent(&[], false, &[])?;
    let a = lab.add_pod_with("a", &[])?;
    let b = lab.add_pod_with("b", &[])?;
    let list = pods(&lab)?;
    assert_eq!(list.len(), 2, "{list:#?}");
    for (p, v) in [(&a, &list[0]), (&b, &list[1])] {
        assert_eq!(v["name"], format!("lab/{}", p.name), "{v}");
        assert_eq!(v["mode"], "accelerate", "{v}");
        assert_eq!(v["cni"]["ifname"], "eth0", "{v}");
        assert_eq!(v["cni"]["network"], NETWORK, "{v}");
        assert!(
            v["cni"]["container_id"]
                .as_str()
                .is_some_and(|c| c.starts_with("cnitool-")),
            "{v}"
        );
        assert_eq!(
            v["ips"],
            json!([p.ip.to_string(), p.ip6.to_string()]),
            "{v}"
        );
    }
    assert_eq!(map_entries(&lab, "ML_NETNS")?, 2);
    assert_eq!(map_entries(&lab, "ML_ENDPOINTS")?, 4);
    // The CLI shows container, interface and mode.
    let out = lab.cli(&["pod", "list"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("accelerate") && text.contains("/eth0"),
        "{text}"
    );

    // Accelerated: 64 MiB from a to b, and the bridge veth of a carries almost none of it.
    let veth0 = Lab::link_bytes(&lab.node_ns, &a.host_veth)?.0;
    transfer(&lab, &a, &b, 7800, 64 * MIB)?;
    let through_veth = Lab::link_bytes(&lab.node_ns, &a.host_veth)?.0 - veth0;
    assert!(
        through_veth < 2 * MIB,
        "{through_veth} bytes went through a's veth"
    );

    let net = lab.dir.join("cni");
    let network = cni::Network {
        conf_dir: net.join("net.d"),
        bin_dir: net.join("bin"),
        conflist: Value::Null,
    };
    // CHECK through the whole chain. The bridge plugin (Debian's 1.1.1 and v1.10.0 alike)
    // compares the bridge's MAC with the one cached at ADD, and the bridge takes a new MAC when
    // another port joins, so only the newest pod's CHECK passes the bridge.
    cnitool_ok(
        cni::cnitool_run(
            &lab,
            &network,
            "check",
            Some(&b.netns_path),
            &cni::k8s_args(&b.name, &[]),
        )?,
        "cnitool check",
    )?;
    // DEL in reverse order, each followed by the agent's view; then DEL again.
    for (p, left) in [(&b, 1usize), (&a, 0)] {
        cnitool_ok(
            cni::cnitool_run(&lab, &network, "del", Some(&p.netns_path), "")?,
            "cnitool del",
        )?;
        assert_eq!(pods(&lab)?.len(), left);
        assert_eq!(map_entries(&lab, "ML_NETNS")?, left);
        assert_eq!(map_entries(&lab, "ML_ENDPOINTS")?, 2 * left);
        cnitool_ok(
            cni::cnitool_run(&lab, &network, "del", Some(&p.netns_path), "")?,
            "a second cnitool del",
        )?;
    }
    // GC at the end of the sequence: nothing of this network is left to collect.
    gc(&lab, json!({"cni.dev/valid-attachments": []}))?;
    assert_eq!(pods(&lab)?.len(), 0);
    assert_eq!(map_entries(&lab, "ML_NETNS")?, 0);
    // CHECK fails when the agent no longer has the pod.
    let c = lab.add_pod_with("c", &[])?;
    lab.call(&Request::PodDel {
        netns: Some(c.netns_path.clone()),
        name: None,
        attachment: None,
    })?;
    let out = cni::cnitool_run(
        &lab,
        &network,
        "check",
        Some(&c.netns_path),
        &cni::k8s_args("c", &[]),
    )?;
    assert!(
        !out.status.success(),
        "check passed for a pod the agent does not have"
    );
    // DEL through the chain with the netns gone succeeds (and releases c's address).
    netns_del(&c.netns_path);
    cnitool_ok(
        cni::cnitool_run(&lab, &network, "del", Some(&c.netns_path), "")?,
        "cnitool del without a netns",
    )?;
    // A pod asking for sidecar capture through CNI_ARGS gets it, with the network's settings
    // (Istio's defaults here).
    lab.add_pod_with("s", &[("MESHLANE_MODE", "sidecar")])?;
    let s = pods(&lab)?
        .into_iter()
        .find(|p| p["name"] == "lab/s")
        .context("the sidecar pod is not enrolled")?;
    assert_eq!(s["mode"], "sidecar", "{s}");
    assert_eq!(s["sidecar"]["outbound_port"], 15001, "{s}");
    assert_eq!(s["sidecar"]["proxy_uid"], 1337, "{s}");
    // DEL of a container never seen, without prevResult, succeeds.
    invoke_ok(
        "DEL",
        &[
            ("CNI_CONTAINERID", "never-seen"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/none"),
        ],
        &plugin_conf(&lab, "1.0.0", json!({})).to_string(),
    )?;
    Ok(())
}

/// Spec 1.1.0 with the reference plugins: STATUS while the agent is up, down with a writable
/// queue, and down with an unwritable one (error 50); GC with `cni.dev/valid-attachments` and
/// the older `cni.dev/attachments` removes only this network's stale enrollments.
#[test]
fn status_and_gc_at_1_1_0() -> Result<()> {
    let mut lab = Lab::with_agent(&[], false, &[])?;
    let conflist = cni::conflist(&lab, "1.1.0");
    let net = cni::write(&lab, "cni11", &conflist, &cni::reference_plugins()?)?;
    let mut made = Vec::new();
    let result = (|| -> Result<()> {
        for n in ["p1", "p2"] {
            let ns = netns_add(&lab, n)?;
            made.push(ns.clone());
            cni::add_to(&lab, &net, &ns, &cni::k8s_args(n, &[]))?;
        }
        // (Only the newest pod: the bridge plugins' CHECK compares the bridge's MAC, which
        // changes as ports join.)
        cnitool_ok(
            cni::cnitool_run(
                &lab,
                &net,
                "check",
                Some(&made[1]),
                &cni::k8s_args("p2", &[]),
            )?,
            "cnitool check",
        )?;
        cnitool_ok(
            cni::cnitool_run(&lab, &net, "status", Some(&made[0]), "")?,
            "cnitool status",
        )?;
        let hand = lab.add_pod("hand")?;
        lab.enroll(&hand)?;
        assert_eq!(pods(&lab)?.len(), 3);

        let attachment =
            |v: &Value| json!({"containerID": v["cni"]["container_id"], "ifname": "eth0"});
        let list = pods(&lab)?;
        let p1 = list
            .iter()
            .find(|p| p["name"] == "lab/p1")
            .context("p1")?
            .clone();
        gc(
            &lab,
            json!({"cni.dev/valid-attachments": [attachment(&p1)]}),
        )?;
        let names: Vec<Value> = pods(&lab)?.iter().map(|p| p["name"].clone()).collect();
        assert_eq!(names, vec![json!("lab/p1"), json!("lab/hand")]);
        // Another network's GC leaves this one's pods alone.
        let mut other_net = plugin_conf(&lab, "1.1.0", json!({"cni.dev/valid-attachments": []}));
        other_net["name"] = json!("other-net");
        let other = invoke("GC", &[], &other_net.to_string())?;
        assert!(other.status.success());
        assert_eq!(pods(&lab)?.len(), 2);
        gc(&lab, json!({"cni.dev/attachments": []}))?;
        let names: Vec<Value> = pods(&lab)?.iter().map(|p| p["name"].clone()).collect();
        assert_eq!(
            names,
            vec![json!("lab/hand")],
            "the hand-enrolled pod stays"
        );

        // cnitool's own GC (libcni): DEL of every cached attachment, then GC with no valid
        // list; the hand-enrolled pod still stays.
        let p3 = netns_add(&lab, "p3")?;
        made.push(p3.clone());
        cni::add_to(&lab, &net, &p3, &cni::k8s_args("p3", &[]))?;
        assert_eq!(pods(&lab)?.len(), 2);
        cnitool_ok(
            cni::cnitool_run(&lab, &net, "gc", Some(&p3), "")?,
            "cnitool gc",
        )?;
        let names: Vec<Value> = pods(&lab)?.iter().map(|p| p["name"].clone()).collect();
        assert_eq!(names, vec![json!("lab/hand")], "after cnitool gc");

        // STATUS: the agent away but the queue writable is fine (a restart must not mark the
        // node's network not ready); neither is error 50.
        lab.stop_agent()?;
        invoke_ok(
            "STATUS",
            &[],
            &plugin_conf(&lab, "1.1.0", json!({})).to_string(),
        )?;
        let file = lab.dir.join("not-a-dir");
        std::fs::write(&file, b"")?;
        let st = invoke(
            "STATUS",
            &[],
            &plugin_conf(&lab, "1.1.0", json!({"queueDir": file.join("q")})).to_string(),
        )?;
        assert!(!st.status.success());
        let err: Value = serde_json::from_slice(&st.stdout)?;
        assert_eq!(err["code"], 50, "{err}");
        lab.restart_agent(&[])?;
        Ok(())
    })();
    for ns in &made {
        let _ = cni::cnitool_run(&lab, &net, "del", Some(ns), "");
        netns_del(ns);
    }
    result
}

/// With the agent down, ADD succeeds and the pod works through the stack; the enrollment is
/// queued and applied within 5 s of the agent's start, and the pod is then accelerated. A DEL
/// while the agent is down is applied later. An entry applied but not removed (the agent died in
/// between) is applied again without harm.
#[test]
fn an_agent_away_loses_nothing() -> Result<()> {
    let mut lab = Lab::with_agent(&[], false, &[])?;
    let b = lab.add_pod_with("b", &[])?;
    lab.stop_agent()?;
    let a = lab.add_pod_with("a", &[])?;
    let waiting = queue::entries(&lab.cni_queue_dir())?;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let kept = lab.dir.join("queued-add.json");
    std::fs::copy(&waiting[0], &kept)?;
    // The pod works without the agent, through the stack.
    transfer(&lab, &a, &b, 7810, MIB)?;

    let started = Instant::now();
    lab.restart_agent(&[])?;
    let took = wait_until(Duration::from_secs(5), "the queued pod enrolled", || {
        Ok(pods(&lab)?.iter().any(|p| p["name"] == "lab/a"))
    })?;
    eprintln!(
        "queued pod enrolled {:?} after the agent started ({took:?} after it answered)",
        started.elapsed()
    );
    assert!(queue::entries(&lab.cni_queue_dir())?.is_empty());
    let before = lab.counter("bytes_redirected")?;
    transfer(&lab, &a, &b, 7811, 8 * MIB)?;
    assert!(
        lab.counter("bytes_redirected")? - before >= 8 * MIB,
        "not accelerated after the queue"
    );

    // Applied again (as if the agent died before removing it): same pods, counted, no failure.
    std::fs::rename(
        &kept,
        lab.cni_queue_dir().join("00000000000000000001-1-0.json"),
    )?;
    wait_until(
        Duration::from_secs(5),
        "the re-applied entry removed",
        || Ok(queue::entries(&lab.cni_queue_dir())?.is_empty()),
    )?;
    assert_eq!(pods(&lab)?.len(), 2);
    let st = lab.call(&Request::Status)?;
    assert_eq!(st["cni_queue"]["failed"], 0, "{st}");

    // A request never overtakes one that waits: an ADD waiting in the queue (written as the
    // plugin writes it) and its DEL right after, with the agent running, leave no pod behind.
    let late = netns_add(&lab, "late")?;
    let waits = queue::enqueue(
        &lab.cni_queue_dir(),
        &Request::PodAdd {
            netns: late.clone(),
            ips: vec!["10.77.3.1".parse()?],
            name: Some("lab/late".into()),
            sidecar: None,
            accel: None,
            telemetry: None,
            cni: Some(meshlane_api::types::CniAttachment {
                container_id: "late-container".into(),
                ifname: "eth0".into(),
                network: NETWORK.into(),
            }),
        },
    )?;
    invoke_ok(
        "DEL",
        &[
            ("CNI_CONTAINERID", "late-container"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", &late.display().to_string()),
        ],
        &plugin_conf(&lab, "1.0.0", json!({})).to_string(),
    )?;
    wait_until(Duration::from_secs(5), "the queue applied", || {
        Ok(queue::entries(&lab.cni_queue_dir())?.is_empty())
    })?;
    netns_del(&late);
    assert!(!waits.exists());
    assert!(
        !pods(&lab)?.iter().any(|p| p["name"] == "lab/late"),
        "the DEL overtook the ADD that waited before it"
    );

    // DEL while the agent is down: queued, applied when it is back.
    lab.stop_agent()?;
    cni::del_pod(&lab, &a)?;
    assert_eq!(queue::entries(&lab.cni_queue_dir())?.len(), 1);
    lab.restart_agent(&[])?;
    wait_until(Duration::from_secs(5), "the queued DEL applied", || {
        Ok(!pods(&lab)?.iter().any(|p| p["name"] == "lab/a"))
    })?;
    Ok(())
}

/// 64 ADDs in parallel, then 64 DELs: every enrollment made and removed once; the same with the
/// agent down, every ADD queued and applied.
#[test]
fn sixty_four_parallel_adds_and_dels() -> Result<()> {
    let mut lab = Lab::with_agent(&[], false, &[])?;
    let n = 64usize;
    let mut nss = Vec::new();
    for i in 0..n {
        nss.push(netns_add(&lab, &format!("par{i}"))?);
    }
    let result = (|| -> Result<()> {
        let confs: Vec<String> = (0..n)
            .map(|i| {
                let mut c = plugin_conf(&lab, "1.0.0", json!({}));
                c["prevResult"] = prev_result(
                    &format!("10.77.1.{}", i + 1),
                    &format!("fd77:1::{:x}", i + 1),
                );
                c.to_string()
            })
            .collect();
        let run_all = |cmd: &'static str| -> Result<()> {
            let outs: Vec<Result<Output>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..n)
                    .map(|i| {
                        let (ns, conf) = (nss[i].display().to_string(), confs[i].clone());
                        s.spawn(move || {
                            let id = format!("par-container-{i}");
                            let args = format!("K8S_POD_NAMESPACE=par;K8S_POD_NAME=p{i}");
                            invoke(
                                cmd,
                                &[
                                    ("CNI_CONTAINERID", &id),
                                    ("CNI_IFNAME", "eth0"),
                                    ("CNI_NETNS", &ns),
                                    ("CNI_ARGS", &args),
                                ],
                                &conf,
                            )
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("no panic"))
                    .collect()
            });
            for (i, o) in outs.into_iter().enumerate() {
                let o = o?;
                if !o.status.success() {
                    bail!(
                        "{cmd} {i}: {}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            }
            Ok(())
        };
        run_all("ADD")?;
        let list = pods(&lab)?;
        assert_eq!(list.len(), n);
        for i in 0..n {
            let p = list
                .iter()
                .find(|p| p["name"] == format!("par/p{i}"))
                .with_context(|| format!("p{i} missing"))?;
            assert_eq!(p["ips"][0], format!("10.77.1.{}", i + 1));
        }
        assert_eq!(map_entries(&lab, "ML_NETNS")?, n);
        run_all("DEL")?;
        assert!(pods(&lab)?.is_empty());
        assert_eq!(map_entries(&lab, "ML_NETNS")?, 0);
        assert_eq!(map_entries(&lab, "ML_ENDPOINTS")?, 0);

        lab.stop_agent()?;
        run_all("ADD")?;
        assert_eq!(queue::entries(&lab.cni_queue_dir())?.len(), n);
        lab.restart_agent(&[])?;
        wait_until(Duration::from_secs(10), "64 queued pods enrolled", || {
            Ok(pods(&lab)?.len() == n)
        })?;
        assert!(queue::entries(&lab.cni_queue_dir())?.is_empty());
        assert_eq!(lab.call(&Request::Status)?["cni_queue"]["failed"], 0);
        run_all("DEL")?;
        assert!(pods(&lab)?.is_empty());
        Ok(())
    })();
    for ns in &nss {
        netns_del(ns);
    }
    result
}

/// Every bad input gets the spec's error code, exactly one JSON document on stdout, a message
/// naming what was wrong, and changes nothing.
#[test]
fn bad_input_gets_the_spec_error_code() -> Result<()> {
    let mut lab = Lab::with_agent(&[], false, &[])?;
    let pod = lab.add_pod("x")?;
    let ns = pod.netns_path.display().to_string();
    let good = {
        let mut c = plugin_conf(&lab, "1.0.0", json!({}));
        c["prevResult"] = prev_result("10.77.2.1", "fd77:2::1");
        c
    };
    let env_ok: Vec<(&str, &str)> = vec![
        ("CNI_CONTAINERID", "ctr-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", &ns),
    ];
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c.to_string()
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().expect("object").remove(k);
        c.to_string()
    };
    let env_with = |k: &'static str, v: &'static str| {
        let mut e: Vec<(&str, &str)> = env_ok.iter().copied().filter(|(n, _)| *n != k).collect();
        if !v.is_empty() {
            e.push((k, v));
        }
        e
    };
    // (what, environment, stdin, expected code, what the message must mention)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unsupported cniVersion",
            env_ok.clone(),
            with("cniVersion", json!("9.9.9")),
            1,
            "9.9.9",
        ),
        (
            "malformed JSON",
            env_ok.clone(),
            "{\"cniVersion\":".into(),
            6,
            "",
        ),
        (
            "unknown mode",
            env_ok.clone(),
            with("mode", json!("turbo")),
            7,
            "mode",
        ),
        (
            "unknown key",
            env_ok.clone(),
            with("agentsocket", json!("/x")),
            7,
            "agentsocket",
        ),
        (
            "relative agentSocket",
            env_ok.clone(),
            with("agentSocket", json!("agent.sock")),
            7,
            "agentSocket",
        ),
        (
            "no prevResult",
            env_ok.clone(),
            without("prevResult"),
            7,
            "prevResult",
        ),
        (
            "bad MESHLANE_MODE",
            [env_ok.clone(), vec![("CNI_ARGS", "MESHLANE_MODE=fast")]].concat(),
            good.to_string(),
            7,
            "MESHLANE_MODE",
        ),
        (
            "malformed CNI_ARGS",
            [env_ok.clone(), vec![("CNI_ARGS", "K8S_POD_NAME")]].concat(),
            good.to_string(),
            4,
            "CNI_ARGS",
        ),
        (
            "no CNI_CONTAINERID",
            env_with("CNI_CONTAINERID", ""),
            good.to_string(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "invalid container ID",
            env_with("CNI_CONTAINERID", "-not valid!"),
            good.to_string(),
            4,
            "",
        ),
        (
            "invalid interface name",
            env_with("CNI_IFNAME", "eth/0"),
            good.to_string(),
            4,
            "",
        ),
        (
            "no CNI_NETNS",
            env_with("CNI_NETNS", ""),
            good.to_string(),
            4,
            "CNI_NETNS",
        ),
    ];
    let before = pods(&lab)?;
    for (what, env, stdin, code, mention) in &cases {
        let out = invoke("ADD", env, stdin)?;
        assert!(!out.status.success(), "{what}: accepted");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut docs = serde_json::Deserializer::from_slice(&out.stdout).into_iter::<Value>();
        let doc = docs
            .next()
            .with_context(|| format!("{what}: nothing on stdout"))??;
        assert!(
            docs.next().is_none(),
            "{what}: more than one JSON document on stdout: {text}"
        );
        assert_eq!(doc["code"], *code, "{what}: {doc}");
        let msg = format!("{} {}", doc["msg"], doc["details"]);
        assert!(
            msg.contains(mention),
            "{what}: {doc} does not mention {mention:?}"
        );
        assert_eq!(pods(&lab)?, before, "{what} changed the agent's pods");
    }
    // VERSION names the versions it speaks.
    let v = invoke("VERSION", &[], "")?;
    let v: Value = serde_json::from_slice(&v.stdout)?;
    assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]), "{v}");
    // The good one works, and prints the previous result unchanged.
    let out = invoke_ok("ADD", &env_ok, &good.to_string())?;
    let printed: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(printed["ips"], good["prevResult"]["ips"]);
    assert_eq!(printed["interfaces"], good["prevResult"]["interfaces"]);
    assert_eq!(pods(&lab)?.len(), 1);
    Ok(())
}

fn install_cmd(conf: &Path, bins: &Path) -> Result<Command> {
    let mut c = Command::new(bin("meshlane-cni")?);
    c.arg("install")
        .arg("--conf-dir")
        .arg(conf)
        .arg("--bin-dir")
        .arg(bins);
    Ok(c)
}

fn dir_snapshot(d: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d)? {
        let e = e?;
        if e.file_type()?.is_file() {
            v.push((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path())?,
            ));
        }
    }
    v.sort();
    Ok(v)
}

/// The node install as the DaemonSet runs it: into an empty dir, into the primary conflist of
/// several (others' plugins and files untouched), put back within 2 s when "another CNI"
/// rewrites the file, a conflist it cannot understand refused with nothing changed, and
/// uninstall giving the original back byte for byte.
#[test]
fn install_chains_the_plugin_and_keeps_it_there() -> Result<()> {
    let lab = Lab::new()?;
    let conf = lab.dir.join("node/net.d");
    let bins = lab.dir.join("node/bin");
    std::fs::create_dir_all(&conf)?;
    std::fs::create_dir_all(&bins)?;

    let out = install_cmd(&conf, &bins)?.output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no network configuration"));
    assert_eq!(
        std::fs::read(bins.join("meshlane"))?,
        std::fs::read(bin("meshlane-cni")?)?
    );
    assert!(dir_snapshot(&conf)?.is_empty());

    let mut watch = install_cmd(&conf, &bins)?
        .arg("--watch")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = (|| -> Result<()> {
        let primary = conf.join("10-primary.conflist");
        let other = conf.join("20-other.conflist");
        let original = serde_json::to_vec_pretty(&json!({
            "cniVersion": "1.0.0", "name": "k8s",
            "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap", "capabilities": {"portMappings": true}}]
        }))?;
        std::fs::write(
            &other,
            br#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#,
        )?;
        std::fs::write(&primary, &original)?;
        let ours = |p: &Path| -> Result<bool> {
            let v: Value = serde_json::from_slice(&std::fs::read(p)?)?;
            let types: Vec<&str> = v["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["type"].as_str())
                .collect();
            Ok(types == ["bridge", "portmap", "meshlane"])
        };
        let took = wait_until(
            Duration::from_secs(2),
            "the entry chained into the new primary",
            || ours(&primary),
        )?;
        eprintln!("chained {took:?} after the primary appeared");
        assert_eq!(
            std::fs::read(&other)?,
            br#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#
        );

        // "Another CNI" rewrites its conflist without us: back within 2 s.
        let rewritten = serde_json::to_vec_pretty(&json!({
            "cniVersion": "1.0.0", "name": "k8s",
            "plugins": [{"type": "bridge", "bridge": "cni0", "mtu": 1400}, {"type": "portmap", "capabilities": {"portMappings": true}}]
        }))?;
        std::fs::write(&primary, &rewritten)?;
        let took = wait_until(
            Duration::from_secs(2),
            "the entry put back after a rewrite",
            || ours(&primary),
        )?;
        eprintln!("put back {took:?} after the rewrite");

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(watch.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        wait_until(
            Duration::from_secs(5),
            "install --watch stopped by SIGTERM",
            || Ok(watch.try_wait()?.is_some()),
        )?;
        assert!(watch.wait()?.success());

        let out = Command::new(bin("meshlane-cni")?)
            .arg("uninstall")
            .arg("--conf-dir")
            .arg(&conf)
            .arg("--bin-dir")
            .arg(&bins)
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(&primary)?,
            rewritten,
            "uninstall did not give the file back byte for byte"
        );
        assert!(!bins.join("meshlane").exists());

        // A conflist it cannot understand first in order: refused, naming it; nothing changes.
        std::fs::write(
            conf.join("05-broken.conflist"),
            b"{\"plugins\": [ {\"name\": 1} ]}",
        )?;
        let before = dir_snapshot(&conf)?;
        let out = install_cmd(&conf, &bins)?.output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("05-broken.conflist"),
            "{err}"
        );
        assert_eq!(dir_snapshot(&conf)?, before);
        assert!(!bins.join("meshlane").exists());
        Ok(())
    })();
    let _ = watch.kill();
    let _ = watch.wait();
    result
}
