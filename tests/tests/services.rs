//! Service translation end to end: a services file loaded by a real agent, connect-time DNAT in
//! the real kernel programs, getpeername and UDP replies showing the VIP, backend changes taking
//! effect for new connects, ECONNREFUSED without backends, 5,000 services, and bad files refused
//! with line-precise errors while the previous table keeps working.
//!
//! Run as root: `cargo test -p meshlane-lab -- --test-threads=1` (after `cargo build --bins`).

use std::{collections::BTreeSet, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use meshlane_api::Request;
use meshlane_lab::{
    Lab, bin,
    svc::{
        Proc, ask, ask_one, hostport, services_summary, wait_applied, wait_rejected, whoami,
        write_services,
    },
};
use serde_json::Value;

/// A lab with pods `names`, a services file holding `services`, an agent reading it, every pod
/// enrolled.
fn lab_with_services(names: &[&str], services: &str) -> Result<(Lab, PathBuf)> {
    let mut lab = Lab::new()?;
    for n in names {
        lab.add_pod(n)?;
    }
    let file = lab.dir.join("services.yaml");
    write_services(&file, services)?;
    lab.start_agent(&["--services", &file.display().to_string()])?;
    for p in lab.pods.clone() {
        lab.enroll(&p)?;
    }
    Ok((lab, file))
}

/// Backends `b` and `c` answer on port 8080 (TCP and UDP, IPv4 and IPv6).
fn backends(lab: &Lab) -> Result<Vec<Proc>> {
    Ok(vec![
        whoami(lab, lab.pod("b"), "[::]:8080", "b", true)?,
        whoami(lab, lab.pod("c"), "[::]:8080", "c", true)?,
    ])
}

fn ids(replies: &[Value]) -> Result<BTreeSet<String>> {
    replies
        .iter()
        .map(|r| {
            if r["ok"] != true {
                bail!("a connect failed: {r}");
            }
            Ok(r["reply"]["id"].as_str().context("reply id")?.to_string())
        })
        .collect()
}

#[test]
fn vips_translate_show_the_vip_and_follow_backend_changes() -> Result<()> {
    let b4 = "10.77.0.11";
    let c4 = "10.77.0.12";
    let table = |web_backends: &str| {
        format!(
            "services:\n\
             - name: web\n  vip: 10.96.0.10\n  port: 80\n  backends: [{web_backends}]\n\
             - name: dns\n  vip: 10.96.0.53\n  port: 53\n  protocol: UDP\n  backends: [\"{b4}:8080\"]\n\
             - name: web6\n  vip: \"fd96::10\"\n  port: 80\n  backends: [\"[fd77::b]:8080\"]\n\
             - name: sticky\n  vip: 10.96.0.11\n  port: 80\n  balance: client-address\n  backends: [\"{b4}:8080\", \"{c4}:8080\"]\n\
             - name: empty\n  vip: 10.96.0.12\n  port: 80\n  backends: []\n"
        )
    };
    let (lab, file) = lab_with_services(
        &["a", "b", "c"],
        &table(&format!("\"{b4}:8080\", \"{c4}:8080\"")),
    )?;
    // The lab numbers pods from 10.77.0.11; check the addresses the table assumed.
    assert_eq!(lab.pod("b").ip.to_string(), b4);
    assert_eq!(lab.pod("c").ip.to_string(), c4);
    assert_eq!(lab.pod("b").ip6.to_string(), "fd77::b");
    let _servers = backends(&lab)?;
    let a = lab.pod("a");

    // TCP: every connect reaches a backend, getpeername shows the VIP, both backends serve.
    let replies = ask(&lab, a, "10.96.0.10:80", 30, false, None)?;
    assert_eq!(
        ids(&replies)?,
        BTreeSet::from(["b".into(), "c".into()]),
        "{replies:?}"
    );
    for r in &replies {
        assert_eq!(
            r["peer"], "10.96.0.10:80",
            "getpeername must show the VIP: {r}"
        );
        let local = r["reply"]["local"].as_str().unwrap_or("");
        assert!(
            local.ends_with(":8080"),
            "the backend saw the connect on its port: {r}"
        );
        assert!(
            !local.contains("10.96.0.10"),
            "the connect was translated: {r}"
        );
    }

    // UDP: the query to VIP:53 is answered, and the reply comes from the VIP.
    for r in ask(&lab, a, "10.96.0.53:53", 5, true, None)? {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(
            r["peer"], "10.96.0.53:53",
            "the reply's source must be the VIP: {r}"
        );
        assert_eq!(r["reply"]["id"], "b", "{r}");
        assert!(
            r["reply"]["local"]
                .as_str()
                .unwrap_or("")
                .ends_with(":8080"),
            "{r}"
        );
    }

    // IPv6 VIP.
    let r = ask_one(&lab, a, "[fd96::10]:80", false, None)?;
    assert_eq!(r["peer"], "[fd96::10]:80", "{r}");
    assert_eq!(r["reply"]["id"], "b", "{r}");

    // Client-address affinity: one client, one backend.
    let sticky = ids(&ask(&lab, a, "10.96.0.11:80", 20, false, None)?)?;
    assert_eq!(
        sticky.len(),
        1,
        "affinity must pin a client to one backend: {sticky:?}"
    );

    // No backends: ECONNREFUSED, at once.
    let r = ask(&lab, a, "10.96.0.12:80", 1, false, None)?.remove(0);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");

    // status: the table, connects per service, refusals.
    let st = lab.call(&Request::Status)?;
    let web = st["service_table"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["name"] == "web"))
        .with_context(|| format!("web in status: {st:#}"))?;
    assert!(web["connects"].as_u64().unwrap_or(0) >= 30, "{web}");
    assert_eq!(web["frontend"], "10.96.0.10:80/TCP");
    let empty = st["service_table"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["name"] == "empty"))
        .context("empty in status")?;
    assert!(empty["refused"].as_u64().unwrap_or(0) >= 1, "{empty}");
    assert!(
        st["counters"]["svc_datagram_translated"]
            .as_u64()
            .unwrap_or(0)
            >= 5
    );
    assert!(st["counters"]["revnat_applied"].as_u64().unwrap_or(0) >= 35);
    let out = lab.cli(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("10.96.0.10:80/TCP") && text.contains("(none: connects refused)"),
        "{text}"
    );

    // Remove backend b: new connects go only to c.
    let loads = services_summary(&lab)?["loads"].as_u64().unwrap_or(0);
    write_services(&file, table(&format!("\"{c4}:8080\"")))?;
    wait_applied(&lab, loads)?;
    let only_c = ids(&ask(&lab, a, "10.96.0.10:80", 20, false, None)?)?;
    assert_eq!(only_c, BTreeSet::from(["c".to_string()]));

    // None left: refused.
    let loads = services_summary(&lab)?["loads"].as_u64().unwrap_or(0);
    write_services(&file, table(""))?;
    wait_applied(&lab, loads)?;
    let r = ask(&lab, a, "10.96.0.10:80", 1, false, None)?.remove(0);
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    Ok(())
}

#[test]
fn five_thousand_services_load_and_translate() -> Result<()> {
    const N: usize = 5_000;
    let vip = |i: usize| format!("10.100.{}.{}", i / 250, i % 250 + 1);
    let mut text = String::from("services:\n");
    for i in 0..N {
        text += &format!(
            "  - name: svc-{i}\n    vip: {}\n    port: 80\n    backends: [\"10.77.0.11:8080\", \"10.77.0.12:8080\"]\n",
            vip(i)
        );
    }
    let started = Instant::now();
    let (lab, _file) = lab_with_services(&["a", "b", "c"], &text)?;
    let summary = services_summary(&lab)?;
    eprintln!(
        "5000 services: agent up and table loaded in {:?}",
        started.elapsed()
    );
    assert_eq!(summary["services"], N, "{summary}");
    assert_eq!(summary["backends"], 2 * N, "{summary}");
    let _servers = backends(&lab)?;
    for i in [0, 1, N / 2, N - 2, N - 1] {
        let to = format!("{}:80", vip(i));
        let r = ask_one(&lab, lab.pod("a"), &to, false, None)?;
        assert_eq!(r["peer"], to, "{r}");
        assert!(
            ["b", "c"].contains(&r["reply"]["id"].as_str().unwrap_or("")),
            "{r}"
        );
    }
    let all = lab.call(&Request::Services)?;
    assert_eq!(all["services"].as_array().map(Vec::len), Some(N));
    Ok(())
}

#[test]
fn bad_services_files_are_refused_and_the_old_table_keeps_working() -> Result<()> {
    let good = "services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    backends: [\"10.77.0.11:8080\"]\n";
    let (lab, file) = lab_with_services(&["a", "b"], good)?;
    let _server = whoami(&lab, lab.pod("b"), "[::]:8080", "b", false)?;
    let works = |lab: &Lab| -> Result<()> {
        let r = ask_one(lab, lab.pod("a"), "10.96.0.10:80", false, None)?;
        if r["reply"]["id"] != "b" || r["peer"] != "10.96.0.10:80" {
            bail!("the old table stopped working: {r}");
        }
        Ok(())
    };
    works(&lab)?;
    let loads = services_summary(&lab)?["loads"].as_u64().unwrap_or(0);

    let garbage: Vec<u8> = {
        // 1 MB of deterministic pseudo-random bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..1_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    };
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "wrong types",
            b"services:\n  - name: web\n    vip: 10.96.0.10\n    port: http\n    backends: 10.77.0.11:8080\n".to_vec(),
            vec![
                "line 4, column 11: services[0].port: expected an integer 1-65535, found \"http\"",
                "line 5, column 15: services[0].backends: expected a list of IP:port",
            ],
        ),
        (
            "duplicate VIPs",
            b"services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n  - name: web2\n    vip: 10.96.0.10\n    port: 80\n".to_vec(),
            vec!["line 5, column 1: services[1]: duplicate VIP: 10.96.0.10:80/TCP is already defined by services[0] (\"web\", line 2)"],
        ),
        (
            "unknown protocol",
            b"services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    protocol: SCTP\n".to_vec(),
            vec!["line 5, column 15: services[0].protocol: unknown protocol \"SCTP\"; expected TCP or UDP"],
        ),
        (
            "a backend that is not an address",
            b"services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    backends:\n      - 10.77.0.11:8080\n      - backend-1.local:8080\n".to_vec(),
            vec!["line 7, column 9: services[0].backends[1]: \"backend-1.local:8080\" is not an address"],
        ),
        // Random bytes are not UTF-8 (checked below); the report still names line and column.
        ("1 MB of garbage", garbage, vec!["not UTF-8 text (invalid byte at offset", "line 1, column "]),
    ];
    for (what, bytes, expected) in &cases {
        write_services(&file, bytes)?;
        let err = wait_rejected(&lab, expected[0])
            .with_context(|| format!("{what}: the agent did not refuse it"))?;
        for e in expected {
            assert!(err.contains(e), "{what}: expected {e:?} in:\n{err}");
        }
        assert!(
            err.contains(&file.display().to_string()),
            "{what}: the path is named: {err}"
        );
        let s = services_summary(&lab)?;
        assert_eq!(s["loads"], loads, "{what}: nothing was applied");
        assert_eq!(s["services"], 1, "{what}: the old table is in force");
        works(&lab).with_context(|| what.to_string())?;

        // The CLI's offline check reports the same.
        let bad = lab.dir.join("check.yaml");
        std::fs::write(&bad, bytes)?;
        let out = std::process::Command::new(bin("meshlane")?)
            .args(["services", "check"])
            .arg(&bad)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: check must fail");
        assert!(stderr.contains(expected[0]), "{what}: {stderr}");
    }
    assert!(std::str::from_utf8(&cases[4].1).is_err());

    // A good file again is applied and clears the error.
    write_services(&file, good.replace("10.96.0.10", "10.96.0.20"))?;
    let s = wait_applied(&lab, loads)?;
    assert!(s["last_error"].is_null(), "{s}");
    let r = ask_one(
        &lab,
        lab.pod("a"),
        &hostport([10, 96, 0, 20], 80),
        false,
        None,
    )?;
    assert_eq!(r["reply"]["id"], "b");
    Ok(())
}
