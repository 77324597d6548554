//! The `webhook-relay dlq` command (SPEC §6): arguments, output (a table for people,
//! JSON lines for scripts), progress on stderr, and exit codes. The operations
//! themselves live in the parent module.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::{Duration, Instant, UNIX_EPOCH};

use lapin::Connection;
use tokio_util::sync::CancellationToken;

use super::{
    Action, Dlq, DlqEntry, DlqError, DlqMessage, Operation, Selection, StatusMatch, Tally,
};
use crate::broker::Topology;
use crate::config::Config;
use crate::retry::Ladder;

/// How often progress is printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// `webhook-relay dlq ...`
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List messages from the head of the DLQ, oldest first; the DLQ is left unchanged.
    List {
        /// At most this many messages (0: all of them).
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message with its headers and body.
    Show {
        /// The event id.
        id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move messages back to the work queue with their attempt count reset. Each copy
    /// is confirmed by the broker before the DLQ message is removed.
    Replay {
        /// Every message in the DLQ.
        #[arg(long, conflicts_with_all = ["ids", "status", "older_than", "reason"])]
        all: bool,
        #[command(flatten)]
        select: SelectArgs,
        /// Print what would be moved; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages per second, to spare a downstream that just came back.
        #[arg(long, value_name = "N", value_parser = parse_rate)]
        rate: Option<f64>,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete messages for good (all of them, or those the filters select).
    Purge {
        #[command(flatten)]
        select: SelectArgs,
        /// Confirms the deletion; without it nothing is deleted.
        #[arg(long)]
        yes: bool,
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The filters shared by replay and purge; every one given must hold.
#[derive(Debug, Clone, clap::Args)]
pub struct SelectArgs {
    /// Only this event id (repeatable).
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
    /// Only messages whose last downstream status is this: 503, a class such as 5xx,
    /// or none (the downstream never answered).
    #[arg(long, value_name = "STATUS")]
    pub status: Option<StatusMatch>,
    /// Only messages dead-lettered at least this long ago: 10m, 2h, 7d.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Only messages dead-lettered for this reason: attempts_exhausted, refused,
    /// delivery_limit.
    #[arg(long)]
    pub reason: Option<String>,
}

impl SelectArgs {
    /// The selection these filters describe.
    pub fn selection(&self) -> Selection {
        Selection {
            ids: self.ids.iter().cloned().collect(),
            status: self.status,
            older_than: self.older_than,
            reason: self.reason.clone(),
        }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "expected a number of messages per second above 0, got {s:?}"
        )),
    }
}

/// Runs one `dlq` command; prints its own errors. Exit codes: 0 done, 1 failed or
/// stopped early (nothing lost: what was not moved is still in the DLQ), 2 refused.
pub async fn run(config: &Config, command: DlqCommand) -> ExitCode {
    let ladder = Ladder::new(config.backoff_base, config.backoff_max);
    let topology = Topology::new(&config.queue_prefix, &ladder);
    let dlq = Dlq::new(&topology, config.publish_timeout);

    let operation = match &command {
        DlqCommand::Replay {
            all,
            select,
            dry_run,
            rate,
            ..
        } => {
            let selection = select.selection();
            if !all && selection.is_everything() {
                eprintln!(
                    "webhook-relay: say which messages to replay: --all, or --id, --status, --older-than, --reason"
                );
                return ExitCode::from(2);
            }
            Some(Operation {
                action: Action::Replay,
                selection,
                dry_run: *dry_run,
                rate: *rate,
            })
        }
        DlqCommand::Purge {
            select,
            yes,
            dry_run,
            ..
        } => {
            if !yes && !dry_run {
                eprintln!(
                    "webhook-relay: purge deletes messages for good; add --yes to confirm (or --dry-run to see what it would delete)"
                );
                return ExitCode::from(2);
            }
            Some(Operation {
                action: Action::Purge,
                selection: select.selection(),
                dry_run: *dry_run,
                rate: None,
            })
        }
        _ => None,
    };

    let conn = match crate::broker::connect_any(config.amqp_url.urls(), "webhook-relay dlq").await {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "webhook-relay: {}",
                DlqError::Unreachable(crate::error_chain(&e))
            );
            return ExitCode::FAILURE;
        }
    };
    // Ctrl-C stops the walk cleanly: in-flight copies settle, the rest stays in the DLQ.
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });

    let code = match (command, operation) {
        (DlqCommand::List { limit, json }, _) => list(&dlq, &conn, limit, json, &cancel).await,
        (DlqCommand::Show { id, json }, _) => show(&dlq, &conn, &id, json, &cancel).await,
        (DlqCommand::Replay { json, .. } | DlqCommand::Purge { json, .. }, Some(op)) => {
            operate(&dlq, &conn, &op, json, &cancel).await
        }
        _ => unreachable!("replay and purge always build an operation"),
    };
    let _ = conn.close(200, "done".into()).await;
    code
}

async fn list(
    dlq: &Dlq,
    conn: &Connection,
    limit: u64,
    json: bool,
    cancel: &CancellationToken,
) -> ExitCode {
    let mut out = std::io::stdout();
    let mut shown = 0u64;
    if !json {
        let _ = writeln!(out, "{}", table_header());
    }
    let listed = dlq
        .list(conn, (limit > 0).then_some(limit), cancel, |entry| {
            shown += 1;
            let line = if json {
                serde_json::to_string(&entry).expect("entries serialise")
            } else {
                table_row(&entry)
            };
            // A closed pipe (`| head`) ends the listing quietly.
            if writeln!(out, "{line}").is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await;
    match listed {
        Ok(total) => {
            eprintln!("{shown} of {total} messages in {} shown", dlq.queue);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

async fn show(
    dlq: &Dlq,
    conn: &Connection,
    id: &str,
    json: bool,
    cancel: &CancellationToken,
) -> ExitCode {
    match dlq.show(conn, id, cancel).await {
        Ok(Some(m)) => {
            let text = if json {
                serde_json::to_string_pretty(&m).expect("messages serialise")
            } else {
                describe(&m)
            };
            let _ = writeln!(std::io::stdout(), "{text}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("webhook-relay: no message with id {id:?} in {}", dlq.queue);
            ExitCode::FAILURE
        }
        Err(e) => fail(&e),
    }
}

async fn operate(
    dlq: &Dlq,
    conn: &Connection,
    op: &Operation,
    json: bool,
    cancel: &CancellationToken,
) -> ExitCode {
    let verb = match op.action {
        Action::Replay => "replay",
        Action::Purge => "purge",
    };
    let mut out = std::io::stdout();
    if op.dry_run && !json {
        let _ = writeln!(out, "{}", table_header());
    }
    let mut progress = Progress::new(verb, op.dry_run);
    let result = dlq
        .run(
            conn,
            op,
            cancel,
            |entry| {
                if op.dry_run {
                    let line = if json {
                        serde_json::to_string(entry).expect("entries serialise")
                    } else {
                        table_row(entry)
                    };
                    let _ = writeln!(out, "{line}");
                }
            },
            |tally| progress.update(tally),
        )
        .await;
    progress.finish();
    let tally = match result {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let _ = writeln!(std::io::stdout(), "{}", summary(op, &tally, json));
    if let Some(why) = &tally.stopped {
        eprintln!(
            "webhook-relay: {verb} stopped early: {why}; messages not moved are still in {}",
            dlq.queue
        );
    }
    if tally.failed > 0 || tally.stopped.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(e: &DlqError) -> ExitCode {
    eprintln!("webhook-relay: {}", crate::error_chain(e));
    ExitCode::FAILURE
}

/// The closing line of a replay or purge (pure).
pub fn summary(op: &Operation, t: &Tally, json: bool) -> String {
    let (done, would) = match op.action {
        Action::Replay => ("moved", "would move"),
        Action::Purge => ("purged", "would purge"),
    };
    if json {
        let key = if op.dry_run {
            would.replace(' ', "_")
        } else {
            done.to_owned()
        };
        let mut v = serde_json::json!({
            "action": match op.action { Action::Replay => "replay", Action::Purge => "purge" },
            "dry_run": op.dry_run,
            "total": t.total,
            key: t.matched,
            "skipped": t.skipped,
            "failed": t.failed,
        });
        if let Some(s) = &t.stopped {
            v["stopped"] = s.as_str().into();
        }
        return v.to_string();
    }
    if op.dry_run {
        format!(
            "{would} {}, skip {} (dry run: nothing changed; {} in the DLQ)",
            t.matched, t.skipped, t.total
        )
    } else {
        format!(
            "{done} {}, skipped {}, failed {} ({} in the DLQ when it started)",
            t.matched, t.skipped, t.failed, t.total
        )
    }
}

const COLUMNS: [(&str, usize); 7] = [
    ("ID", 36),
    ("WEBHOOK", 24),
    ("ATT", 3),
    ("STATUS", 6),
    ("REASON", 18),
    ("FIRST RECEIVED", 20),
    ("DEAD-LETTERED AT", 20),
];

/// The table's header line (pure).
pub fn table_header() -> String {
    let mut line: String = COLUMNS
        .iter()
        .map(|(name, width)| format!("{name:<width$}  "))
        .collect();
    line.push_str("LAST ERROR");
    line
}

/// One table line (pure). Ids are never cut (they are what `show` and `--id` take);
/// the last error comes last, so it needs no cutting either.
pub fn table_row(e: &DlqEntry) -> String {
    let cells = [
        if e.id.is_empty() {
            "(no id)".to_owned()
        } else {
            e.id.clone()
        },
        cut(&e.webhook, COLUMNS[1].1),
        e.attempts.to_string(),
        e.last_status
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        cut(e.reason.as_deref().unwrap_or("-"), COLUMNS[4].1),
        seconds(Some(e.first_received_ms)),
        seconds(e.dead_lettered_at_ms),
    ];
    let mut line = String::new();
    for (cell, (_, width)) in cells.iter().zip(COLUMNS) {
        line.push_str(&format!("{cell:<width$}  "));
    }
    line.push_str(e.last_error.as_deref().unwrap_or("-"));
    line
}

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

fn seconds(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "-".to_owned(),
        |ms| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
    )
}

/// `show` as text (pure).
pub fn describe(m: &DlqMessage) -> String {
    let e = &m.entry;
    let mut s = String::new();
    let mut line = |k: &str, v: &str| s.push_str(&format!("{k:<18}{v}\n"));
    line("id:", &e.id);
    line("webhook:", &e.webhook);
    line("attempts:", &e.attempts.to_string());
    line(
        "last status:",
        &e.last_status.map_or_else(|| "-".into(), |s| s.to_string()),
    );
    line("last error:", e.last_error.as_deref().unwrap_or("-"));
    line("reason:", e.reason.as_deref().unwrap_or("-"));
    line(
        "first received:",
        &crate::envelope::rfc3339_ms(e.first_received_ms),
    );
    line(
        "dead-lettered at:",
        &e.dead_lettered_at_ms
            .map_or_else(|| "-".into(), crate::envelope::rfc3339_ms),
    );
    line("content type:", m.content_type.as_deref().unwrap_or("-"));
    s.push_str("forwarded headers:\n");
    for (k, v) in &m.forward_headers {
        s.push_str(&format!("  {k}: {v}\n"));
    }
    s.push_str("message headers:\n");
    for (k, v) in &m.headers {
        // The forwarded headers are listed above, in either envelope version's form.
        if k != crate::envelope::H_HEADERS && k != crate::envelope::H_FORWARD_HEADERS {
            s.push_str(&format!("  {k}: {v}\n"));
        }
    }
    match (&m.body, &m.body_base64) {
        (Some(text), _) => s.push_str(&format!("body ({} bytes):\n{text}", text.len())),
        (None, Some(b64)) => s.push_str(&format!("body (not UTF-8, base64):\n{b64}")),
        (None, None) => s.push_str("body: (empty)"),
    }
    s
}

/// Progress of a long walk on stderr: a bar on a terminal, a line every few seconds
/// otherwise (SPEC §6).
struct Progress {
    /// The bar, on a terminal.
    bar: Option<indicatif::ProgressBar>,
    /// What is running, for the plain lines.
    verb: &'static str,
    /// When the last plain line was printed.
    last_line: Instant,
    /// The latest tally, for the last plain line.
    latest: Option<Tally>,
    /// Dry runs print their report on stdout; a bar would only get in its way.
    quiet: bool,
}

impl Progress {
    fn new(verb: &'static str, dry_run: bool) -> Self {
        Self {
            bar: None,
            verb,
            last_line: Instant::now(),
            latest: None,
            quiet: dry_run,
        }
    }

    fn update(&mut self, t: &Tally) {
        if self.quiet {
            return;
        }
        if std::io::stderr().is_terminal() {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(t.total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} [{bar:40}] {pos}/{len} {msg} ({per_sec}, eta {eta})",
                    )
                    .expect("the template is valid")
                    .progress_chars("=> "),
                );
                bar.set_prefix(self.verb);
                bar
            });
            bar.set_position(t.walked);
            bar.set_message(format!(
                "done {}, skipped {}, failed {}",
                t.matched, t.skipped, t.failed
            ));
        } else {
            self.latest = Some(t.clone());
            if self.last_line.elapsed() >= PLAIN_PROGRESS_EVERY {
                self.last_line = Instant::now();
                self.print_plain(t);
            }
        }
    }

    fn print_plain(&self, t: &Tally) {
        eprintln!(
            "{}: walked {}/{}, done {}, skipped {}, failed {}",
            self.verb, t.walked, t.total, t.matched, t.skipped, t.failed
        );
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> DlqEntry {
        DlqEntry {
            id: "0198c2d4-6b1e-7a10-9c4e-1f2a3b4c5d6e".into(),
            webhook: "v2.routing.queues.conversations.with.a.long.name".into(),
            attempts: 5,
            last_status: Some(503),
            last_error: Some("HTTP 503 Service Unavailable".into()),
            reason: Some("attempts_exhausted".into()),
            first_received_ms: 1_764_430_212_345,
            dead_lettered_at_ms: None,
        }
    }

    #[test]
    fn table_rows_line_up_with_the_header() {
        let header = table_header();
        let row = table_row(&entry());
        // Columns line up in characters (the cut marker is one character, three bytes).
        let column = |line: &str, text: &str| line[..line.find(text).unwrap()].chars().count();
        assert_eq!(column(&header, "LAST ERROR"), column(&row, "HTTP 503"));
        assert!(row.starts_with("0198c2d4-6b1e-7a10-9c4e-1f2a3b4c5d6e  "));
        assert!(row.contains("v2.routing.queues.conve…"));
        assert!(row.contains("2025-11-29T15:30:12Z"));
    }

    #[test]
    fn summaries_say_what_happened() {
        let op = Operation {
            action: Action::Replay,
            selection: Selection::default(),
            dry_run: false,
            rate: None,
        };
        let t = Tally {
            total: 10,
            walked: 10,
            matched: 8,
            skipped: 1,
            failed: 1,
            stopped: None,
        };
        assert_eq!(
            summary(&op, &t, false),
            "moved 8, skipped 1, failed 1 (10 in the DLQ when it started)"
        );
        let v: serde_json::Value = serde_json::from_str(&summary(&op, &t, true)).unwrap();
        assert_eq!(v["moved"], 8);
        assert_eq!(v["failed"], 1);
    }

    #[test]
    fn rates_must_be_positive() {
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
