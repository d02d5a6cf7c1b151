//! Results of a mesh run: per-rep samples, medians, the ratio of Latch to the better of stunnel and
//! HAProxy, the goals of docs/benchmarks.md ("Mesh"), and the outputs: a Markdown table (printed
//! and written into docs/benchmarks.md between markers) and docs/benchmarks-mesh.json with the raw
//! numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::json;

use super::tunnel::Alt;

/// A table row: the sample key, its label, and which direction is better.
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
}

const fn metric(key: &'static str, label: &'static str, higher_is_better: bool) -> Metric {
    Metric {
        key,
        label,
        higher_is_better,
    }
}

pub const METRICS: &[Metric] = &[
    metric("iperf1_gbps", "iperf3 1 stream, Gbit/s", true),
    metric(
        "iperf1_cpu_s_per_gb",
        "iperf3 1 stream, tunnel CPU s/GB",
        false,
    ),
    metric("iperf4_gbps", "iperf3 4 streams, Gbit/s", true),
    metric(
        "iperf4_cpu_s_per_gb",
        "iperf3 4 streams, tunnel CPU s/GB",
        false,
    ),
    metric("redis50_rps", "redis -c 50 GET, req/s", true),
    metric("redis50_p50_ms", "redis -c 50 GET p50, ms", false),
    metric("redis50_p99_ms", "redis -c 50 GET p99, ms", false),
    metric("redis1_rps", "redis -c 1 GET, req/s", true),
    metric("redis1_p50_ms", "redis -c 1 GET p50, ms", false),
    metric("redis1_p99_ms", "redis -c 1 GET p99, ms", false),
    metric("http_rps", "HTTP keep-alive, wrk -c 50, req/s", true),
    metric("http_p99_ms", "HTTP keep-alive p99, ms", false),
    metric(
        "http_errors",
        "HTTP keep-alive, wrk socket errors + non-2xx",
        false,
    ),
    metric("churn_rps", "new connection per request, conn/s", true),
    metric("churn_p99_ms", "new connection per request p99, ms", false),
    metric(
        "churn_cpu_us_per_conn",
        "tunnel CPU per new connection (both sides), µs",
        false,
    ),
    metric(
        "churn_errors",
        "new connection per request, wrk socket errors + non-2xx",
        false,
    ),
    metric("rss_idle_client_mib", "RSS idle, client side, MiB", false),
    metric("rss_idle_server_mib", "RSS idle, server side, MiB", false),
    metric(
        "rss_1k_client_mib",
        "RSS with 1,000 idle connections, client side, MiB",
        false,
    ),
    metric(
        "rss_1k_server_mib",
        "RSS with 1,000 idle connections, server side, MiB",
        false,
    ),
    metric(
        "rss_9k_client_mib",
        "RSS with 9,000 idle connections, client side, MiB",
        false,
    ),
    metric(
        "rss_9k_server_mib",
        "RSS with 9,000 idle connections, server side, MiB",
        false,
    ),
];

/// Everything measured in one run.
#[derive(Default)]
pub struct Results {
    /// metric key -> alternative -> one value per repetition that produced it.
    samples: BTreeMap<String, BTreeMap<Alt, Vec<f64>>>,
    /// Measurements that failed, with the reason.
    pub failures: Vec<String>,
}

impl Results {
    pub fn record(&mut self, alt: Alt, samples: Vec<(String, f64)>) {
        for (key, value) in samples {
            self.samples
                .entry(key)
                .or_default()
                .entry(alt)
                .or_default()
                .push(value);
        }
    }

    pub fn median(&self, key: &str, alt: Alt) -> Option<f64> {
        let mut values = self.samples.get(key)?.get(&alt)?.clone();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        Some(if values.len() % 2 == 1 {
            values[mid]
        } else {
            (values[mid - 1] + values[mid]) / 2.0
        })
    }

    /// The better of stunnel's and HAProxy's medians for `metric`.
    pub fn best_alternative(&self, metric: &Metric) -> Option<(Alt, f64)> {
        let candidates = [Alt::Stunnel, Alt::Haproxy]
            .into_iter()
            .filter_map(|alt| Some((alt, self.median(metric.key, alt)?)));
        if metric.higher_is_better {
            candidates.max_by(|a, b| a.1.total_cmp(&b.1))
        } else {
            candidates.min_by(|a, b| a.1.total_cmp(&b.1))
        }
    }

    /// Latch's median divided by the better alternative's.
    pub fn ratio(&self, metric: &Metric) -> Option<f64> {
        let latch = self.median(metric.key, Alt::Latch)?;
        let (_, best) = self.best_alternative(metric)?;
        (best != 0.0).then_some(latch / best)
    }

    pub fn table(&self) -> String {
        let labels: Vec<&str> = Alt::ALL.iter().map(|alt| alt.label()).collect();
        let mut out = format!(
            "| metric | {} | Latch ÷ best alternative |\n|---|{}---:|\n",
            labels.join(" | "),
            "---:|".repeat(labels.len())
        );
        for metric in METRICS {
            let cells: Vec<String> = Alt::ALL
                .iter()
                .map(|&alt| {
                    self.median(metric.key, alt)
                        .map_or("-".into(), format_number)
                })
                .collect();
            let ratio = match (self.ratio(metric), self.best_alternative(metric)) {
                (Some(r), Some((alt, _))) => format!("{r:.2}x ({})", alt.label()),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {ratio} |",
                metric.label,
                cells.join(" | ")
            );
        }
        out
    }

    /// The mesh goals (docs/benchmarks.md, "Mesh"), each with the measured ratio and whether it is met.
    pub fn goals(&self) -> String {
        let mut out = String::new();
        let by_key = |key: &str| METRICS.iter().find(|m| m.key == key);
        let goals: [(&str, &str, f64, bool); 5] = [
            ("iperf1_gbps", "throughput, iperf3 1 stream", 1.5, true),
            ("redis50_rps", "redis -c 50 req/s", 1.3, true),
            ("http_rps", "HTTP keep-alive req/s", 1.3, true),
            ("redis1_p50_ms", "redis -c 1 p50 latency", 1.0, false),
            ("churn_rps", "new connections per second", 2.0, true),
        ];
        for (key, what, target, at_least) in goals {
            let ratio = by_key(key).and_then(|m| self.ratio(m));
            let sign = if at_least { "≥" } else { "≤" };
            let verdict = match ratio {
                Some(r) if (at_least && r >= target) || (!at_least && r <= target) => "**met**",
                Some(_) => "**not met**",
                None => "not measured",
            };
            let measured = ratio.map_or("-".into(), |r| format!("{r:.2}x"));
            let _ = writeln!(
                out,
                "- {what}: goal {sign} {target}x, measured {measured}: {verdict}"
            );
        }
        // Memory: against HAProxy specifically, both sides together.
        let rss = |alt| {
            Some(self.median("rss_1k_client_mib", alt)? + self.median("rss_1k_server_mib", alt)?)
        };
        let verdict = match (rss(Alt::Latch), rss(Alt::Haproxy)) {
            (Some(latch), Some(haproxy)) if haproxy > 0.0 => {
                let r = latch / haproxy;
                let met = if r <= 0.5 { "**met**" } else { "**not met**" };
                format!("measured {r:.2}x ({latch:.1} vs {haproxy:.1} MiB, both sides): {met}")
            }
            _ => "not measured".into(),
        };
        let _ = writeln!(
            out,
            "- RSS with 1,000 idle connections vs HAProxy: goal ≤ 0.5x, {verdict}"
        );
        out
    }

    pub fn to_json(&self, facts: &Facts, reps: usize) -> serde_json::Value {
        let mut raw = serde_json::Map::new();
        let mut medians = serde_json::Map::new();
        for (key, by_alt) in &self.samples {
            let mut raw_row = serde_json::Map::new();
            let mut median_row = serde_json::Map::new();
            for (alt, values) in by_alt {
                raw_row.insert(alt.key().into(), json!(values));
                median_row.insert(alt.key().into(), json!(self.median(key, *alt)));
            }
            raw.insert(key.clone(), raw_row.into());
            medians.insert(key.clone(), median_row.into());
        }
        let ratios: serde_json::Map<_, _> = METRICS
            .iter()
            .filter_map(|m| Some((m.key.to_string(), json!(self.ratio(m)?))))
            .collect();
        json!({
            "command": facts.command,
            "date": facts.date,
            "commit": facts.commit,
            "machine": {
                "nproc": facts.nproc,
                "kernel": facts.kernel,
                "cpu": facts.cpu,
                "loadavg_at_end": facts.load,
            },
            "versions": facts.versions,
            "tls": facts.tls,
            "repetitions": reps,
            "seconds_per_measurement": facts.seconds,
            "samples_per_rep": raw,
            "medians": medians,
            "latch_over_best_alternative": ratios,
            "failures": self.failures,
        })
    }
}

/// Numbers as the table shows them: thousands separated, fewer decimals as they grow.
pub fn format_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        let digits = format!("{:.0}", value.abs());
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if value < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// Machine facts, tool versions and settings, for the doc and the JSON.
pub struct Facts {
    pub command: String,
    pub date: String,
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub versions: BTreeMap<String, String>,
    pub tls: String,
    pub seconds: u64,
    /// `git describe` of the measured tree (`-dirty` when it had uncommitted changes).
    pub commit: String,
    /// /proc/loadavg when the run ended: other work on the machine skews every column.
    pub load: String,
}

impl Facts {
    pub fn collect(command: String, tls: String, seconds: u64) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let tools: [(&str, &[&str], &str); 6] = [
            ("stunnel", &["-version"], "stunnel "),
            ("haproxy", &["-v"], "HAProxy"),
            ("iperf3", &["-v"], "iperf"),
            ("redis-server", &["-v"], "Redis"),
            ("nginx", &["-v"], "nginx"),
            ("wrk", &["-v"], "wrk"),
        ];
        let versions = tools
            .iter()
            .map(|(tool, args, prefix)| (tool.to_string(), tool_version(tool, args, prefix)))
            .collect();
        Self {
            command,
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: first_line("uname", &["-r"]),
            cpu,
            versions,
            tls,
            seconds,
            commit: first_line("git", &["describe", "--always", "--dirty"]),
            load: String::new(),
        }
    }

    /// Reads the load average now (call when the run ends).
    pub fn record_load(&mut self) {
        self.load = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string();
    }

    fn markdown(&self) -> String {
        let mut out = format!(
            "Run of {}: `{}` on commit {}, {} s per measurement. Machine: {} cores, {}, \
             kernel {}; load average at the end: {}.\n\n",
            self.date,
            self.command,
            self.commit,
            self.seconds,
            self.nproc,
            self.cpu,
            self.kernel,
            self.load
        );
        out.push_str("Versions:");
        for version in self.versions.values() {
            let _ = write!(out, " {version};");
        }
        out.pop();
        let _ = write!(out, ".\n\nTLS: {}\n", self.tls);
        out
    }
}

/// Output of `program args` (stdout then stderr), first line only.
pub fn first_line(program: &str, args: &[&str]) -> String {
    output_text(program, args)
        .lines()
        .next()
        .unwrap_or("?")
        .trim()
        .to_string()
}

fn tool_version(program: &str, args: &[&str], prefix: &str) -> String {
    let text = output_text(program, args);
    text.lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| text.lines().next().unwrap_or("not found"))
        .trim()
        .to_string()
}

fn output_text(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text
        })
        .unwrap_or_default()
}

/// A generated block of docs/benchmarks.md: its heading and the markers around it.
pub struct DocSection {
    pub heading: &'static str,
    pub begin: &'static str,
    pub end: &'static str,
}

pub const MESH_SECTION: DocSection = DocSection {
    heading: "## Mesh: Latch vs stunnel vs HAProxy (`cargo xtask bench mesh`)",
    begin: "<!-- mesh results: generated by `cargo xtask bench mesh`; edits between these markers are overwritten -->",
    end: "<!-- end of generated mesh results -->",
};

/// The generated part of the doc section: facts, table, goals, failures.
pub fn generated_section(results: &Results, facts: &Facts) -> String {
    let mut out = format!("{}\n{}\n", facts.markdown(), results.table());
    let _ = write!(
        out,
        "\nGoals (ratio to the better of stunnel and HAProxy, same run):\n\n{}",
        results.goals()
    );
    if !results.failures.is_empty() {
        out.push_str("\nMeasurements that failed:\n\n");
        for failure in &results.failures {
            let _ = writeln!(out, "- {}", failure.replace('\n', " "));
        }
    }
    out
}

/// Replaces the generated block of `section` in `doc` (appending the heading and the block if
/// absent); text outside the markers, such as hand-written analysis, is kept.
pub fn update_doc(doc: &Path, section: &DocSection, generated: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let (begin, end_marker) = (section.begin, section.end);
    let block = format!("{begin}\n{generated}{end_marker}");
    let updated = match (text.find(begin), text.find(end_marker)) {
        (Some(start), Some(end)) if end > start => {
            format!(
                "{}{block}{}",
                &text[..start],
                &text[end + end_marker.len()..]
            )
        }
        _ => format!("{}\n\n{}\n\n{block}\n", text.trim_end(), section.heading),
    };
    std::fs::write(doc, updated).with_context(|| format!("writing {}", doc.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        let mut results = Results::default();
        for (alt, rps, p50) in [
            (Alt::Latch, 30.0, 0.8),
            (Alt::Stunnel, 20.0, 0.9),
            (Alt::Haproxy, 25.0, 1.0),
        ] {
            for rep in 0..3 {
                let noise = f64::from(rep) - 1.0;
                results.record(
                    alt,
                    vec![
                        ("redis50_rps".into(), rps + noise),
                        ("redis1_p50_ms".into(), p50 + noise / 100.0),
                    ],
                );
            }
        }
        results
    }

    #[test]
    fn ratio_is_to_the_better_alternative_in_the_metrics_direction() {
        let results = results();
        let rps = METRICS.iter().find(|m| m.key == "redis50_rps").unwrap();
        let p50 = METRICS.iter().find(|m| m.key == "redis1_p50_ms").unwrap();
        assert_eq!(results.best_alternative(rps), Some((Alt::Haproxy, 25.0)));
        assert_eq!(results.ratio(rps), Some(30.0 / 25.0));
        assert_eq!(
            results.best_alternative(p50).map(|b| b.0),
            Some(Alt::Stunnel)
        );
        let goals = results.goals();
        assert!(goals.contains("redis -c 50 req/s: goal ≥ 1.3x, measured 1.20x: **not met**"));
        assert!(goals.contains("redis -c 1 p50 latency: goal ≤ 1x, measured 0.89x: **met**"));
    }

    #[test]
    fn numbers_are_grouped_and_rounded_by_size() {
        assert_eq!(format_number(90_600.4), "90,600");
        assert_eq!(format_number(1_234_567.0), "1,234,567");
        assert_eq!(format_number(128.4), "128");
        assert_eq!(format_number(22.84), "22.8");
        assert_eq!(format_number(0.0634), "0.063");
    }

    #[test]
    fn doc_update_replaces_only_the_generated_block() {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("benchmarks.md");
        std::fs::write(&doc, "# Benchmarks\n\n## CA\n\ntext\n").unwrap();
        update_doc(&doc, &MESH_SECTION, "first\n").unwrap();
        let text = std::fs::read_to_string(&doc).unwrap();
        assert!(
            text.starts_with("# Benchmarks\n\n## CA\n\ntext\n\n")
                && text.contains(MESH_SECTION.heading)
        );
        std::fs::write(&doc, format!("{text}\nhand-written analysis\n")).unwrap();
        update_doc(&doc, &MESH_SECTION, "second\n").unwrap();
        let text = std::fs::read_to_string(&doc).unwrap();
        assert!(text.contains("second\n") && !text.contains("first\n"));
        assert!(text.contains("hand-written analysis") && text.contains("## CA"));
    }
}
