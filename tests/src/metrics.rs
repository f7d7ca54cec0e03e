//! Reading the agent's `/metrics` in tests: the exposition text parsed into samples, and sums
//! over the samples whose labels match.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::Lab;

/// One sample: metric name (with `_total`, `_bucket`… as exposed), labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text exposition format as the agent writes it (no escapes inside label values
/// other than `\"` and `\\`, which it never produces for our labels).
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("line {}: no value: {line}", i + 1))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("line {}: bad value: {line}", i + 1))?;
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .with_context(|| format!("line {}: unclosed labels: {line}", i + 1))?;
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .with_context(|| format!("line {}: bad label {pair:?}", i + 1))?;
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (n.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

/// One scrape of the lab agent's `/metrics`.
pub fn scrape(lab: &Lab) -> Result<Vec<Sample>> {
    let url = format!("http://{}/metrics", lab.metrics_addr()?);
    let out = crate::run(Command::new("curl").args(["-sf", "--max-time", "20", &url]))?;
    if !out.status.success() {
        bail!(
            "curl {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&String::from_utf8(out.stdout)?)
}

/// The sum of `name` over samples whose labels include every `(key, value)` of `want`.
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
        .sum()
}

/// Scrapes until `done` holds for a scrape (returned), or fails with the last one after
/// `timeout`.
pub fn scrape_until(
    lab: &Lab,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[Sample]) -> bool,
) -> Result<Vec<Sample>> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scrape(lab)?;
        if done(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let ours: Vec<String> = s
                .iter()
                .filter(|x| {
                    [
                        "meshlane_tcp",
                        "meshlane_telemetry",
                        "meshlane_http",
                        "http_",
                    ]
                    .iter()
                    .any(|p| x.name.starts_with(p))
                        && !x.name.ends_with("_bucket")
                })
                .map(|x| format!("{} {:?} {}", x.name, x.labels, x.value))
                .collect();
            bail!(
                "after {timeout:?}, still not {what}; telemetry series:\n{}",
                ours.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_with_labels() {
        let s = parse(
            "# HELP x y\nmeshlane_tcp_sent_bytes_total{reporter=\"source\",path=\"stack\"} 42\nplain 1.5\n",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["path"], "stack");
        assert_eq!(
            sum(
                &s,
                "meshlane_tcp_sent_bytes_total",
                &[("reporter", "source")]
            ),
            42.0
        );
        assert_eq!(
            sum(
                &s,
                "meshlane_tcp_sent_bytes_total",
                &[("reporter", "destination")]
            ),
            0.0
        );
        assert_eq!(s[1].value, 1.5);
    }
}
