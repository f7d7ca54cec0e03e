//! Workload runners shared by the demo and the benchmarks: sockperf ping-pong and iperf3 between
//! lab pods, parsed into numbers. Only ratios from one run mean anything on a shared machine.

use std::{net::IpAddr, process::Child, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Lab, Pod, spawn_piped, wait_for_line};

/// Round-trip latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// sockperf ping-pong over TCP: server in `server`, client in `client`, `msg` bytes, `secs`.
pub fn sockperf_pingpong(
    lab: &Lab,
    client: &Pod,
    server: &Pod,
    ip: IpAddr,
    port: u16,
    msg: usize,
    secs: u32,
) -> Result<Latency> {
    let mut srv = lab.cmd(server, "sockperf")?;
    srv.args([
        "sr",
        "--tcp",
        "-i",
        &ip.to_string(),
        "-p",
        &port.to_string(),
    ]);
    // sockperf logs to stderr and gives no machine-readable "ready"; give it a moment, and retry
    // the client while the server is still coming up.
    let _srv = Guard(spawn_piped(&mut srv)?);
    let mut out = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let o = lab
            .cmd(client, "sockperf")?
            .args([
                "pp",
                "--tcp",
                "-i",
                &ip.to_string(),
                "-p",
                &port.to_string(),
            ])
            .args(["-t", &secs.to_string(), "-m", &msg.to_string()])
            .output()?;
        let refused = String::from_utf8_lossy(&o.stderr).contains("Connection refused")
            || String::from_utf8_lossy(&o.stdout).contains("Connection refused");
        out = Some(o);
        if !refused {
            break;
        }
    }
    let out = out.context("sockperf never ran")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("sockperf pp failed: {text}");
    }
    parse_sockperf(&text).with_context(|| format!("sockperf output: {text}"))
}

pub fn parse_sockperf(text: &str) -> Option<Latency> {
    let grab = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(key))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    Some(Latency {
        p50_us: grab("percentile 50.000")?,
        p99_us: grab("percentile 99.000")?,
        max_us: grab("<MAX> observation")?,
    })
}

/// iperf3 single stream for `secs` with `len`-byte writes; returns receiver bits per second.
pub fn iperf3(
    lab: &Lab,
    client: &Pod,
    server: &Pod,
    ip: IpAddr,
    port: u16,
    len: usize,
    secs: u32,
) -> Result<f64> {
    let mut srv = lab.cmd(server, "iperf3")?;
    srv.args([
        "-s",
        "-1",
        "--forceflush",
        "-B",
        &ip.to_string(),
        "-p",
        &port.to_string(),
    ]);
    let mut child = spawn_piped(&mut srv)?;
    let _lines = wait_for_line(&mut child, Duration::from_secs(10), |l| {
        l.contains("Server listening")
    })?;
    let _srv = Guard(child);
    let out = lab
        .cmd(client, "iperf3")?
        .args(["-c", &ip.to_string(), "-p", &port.to_string(), "-J"])
        .args(["-t", &secs.to_string(), "-l", &len.to_string()])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

/// The median of a non-empty sample.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_summary() {
        let t = "sockperf: ---> <MAX> observation =  818.376\n\
                 sockperf: ---> percentile 99.000 =   51.313\n\
                 sockperf: ---> percentile 50.000 =   33.886\n";
        let l = parse_sockperf(t).unwrap();
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (33.886, 51.313, 818.376));
        assert!(parse_sockperf("nothing").is_none());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
