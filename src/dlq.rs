//! The dead-letter queue's operations (SPEC §6): list, show, replay and purge, shared
//! by the `dlq` command and `/admin/dlq`. The selection rules are pure; the walks over
//! the queue keep memory bounded whatever the DLQ holds and never drop a message.
//!
//! Two kinds of walk:
//! - *Peeking* (list, show, dry runs) takes messages one `basic.get` at a time without
//!   acking, then hands them back to the head of the queue in order (see
//!   [`Dlq::release`]): the queue is left as it was. A quorum queue keeps handed-back
//!   messages in a segment at its head and appends to it, so a peek that stops inside
//!   that segment reads on to its end (without showing more, up to a bound) before
//!   handing back. RabbitMQ 3.10 slows down as one channel holds more un-acked
//!   messages (about 1 ms per message at 5,000, 3 ms at 20,000), so peeks meant to read
//!   everything (`list --limit 0`, a deep `show`, dry runs) are slow on a huge DLQ.
//! - *Moving* (replay, purge) walks exactly the messages present when it starts. A
//!   selected message is published to the work queue (replay) or dropped (purge); one
//!   not selected is published again to the tail of the DLQ, byte for byte. Either way
//!   the DLQ copy is acked only after the broker confirmed the publish, so a crash in
//!   between leaves a duplicate, never a loss. A complete walk leaves the messages it
//!   kept in their original order; one stopped early hands back what it had taken.

pub mod cli;

use std::collections::{BTreeSet, VecDeque};
use std::ops::ControlFlow;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::confirms::{ConfirmChannel, Tracked};
use crate::broker::{PublishError, Topology};
use crate::envelope::{self, Envelope, H_DEAD_LETTERED_AT, H_REASON};

/// Publishes in flight (and DLQ messages un-acked) at once during a moving walk.
const WINDOW: usize = 256;
/// A consumer that delivers nothing for this long has run out of messages (someone
/// else took them); the walk falls back to `basic.get`, which says so at once.
const CONSUMER_IDLE: Duration = Duration::from_secs(5);
/// Messages a peek reads past what it shows, to reach the end of the segment of
/// messages handed back earlier (see the module doc). Past this, the order inside that
/// segment may change (never its contents).
const SEGMENT_READ_AHEAD: u64 = 1_000;
/// Longest a walk waits for the messages it handed back to show as ready again.
const RETURNS_VISIBLE_WITHIN: Duration = Duration::from_secs(2);
/// Messages handed back per `nack(multiple)`: RabbitMQ keeps batches this small in order.
const RELEASE_BATCH: usize = 32;
/// Longest an un-acked message should wait in a rate-limited walk's window.
const MAX_HOLD_SECS: f64 = 10.0;

/// Why a DLQ operation could not start.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The queue is not on the broker: wrong `QUEUE_PREFIX`, or the relay never ran.
    #[error(
        "queue {0} does not exist (is QUEUE_PREFIX right? `webhook-relay topology declare` creates it)"
    )]
    MissingQueue(String),
    /// No broker connection could be had.
    #[error("broker not reachable: {0}")]
    Unreachable(String),
    /// The broker failed the operation.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

/// One DLQ message as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqEntry {
    /// The event id (AMQP `message_id`); empty for a message published without one.
    pub id: String,
    /// The webhook name.
    pub webhook: String,
    /// Attempts made before it was dead-lettered.
    pub attempts: u32,
    /// The downstream's status in the last attempt, when it answered.
    pub last_status: Option<u16>,
    /// The error of the last attempt.
    pub last_error: Option<String>,
    /// Why it is in the DLQ: `attempts_exhausted`, `refused`, or the broker's own reason
    /// (`delivery_limit`) for a message the work queue dead-lettered by itself.
    pub reason: Option<String>,
    /// When the relay first received the event (ms since the epoch).
    #[serde(rename = "first_received", serialize_with = "ser_time")]
    pub first_received_ms: u64,
    /// When it entered the DLQ (ms since the epoch).
    #[serde(rename = "dead_lettered_at", serialize_with = "ser_opt_time")]
    pub dead_lettered_at_ms: Option<u64>,
}

fn ser_time<S: serde::Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&envelope::rfc3339_ms(*ms))
}

fn ser_opt_time<S: serde::Serializer>(ms: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&envelope::rfc3339_ms(*ms)),
        None => s.serialize_none(),
    }
}

impl DlqEntry {
    /// Reads the summary from a message's properties (pure; the body is not needed).
    pub fn from_properties(props: &BasicProperties) -> Self {
        let e = Envelope::from_amqp(props, Vec::new());
        Self {
            // `from_amqp` mints an id for a message without one; a listing must not.
            id: props
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            webhook: e.webhook,
            attempts: e.attempts,
            last_status: e.last_status,
            last_error: e.last_error,
            reason: e.dead_letter_reason,
            first_received_ms: e.first_received_ms,
            dead_lettered_at_ms: e.dead_lettered_at_ms.or_else(|| broker_death_time(props)),
        }
    }
}

/// One DLQ message in full, for `show`.
#[derive(Debug, Clone, Serialize)]
pub struct DlqMessage {
    /// The summary.
    #[serde(flatten)]
    pub entry: DlqEntry,
    /// The sender's content type.
    pub content_type: Option<String>,
    /// Every AMQP header, as JSON.
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// The request headers that will be forwarded, in order.
    pub forward_headers: Vec<(String, String)>,
    /// The body as text when it is UTF-8 (it was checked to be JSON on receipt).
    pub body: Option<String>,
    /// The body in base64 when it is not UTF-8.
    pub body_base64: Option<String>,
}

impl DlqMessage {
    /// Reads the full message (pure).
    pub fn from_delivery(props: &BasicProperties, body: &[u8]) -> Self {
        use base64::Engine;
        let entry = DlqEntry::from_properties(props);
        let env = Envelope::from_amqp(props, Vec::new());
        let headers = props
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        let (body, body_base64) = match std::str::from_utf8(body) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(body)),
            ),
        };
        Self {
            entry,
            content_type: props.content_type().as_ref().map(|c| c.as_str().to_owned()),
            headers,
            forward_headers: env
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
            body,
            body_base64,
        }
    }
}

/// An AMQP header value as JSON, for operators (byte strings as lossy UTF-8).
pub fn amqp_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => serde_json::json!(f),
        AMQPValue::Double(f) => serde_json::json!(f),
        AMQPValue::DecimalValue(d) => serde_json::json!(format!("{d:?}")),
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned().into(),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
                .collect(),
        ),
        AMQPValue::Timestamp(t) => envelope::rfc3339_ms(t.saturating_mul(1000)).into(),
        AMQPValue::Void => Value::Null,
    }
}

/// The time the broker recorded when it last dead-lettered a message itself (the
/// work queue's delivery limit), from the newest `x-death` entry (pure). The reason
/// comes from `Envelope::from_amqp`, which reads the same entry.
fn broker_death_time(props: &BasicProperties) -> Option<u64> {
    let h = props.headers().as_ref()?.inner();
    match h.get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(t) => match t.inner().get("time") {
                Some(AMQPValue::Timestamp(s)) => Some(s.saturating_mul(1000)),
                _ => None,
            },
            _ => None,
        }),
        _ => None,
    }
}

/// Headers the broker adds; a copy put back in the DLQ drops them (SPEC §2).
fn is_broker_header(name: &str) -> bool {
    name == "x-death"
        || name == "x-delivery-count"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// The properties of a copy put back at the DLQ tail: the same message, minus the
/// broker's own headers, whose reason and time are kept in the relay's headers (pure).
pub fn kept_properties(props: &BasicProperties) -> BasicProperties {
    let Some(headers) = props.headers().as_ref() else {
        return props.clone();
    };
    let reason = Envelope::from_amqp(props, Vec::new()).dead_letter_reason;
    let at = broker_death_time(props);
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        if !is_broker_header(k.as_str()) {
            kept.insert(k.clone(), v.clone());
        }
    }
    if !kept.contains_key(H_REASON)
        && let Some(r) = reason
    {
        kept.insert(H_REASON.into(), AMQPValue::LongString(LongString::from(r)));
    }
    if !kept.contains_key(H_DEAD_LETTERED_AT)
        && let Some(at) = at
    {
        kept.insert(
            H_DEAD_LETTERED_AT.into(),
            AMQPValue::LongString(LongString::from(envelope::rfc3339_ms(at))),
        );
    }
    props.clone().with_headers(kept)
}

/// Matching on the last downstream status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    /// Exactly this status (`503`).
    Exact(u16),
    /// Any status of this class (`5xx` is `Class(5)`).
    Class(u16),
    /// The downstream never answered (timeout, connection refused): `none`.
    NoAnswer,
}

impl std::str::FromStr for StatusMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "none" {
            return Ok(Self::NoAnswer);
        }
        if let Some(class) = s.strip_suffix("xx")
            && let Ok(c @ 1..=5) = class.parse::<u16>()
        {
            return Ok(Self::Class(c));
        }
        match s.parse::<u16>() {
            Ok(code @ 100..=599) => Ok(Self::Exact(code)),
            _ => Err(format!(
                "expected a status such as 503, a class such as 5xx, or none; got {s:?}"
            )),
        }
    }
}

impl StatusMatch {
    fn matches(self, status: Option<u16>) -> bool {
        match (self, status) {
            (Self::Exact(want), Some(s)) => s == want,
            (Self::Class(c), Some(s)) => s / 100 == c,
            (Self::NoAnswer, None) => true,
            _ => false,
        }
    }
}

/// Which DLQ messages an operation applies to. Every criterion given must hold; an
/// empty selection selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Any of these event ids (none given: any id).
    pub ids: BTreeSet<String>,
    /// The last downstream status.
    pub status: Option<StatusMatch>,
    /// Dead-lettered at least this long ago (first received, when the time is unknown).
    pub older_than: Option<Duration>,
    /// The dead-letter reason, exactly.
    pub reason: Option<String>,
}

impl Selection {
    /// True when no criterion is given (everything is selected).
    pub fn is_everything(&self) -> bool {
        self.ids.is_empty()
            && self.status.is_none()
            && self.older_than.is_none()
            && self.reason.is_none()
    }

    /// Whether `entry` is selected at `now_ms` (pure).
    pub fn matches(&self, entry: &DlqEntry, now_ms: u64) -> bool {
        if !self.ids.is_empty() && !self.ids.contains(&entry.id) {
            return false;
        }
        if let Some(s) = self.status
            && !s.matches(entry.last_status)
        {
            return false;
        }
        if let Some(age) = self.older_than {
            let at = entry.dead_lettered_at_ms.unwrap_or(entry.first_received_ms);
            if now_ms.saturating_sub(at) < age.as_millis() as u64 {
                return false;
            }
        }
        if let Some(r) = &self.reason
            && entry.reason.as_deref() != Some(r.as_str())
        {
            return false;
        }
        true
    }
}

/// What a moving walk does with the messages it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Back to the work queue with the attempt count reset.
    Replay,
    /// Delete.
    Purge,
}

/// A replay or purge request.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    /// Replay or purge.
    pub action: Action,
    /// Which messages.
    pub selection: Selection,
    /// Only report what would happen; the DLQ is left exactly as it was.
    pub dry_run: bool,
    /// At most this many selected messages per second (replay), to spare a downstream
    /// that just came back.
    pub rate: Option<f64>,
}

/// What a walk did. `matched` counts messages moved (replay), deleted (purge), or that
/// would be (dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Messages in the DLQ when the walk started (its length bound).
    pub total: u64,
    /// Messages looked at.
    pub walked: u64,
    /// Messages selected and moved or deleted (or that would be, in a dry run).
    pub matched: u64,
    /// Messages not selected, left in the DLQ.
    pub skipped: u64,
    /// Messages whose publish failed; they are still in the DLQ.
    pub failed: u64,
    /// Why the walk stopped before the end, if it did.
    pub stopped: Option<String>,
}

/// Paces selected messages to a rate, without bursts after a pause.
struct Pacer {
    /// Time between two messages.
    every: Duration,
    /// When the next message may go.
    next: Instant,
}

impl Pacer {
    fn new(per_second: f64) -> Self {
        Self {
            every: Duration::from_secs_f64(1.0 / per_second),
            next: Instant::now(),
        }
    }

    async fn wait(&mut self) {
        let now = Instant::now();
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        self.next = self.next.max(now) + self.every;
    }
}

/// The DLQ of one topology, and where replays go.
#[derive(Debug, Clone)]
pub struct Dlq {
    /// The DLQ's name.
    pub queue: String,
    /// The work exchange (and routing key) replays publish to.
    pub work: String,
    /// How long a publish may wait for its confirm.
    pub publish_timeout: Duration,
}

impl Dlq {
    /// The DLQ of `topology`.
    pub fn new(topology: &Topology, publish_timeout: Duration) -> Self {
        Self {
            queue: topology.dlq.clone(),
            work: topology.work.clone(),
            publish_timeout,
        }
    }

    /// Messages ready in the DLQ now.
    pub async fn count(&self, conn: &Connection) -> Result<u64, DlqError> {
        let ch = conn.create_channel().await?;
        let n = self.count_on(&ch).await;
        let _ = ch.close(200, "counted".into()).await;
        n
    }

    async fn count_on(&self, ch: &Channel) -> Result<u64, DlqError> {
        let declared = crate::broker::topology::peek(ch, &self.queue).await;
        match declared {
            Ok(q) => Ok(u64::from(q.message_count())),
            Err(e) if is_not_found(&e) => Err(DlqError::MissingQueue(self.queue.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Hands the un-acked messages `tags` (ascending; every message un-acked on `ch`)
    /// back to the DLQ head in that order, and waits until the broker shows them ready,
    /// so an operation started right after this one sees them.
    ///
    /// RabbitMQ 3.10 keeps order only for small batches applied one after the other: a
    /// channel closing with more than 32 fetched (`basic.get`) messages, or one
    /// `nack(multiple)` over more than 32, requeues them in hash order, and returns
    /// pipelined faster than the queue applies them can be reordered. So: one
    /// `nack(multiple)` per 32 tags, each applied before the next is sent.
    async fn release(&self, ch: &Channel, tags: &[u64]) -> Result<(), lapin::Error> {
        if tags.is_empty() {
            return Ok(());
        }
        let Some(base) = self.count_on(ch).await.ok() else {
            return Ok(()); // the channel is gone: the broker returns everything itself
        };
        let mut returned = 0u64;
        for batch in tags.chunks(RELEASE_BATCH) {
            let last = *batch.last().expect("chunks are not empty");
            ch.basic_nack(
                last,
                BasicNackOptions {
                    multiple: true, // this batch only: earlier tags were acked or released
                    requeue: true,
                },
            )
            .await?;
            returned += batch.len() as u64;
            self.wait_ready(ch, base + returned).await;
        }
        Ok(())
    }

    /// Waits until `expected` messages are ready. Bounded: concurrent consumers of the
    /// DLQ could keep the count below it for good.
    async fn wait_ready(&self, ch: &Channel, expected: u64) {
        let deadline = Instant::now() + RETURNS_VISIBLE_WITHIN;
        while Instant::now() < deadline {
            match self.count_on(ch).await {
                Ok(n) if n < expected => tokio::time::sleep(Duration::from_millis(2)).await,
                _ => return,
            }
        }
    }

    /// Calls `each` with up to `limit` messages (all when `None`) from the head of the
    /// DLQ, in order, leaving the DLQ unchanged. Returns the DLQ's length.
    pub async fn list<F>(
        &self,
        conn: &Connection,
        limit: Option<u64>,
        cancel: &CancellationToken,
        mut each: F,
    ) -> Result<u64, DlqError>
    where
        F: FnMut(DlqEntry) -> ControlFlow<()>,
    {
        self.peek(conn, limit, cancel, |d, _| {
            each(DlqEntry::from_properties(&d.properties))
        })
        .await
    }

    /// The first message with event id `id`, leaving the DLQ unchanged.
    pub async fn show(
        &self,
        conn: &Connection,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<DlqMessage>, DlqError> {
        let mut found = None;
        self.peek(conn, None, cancel, |d, _| {
            if d.properties
                .message_id()
                .as_ref()
                .is_some_and(|m| m.as_str() == id)
            {
                found = Some(DlqMessage::from_delivery(&d.properties, &d.data));
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await?;
        Ok(found)
    }

    /// Shows `f` up to `limit` messages from the head, taken one `basic.get` at a time
    /// without acking (no prefetch to outgrow, one message in memory), then hands them
    /// all back in order. `f` also gets the DLQ's length.
    async fn peek<F>(
        &self,
        conn: &Connection,
        limit: Option<u64>,
        cancel: &CancellationToken,
        mut f: F,
    ) -> Result<u64, DlqError>
    where
        F: FnMut(&Delivery, u64) -> ControlFlow<()>,
    {
        let ch = conn.create_channel().await?;
        let total = self.count_on(&ch).await?;
        // Messages arriving during the walk are not looked at: the walk has an end.
        let budget = limit.map_or(total, |l| l.min(total));
        let mut tags = Vec::new();
        let walked = async {
            let mut shown = 0;
            let mut extra = 0;
            let mut enough = budget == 0;
            let mut last_fresh = true;
            while (tags.len() as u64) < total && !cancel.is_cancelled() {
                // Messages handed back earlier sit in a segment at the head, and what is
                // handed back joins its end. Past the budget, the walk goes on to the end
                // of that segment, so that handing everything back keeps the order; but
                // not for ever: the broker slows down as un-acked messages pile up.
                if enough && (last_fresh || extra >= SEGMENT_READ_AHEAD) {
                    break;
                }
                let Some(m) = ch
                    .basic_get(
                        self.queue.as_str().into(),
                        BasicGetOptions { no_ack: false },
                    )
                    .await?
                else {
                    break;
                };
                tags.push(m.delivery.delivery_tag);
                last_fresh = !m.delivery.redelivered;
                if enough {
                    extra += 1;
                } else {
                    shown += 1;
                    enough = f(&m.delivery, total).is_break() || shown >= budget;
                }
            }
            Ok::<_, lapin::Error>(())
        }
        .await;
        let released = self.release(&ch, &tags).await;
        let _ = ch.close(200, "peeked".into()).await;
        walked?;
        released?;
        Ok(total)
    }

    /// Runs a replay or purge over the messages present at the start. `on_match` sees
    /// each selected message (a dry run's report); `progress` sees the tally after each
    /// message. Stops early, settling what is in flight, when `cancel` fires or a
    /// publish fails; the tally says so.
    pub async fn run<M, P>(
        &self,
        conn: &Connection,
        op: &Operation,
        cancel: &CancellationToken,
        mut on_match: M,
        mut progress: P,
    ) -> Result<Tally, DlqError>
    where
        M: FnMut(&DlqEntry),
        P: FnMut(&Tally),
    {
        if op.dry_run {
            let mut tally = Tally::default();
            let now = envelope::now_ms();
            self.peek(conn, None, cancel, |d, total| {
                let entry = DlqEntry::from_properties(&d.properties);
                tally.total = total;
                tally.walked += 1;
                if op.selection.matches(&entry, now) {
                    tally.matched += 1;
                    on_match(&entry);
                } else {
                    tally.skipped += 1;
                }
                progress(&tally);
                ControlFlow::Continue(())
            })
            .await
            .map(|total| tally.total = total)?;
            if cancel.is_cancelled() {
                tally.stopped = Some("interrupted".into());
            }
            return Ok(tally);
        }
        let get = conn.create_channel().await?;
        let publish = conn.create_channel().await?;
        let result = async {
            publish
                .confirm_select(ConfirmSelectOptions { nowait: false })
                .await?;
            let total = self.count_on(&get).await?;
            let mut walk = Walk {
                dlq: self,
                op,
                get: &get,
                publish: ConfirmChannel::new(publish.clone()),
                window: window_for(op.rate),
                tally: Tally {
                    total,
                    ..Tally::default()
                },
                pending: VecDeque::new(),
                held: Vec::new(),
                hand_back_on_close: false,
            };
            walk.run(cancel, &mut on_match, &mut progress).await;
            Ok::<_, DlqError>((walk.tally, walk.hand_back_on_close))
        }
        .await;
        let _ = publish.close(200, "walked".into()).await;
        let _ = get.close(200, "walked".into()).await;
        let (tally, handed_back) = result?;
        if handed_back && let Ok(ch) = conn.create_channel().await {
            // What was there, minus what moved or was deleted, is back once this shows.
            self.wait_ready(&ch, tally.total.saturating_sub(tally.matched))
                .await;
            let _ = ch.close(200, "counted".into()).await;
        }
        Ok(tally)
    }
}

/// Publishes in flight for a rate: a rate-limited walk holds fewer un-acked messages,
/// so none waits long (pure).
fn window_for(rate: Option<f64>) -> usize {
    match rate {
        Some(r) if r > 0.0 => ((r * MAX_HOLD_SECS).ceil() as usize).clamp(1, WINDOW),
        _ => WINDOW,
    }
}

/// A publish awaiting its confirm, and the DLQ message it settles.
struct Pending {
    /// The DLQ delivery, acked once the publish is confirmed.
    delivery_tag: u64,
    /// The broker's answer to the publish.
    confirm: Tracked,
    /// Selected (moved to work) or kept (put back at the DLQ tail).
    moved: bool,
    /// For the log line about the event.
    id: String,
    /// For the log line about the event.
    webhook: String,
}

/// Where deliveries come from: a consumer for the bulk (fast), `basic.get` near the
/// end (exact: never takes a message past the walk's length).
enum Source {
    Consume(Consumer),
    Get,
}

/// The state of one moving walk.
struct Walk<'a> {
    dlq: &'a Dlq,
    op: &'a Operation,
    /// Channel the DLQ messages are taken and acked on.
    get: &'a Channel,
    /// Confirm-mode channel the copies are published on.
    publish: ConfirmChannel,
    /// Publishes in flight at most (and the consumer prefetch).
    window: usize,
    tally: Tally,
    pending: VecDeque<Pending>,
    /// Delivery tags left un-acked on purpose (a failed publish, or a message taken
    /// but not handled); handed back in order at the end. At most about a window.
    held: Vec<u64>,
    /// Un-acked messages are left for the channel close to hand back (see `run`).
    hand_back_on_close: bool,
}

impl Walk<'_> {
    async fn run<M, P>(&mut self, cancel: &CancellationToken, on_match: &mut M, progress: &mut P)
    where
        M: FnMut(&DlqEntry),
        P: FnMut(&Tally),
    {
        let mut pacer = self.op.rate.filter(|r| *r > 0.0).map(Pacer::new);
        let mut fetched = 0u64;
        let total = self.tally.total;
        let mut source = match self.start_consumer(total).await {
            Ok(s) => s,
            Err(e) => {
                self.tally.stopped = Some(format!("could not consume the DLQ: {e}"));
                return;
            }
        };
        let mut consumer_cancelled = false;
        while fetched < total && self.tally.stopped.is_none() {
            if cancel.is_cancelled() {
                self.tally.stopped = Some("interrupted".into());
                break;
            }
            let next = match &mut source {
                Source::Consume(consumer) => {
                    let got = tokio::select! {
                        _ = cancel.cancelled() => continue,
                        got = tokio::time::timeout(CONSUMER_IDLE, consumer.next()) => got,
                    };
                    match got {
                        Ok(Some(Ok(d))) => Some(d),
                        // Cancelled (by us): the bulk is done, the rest goes by basic.get.
                        Ok(None) => {
                            source = Source::Get;
                            continue;
                        }
                        Ok(Some(Err(e))) => {
                            self.tally.stopped = Some(format!("DLQ consumer failed: {e}"));
                            break;
                        }
                        Err(_idle) => {
                            if !consumer_cancelled {
                                consumer_cancelled = true;
                                let _ = self
                                    .get
                                    .basic_cancel(
                                        consumer.tag(),
                                        BasicCancelOptions { nowait: false },
                                    )
                                    .await;
                            }
                            continue;
                        }
                    }
                }
                Source::Get => match self
                    .get
                    .basic_get(
                        self.dlq.queue.as_str().into(),
                        BasicGetOptions { no_ack: false },
                    )
                    .await
                {
                    Ok(Some(m)) => Some(m.delivery),
                    Ok(None) => None,
                    Err(e) => {
                        self.tally.stopped = Some(format!("reading the DLQ failed: {e}"));
                        break;
                    }
                },
            };
            let Some(delivery) = next else { break };
            fetched += 1;
            // The broker never has more than `window` un-acked deliveries out: cancelling
            // the consumer once that many remain means it never delivers past the end.
            if let Source::Consume(consumer) = &source
                && !consumer_cancelled
                && total - fetched <= self.window as u64
            {
                consumer_cancelled = true;
                if let Err(e) = self
                    .get
                    .basic_cancel(consumer.tag(), BasicCancelOptions { nowait: false })
                    .await
                {
                    self.hold(delivery.delivery_tag);
                    self.tally.stopped = Some(format!("could not stop the DLQ consumer: {e}"));
                    break;
                }
            }
            if let Some(p) = pacer.as_mut() {
                let entry = DlqEntry::from_properties(&delivery.properties);
                if self.op.action == Action::Replay
                    && self.op.selection.matches(&entry, envelope::now_ms())
                {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            self.hold(delivery.delivery_tag);
                            self.tally.stopped = Some("interrupted".into());
                            break;
                        }
                        _ = p.wait() => {}
                    }
                }
            }
            self.handle(delivery, on_match).await;
            while self.pending.len() >= self.window && self.tally.stopped.is_none() {
                self.settle_oldest().await;
            }
            self.settle_ready().await;
            progress(&self.tally);
        }
        while !self.pending.is_empty() {
            self.settle_oldest().await;
        }
        match source {
            // Stopped mid-bulk: the consumer's un-acked messages (failed, delivered but
            // not handled, still on the wire) all go back, in delivery order, when the
            // channel closes. Cancelling first would let the queue return the ones on the
            // wire at once, ahead of the others.
            Source::Consume(_) if !consumer_cancelled => {
                self.hand_back_on_close = true;
            }
            Source::Consume(mut consumer) => {
                while let Ok(Some(Ok(d))) =
                    tokio::time::timeout(CONSUMER_IDLE, consumer.next()).await
                {
                    self.hold(d.delivery_tag);
                }
            }
            Source::Get => {}
        }
        if !self.hand_back_on_close && !self.held.is_empty() {
            // Back to the DLQ head, in the order they were delivered.
            self.held.sort_unstable();
            let _ = self.dlq.release(self.get, &self.held).await;
        }
        progress(&self.tally);
    }

    /// A consumer with a prefetch of `window` when there is more than a window to walk.
    async fn start_consumer(&self, total: u64) -> Result<Source, lapin::Error> {
        if total <= self.window as u64 {
            return Ok(Source::Get);
        }
        self.get
            .basic_qos(self.window as u16, BasicQosOptions { global: false })
            .await?;
        let consumer = self
            .get
            .basic_consume(
                self.dlq.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_local: false,
                    no_ack: false, // acked one by one, after the copy is confirmed
                    exclusive: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Source::Consume(consumer))
    }

    fn hold(&mut self, tag: u64) {
        self.held.push(tag);
    }

    async fn handle<M: FnMut(&DlqEntry)>(&mut self, delivery: Delivery, on_match: &mut M) {
        self.tally.walked += 1;
        let entry = DlqEntry::from_properties(&delivery.properties);
        let selected = self.op.selection.matches(&entry, envelope::now_ms());
        if selected {
            on_match(&entry);
        }
        let tag = delivery.delivery_tag;
        let span = crate::telemetry::event_span(&entry.id, &entry.webhook);
        let published = match (selected, self.op.action) {
            (true, Action::Purge) => {
                match self
                    .get
                    .basic_ack(tag, BasicAckOptions { multiple: false })
                    .await
                {
                    Ok(()) => {
                        self.tally.matched += 1;
                        crate::metrics::purged();
                        span.in_scope(|| tracing::debug!("purged from the DLQ"));
                    }
                    Err(e) => {
                        self.tally.stopped = Some(format!("acking in the DLQ failed: {e}"));
                    }
                }
                return;
            }
            (true, Action::Replay) => {
                let mut event = Envelope::from_amqp(&delivery.properties, delivery.data);
                event.reset_for_replay();
                // Mandatory: a missing work queue must fail the move.
                self.publish
                    .publish(
                        &self.dlq.work,
                        &self.dlq.work,
                        &event.body,
                        event.properties(),
                    )
                    .await
            }
            (false, _) => {
                self.publish
                    .publish(
                        "",
                        &self.dlq.queue,
                        &delivery.data,
                        kept_properties(&delivery.properties),
                    )
                    .await
            }
        };
        match published {
            Ok(confirm) => self.pending.push_back(Pending {
                delivery_tag: tag,
                confirm,
                moved: selected,
                id: entry.id,
                webhook: entry.webhook,
            }),
            Err(e) => {
                self.hold(tag);
                self.fail(selected, &span, PublishError::Broker(e));
            }
        }
    }

    /// Settles the oldest publish, waiting for its confirm.
    async fn settle_oldest(&mut self) {
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        let confirmed = match tokio::time::timeout(self.dlq.publish_timeout, p.confirm).await {
            Err(_) => Err(PublishError::Timeout(self.dlq.publish_timeout)),
            Ok(answer) => answer,
        };
        self.settle(p.delivery_tag, p.moved, &p.id, &p.webhook, confirmed)
            .await;
    }

    /// Settles the publishes already confirmed, oldest first, without waiting: acks go
    /// out promptly, so few messages sit un-acked and the tally stays current.
    async fn settle_ready(&mut self) {
        while let Some(front) = self.pending.front_mut() {
            let Some(c) = (&mut front.confirm).now_or_never() else {
                break;
            };
            let p = self.pending.pop_front().expect("front exists");
            self.settle(p.delivery_tag, p.moved, &p.id, &p.webhook, c)
                .await;
        }
    }

    async fn settle(
        &mut self,
        tag: u64,
        moved: bool,
        id: &str,
        webhook: &str,
        confirmed: Result<(), PublishError>,
    ) {
        let span = crate::telemetry::event_span(id, webhook);
        if let Err(e) = confirmed {
            self.hold(tag);
            self.fail(moved, &span, e);
            return;
        }
        // The copy is safe: now the DLQ message may go.
        if let Err(e) = self
            .get
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
        {
            // The broker hands it back to the DLQ: a duplicate of the copy, never a loss.
            if self.tally.stopped.is_none() {
                self.tally.stopped = Some(format!(
                    "acking in the DLQ failed (the message may now be in two places): {e}"
                ));
            }
            return;
        }
        if moved {
            self.tally.matched += 1;
            crate::metrics::replayed("moved");
            span.in_scope(|| tracing::debug!("replayed from the DLQ to the work queue"));
        } else {
            self.tally.skipped += 1;
        }
    }

    fn fail(&mut self, moved: bool, span: &tracing::Span, e: PublishError) {
        self.tally.failed += 1;
        if moved {
            crate::metrics::replayed("failed");
        }
        span.in_scope(
            || tracing::warn!(error = %e, "publish failed; the message stays in the DLQ"),
        );
        if self.tally.stopped.is_none() {
            self.tally.stopped = Some(format!("publish failed: {e}"));
        }
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, ShortString};

    fn entry() -> DlqEntry {
        DlqEntry {
            id: "ev-1".into(),
            webhook: "orders".into(),
            attempts: 5,
            last_status: Some(503),
            last_error: Some("HTTP 503".into()),
            reason: Some("attempts_exhausted".into()),
            first_received_ms: 1_000_000,
            dead_lettered_at_ms: Some(2_000_000),
        }
    }

    #[test]
    fn an_empty_selection_selects_everything() {
        let s = Selection::default();
        assert!(s.is_everything());
        assert!(s.matches(&entry(), 0));
    }

    #[test]
    fn every_given_criterion_must_hold() {
        let e = entry();
        let now = 2_000_000 + 600_000;
        let mut s = Selection {
            ids: ["ev-1".to_owned(), "ev-9".to_owned()].into(),
            status: Some(StatusMatch::Exact(503)),
            older_than: Some(Duration::from_secs(600)),
            reason: Some("attempts_exhausted".into()),
        };
        assert!(s.matches(&e, now));
        assert!(!s.matches(&e, now - 1), "dead-lettered only 599.999 s ago");
        s.status = Some(StatusMatch::Class(4));
        assert!(!s.matches(&e, now));
        s.status = Some(StatusMatch::Class(5));
        assert!(s.matches(&e, now));
        s.reason = Some("refused".into());
        assert!(!s.matches(&e, now));
        s.reason = None;
        s.ids = ["ev-2".to_owned()].into();
        assert!(!s.matches(&e, now));
    }

    #[test]
    fn age_falls_back_to_first_received() {
        let mut e = entry();
        e.dead_lettered_at_ms = None;
        let s = Selection {
            older_than: Some(Duration::from_secs(1)),
            ..Selection::default()
        };
        assert!(s.matches(&e, 1_001_000));
        assert!(!s.matches(&e, 1_000_999));
    }

    #[test]
    fn status_matching() {
        assert_eq!("503".parse(), Ok(StatusMatch::Exact(503)));
        assert_eq!("5xx".parse(), Ok(StatusMatch::Class(5)));
        assert_eq!("4XX".parse(), Ok(StatusMatch::Class(4)));
        assert_eq!("none".parse(), Ok(StatusMatch::NoAnswer));
        assert!("abc".parse::<StatusMatch>().is_err());
        assert!("99".parse::<StatusMatch>().is_err());
        assert!("9xx".parse::<StatusMatch>().is_err());
        assert!(StatusMatch::NoAnswer.matches(None));
        assert!(!StatusMatch::NoAnswer.matches(Some(500)));
        assert!(!StatusMatch::Exact(503).matches(None));
    }

    #[test]
    fn entries_read_relay_headers_and_fall_back_to_the_brokers() {
        let mut env =
            Envelope::received("ev-7".into(), "w".into(), None, vec![], Default::default());
        env.record_attempt(2, Some(500), Some("HTTP 500"));
        let props = env.properties();
        let e = DlqEntry::from_properties(&props);
        assert_eq!(
            (e.id.as_str(), e.attempts, e.last_status),
            ("ev-7", 2, Some(500))
        );
        assert_eq!(e.reason, None);

        // Dead-lettered by the broker (work queue delivery limit): reason and time from x-death.
        let mut h = props.headers().clone().unwrap();
        let mut death = FieldTable::default();
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        let mut deaths = FieldArray::default();
        deaths.push(AMQPValue::FieldTable(death));
        h.insert("x-death".into(), AMQPValue::FieldArray(deaths));
        h.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let props = props.with_headers(h);
        let e = DlqEntry::from_properties(&props);
        assert_eq!(e.reason.as_deref(), Some("delivery_limit"));
        assert_eq!(e.dead_lettered_at_ms, Some(1_700_000_000_000));

        // The copy kept in the DLQ drops the broker's headers but keeps what they said.
        let kept = kept_properties(&props);
        let kh = kept.headers().as_ref().unwrap();
        assert!(!kh.contains_key("x-death"));
        assert!(!kh.contains_key("x-first-death-reason"));
        assert!(!kh.contains_key("x-delivery-count"));
        assert_eq!(DlqEntry::from_properties(&kept), e);
        assert_eq!(kept.message_id(), &Some(ShortString::from("ev-7")));
    }

    #[test]
    fn a_message_without_id_lists_with_an_empty_id_every_time() {
        let props = BasicProperties::default();
        assert_eq!(DlqEntry::from_properties(&props).id, "");
        assert_eq!(DlqEntry::from_properties(&props).id, "");
    }

    #[test]
    fn rate_limited_walks_hold_few_messages() {
        assert_eq!(window_for(None), WINDOW);
        assert_eq!(window_for(Some(1.0)), 10);
        assert_eq!(window_for(Some(0.01)), 1);
        assert_eq!(window_for(Some(1e6)), WINDOW);
    }

    #[test]
    fn show_reads_body_and_headers() {
        let env = Envelope::received(
            "ev-3".into(),
            "w".into(),
            Some("application/json"),
            vec![("x-a".into(), b"1".to_vec())],
            bytes::Bytes::from_static(br#"{"a":1}"#),
        );
        let m = DlqMessage::from_delivery(&env.properties(), &env.body);
        assert_eq!(m.body.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(m.forward_headers, vec![("x-a".to_owned(), "1".to_owned())]);
        assert_eq!(m.headers["x-relay-webhook"], "w");
        let m = DlqMessage::from_delivery(&env.properties(), &[0xff, 0xfe]);
        assert_eq!(m.body, None);
        assert_eq!(m.body_base64.as_deref(), Some("//4="));
    }
}
