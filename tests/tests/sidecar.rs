//! Sidecar capture without iptables, end to end: the real connect and getsockopt programs, a
//! real agent, and HAProxy from Debian as the sidecar (uid 1337, `server orig 0.0.0.0:0`, i.e.
//! forwarding to `SO_ORIGINAL_DST`), compared against Istio's iptables REDIRECT rules.
//!
//! Run as root: `cargo test -p meshlane-lab -- --test-threads=1` (after `cargo build --bins`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use meshlane_api::{Request, types::SidecarSpec};
use meshlane_lab::{
    Lab, bin,
    svc::{
        PROXY_UID, ask_one, flush_iptables, haproxy_sidecar, hostport, install_istio_iptables,
        iptables_rules, nginx, whoami,
    },
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

#[test]
fn capture_keeps_the_original_destination_and_honours_exclusions() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b", "c", "d"], false, &[])?;
    let (a, b, c, d) = (
        lab.pod("a").clone(),
        lab.pod("b").clone(),
        lab.pod("c").clone(),
        lab.pod("d").clone(),
    );
    lab.enroll_with(
        &a,
        Some(SidecarSpec {
            exclude_outbound_ports: vec![2222],
            exclude_cidrs: vec![format!("{}/32", d.ip).parse()?],
            ..SidecarSpec::default()
        }),
    )?;
    lab.enroll_with(&b, Some(SidecarSpec::default()))?;
    lab.enroll(&c)?;
    lab.enroll(&d)?;

    // Stand-ins for the proxies: they answer with SO_ORIGINAL_DST as a proxy would read it.
    let _servers = [
        whoami(&lab, &a, "[::]:15001", "a-outbound", false)?,
        whoami(&lab, &b, "[::]:15006", "b-inbound", false)?,
        whoami(&lab, &b, "[::]:80", "b-app", false)?,
        whoami(&lab, &b, "[::]:2222", "b-ssh", false)?,
        whoami(&lab, &c, "[::]:80", "c-app", false)?,
        whoami(&lab, &d, "[::]:80", "d-app", false)?,
    ];
    let expect = |what: &str, r: &Value, id: &str, orig: Option<&str>| -> Result<()> {
        if r["reply"]["id"] != id || r["reply"]["orig"].as_str() != orig {
            bail!("{what}: expected {id} with original destination {orig:?}, got {r}");
        }
        Ok(())
    };
    let b80 = hostport(b.ip, 80);
    let b80v6 = hostport(b.ip6, 80);

    // The application's connects go to its sidecar, which sees the exact original destination
    // (IPv4 and IPv6), while the application's getpeername still shows where it connected.
    for to in [&b80, &b80v6, &hostport(c.ip, 80)] {
        let r = ask_one(&lab, &a, to, false, None)?;
        expect("app → outbound", &r, "a-outbound", Some(to))?;
        assert_eq!(r["peer"].as_str(), Some(to.as_str()), "getpeername: {r}");
    }
    // Excluded port: not captured by a's sidecar (b's inbound capture still applies, as with
    // Istio's PREROUTING rule in b).
    let r = ask_one(&lab, &a, &hostport(b.ip, 2222), false, None)?;
    expect(
        "excluded port",
        &r,
        "b-inbound",
        Some(&hostport(b.ip, 2222)),
    )?;
    // Excluded CIDR: straight to d.
    let r = ask_one(&lab, &a, &hostport(d.ip, 80), false, None)?;
    expect("excluded CIDR", &r, "d-app", None)?;
    // Loopback is never captured.
    let r = ask_one(&lab, &a, "127.0.0.1:15001", false, None)?;
    expect("loopback", &r, "a-outbound", None)?;
    // The proxy's own connects are not captured (no loops)...
    let r = ask_one(&lab, &a, &hostport(c.ip, 80), false, Some(PROXY_UID))?;
    expect("proxy uid → non-sidecar pod", &r, "c-app", None)?;
    // ...and a sidecar's connect to a sidecar pod of this node reaches that pod's inbound
    // listener with the original destination, IPv4 and IPv6.
    for to in [&b80, &b80v6] {
        let r = ask_one(&lab, &a, to, false, Some(PROXY_UID))?;
        expect("sidecar → sidecar", &r, "b-inbound", Some(to))?;
    }
    // A pod without a sidecar reaching a sidecar pod goes through its inbound listener too.
    let r = ask_one(&lab, &c, &b80, false, None)?;
    expect("plain pod → sidecar pod", &r, "b-inbound", Some(&b80))?;
    // Inside b, the proxy reaches its own application directly.
    let r = ask_one(&lab, &b, &b80, false, Some(PROXY_UID))?;
    expect("proxy → own app", &r, "b-app", None)?;

    // No iptables rules anywhere in the sidecar pods.
    for p in [&a, &b] {
        let rules = iptables_rules(&lab, p)?;
        assert!(rules.is_empty(), "{}: iptables rules: {rules:?}", p.name);
    }

    let st = lab.call(&Request::Status)?;
    let n = |name: &str| st["counters"][name].as_u64().unwrap_or(0);
    assert_eq!(st["sidecar_pods"], 2, "{st:#}");
    assert!(n("capture_outbound") >= 3, "{st:#}");
    assert!(n("capture_inbound") >= 4, "{st:#}");
    assert!(n("capture_skip_proxy_uid") >= 4, "{st:#}");
    assert!(n("capture_skip_excluded_port") >= 1, "{st:#}");
    assert!(n("capture_skip_excluded_cidr") >= 1, "{st:#}");
    assert!(n("capture_skip_loopback") >= 1, "{st:#}");
    assert!(n("orig_dst_served") >= 7, "{st:#}");

    // Bad sidecar settings are refused and change nothing.
    let before = lab.call(&Request::PodList)?;
    lab.unenroll(&d)?;
    let err = lab
        .enroll_with(
            &d,
            Some(SidecarSpec {
                inbound_port: 15001,
                ..SidecarSpec::default()
            }),
        )
        .expect_err("equal ports must be refused");
    assert!(err.to_string().contains("sidecar.outbound_port"), "{err}");
    lab.enroll(&d)?;
    let after = lab.call(&Request::PodList)?;
    assert_eq!(
        before.as_array().map(Vec::len),
        after.as_array().map(Vec::len)
    );
    Ok(())
}

/// The results a client sees: an HTTP response and a byte-exact raw TCP exchange.
fn requests(lab: &Lab, to_ip: std::net::Ipv4Addr) -> Result<(String, Value)> {
    let a = lab.pod("a");
    let out = lab
        .cmd(a, "curl")?
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg(format!("http://{to_ip}:8080/hello.txt"))
        .output()?;
    if !out.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&out.stderr));
    }
    let http = String::from_utf8_lossy(&out.stdout).into_owned();

    let mut serve = lab.cmd(lab.pod("b"), bin("ml-probe")?)?;
    serve.args([
        "serve",
        "--listen",
        "0.0.0.0:7000",
        "--conns",
        "1",
        "--duplex",
        "65536",
    ]);
    let mut server = meshlane_lab::spawn_piped(&mut serve)?;
    meshlane_lab::wait_for_line(&mut server, Duration::from_secs(10), |l| {
        l.starts_with("listening")
    })?;
    let out = lab
        .cmd(a, bin("ml-probe")?)?
        .args(["send", "--to", &format!("{to_ip}:7000")])
        .args(["--bytes", &(4 * MIB).to_string(), "--duplex", "65536"])
        .output()?;
    let _ = server.kill();
    let _ = server.wait();
    if !out.status.success() {
        bail!(
            "ml-probe send: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut tcp: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )?;
    // Timing is not a result.
    if let Some(m) = tcp.as_object_mut() {
        m.retain(|k, _| !k.contains("secs") && !k.contains("gbps") && !k.contains("ms"));
    }
    Ok((http, tcp))
}

#[test]
fn haproxy_sidecars_work_the_same_with_iptables_redirect_and_with_meshlane() -> Result<()> {
    let lab = Lab::with_agent(&["a", "b"], false, &[])?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("hello.txt"), "hello from pod b\n".repeat(64))?;
    let _nginx = nginx(&lab, &b, &format!("{}:8080", b.ip), &www)?;
    let _sidecars = [haproxy_sidecar(&lab, &a)?, haproxy_sidecar(&lab, &b)?];

    // (a) Istio's iptables REDIRECT rules in both pods; meshlane not involved.
    install_istio_iptables(&lab, &a)?;
    install_istio_iptables(&lab, &b)?;
    let redirected_before = lab.counter("bytes_redirected")?;
    let with_iptables = requests(&lab, b.ip)?;
    let counted = |p: &meshlane_lab::Pod, rule: &str| -> Result<u64> {
        let out = lab.cmd(p, "iptables-save")?.arg("-c").output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains(rule))
            .with_context(|| format!("{rule} in {text}"))?;
        // "[packets:bytes] -A ..."
        Ok(line
            .trim_start_matches('[')
            .split(':')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    };
    assert!(
        counted(&a, "--to-ports 15001")? >= 2,
        "a's OUTPUT REDIRECT was used"
    );
    assert!(
        counted(&b, "--to-ports 15006")? >= 2,
        "b's PREROUTING REDIRECT was used"
    );
    assert_eq!(
        lab.counter("bytes_redirected")?,
        redirected_before,
        "nothing was accelerated in the iptables run"
    );

    // (b) No iptables at all; the pods enrolled with sidecar capture.
    flush_iptables(&lab, &a)?;
    flush_iptables(&lab, &b)?;
    lab.enroll_with(&a, Some(SidecarSpec::default()))?;
    lab.enroll_with(&b, Some(SidecarSpec::default()))?;
    for p in [&a, &b] {
        let rules = iptables_rules(&lab, p)?;
        assert!(rules.is_empty(), "{}: {rules:?}", p.name);
    }
    let before = lab.counters()?;
    let started = Instant::now();
    let with_meshlane = requests(&lab, b.ip)?;
    let after = lab.counters()?;
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);

    assert_eq!(
        with_iptables, with_meshlane,
        "the same requests must give the same results"
    );
    assert!(with_meshlane.0.ends_with("\n200"), "{}", with_meshlane.0);
    assert_eq!(with_meshlane.1["ok"], 1, "{}", with_meshlane.1);
    assert_eq!(
        with_meshlane.1["failed"],
        serde_json::json!([]),
        "{}",
        with_meshlane.1
    );
    assert!(delta("capture_outbound") >= 2, "{after:?}");
    assert!(delta("capture_inbound") >= 2, "{after:?}");
    assert!(
        delta("orig_dst_served") >= 4,
        "HAProxy asked for SO_ORIGINAL_DST: {after:?}"
    );
    // Every hop — app → sidecar a (loopback), sidecar a → sidecar b (pod to pod), sidecar b →
    // app (own pod address) — rode the fast path: at least the 4 MiB payload three times.
    assert!(
        delta("bytes_redirected") >= 3 * 4 * MIB,
        "only {} bytes redirected in {:?}: {after:?}",
        delta("bytes_redirected"),
        started.elapsed()
    );
    assert_eq!(delta("bytes_passed"), 0, "{after:?}");

    // Telemetry tells the three hops of the 4 MiB exchange apart, each carrying it whole: the
    // app's connect captured to its proxy, a's proxy captured into b's inbound listener, b's
    // proxy delivering to b's app.
    let want = [
        ("app_to_proxy", "lab/a", "lab/a"),
        ("inbound", "lab/a", "lab/b"),
        ("proxy_to_app", "lab/b", "lab/b"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let hops = loop {
        let out = lab.cli(&["observe", "--json", "--last", "1000"])?;
        let recs: Vec<Value> = String::from_utf8(out.stdout)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let hop = |leg: &str, src: &str, dst: &str| {
            recs.iter().find(|r| {
                r["kind"] == "close"
                    && r["reporter"] == "source"
                    && r["leg"] == leg
                    && r["source"]["pod"] == src
                    && r["destination"]["pod"] == dst
                    && r["sent_bytes"] == 4 * MIB
            })
        };
        let found: Vec<Option<&Value>> = want.iter().map(|(l, s, d)| hop(l, s, d)).collect();
        if found.iter().all(Option::is_some) {
            break found.into_iter().flatten().cloned().collect::<Vec<Value>>();
        }
        if Instant::now() > deadline {
            bail!("not every hop of the exchange is in the flow records: {recs:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let orig = format!("{}:7000", b.ip);
    assert_eq!(
        hops[0]["original_destination"],
        orig.as_str(),
        "{:#}",
        hops[0]
    );
    assert_eq!(
        hops[1]["original_destination"],
        orig.as_str(),
        "{:#}",
        hops[1]
    );
    assert_eq!(hops[1]["destination"]["port"], 15006, "{:#}", hops[1]);
    assert_eq!(hops[2]["destination"]["port"], 7000, "{:#}", hops[2]);
    for h in &hops {
        assert_eq!(h["sent_redirected_bytes"], 4 * MIB, "{h:#}");
    }
    Ok(())
}
