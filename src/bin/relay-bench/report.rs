//! The one table the benchmark prints: each row the relay's figure, the baseline
//! measured in the same run, their ratio, the target and whether it was met.

use crate::process::Usage;

/// The target of a reference row ([`Row::reference`]): none.
pub const REFERENCE: &str = "reference";

/// What a reference row's floor is called: the least a forwarder does (`floor.rs`).
pub const FLOOR: &str = "least forwarder";
/// The same floor storing the relay's envelope (SPEC §2) instead of a bare message.
pub const FLOOR_ENVELOPE: &str = "least forwarder + envelope";

/// Peak RSS allowed in every scenario.
pub const RSS_LIMIT_MB: f64 = 64.0;

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured.
    pub scenario: String,
    /// The relay's figure, formatted.
    pub relay: String,
    /// The baseline's figure and what it is, formatted.
    pub baseline: String,
    /// Relay against baseline, formatted.
    pub ratio: String,
    /// The target, in words.
    pub target: String,
    /// Whether the target was met; `None` when not judged (smoke runs).
    pub met: Option<bool>,
    /// Peak RSS of the relay process(es) in this scenario, MB.
    pub rss_mb: Option<f64>,
    /// CPU seconds of the relay process(es) per 10,000 events.
    pub cpu_per_10k: Option<f64>,
    /// Broker CPU seconds per 10,000 events while the relay ran, and while the
    /// baseline did, formatted (empty when not measured).
    pub broker_cpu: String,
    /// The relay's and the baseline's events/s, for the chart; `None` where the row
    /// compares something else (latency, memory).
    pub rates: Option<(f64, f64)>,
}

/// Resource figures of one scenario: worst peak RSS, summed CPU, per events handled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resources {
    /// Largest VmHWM among the scenario's relay processes, MB.
    pub rss_mb: f64,
    /// CPU seconds per 10,000 events, all relay processes together.
    pub cpu_per_10k: f64,
}

impl Resources {
    /// From per-process (before, after) samples and the events handled meanwhile.
    pub fn from_samples(samples: &[(Usage, Usage)], events: usize) -> Self {
        let rss = samples.iter().map(|(_, a)| a.peak_rss).max().unwrap_or(0);
        let cpu: f64 = samples.iter().map(|(b, a)| a.cpu_secs - b.cpu_secs).sum();
        Self {
            rss_mb: rss as f64 / (1024.0 * 1024.0),
            cpu_per_10k: cpu / events.max(1) as f64 * 10_000.0,
        }
    }
}

impl Row {
    /// A throughput row: met when relay / baseline reaches `min_ratio`.
    pub fn rate(
        scenario: &str,
        relay: f64,
        baseline: f64,
        baseline_what: &str,
        min_ratio: f64,
        judged: bool,
        res: Option<Resources>,
    ) -> Self {
        let ratio = relay / baseline.max(1e-9);
        Self {
            scenario: scenario.to_owned(),
            relay: format!("{}/s", thousands(relay)),
            baseline: format!("{}/s {baseline_what}", thousands(baseline)),
            ratio: format!("{ratio:.2}"),
            target: format!(">= {min_ratio:.2}"),
            met: judged.then_some(ratio >= min_ratio),
            rss_mb: res.map(|r| r.rss_mb),
            cpu_per_10k: res.map(|r| r.cpu_per_10k),
            broker_cpu: String::new(),
            rates: Some((relay, baseline)),
        }
    }

    /// A reference row, judged against no target: the relay's rate beside a floor
    /// forwarder's (`floor.rs`, the least any forwarder does on this machine, called
    /// `floor_what`), and the floor's own ratio to the scenario's `baseline`: the most
    /// a relay could reach.
    pub fn reference(
        scenario: &str,
        relay: f64,
        floor: f64,
        floor_what: &str,
        baseline: f64,
        baseline_what: &str,
    ) -> Self {
        Self {
            scenario: scenario.to_owned(),
            relay: format!("{}/s", thousands(relay)),
            baseline: format!(
                "{}/s {floor_what} ({:.2} of {baseline_what})",
                thousands(floor),
                floor / baseline.max(1e-9)
            ),
            ratio: format!("{:.2}", relay / floor.max(1e-9)),
            target: REFERENCE.to_owned(),
            met: None,
            rss_mb: None,
            cpu_per_10k: None,
            broker_cpu: String::new(),
            rates: Some((relay, floor)),
        }
    }

    /// Adds the broker's CPU per 10,000 events during the relay's and the baseline's
    /// runs (`?` where the broker's process could not be watched).
    pub fn with_broker_cpu(mut self, relay: Option<f64>, baseline: Option<f64>) -> Self {
        let show = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
        self.broker_cpu = format!("{} / {}", show(relay), show(baseline));
        self
    }

    /// A latency row: met when the relay's p99 is within `max_extra_ms` of the baseline's.
    pub fn latency(
        scenario: &str,
        relay: (f64, f64),
        baseline: (f64, f64),
        max_extra_ms: f64,
        judged: bool,
    ) -> Self {
        let extra = relay.1 - baseline.1;
        Self {
            scenario: scenario.to_owned(),
            relay: format!("{:.2} / {:.2} ms", relay.0, relay.1),
            baseline: format!("{:.2} / {:.2} ms direct", baseline.0, baseline.1),
            ratio: format!("p99 {extra:+.2} ms"),
            target: format!("p99 <= +{max_extra_ms} ms"),
            met: judged.then_some(extra <= max_extra_ms),
            rss_mb: None,
            cpu_per_10k: None,
            broker_cpu: String::new(),
            rates: None,
        }
    }

    /// The downstream-capacity row: delivered events/s, the share of attempts refused
    /// with 503 and the share of events delivered (the rest exhausted their attempts),
    /// adaptive concurrency against a fixed one in the same run; met
    /// when adaptive delivers at least `min_share` of the downstream's `capacity_rate`
    /// with fewer than `max_refused` of its attempts refused.
    #[allow(clippy::too_many_arguments)]
    pub fn capacity(
        scenario: &str,
        adaptive: (f64, f64, f64),
        fixed: (f64, f64, f64),
        capacity_rate: f64,
        min_share: f64,
        max_refused: f64,
        judged: bool,
        res: Option<Resources>,
    ) -> Self {
        Self {
            scenario: scenario.to_owned(),
            relay: format!(
                "{:.0}/s, {:.1}% 503, {:.0}% delivered",
                adaptive.0,
                adaptive.1 * 100.0,
                adaptive.2 * 100.0
            ),
            baseline: format!(
                "{:.0}/s, {:.1}% 503, {:.0}% delivered, fixed",
                fixed.0,
                fixed.1 * 100.0,
                fixed.2 * 100.0
            ),
            ratio: format!("{:.2}", adaptive.0 / fixed.0.max(1e-9)),
            target: format!(
                ">= {:.0}/s, < {:.0}% 503",
                capacity_rate * min_share,
                max_refused * 100.0
            ),
            met: judged
                .then_some(adaptive.0 >= capacity_rate * min_share && adaptive.1 < max_refused),
            rss_mb: res.map(|r| r.rss_mb),
            cpu_per_10k: res.map(|r| r.cpu_per_10k),
            broker_cpu: String::new(),
            rates: Some((adaptive.0, fixed.0)),
        }
    }

    /// The memory row: the worst peak RSS of every scenario against the limit.
    pub fn peak_rss(worst_mb: f64, judged: bool) -> Self {
        Self {
            scenario: "7 peak RSS, worst scenario".to_owned(),
            relay: format!("{worst_mb:.1} MB"),
            baseline: format!("{RSS_LIMIT_MB} MB limit"),
            ratio: format!("{:.2}", worst_mb / RSS_LIMIT_MB),
            target: "< 1.00".to_owned(),
            met: judged.then_some(worst_mb < RSS_LIMIT_MB),
            rss_mb: None,
            cpu_per_10k: None,
            broker_cpu: String::new(),
            rates: None,
        }
    }
}

/// The median of per-round figures (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `12345.6` as `12,346`.
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The table as Markdown, columns padded so it also reads well on a terminal.
pub fn render(rows: &[Row]) -> String {
    let header = [
        "scenario",
        "relay",
        "baseline (same run)",
        "ratio",
        "target",
        "met",
        "relay peak RSS",
        "relay CPU s / 10k",
        "broker CPU s / 10k, relay / baseline",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.relay.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                r.target.clone(),
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "**no**".into(),
                    None => "-".into(),
                },
                r.rss_mb.map_or_else(String::new, |m| format!("{m:.1} MB")),
                r.cpu_per_10k
                    .map_or_else(String::new, |c| format!("{c:.2}")),
                r.broker_cpu.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| {
        let padded: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&header.map(String::from));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.8), "1,234,568");
    }

    #[test]
    fn medians_resist_one_disturbed_round() {
        assert_eq!(median(&[10.0, 1.0, 11.0]), 10.0);
        assert_eq!(median(&[4.0, 2.0]), 3.0);
        assert_eq!(median(&[7.0]), 7.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn targets_are_judged_on_the_ratio() {
        let r = Row::rate("s", 700.0, 1000.0, "raw", 0.7, true, None);
        assert_eq!(r.met, Some(true));
        assert_eq!(r.ratio, "0.70");
        let r = Row::rate("s", 690.0, 1000.0, "raw", 0.7, true, None);
        assert_eq!(r.met, Some(false));
        assert_eq!(Row::rate("s", 1.0, 2.0, "raw", 0.7, false, None).met, None);
        // A reference row is never judged: it says what the floor reached.
        let f = Row::reference("s", 800.0, 1000.0, FLOOR, 1250.0, "raw");
        assert_eq!((f.met, f.ratio.as_str()), (None, "0.80"));
        assert_eq!(f.baseline, "1,000/s least forwarder (0.80 of raw)");
        assert_eq!(f.rates, Some((800.0, 1000.0)));
        let l = Row::latency("s", (1.0, 5.0), (0.5, 3.0), 2.0, true);
        assert_eq!(l.met, Some(true));
        let l = Row::latency("s", (1.0, 5.1), (0.5, 3.0), 2.0, true);
        assert_eq!(l.met, Some(false));
        assert_eq!(Row::peak_rss(63.9, true).met, Some(true));
        let c = Row::capacity(
            "c",
            (70.0, 0.05, 1.0),
            (60.0, 0.9, 0.1),
            80.0,
            0.8,
            0.1,
            true,
            None,
        );
        assert_eq!(c.met, Some(true));
        let c = Row::capacity(
            "c",
            (70.0, 0.12, 1.0),
            (60.0, 0.9, 0.1),
            80.0,
            0.8,
            0.1,
            true,
            None,
        );
        assert_eq!(c.met, Some(false));
        assert_eq!(Row::peak_rss(64.0, true).met, Some(false));
    }

    #[test]
    fn resources_take_the_worst_rss_and_the_summed_cpu() {
        let mb = 1024 * 1024;
        let at = |rss: u64, cpu: f64| Usage {
            peak_rss: rss * mb,
            cpu_secs: cpu,
        };
        let r = Resources::from_samples(
            &[(at(1, 1.0), at(20, 3.0)), (at(1, 0.0), at(30, 1.0))],
            30_000,
        );
        assert_eq!(r.rss_mb, 30.0);
        assert!((r.cpu_per_10k - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_table_has_one_line_per_row_and_aligned_columns() {
        let rows = [
            Row::rate("1 inline", 5000.0, 10000.0, "direct", 0.3, true, None),
            Row::peak_rss(20.0, false),
        ];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() == lines[0].chars().count())
        );
        assert!(lines[2].contains("5,000/s") && lines[2].contains("yes"));
        let r = Row::rate("s", 1.0, 1.0, "raw", 0.7, true, None).with_broker_cpu(Some(0.5), None);
        assert_eq!(r.broker_cpu, "0.50 / ?");
    }
}
