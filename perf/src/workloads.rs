//! Workload runners shared by the demo and the benchmarks: sockperf ping-pong and throughput,
//! iperf3, oha and wrk between lab pods, parsed into numbers, plus host CPU and eBPF run-time
//! accounting. Only ratios from one run mean anything on a shared machine.

use std::{
    net::IpAddr,
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use meshlane_lab::{Lab, Pod, spawn_piped, wait_for_line};

/// Round-trip latency percentiles in microseconds, and how many round trips were observed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub observations: u64,
}

/// Which CPU the client and the server of a workload run on (`None`: wherever the scheduler
/// puts them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pin {
    pub client: Option<usize>,
    pub server: Option<usize>,
}

impl Pin {
    pub const NONE: Pin = Pin {
        client: None,
        server: None,
    };
    /// Client on CPU 0, server on CPU 1: every message crosses CPUs, as between pods on a node.
    pub const SPLIT: Pin = Pin {
        client: Some(0),
        server: Some(1),
    };
}

/// Makes `cmd` run on `cpu` only (sched_setaffinity between fork and exec).
pub fn pin(cmd: &mut Command, cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: sched_setaffinity is async-signal-safe; the cpu set lives on the child's stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sockperf server in `server` on `port`, and `sockperf <mode>` against it from `client`
/// with `msg`-byte messages for `secs`; returns the client's output (stdout + stderr).
#[allow(clippy::too_many_arguments)]
fn sockperf(
    lab: &Lab,
    client: &Pod,
    server: &Pod,
    ip: IpAddr,
    port: u16,
    pin_to: Pin,
    mode: &str,
    msg: usize,
    secs: u32,
) -> Result<String> {
    // The server listens on every address: `ip` may be a Service VIP the client's connect is
    // translated from.
    let any = if ip.is_ipv4() { "0.0.0.0" } else { "::" };
    let (ip, port) = (ip.to_string(), port.to_string());
    let mut srv = lab.cmd(server, "sockperf")?;
    srv.args(["sr", "--tcp", "-i", any, "-p", &port]);
    pin(&mut srv, pin_to.server);
    // sockperf logs to stderr and gives no machine-readable "ready"; give it a moment, and retry
    // the client while the server is still coming up.
    let _srv = Guard(spawn_piped(&mut srv)?);
    let mut out = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let mut c = lab.cmd(client, "sockperf")?;
        c.args([mode, "--tcp", "-i", &ip, "-p", &port]).args([
            "-t",
            &secs.to_string(),
            "-m",
            &msg.to_string(),
        ]);
        pin(&mut c, pin_to.client);
        let o = c.output()?;
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
        bail!("sockperf {mode} failed: {text}");
    }
    Ok(text)
}

/// sockperf ping-pong over TCP: server in `server`, client in `client`, `msg` bytes, `secs`.
#[allow(clippy::too_many_arguments)]
pub fn sockperf_pingpong(
    lab: &Lab,
    client: &Pod,
    server: &Pod,
    ip: IpAddr,
    port: u16,
    msg: usize,
    secs: u32,
    pin_to: Pin,
) -> Result<Latency> {
    let text = sockperf(lab, client, server, ip, port, pin_to, "pp", msg, secs)?;
    parse_sockperf(&text).with_context(|| format!("sockperf output: {text}"))
}

/// sockperf throughput mode over TCP (`msg`-byte messages as fast as the socket takes them);
/// returns messages per second.
#[allow(clippy::too_many_arguments)]
pub fn sockperf_throughput(
    lab: &Lab,
    client: &Pod,
    server: &Pod,
    ip: IpAddr,
    port: u16,
    msg: usize,
    secs: u32,
    pin_to: Pin,
) -> Result<f64> {
    let text = sockperf(lab, client, server, ip, port, pin_to, "tp", msg, secs)?;
    text.lines()
        .find_map(|l| {
            l.split("Message Rate is ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no message rate in sockperf output: {text}"))
}

pub fn parse_sockperf(text: &str) -> Option<Latency> {
    let grab = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(key))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    let observations = text.lines().find_map(|l| {
        l.split("ReceivedMessages=")
            .nth(1)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })?;
    Some(Latency {
        p50_us: grab("percentile 50.000")?,
        p99_us: grab("percentile 99.000")?,
        max_us: grab("<MAX> observation")?,
        observations,
    })
}

/// iperf3 single stream for `secs` with `len`-byte writes; returns receiver bits per second.
#[allow(clippy::too_many_arguments)]
pub fn iperf3(
    lab: &Lab,
    client: &Pod,
    server: &Pod,
    ip: IpAddr,
    port: u16,
    len: usize,
    secs: u32,
    pin_to: Pin,
) -> Result<Stream> {
    let mut srv = lab.cmd(server, "iperf3")?;
    pin(&mut srv, pin_to.server);
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
    let mut c = lab.cmd(client, "iperf3")?;
    c.args(["-c", &ip.to_string(), "-p", &port.to_string(), "-J"])
        .args(["-t", &secs.to_string(), "-l", &len.to_string()]);
    pin(&mut c, pin_to.client);
    let out = c.output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    parse_iperf3(&v).with_context(|| format!("iperf3 JSON without the figures: {v}"))
}

/// What one iperf3 stream achieved, and what its two ends cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stream {
    /// Received bits per second.
    pub bits_per_sec: f64,
    /// CPU time of the sending and of the receiving process (user + system) over the run's
    /// wall time, in percent of one CPU: a sender far below 100 % spent the run asleep.
    pub sender_cpu_pct: f64,
    pub receiver_cpu_pct: f64,
}

/// The figures of an `iperf3 -c … -J` report (the client sends).
pub fn parse_iperf3(v: &Value) -> Option<Stream> {
    let cpu = &v["end"]["cpu_utilization_percent"];
    Some(Stream {
        bits_per_sec: v["end"]["sum_received"]["bits_per_second"].as_f64()?,
        sender_cpu_pct: cpu["host_total"].as_f64()?,
        receiver_cpu_pct: cpu["remote_total"].as_f64()?,
    })
}

/// What an HTTP load run saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Http {
    /// Requests answered with 200.
    pub ok: u64,
    /// Requests that failed or got another status.
    pub errors: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `oha` at a fixed rate (`qps` requests/s over `conns` keep-alive connections, `secs` seconds,
/// latency measured from each request's actual send: at these rates nothing queues) from
/// `client` to `url`.
pub fn oha(
    lab: &Lab,
    client: &Pod,
    url: &str,
    qps: u32,
    conns: u32,
    secs: u32,
    cpu: Option<usize>,
) -> Result<Http> {
    let mut c = lab.cmd(client, "oha")?;
    c.args([
        "--no-tui",
        "--output-format",
        "json",
        "--latency-correction",
        "-w",
    ])
    .args(["-z", &format!("{secs}s"), "-q", &qps.to_string()])
    .args(["-c", &conns.to_string(), url]);
    pin(&mut c, cpu);
    let out = c
        .output()
        .context("running oha (deploy/setup.sh installs it)")?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "oha output: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    parse_oha(&v).with_context(|| format!("oha JSON: {v}"))
}

pub fn parse_oha(v: &Value) -> Option<Http> {
    let codes = v["statusCodeDistribution"].as_object()?;
    let ok = codes.get("200").and_then(Value::as_u64).unwrap_or(0);
    let other: u64 = codes
        .iter()
        .filter(|(k, _)| *k != "200")
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    let failed: u64 = v["errorDistribution"]
        .as_object()?
        .values()
        .filter_map(Value::as_u64)
        .sum();
    let pct = &v["latencyPercentiles"];
    Some(Http {
        ok,
        errors: other + failed,
        per_sec: v["summary"]["requestsPerSec"].as_f64()?,
        p50_us: pct["p50"].as_f64()? * 1e6,
        p99_us: pct["p99"].as_f64()? * 1e6,
    })
}

/// `wrk` at saturation: one thread, `conns` keep-alive connections, `secs` seconds.
pub fn wrk(
    lab: &Lab,
    client: &Pod,
    url: &str,
    conns: u32,
    secs: u32,
    cpu: Option<usize>,
) -> Result<Http> {
    let mut c = lab.cmd(client, "wrk")?;
    c.args(["-t1", "--latency", "-c", &conns.to_string()])
        .args(["-d", &format!("{secs}s"), url]);
    pin(&mut c, cpu);
    let out = meshlane_lab::run(&mut c)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).with_context(|| format!("wrk output: {text}"))
}

pub fn parse_wrk(text: &str) -> Option<Http> {
    let field = |key: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(key))
            .map(str::trim)
    };
    let us = |v: &str| -> Option<f64> {
        let unit = v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        let x: f64 = v[..v.len() - unit.len()].parse().ok()?;
        Some(match unit {
            "us" => x,
            "ms" => x * 1e3,
            "s" => x * 1e6,
            "m" => x * 60e6,
            _ => return None,
        })
    };
    // "  123456 requests in 5.00s, 140.12MB read"
    let total: u64 = text
        .lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let errors = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with("Non-2xx or 3xx responses:") {
                l.rsplit(' ').next()?.parse::<u64>().ok()
            } else if l.starts_with("Socket errors:") {
                Some(
                    l.split(',')
                        .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                        .sum(),
                )
            } else {
                None
            }
        })
        .sum::<u64>();
    Some(Http {
        ok: total.saturating_sub(errors),
        errors,
        per_sec: field("Requests/sec:")?.parse().ok()?,
        p50_us: us(field("50%")?)?,
        p99_us: us(field("99%")?)?,
    })
}

/// A reading of `/proc/stat`: the CPU time so far that was not this machine's work (idle, iowait
/// and steal), how many CPUs that covers, and when it was read.
///
/// Busy time between two readings is wall time × CPUs − that time. The user and system columns
/// are not used: they are sampled at the scheduler tick, and timer-driven load (a fixed-rate load
/// generator wakes every millisecond) aliases with the tick, so the same work can read as 4× more
/// or less. The idle column comes from the idle loop's own clock (NO_HZ), taken at every entry
/// and exit.
#[derive(Clone, Copy, Debug)]
pub struct CpuClock {
    at: Instant,
    not_busy_secs: f64,
    cpus: usize,
}

impl CpuClock {
    pub fn read() -> Result<CpuClock> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let at = Instant::now();
        let (not_busy_secs, cpus) =
            parse_cpu_not_busy(&stat).context("/proc/stat has no cpu lines")?;
        Ok(CpuClock {
            at,
            not_busy_secs,
            cpus,
        })
    }

    /// CPU seconds all CPUs spent on work between `earlier` and this reading.
    pub fn busy_since(&self, earlier: &CpuClock) -> f64 {
        let wall = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        let not_busy = (self.not_busy_secs - earlier.not_busy_secs).max(0.0);
        (wall * self.cpus as f64 - not_busy).max(0.0)
    }
}

/// (idle + iowait + steal seconds of all CPUs, number of CPUs) from `/proc/stat`.
pub fn parse_cpu_not_busy(stat: &str) -> Option<(f64, usize)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let not_busy = f.get(3)? + f.get(4)? + f.get(7)?;
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l[3..].starts_with(|c: char| c.is_ascii_digit()))
        .count();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    (cpus > 0).then(|| (not_busy as f64 / hz, cpus))
}

/// Cross-CPU interrupts so far, all CPUs: rescheduling (RES) and function-call (CAL) IPIs from
/// `/proc/interrupts`. A wake-up of a task on another, idle CPU sends one; in a VM each one costs
/// an exit on the sender and, when the receiving vCPU had halted, its wake-up by the host.
pub fn cross_cpu_interrupts() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/interrupts")?;
    parse_cross_cpu_interrupts(&text).context("/proc/interrupts has no RES or CAL line")
}

pub fn parse_cross_cpu_interrupts(text: &str) -> Option<u64> {
    let mut found = false;
    let mut n = 0;
    for line in text.lines() {
        let line = line.trim_start();
        if let Some(rest) = line
            .strip_prefix("RES:")
            .or_else(|| line.strip_prefix("CAL:"))
        {
            found = true;
            n += rest
                .split_whitespace()
                .map_while(|x| x.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    found.then_some(n)
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
    fn parses_iperf3_report() {
        // The end of a real `iperf3 -c 127.0.0.1 -J` report (iperf 3.12).
        let v: Value = serde_json::from_str(
            r#"{"end": {"sum_received": {"bytes": 2774794240, "bits_per_second": 22188391332.2918},
                "cpu_utilization_percent": {"host_total": 98.12826194754544,
                "host_user": 0.8376925740089816, "host_system": 97.29066914635375,
                "remote_total": 37.7235453807618, "remote_user": 1.542678026683512,
                "remote_system": 36.18096730730018}}}"#,
        )
        .unwrap();
        let s = parse_iperf3(&v).unwrap();
        assert_eq!(s.bits_per_sec, 22188391332.2918);
        assert_eq!(s.sender_cpu_pct, 98.12826194754544);
        assert_eq!(s.receiver_cpu_pct, 37.7235453807618);
        // A report without CPU figures is refused, not read as zero.
        let mut v = v;
        v["end"]["cpu_utilization_percent"] = Value::Null;
        assert_eq!(parse_iperf3(&v), None);
    }

    #[test]
    fn parses_sockperf_summary() {
        let t = "sockperf: ---> <MAX> observation =  818.376\n\
                 sockperf: ---> percentile 99.000 =   51.313\n\
                 sockperf: ---> percentile 50.000 =   33.886\n";
        let t = format!(
            "sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=90376; \
             ReceivedMessages=90375\n{t}"
        );
        let l = parse_sockperf(&t).unwrap();
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (33.886, 51.313, 818.376));
        assert_eq!(l.observations, 90375);
        assert!(parse_sockperf("nothing").is_none());
    }

    #[test]
    fn parses_oha_json() {
        let v: Value = serde_json::json!({
            "summary": {"requestsPerSec": 999.5},
            "latencyPercentiles": {"p50": 0.000120, "p99": 0.000480},
            "statusCodeDistribution": {"200": 4990, "502": 3},
            "errorDistribution": {"aborted due to deadline": 2}
        });
        let h = parse_oha(&v).unwrap();
        assert_eq!((h.ok, h.errors), (4990, 5));
        assert!((h.p50_us - 120.0).abs() < 1e-6 && (h.p99_us - 480.0).abs() < 1e-6);
        assert!(parse_oha(&serde_json::json!({})).is_none());
    }

    #[test]
    fn parses_wrk_output() {
        let t = "Running 5s test @ http://10.77.0.11/1k\n  1 threads and 16 connections\n\
                 \x20 Latency Distribution\n     50%  412.00us\n     75%  500.00us\n\
                 \x20    90%  600.00us\n     99%    1.20ms\n\
                 \x20 187654 requests in 5.00s, 220.11MB read\n\
                 \x20 Socket errors: connect 0, read 2, write 0, timeout 1\n\
                 Requests/sec:  37530.80\nTransfer/sec:     44.02MB\n";
        let h = parse_wrk(t).unwrap();
        assert_eq!((h.ok, h.errors), (187651, 3));
        assert_eq!((h.p50_us, h.p99_us, h.per_sec), (412.0, 1200.0, 37530.80));
        assert!(parse_wrk("garbage").is_none());
    }

    #[test]
    fn cpu_not_busy_is_idle_iowait_and_steal() {
        let s = "cpu  100 10 50 1000 7 3 2 99 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n\
                 cpu1 1 2 3 4 5 6 7 8 9 10\nintr 5 6\nctxt 9\n";
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(parse_cpu_not_busy(s), Some((1106.0 / hz, 2)));
        assert_eq!(parse_cpu_not_busy("cpu  1 2 3\n"), None);
        assert_eq!(parse_cpu_not_busy("intr 5\n"), None);
    }

    #[test]
    fn busy_time_is_wall_time_less_idle() {
        let t0 = Instant::now();
        let a = CpuClock {
            at: t0,
            not_busy_secs: 10.0,
            cpus: 2,
        };
        let b = CpuClock {
            at: t0 + Duration::from_secs(3),
            not_busy_secs: 14.5,
            cpus: 2,
        };
        assert_eq!(b.busy_since(&a), 1.5);
        // A reading taken before `earlier` never gives negative time.
        assert_eq!(a.busy_since(&b), 0.0);
    }

    #[test]
    fn cross_cpu_interrupts_sum_res_and_cal() {
        let t = "           CPU0       CPU1\n  0:         44          0   IO-APIC   2-edge      timer\n\
                 NMI:          0          0   Non-maskable interrupts\n\
                 RES:     721371     736552   Rescheduling interrupts\n\
                 CAL:   30851785   36481987   Function call interrupts\n\
                 TLB:     400925     403322   TLB shootdowns\n";
        assert_eq!(
            parse_cross_cpu_interrupts(t),
            Some(721371 + 736552 + 30851785 + 36481987)
        );
        assert_eq!(parse_cross_cpu_interrupts("NMI: 0 0\n"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
