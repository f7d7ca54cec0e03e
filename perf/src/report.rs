//! The results of one benchmark run: every sample of every metric, summarised as medians and
//! spread, every figure as a ratio to its baseline from the same run, the targets and the
//! regression gates; written as JSON, a Markdown table and SVG plots.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// Which way is good for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One measured quantity, with its samples per variant in the order the variants ran.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub id: String,
    pub group: String,
    pub title: String,
    pub unit: String,
    pub better: Better,
    /// The variant every ratio of this metric is taken against.
    pub baseline: String,
    /// False where a ratio means nothing (eBPF time per request: the baseline runs none).
    pub ratios: bool,
    pub variants: Vec<Variant>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Variant {
    pub name: String,
    /// One value per repetition, in the order they ran.
    pub samples: Vec<f64>,
}

/// Median and spread of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(xs: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

impl Metric {
    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }

    pub fn summary(&self, variant: &str) -> Option<Summary> {
        Summary::of(&self.variant(variant)?.samples)
    }

    /// median(variant) ÷ median(base): the ratio every table and target uses.
    pub fn ratio(&self, variant: &str, base: &str) -> Option<f64> {
        let (v, b) = (self.summary(variant)?, self.summary(base)?);
        (b.median != 0.0).then(|| v.median / b.median)
    }

    /// The spread of the per-repetition ratios (repetition i of `variant` ÷ repetition i of
    /// `base`, which ran next to each other).
    pub fn paired_ratios(&self, variant: &str, base: &str) -> Option<Summary> {
        let (v, b) = (self.variant(variant)?, self.variant(base)?);
        let r: Vec<f64> = v
            .samples
            .iter()
            .zip(&b.samples)
            .filter(|(_, b)| **b != 0.0)
            .map(|(v, b)| v / b)
            .collect();
        Summary::of(&r)
    }
}

/// `ratio op threshold`, e.g. accelerated ÷ veth p50 ≤ 0.75.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = "<=")]
    AtMost,
    #[serde(rename = ">=")]
    AtLeast,
    /// The variant's median itself (not a ratio) must stay below the threshold.
    #[serde(rename = "value <")]
    ValueBelow,
}

/// A ratio with a threshold: a target from the issue (reported) or a regression gate (fails the
/// run).
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub metric: String,
    pub variant: String,
    pub base: String,
    pub op: Op,
    pub threshold: f64,
    pub measured: Option<f64>,
    pub met: bool,
}

impl Check {
    pub fn new(
        name: &str,
        metric: &str,
        variant: &str,
        base: &str,
        op: Op,
        threshold: f64,
    ) -> Check {
        Check {
            name: name.into(),
            metric: metric.into(),
            variant: variant.into(),
            base: base.into(),
            op,
            threshold,
            measured: None,
            met: false,
        }
    }

    fn evaluate(&mut self, metrics: &[Metric]) {
        let m = metrics.iter().find(|m| m.id == self.metric);
        self.measured = m.and_then(|m| match self.op {
            Op::ValueBelow => m.summary(&self.variant).map(|s| s.max),
            _ => m.ratio(&self.variant, &self.base),
        });
        self.met = match (self.measured, self.op) {
            (Some(x), Op::AtMost) => x <= self.threshold,
            (Some(x), Op::AtLeast) => x >= self.threshold,
            (Some(x), Op::ValueBelow) => x < self.threshold,
            (None, _) => false,
        };
    }
}

/// A grouped bar chart: one group of bars per category (a metric), one bar per variant.
#[derive(Clone, Debug)]
pub struct Plot {
    pub file: String,
    pub title: String,
    pub unit: String,
    pub categories: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Meta {
    pub mode: String,
    pub started: String,
    pub duration_secs: f64,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub commit: String,
    pub repetitions: usize,
    pub seconds_per_run: u32,
    pub pinning: String,
    pub notes: Vec<String>,
}

/// One eBPF program's totals over the whole run (BPF_ENABLE_STATS).
#[derive(Clone, Debug, Serialize)]
pub struct ProgramStat {
    pub name: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub meta: Meta,
    pub metrics: Vec<Metric>,
    pub programs: Vec<ProgramStat>,
    pub targets: Vec<Check>,
    pub gates: Vec<Check>,
    #[serde(skip)]
    pub plots: Vec<Plot>,
}

impl Report {
    /// Declares a metric (idempotent); samples are added with [`Report::add`].
    #[allow(clippy::too_many_arguments)]
    pub fn metric(
        &mut self,
        id: &str,
        group: &str,
        title: &str,
        unit: &str,
        better: Better,
        baseline: &str,
        variants: &[&str],
    ) {
        if self.metrics.iter().any(|m| m.id == id) {
            return;
        }
        self.metrics.push(Metric {
            id: id.into(),
            group: group.into(),
            title: title.into(),
            unit: unit.into(),
            better,
            baseline: baseline.into(),
            ratios: true,
            variants: variants
                .iter()
                .map(|v| Variant {
                    name: (*v).into(),
                    samples: Vec::new(),
                })
                .collect(),
        });
    }

    /// Marks a metric as one whose ratios mean nothing.
    pub fn without_ratios(&mut self, id: &str) {
        if let Some(m) = self.metrics.iter_mut().find(|m| m.id == id) {
            m.ratios = false;
        }
    }

    /// Adds one sample; the metric and variant must have been declared.
    pub fn add(&mut self, id: &str, variant: &str, value: f64) {
        let m = self
            .metrics
            .iter_mut()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("metric {id} was not declared"));
        let v = m
            .variants
            .iter_mut()
            .find(|v| v.name == variant)
            .unwrap_or_else(|| panic!("metric {id} has no variant {variant}"));
        v.samples.push(value);
    }

    pub fn get(&self, id: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.id == id)
    }

    pub fn evaluate(&mut self) {
        for c in self.targets.iter_mut().chain(self.gates.iter_mut()) {
            c.evaluate(&self.metrics);
        }
    }

    pub fn failed_gates(&self) -> Vec<&Check> {
        self.gates.iter().filter(|g| !g.met).collect()
    }

    /// Writes results.json, results.md and one SVG per plot into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("results.json"), json + "\n")?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        for p in &self.plots {
            // A quick run measures only some metrics; a plot with none of its own is left out.
            if p.categories.iter().any(|(_, id)| self.get(id).is_some()) {
                std::fs::write(dir.join(&p.file), self.svg(p))?;
            }
        }
        Ok(())
    }

    /// The targets and gates as a Markdown table (the README's headline table).
    pub fn checks_markdown(&self, checks: &[Check]) -> String {
        let mut s = String::from("| ratio | target | measured | |\n|---|---|---|---|\n");
        for c in checks {
            let op = match c.op {
                Op::AtMost => "≤",
                Op::AtLeast => "≥",
                Op::ValueBelow => "<",
            };
            let unit = if c.op == Op::ValueBelow {
                self.get(&c.metric).map_or("", |m| m.unit.as_str())
            } else {
                ""
            };
            let show = |x: f64| {
                if unit.is_empty() {
                    format!("{x:.2}")
                } else {
                    fmt(x) + " " + unit
                }
            };
            let measured = c.measured.map_or("n/a".into(), show);
            let _ = writeln!(
                s,
                "| {} | {op} {} | {measured} | {} |",
                c.name,
                show(c.threshold),
                if c.met { "met" } else { "**missed**" }
            );
        }
        s
    }

    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let mut s = format!(
            "# meshlane benchmark ({} mode)\n\n\
             - started {}, took {:.0} s\n- kernel {}, CPU {} × {}\n- commit {}\n\
             - {} interleaved repetitions of {} s per run; pinning: {}\n",
            m.mode,
            m.started,
            m.duration_secs,
            m.kernel,
            m.cpu_model,
            m.cpus,
            m.commit,
            m.repetitions,
            m.seconds_per_run,
            m.pinning
        );
        for n in &m.notes {
            let _ = writeln!(s, "- {n}");
        }
        s += "\nEach cell: median (min–max) over the repetitions. Ratio: median ÷ the baseline's \
              median from the same run, with the range of the per-repetition ratios.\n";
        if !self.targets.is_empty() {
            s += "\n## Targets\n\n";
            s += &self.checks_markdown(&self.targets);
        }
        if !self.gates.is_empty() {
            s += "\n## Regression gates (the run fails when one is missed)\n\n";
            s += &self.checks_markdown(&self.gates);
        }
        if !self.programs.is_empty() {
            s += "\n## meshlane's eBPF programs over the whole run\n\n\
                  | program | runs | total (ms) | ns per run |\n|---|---|---|---|\n";
            for p in &self.programs {
                let per = if p.runs > 0 {
                    p.run_time_ns as f64 / p.runs as f64
                } else {
                    0.0
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    p.name,
                    p.runs,
                    fmt(p.run_time_ns as f64 / 1e6),
                    fmt(per)
                );
            }
        }
        let mut groups: Vec<&str> = Vec::new();
        for m in &self.metrics {
            if !groups.contains(&m.group.as_str()) {
                groups.push(&m.group);
            }
        }
        for g in groups {
            let _ = write!(s, "\n## {g}\n");
            // Metrics of one group with the same variants share a table.
            let ms: Vec<&Metric> = self.metrics.iter().filter(|m| m.group == g).collect();
            let mut i = 0;
            while i < ms.len() {
                let names: Vec<&str> = ms[i].variants.iter().map(|v| v.name.as_str()).collect();
                let base = ms[i].baseline.clone();
                let mut j = i;
                while j < ms.len()
                    && ms[j].baseline == base
                    && ms[j]
                        .variants
                        .iter()
                        .map(|v| v.name.as_str())
                        .eq(names.iter().copied())
                {
                    j += 1;
                }
                let others: Vec<&str> = names.iter().copied().filter(|n| *n != base).collect();
                s += "\n| metric |";
                for n in &names {
                    let _ = write!(s, " {n} |");
                }
                for o in &others {
                    let _ = write!(s, " {o} ÷ {base} |");
                }
                s += "\n|---|";
                s += &"---|".repeat(names.len() + others.len());
                s += "\n";
                for m in &ms[i..j] {
                    let _ = write!(s, "| {} ({}) |", m.title, m.unit);
                    for n in &names {
                        let cell = m.summary(n).map_or("n/a".into(), |x| {
                            format!("{} ({}–{})", fmt(x.median), fmt(x.min), fmt(x.max))
                        });
                        let _ = write!(s, " {cell} |");
                    }
                    for o in &others {
                        let cell = match (m.ratio(o, &base), m.paired_ratios(o, &base)) {
                            _ if !m.ratios => "—".into(),
                            (Some(r), Some(p)) => {
                                format!("**{:.2}** ({:.2}–{:.2})", r, p.min, p.max)
                            }
                            _ => "n/a".into(),
                        };
                        let _ = write!(s, " {cell} |");
                    }
                    s += "\n";
                }
                i = j;
            }
        }
        s
    }

    /// A grouped bar chart of medians with min–max whiskers.
    pub fn svg(&self, p: &Plot) -> String {
        const COLORS: [&str; 5] = ["#8c8c8c", "#4c78a8", "#f58518", "#54a24b", "#b279a2"];
        let metrics: Vec<(&str, &Metric)> = p
            .categories
            .iter()
            .filter_map(|(label, id)| Some((label.as_str(), self.get(id)?)))
            .collect();
        let mut variants: Vec<&str> = Vec::new();
        for (_, m) in &metrics {
            for v in &m.variants {
                if !variants.contains(&v.name.as_str()) {
                    variants.push(&v.name);
                }
            }
        }
        let top = metrics
            .iter()
            .flat_map(|(_, m)| variants.iter().filter_map(|v| m.summary(v)))
            .map(|s| s.max)
            .fold(0.0_f64, f64::max);
        let top = nice_ceiling(top);
        let (w, h, left, right, head, foot) = (760.0, 360.0, 70.0, 20.0, 50.0, 60.0);
        let plot_h = h - head - foot;
        let y = |v: f64| head + plot_h * (1.0 - if top > 0.0 { v / top } else { 0.0 });
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>\n\
             <text x=\"{left}\" y=\"38\" fill=\"#555\">{} — median, whiskers min–max over {} \
             repetitions</text>\n",
            esc(&p.title),
            esc(&p.unit),
            self.meta.repetitions
        );
        for k in 0..=4 {
            let v = top * k as f64 / 4.0;
            let yy = y(v);
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                w - right,
                left - 6.0,
                yy + 4.0,
                fmt(v)
            );
        }
        let n = metrics.len().max(1) as f64;
        let slot = (w - left - right) / n;
        let bar = (slot * 0.8 / variants.len().max(1) as f64).min(40.0);
        for (ci, (label, m)) in metrics.iter().enumerate() {
            let x0 = left + slot * ci as f64 + (slot - bar * variants.len() as f64) / 2.0;
            for (vi, v) in variants.iter().enumerate() {
                let Some(sm) = m.summary(v) else { continue };
                let x = x0 + bar * vi as f64;
                let color = COLORS[vi % COLORS.len()];
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\">\
                     <title>{}: {} {} (min {}, max {})</title></rect>\
                     <line x1=\"{xc:.1}\" x2=\"{xc:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                    y(sm.median),
                    bar - 2.0,
                    y(0.0) - y(sm.median),
                    esc(v),
                    fmt(sm.median),
                    esc(&m.unit),
                    fmt(sm.min),
                    fmt(sm.max),
                    y(sm.min),
                    y(sm.max),
                    xc = x + (bar - 2.0) / 2.0,
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                left + slot * (ci as f64 + 0.5),
                h - foot + 18.0,
                esc(label)
            );
        }
        let mut lx = left;
        for (vi, v) in variants.iter().enumerate() {
            let _ = writeln!(
                s,
                "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                h - 24.0,
                COLORS[vi % COLORS.len()],
                lx + 16.0,
                h - 14.0,
                esc(v)
            );
            lx += 30.0 + 7.5 * v.chars().count() as f64;
        }
        s += "</svg>\n";
        s
    }
}

/// Three significant digits, without exponent notation for the ranges we print.
pub fn fmt(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// The next 1, 2 or 5 × 10ⁿ at or above `x`.
fn nice_ceiling(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * p)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut r = Report::default();
        r.metric(
            "pp.p50",
            "pod ↔ pod",
            "ping-pong p50",
            "µs",
            Better::Lower,
            "veth",
            &["veth", "accelerated"],
        );
        for (v, a) in [
            (20.0, 15.0),
            (22.0, 14.0),
            (19.0, 18.0),
            (21.0, 15.0),
            (40.0, 16.0),
        ] {
            r.add("pp.p50", "veth", v);
            r.add("pp.p50", "accelerated", a);
        }
        r
    }

    #[test]
    fn summaries_are_medians_and_ranges() {
        let s = Summary::of(&[3.0, f64::NAN, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                n: 4,
                median: 2.5,
                min: 1.0,
                max: 10.0
            }
        );
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn ratios_come_from_medians_and_pairs_from_neighbouring_runs() {
        let r = report();
        let m = r.get("pp.p50").unwrap();
        assert_eq!(m.ratio("accelerated", "veth"), Some(15.0 / 21.0));
        let p = m.paired_ratios("accelerated", "veth").unwrap();
        assert_eq!((p.min, p.max), (16.0 / 40.0, 18.0 / 19.0));
    }

    #[test]
    fn checks_pass_and_fail_on_thresholds() {
        let mut r = report();
        r.targets.push(Check::new(
            "t",
            "pp.p50",
            "accelerated",
            "veth",
            Op::AtMost,
            0.75,
        ));
        r.gates.push(Check::new(
            "g",
            "pp.p50",
            "accelerated",
            "veth",
            Op::AtMost,
            0.70,
        ));
        r.gates.push(Check::new(
            "worst",
            "pp.p50",
            "accelerated",
            "",
            Op::ValueBelow,
            10.0,
        ));
        r.gates.push(Check::new(
            "absent",
            "nope",
            "accelerated",
            "veth",
            Op::AtLeast,
            1.0,
        ));
        r.evaluate();
        assert!(r.targets[0].met);
        assert!(!r.gates[0].met);
        assert_eq!(r.gates[1].measured, Some(18.0));
        assert!(!r.gates[1].met);
        assert!(!r.gates[2].met && r.gates[2].measured.is_none());
        assert_eq!(r.failed_gates().len(), 3);
    }

    #[test]
    fn markdown_and_svg_show_every_variant() {
        let mut r = report();
        r.plots.push(Plot {
            file: "p.svg".into(),
            title: "a <b>".into(),
            unit: "µs".into(),
            categories: vec![("64 B".into(), "pp.p50".into())],
        });
        let md = r.markdown();
        assert!(
            md.contains("| metric | veth | accelerated | accelerated ÷ veth |"),
            "{md}"
        );
        assert!(md.contains("| ping-pong p50 (µs) | 21.00 (19.00–40.00) | 15.00 (14.00–18.00) | **0.71** (0.40–0.95) |"), "{md}");
        let svg = r.svg(&r.plots[0]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert_eq!(svg.matches("<title>").count(), 2);
    }

    #[test]
    fn nice_axis_tops() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(37.0), 50.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
    }
}
