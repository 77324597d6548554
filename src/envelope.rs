//! The event as it lives in RabbitMQ (SPEC §2): the untouched body plus the relay's
//! own headers. Encoding builds headers from scratch, so broker-added headers such as
//! `x-death` are never carried into a republished copy.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// Header: attempts made so far (0 for an event waiting for its first worker attempt).
pub const H_ATTEMPTS: &str = "x-relay-attempts";
/// Header: when the relay first received the event (RFC 3339, UTC).
pub const H_FIRST_RECEIVED: &str = "x-relay-first-received";
/// Header: the webhook name.
pub const H_WEBHOOK: &str = "x-relay-webhook";
/// Header: the error of the last attempt.
pub const H_LAST_ERROR: &str = "x-relay-last-error";
/// Header: the HTTP status of the last attempt, when the downstream answered.
pub const H_LAST_STATUS: &str = "x-relay-last-status";
/// Header: the request headers to forward, one `name: value` line each (lines
/// separated by `\n`), in one long string: envelope version 2.
pub const H_HEADERS: &str = "x-relay-headers";
/// Header: the envelope's version; absent on version 1 messages.
pub const H_VERSION: &str = "x-relay-version";
/// Header (envelope version 1, read only): the request headers to forward, as an array
/// of `[name, value]` pairs. A table of many small values costs the broker more to
/// decode and store than one string, so version 2 writes [`H_HEADERS`] instead; queues
/// hold messages across upgrades, so this form is still read.
pub const H_FORWARD_HEADERS: &str = "x-relay-forward-headers";
/// The envelope version this relay writes.
pub const VERSION: u8 = 2;
/// Header (DLQ only): why the event was dead-lettered.
pub const H_REASON: &str = "x-relay-dead-letter-reason";
/// Header (DLQ only): when it was dead-lettered (RFC 3339, UTC).
pub const H_DEAD_LETTERED_AT: &str = "x-relay-dead-lettered-at";

/// Content type assumed when the sender gave none (the body was checked to be JSON).
const DEFAULT_CONTENT_TYPE: &str = "application/json";
/// Longest kept error text; headers should stay small.
const MAX_ERROR_LEN: usize = 512;

/// One event with everything needed to attempt it again later.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The event id, also the AMQP `message_id` and the forwarded `Idempotency-Key`.
    pub id: String,
    /// The webhook name, for logs, metrics and operators.
    pub webhook: String,
    /// Attempts already made.
    pub attempts: u32,
    /// When the relay first received it (ms since the Unix epoch).
    pub first_received_ms: u64,
    /// The sender's content type, forwarded as is.
    pub content_type: String,
    /// Request headers to forward, in order, raw.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The error of the last attempt.
    pub last_error: Option<String>,
    /// The downstream's status in the last attempt.
    pub last_status: Option<u16>,
    /// Why it is in the DLQ (DLQ copies only).
    pub dead_letter_reason: Option<String>,
    /// When it entered the DLQ (ms since the Unix epoch; DLQ copies only).
    pub dead_lettered_at_ms: Option<u64>,
    /// The body, byte for byte as received.
    pub body: Bytes,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 text of a ms timestamp, for headers an operator reads in the management UI.
pub fn rfc3339_ms(ms: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

impl Envelope {
    /// A freshly received event, not yet attempted.
    pub fn received(
        id: String,
        webhook: String,
        content_type: Option<&str>,
        headers: Vec<(String, Vec<u8>)>,
        body: Bytes,
    ) -> Self {
        Self {
            id,
            webhook,
            attempts: 0,
            first_received_ms: now_ms(),
            content_type: content_type
                .filter(|c| !c.is_empty() && c.len() <= 255)
                .unwrap_or(DEFAULT_CONTENT_TYPE)
                .to_owned(),
            headers,
            last_error: None,
            last_status: None,
            dead_letter_reason: None,
            dead_lettered_at_ms: None,
            body,
        }
    }

    /// Records the result of attempt `attempt`.
    pub fn record_attempt(&mut self, attempt: u32, status: Option<u16>, error: Option<&str>) {
        self.attempts = attempt;
        self.last_status = status;
        self.last_error = error.map(|e| truncate(e, MAX_ERROR_LEN));
    }

    /// Marks the copy bound for the DLQ.
    pub fn dead_letter(&mut self, reason: &str) {
        self.dead_letter_reason = Some(reason.to_owned());
        self.dead_lettered_at_ms = Some(now_ms());
    }

    /// Resets the copy bound back to the work queue by a replay.
    pub fn reset_for_replay(&mut self) {
        self.attempts = 0;
        self.dead_letter_reason = None;
        self.dead_lettered_at_ms = None;
    }

    /// The AMQP properties: persistent, with id, content type, timestamp and headers.
    pub fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(H_ATTEMPTS.into(), AMQPValue::LongUInt(self.attempts));
        h.insert(
            H_FIRST_RECEIVED.into(),
            long_string(rfc3339_ms(self.first_received_ms)),
        );
        h.insert(H_WEBHOOK.into(), long_string(self.webhook.as_str()));
        if let Some(e) = &self.last_error {
            h.insert(H_LAST_ERROR.into(), long_string(e.as_str()));
        }
        if let Some(s) = self.last_status {
            h.insert(H_LAST_STATUS.into(), AMQPValue::ShortUInt(s));
        }
        if let Some(r) = &self.dead_letter_reason {
            h.insert(H_REASON.into(), long_string(r.as_str()));
        }
        if let Some(at) = self.dead_lettered_at_ms {
            h.insert(H_DEAD_LETTERED_AT.into(), long_string(rfc3339_ms(at)));
        }
        h.insert(H_VERSION.into(), AMQPValue::ShortShortUInt(VERSION));
        if !self.headers.is_empty() {
            h.insert(
                H_HEADERS.into(),
                AMQPValue::LongString(LongString::from(encode_headers(&self.headers))),
            );
        }

        BasicProperties::default()
            // 2 = persistent: the event must survive a broker restart.
            .with_delivery_mode(2)
            .with_message_id(short_string(&self.id))
            .with_content_type(short_string(&self.content_type))
            .with_timestamp(self.first_received_ms / 1000)
            .with_headers(h)
    }

    /// Reads an event back from a delivery. Lenient: a message published by hand (say,
    /// from the management UI) gets defaults instead of being refused.
    pub fn from_amqp(properties: &BasicProperties, body: Vec<u8>) -> Self {
        let empty = FieldTable::default();
        let h = properties.headers().as_ref().unwrap_or(&empty).inner();
        let text = |k: &str| h.get(k).and_then(amqp_text);
        let first_received_ms = text(H_FIRST_RECEIVED)
            .and_then(|s| parse_rfc3339_ms(&s))
            .or_else(|| properties.timestamp().map(|t| t * 1000))
            .unwrap_or_else(now_ms);
        let headers = match (h.get(H_HEADERS), h.get(H_FORWARD_HEADERS)) {
            (Some(AMQPValue::LongString(block)), _) => decode_headers(block.as_bytes()),
            (_, Some(AMQPValue::FieldArray(pairs))) => decode_v1_headers(pairs),
            _ => Vec::new(),
        };
        Self {
            id: properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(crate::event::new_event_id),
            webhook: text(H_WEBHOOK).unwrap_or_else(|| "unknown".to_owned()),
            attempts: h.get(H_ATTEMPTS).and_then(amqp_u64).unwrap_or(0) as u32,
            first_received_ms,
            content_type: properties
                .content_type()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned()),
            headers,
            last_error: text(H_LAST_ERROR),
            last_status: h
                .get(H_LAST_STATUS)
                .and_then(amqp_u64)
                .and_then(|s| u16::try_from(s).ok()),
            // A message the broker dead-lettered itself (past `x-delivery-limit`) has no
            // relay reason, only the broker's (`delivery_limit`): show that one.
            dead_letter_reason: text(H_REASON).or_else(|| broker_death_reason(h)),
            dead_lettered_at_ms: text(H_DEAD_LETTERED_AT).and_then(|s| parse_rfc3339_ms(&s)),
            body: Bytes::from(body),
        }
    }
}

/// The forwarded headers as HTTP/1 field lines, `name: value`, joined by `\n`. Names
/// are tokens (no `:`) and values never hold CR or LF, so the form is unambiguous.
fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let len = headers.iter().map(|(k, v)| k.len() + v.len() + 3).sum();
    let mut out = Vec::with_capacity(len);
    for (name, value) in headers {
        if !out.is_empty() {
            out.push(b'\n');
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
    }
    out
}

fn decode_headers(block: &[u8]) -> Vec<(String, Vec<u8>)> {
    block
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|b| *b == b':')?;
            let name = std::str::from_utf8(&line[..colon]).ok()?.trim();
            let value = line[colon + 1..]
                .strip_prefix(b" ")
                .unwrap_or(&line[colon + 1..]);
            (!name.is_empty()).then(|| (name.to_owned(), value.to_vec()))
        })
        .collect()
}

/// Version 1: an array of `[name, value]` arrays.
fn decode_v1_headers(pairs: &FieldArray) -> Vec<(String, Vec<u8>)> {
    pairs
        .as_slice()
        .iter()
        .filter_map(|p| match p {
            AMQPValue::FieldArray(kv) => match kv.as_slice() {
                [k, v] => Some((amqp_bytes(k)?, amqp_bytes(v)?)),
                _ => None,
            },
            _ => None,
        })
        .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, v)))
        .collect()
}

/// The reason of the broker's most recent dead-lettering: `x-last-death-reason`
/// (RabbitMQ 3.13+), else the newest (first) entry of `x-death` (3.10).
fn broker_death_reason(h: &std::collections::BTreeMap<ShortString, AMQPValue>) -> Option<String> {
    if let Some(r) = h.get("x-last-death-reason").and_then(amqp_text) {
        return Some(r);
    }
    match h.get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(t) => t.inner().get("reason").and_then(amqp_text),
            _ => None,
        },
        _ => None,
    }
}

fn long_string(v: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.into()))
}

/// A short string cut to AMQP's 255-byte limit on a character boundary.
fn short_string(s: &str) -> ShortString {
    ShortString::from(truncate(s, 255))
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn amqp_bytes(v: &AMQPValue) -> Option<Vec<u8>> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
        AMQPValue::ByteArray(b) => Some(b.as_slice().to_vec()),
        _ => None,
    }
}

fn amqp_text(v: &AMQPValue) -> Option<String> {
    amqp_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn amqp_u64(v: &AMQPValue) -> Option<u64> {
    match *v {
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_amqp_properties() {
        let mut e = Envelope::received(
            "ev-1".into(),
            "conv".into(),
            Some("application/json; charset=utf-8"),
            vec![
                ("x-a".into(), b"1".to_vec()),
                ("x-b".into(), vec![0xff, 0x20]),
            ],
            Bytes::from_static(br#"{"a":1}"#),
        );
        e.record_attempt(3, Some(503), Some("HTTP 503 Service Unavailable"));
        e.dead_letter("attempts_exhausted");
        let props = e.properties();
        assert_eq!(props.delivery_mode(), &Some(2));
        let back = Envelope::from_amqp(&props, e.body.to_vec());
        // RFC 3339 text keeps milliseconds, so the round trip is exact.
        assert_eq!(back, e);
    }

    #[test]
    fn forwarded_headers_travel_in_one_string() {
        let e = Envelope::received(
            "ev-1".into(),
            "conv".into(),
            None,
            vec![
                ("x-a".into(), b"1".to_vec()),
                ("x-colon".into(), b"a: b:c".to_vec()),
                ("x-empty".into(), Vec::new()),
                ("x-b".into(), vec![0xff, 0x20]),
            ],
            Bytes::new(),
        );
        let props = e.properties();
        let h = props.headers().as_ref().unwrap().inner();
        assert_eq!(h.get(H_VERSION), Some(&AMQPValue::ShortShortUInt(2)));
        assert!(!h.contains_key(H_FORWARD_HEADERS));
        match h.get(H_HEADERS) {
            Some(AMQPValue::LongString(s)) => assert_eq!(
                s.as_bytes(),
                b"x-a: 1\nx-colon: a: b:c\nx-empty: \nx-b: \xff "
            ),
            other => panic!("not a long string: {other:?}"),
        }
        assert_eq!(Envelope::from_amqp(&props, vec![]).headers, e.headers);
        // No forwarded headers: no field at all.
        let bare = Envelope::received("ev-2".into(), "w".into(), None, vec![], Bytes::new());
        let props = bare.properties();
        assert!(!props.headers().as_ref().unwrap().contains_key(H_HEADERS));
    }

    #[test]
    fn version_1_messages_are_still_read() {
        // As the previous release wrote them: no version, headers as pairs.
        let pair = |k: &str, v: &[u8]| {
            let mut p = FieldArray::default();
            p.push(long_string(k));
            p.push(long_string(v));
            AMQPValue::FieldArray(p)
        };
        let mut pairs = FieldArray::default();
        pairs.push(pair("x-a", b"1"));
        pairs.push(pair("accept", b"*/*"));
        let mut h = FieldTable::default();
        h.insert(H_ATTEMPTS.into(), AMQPValue::LongUInt(2));
        h.insert(H_WEBHOOK.into(), long_string("orders"));
        h.insert(H_FORWARD_HEADERS.into(), AMQPValue::FieldArray(pairs));
        let props = BasicProperties::default()
            .with_message_id("ev-old".into())
            .with_headers(h);
        let e = Envelope::from_amqp(&props, b"{}".to_vec());
        assert_eq!(e.attempts, 2);
        assert_eq!(e.webhook, "orders");
        assert_eq!(
            e.headers,
            vec![
                ("x-a".to_owned(), b"1".to_vec()),
                ("accept".to_owned(), b"*/*".to_vec())
            ]
        );
        // Republished (a retry, a replay), it is written as version 2.
        let again = e.properties();
        let h = again.headers().as_ref().unwrap();
        assert!(h.contains_key(H_HEADERS) && !h.contains_key(H_FORWARD_HEADERS));
        assert_eq!(Envelope::from_amqp(&again, vec![]).headers, e.headers);
    }

    #[test]
    fn broker_headers_are_not_carried_over() {
        let e = Envelope::received("id".into(), "w".into(), None, vec![], Bytes::new());
        let mut props = e.properties();
        let mut h = props.headers().clone().unwrap();
        h.insert("x-death".into(), AMQPValue::LongString("cycle".into()));
        props = props.with_headers(h);
        let again = Envelope::from_amqp(&props, vec![]).properties();
        assert!(!again.headers().as_ref().unwrap().contains_key("x-death"));
    }

    #[test]
    fn broker_dead_lettering_is_named_as_such() {
        // 3.10: only x-death, newest first (the retry expiry came before the limit).
        let death = |reason: &str| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            AMQPValue::FieldTable(t)
        };
        let mut deaths = FieldArray::default();
        deaths.push(death("delivery_limit"));
        deaths.push(death("expired"));
        let mut h = FieldTable::default();
        h.insert("x-death".into(), AMQPValue::FieldArray(deaths));
        let e = Envelope::from_amqp(&BasicProperties::default().with_headers(h.clone()), vec![]);
        assert_eq!(e.dead_letter_reason.as_deref(), Some("delivery_limit"));
        // 3.13+: x-last-death-reason says it directly.
        h.insert(
            "x-last-death-reason".into(),
            AMQPValue::LongString("rejected".into()),
        );
        let e = Envelope::from_amqp(&BasicProperties::default().with_headers(h), vec![]);
        assert_eq!(e.dead_letter_reason.as_deref(), Some("rejected"));
    }

    #[test]
    fn hand_published_messages_get_defaults() {
        let e = Envelope::from_amqp(&BasicProperties::default(), b"{}".to_vec());
        assert_eq!(e.attempts, 0);
        assert_eq!(e.webhook, "unknown");
        assert_eq!(e.content_type, "application/json");
        assert!(!e.id.is_empty());
    }
}
