//! The telemetry group: what observing HTTP costs, telemetry on and off in the same run, with
//! the agent's own CPU per request (issue 15's budget: agent + telemetry eBPF ≤ 2 µs per
//! request at 10,000 requests/s).

use std::time::Duration;

use super::*;

pub(super) const TEL: &str = "telemetry: client → nginx 1 KiB, accelerated, telemetry on ÷ off";
/// The fixed rate of the budget.
const TEL_RATE: u32 = 10_000;
/// Programs whose run time is telemetry's: the length tracepoints (which also serve the reader
/// guard: "off" pods pay their flow lookup too) and the close tracepoint.
const TEL_PROGRAMS: [&str; 3] = ["ml_send_length", "ml_recv_length", "ml_destroy_sock"];

/// CPU time of every thread of process `pid` so far (user + system, from the scheduler's own
/// clock: `/proc/<pid>/task/*/schedstat`, nanoseconds).
fn process_cpu_ns(pid: u32) -> Result<u64> {
    let mut ns = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = t?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(ns)
}

/// Run time of the telemetry programs so far (BPF_ENABLE_STATS), ns.
fn telemetry_bpf_ns() -> u64 {
    programs()
        .iter()
        .filter(|p| TEL_PROGRAMS.contains(&p.name.as_str()))
        .map(|p| p.run_time_ns)
        .sum()
}

#[derive(Clone, Copy)]
struct Cost {
    agent_ns: u64,
    bpf_ns: u64,
}

impl Bench<'_> {
    fn cost(&self) -> Result<Cost> {
        Ok(Cost {
            agent_ns: process_cpu_ns(self.lab.agent().child.id())?,
            bpf_ns: telemetry_bpf_ns(),
        })
    }

    /// Adds the agent's and telemetry's cost per request between `c0` and `c1`.
    fn add_cost(&mut self, id: &str, v: &str, c0: Cost, c1: Cost, requests: u64) {
        let us = |ns: u64| ns as f64 / 1e3 / requests as f64;
        let (agent, bpf) = (
            us(c1.agent_ns.saturating_sub(c0.agent_ns)),
            us(c1.bpf_ns.saturating_sub(c0.bpf_ns)),
        );
        self.report.add(&format!("{id}.agent"), v, agent);
        self.report.add(&format!("{id}.bpf"), v, bpf);
        self.report.add(&format!("{id}.cost"), v, agent + bpf);
    }

    /// Client pod → nginx pod, both accelerated, with and without telemetry: oha at 10,000/s
    /// and wrk at saturation.
    pub(super) fn telemetry_group(&mut self) -> Result<()> {
        let variants: &[&str] = &[ACCEL, ACCEL_NOTEL];
        let r = &mut self.report;
        let http = format!("HTTP 1 KiB at {TEL_RATE}/s (oha, {OHA_CONNS} connections)");
        let sat = format!("HTTP 1 KiB at saturation (wrk, {WRK_CONNS} connections)");
        for (load, id) in [(&http, "tel.http"), (&sat, "tel.wrk")] {
            for (m, title, unit) in [
                ("agent", "agent CPU (user + system) per request", "µs"),
                (
                    "bpf",
                    "telemetry eBPF (length and close tracepoints) per request",
                    "µs",
                ),
                ("cost", "agent CPU + telemetry eBPF per request", "µs"),
            ] {
                let id = format!("{id}.{m}");
                r.metric(
                    &id,
                    TEL,
                    &format!("{load}: {title}"),
                    unit,
                    Better::Lower,
                    ACCEL_NOTEL,
                    variants,
                );
                // The agent has next to nothing to do without telemetry: no ratio.
                if m != "bpf" {
                    r.without_ratios(&id);
                }
            }
        }
        r.metric(
            "tel.http.p50",
            TEL,
            &format!("{http}: p50 latency"),
            "µs",
            Better::Lower,
            ACCEL_NOTEL,
            variants,
        );
        r.metric(
            "tel.wrk.rps",
            TEL,
            &format!("{sat}: requests/s"),
            "req/s",
            Better::Higher,
            ACCEL_NOTEL,
            variants,
        );

        let www = self.lab.dir.join("www-tel");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("1k"), vec![b'x'; 1024])?;
        let port = 8081;
        let _nginx = nginx(&self.lab, &self.b, &format!("0.0.0.0:{port}"), &www)?;
        let url = format!("http://{}:{port}/1k", self.b.ip);
        let reps = self.args.reps;
        for rep in 1..=reps {
            for &v in variants {
                println!("[telemetry] repetition {rep}/{reps}: {v}");
                let redirected = self.counter("msg_redirected")?;
                if v == ACCEL {
                    self.lab.enroll(&self.a)?;
                    self.lab.enroll(&self.b)?;
                } else {
                    self.lab.enroll_unobserved(&self.a)?;
                    self.lab.enroll_unobserved(&self.b)?;
                }
                let c0 = self.cost()?;
                let h = oha(
                    &self.lab, &self.a, &url, TEL_RATE, OHA_CONNS, self.secs, None,
                )?;
                // What the agent still has to read of this run is part of its cost.
                self.settle()?;
                let c1 = self.cost()?;
                if h.errors > 0 || h.ok == 0 {
                    bail!("oha at {TEL_RATE}/s, {v}: {} ok, {} failed", h.ok, h.errors);
                }
                self.add_cost("tel.http", v, c0, c1, h.ok);
                self.report.add("tel.http.p50", v, h.p50_us);
                let c0 = self.cost()?;
                let w = wrk(&self.lab, &self.a, &url, WRK_CONNS, self.secs, None)?;
                self.settle()?;
                let c1 = self.cost()?;
                if w.errors > 0 || w.ok == 0 {
                    bail!("wrk, {v}: {} ok, {} failed", w.ok, w.errors);
                }
                self.add_cost("tel.wrk", v, c0, c1, w.ok);
                self.report.add("tel.wrk.rps", v, w.per_sec);
                self.lab.unenroll(&self.a)?;
                self.lab.unenroll(&self.b)?;
                if self.counter("msg_redirected")? == redirected {
                    bail!("the {v} runs redirected no message: not the sk_msg path");
                }
            }
        }
        Ok(())
    }

    /// Waits until the agent has read every event in its ring (10 s at most).
    fn settle(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.lab.call(&meshlane_api::Request::Status)?;
            if st["telemetry"]["backlog_bytes"].as_u64() == Some(0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent still has {} bytes of events to read after 10 s",
                    st["telemetry"]["backlog_bytes"]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
