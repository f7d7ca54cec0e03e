//! The wire protocol of `ml-probe`, our byte-exact transfer checker.
//!
//! The client sends N bytes of a position-dependent pattern (so a lost, duplicated or reordered
//! byte is caught, not just a short count), then `shutdown(SHUT_WR)`. The server reads to EOF,
//! checking every byte, and answers with one line: `RESULT <bytes> <pattern-ok 0|1> <tag>`. In
//! duplex mode the server first streams D pattern bytes back while it reads. Below: running it
//! in lab pods.

use std::{
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Lab, Pod, spawn_piped, wait_for_line};

/// Byte `i` of every stream.
#[inline]
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9) ^ (i >> 17)) as u8
}

/// Checks `buf`, which starts at stream offset `off`; returns the first bad offset.
pub fn first_mismatch(buf: &[u8], off: u64) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|(i, b)| **b != pattern(off + *i as u64))
        .map(|(i, _)| off + i as u64)
}

/// Fills `buf` with the pattern starting at offset `off`.
pub fn fill(buf: &mut [u8], off: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(off + i as u64);
    }
}

/// The server's answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub bytes: u64,
    pub pattern_ok: bool,
    pub tag: String,
}

impl Verdict {
    pub fn line(&self) -> String {
        format!(
            "RESULT {} {} {}\n",
            self.bytes,
            self.pattern_ok as u8,
            if self.tag.is_empty() { "-" } else { &self.tag }
        )
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        let mut it = s.split_whitespace();
        if it.next()? != "RESULT" {
            return None;
        }
        let bytes = it.next()?.parse().ok()?;
        let pattern_ok = it.next()? == "1";
        let tag = it.next()?.to_string();
        Some(Verdict {
            bytes,
            pattern_ok,
            tag: if tag == "-" { String::new() } else { tag },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Driving `ml-probe` in lab pods.

/// A running `ml-probe serve` in a pod (or in the host netns when `pod` is None).
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
}

pub fn serve(lab: &Lab, pod: Option<&Pod>, listen: &str, extra: &[&str]) -> Result<Server> {
    let mut cmd = match pod {
        Some(p) => lab.cmd(p, crate::bin("ml-probe")?)?,
        None => lab.host_cmd(crate::bin("ml-probe")?)?,
    };
    cmd.args(["serve", "--listen", listen]).args(extra);
    let mut child = spawn_piped(&mut cmd)?;
    let (line, lines) = wait_for_line(&mut child, Duration::from_secs(10), |l| {
        l.starts_with("listening ")
    })?;
    let addr = line["listening ".len()..].parse()?;
    Ok(Server { child, addr, lines })
}

impl Server {
    /// Waits for the server to finish and returns its summary.
    pub fn finish(mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read as _;
                    e.read_to_string(&mut stderr)?;
                }
                let lines: Vec<String> =
                    std::iter::from_fn(|| self.lines.recv_timeout(Duration::from_secs(2)).ok())
                        .collect();
                let last = lines.last().map(String::as_str).unwrap_or("");
                if !st.success() {
                    bail!("server failed ({st}): {last} {stderr}");
                }
                return serde_json::from_str(last)
                    .with_context(|| format!("server output {lines:?} {stderr}"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("server still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ml-probe send` in a pod and returns its summary; fails if any connection was not exact.
pub fn send(lab: &Lab, pod: Option<&Pod>, to: SocketAddr, args: &[&str]) -> Result<Value> {
    let mut cmd = match pod {
        Some(p) => lab.cmd(p, crate::bin("ml-probe")?)?,
        None => lab.host_cmd(crate::bin("ml-probe")?)?,
    };
    let out = cmd
        .args(["send", "--to", &to.to_string()])
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "send to {to} {args:?} failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_str(stdout.lines().last().unwrap_or(""))?)
}

/// One transfer of `bytes` from pod `from` to an `ml-probe` server in pod `to` on `port`; fails
/// unless the server got every byte, in order.
pub fn transfer(lab: &Lab, from: &Pod, to: &Pod, port: u16, bytes: u64) -> Result<()> {
    let srv = serve(
        lab,
        Some(to),
        &SocketAddr::new(to.ip.into(), port).to_string(),
        &[],
    )?;
    send(lab, Some(from), srv.addr, &["--bytes", &bytes.to_string()])?;
    let got = srv.finish(Duration::from_secs(60))?;
    if got["bytes"] != bytes {
        bail!(
            "{} → {}:{port}: the server got {got}, {bytes} bytes were sent",
            from.name,
            to.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_a_swap() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 100);
        assert_eq!(first_mismatch(&b, 100), None);
        b.swap(10, 2000);
        assert!(first_mismatch(&b, 100).is_some());
    }

    #[test]
    fn verdict_round_trip() {
        let v = Verdict {
            bytes: 42,
            pattern_ok: true,
            tag: "a".into(),
        };
        assert_eq!(Verdict::parse(&v.line()), Some(v));
        assert_eq!(Verdict::parse("nonsense"), None);
    }
}
