//! The inbound body (SPEC §4.2, §4.3): checked to be UTF-8 JSON no deeper than
//! [`MAX_DEPTH`], and probed for the few fields that identify the event without
//! building the whole tree, so a request costs about its own size in memory.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Deepest nesting of arrays and objects accepted. The body is forwarded as is and
/// the downstream parses it again: 64 is the default limit of common parsers (.NET's
/// System.Text.Json among them), so the relay refuses at once what a downstream would
/// refuse after the event had been accepted, and no parser on the path recurses far.
pub const MAX_DEPTH: usize = 64;

/// Why a body is not an event (every case is answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Nothing but whitespace.
    #[error("body is empty")]
    Empty,
    /// JSON text must be UTF-8 (RFC 8259 §8.1).
    #[error("body is not UTF-8")]
    NotUtf8,
    /// Arrays and objects nested deeper than [`MAX_DEPTH`].
    #[error("body nests arrays or objects deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Not JSON at all; the parser's words.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
}

/// Checks `body` and returns the fields that name the event, as a small JSON value
/// holding only the keys [`crate::event::event_id`] and [`crate::event::webhook_name`]
/// read (`id`, `eventId`, `detail-type`, `topicName`, `metadata.CorrelationId`,
/// `detail.metadata.CorrelationId`). Those functions give the same answers on this
/// value as on the fully parsed body.
pub fn inspect(body: &[u8]) -> Result<Value, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    if nesting_exceeds(text.as_bytes(), MAX_DEPTH) {
        return Err(BodyError::TooDeep);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let probe = IDENTITY
        .deserialize(&mut de)
        .map_err(|e| BodyError::NotJson(e.to_string()))?;
    // Trailing characters after the value make the text invalid JSON.
    de.end().map_err(|e| BodyError::NotJson(e.to_string()))?;
    Ok(probe)
}

/// Whether arrays and objects in `json` nest deeper than `limit`. Exact for valid
/// JSON; brackets inside strings do not count. Linear, no allocation: the insides of
/// strings (most of an event's bytes) are skipped with `memchr`, not byte by byte.
pub fn nesting_exceeds(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                // To the closing quote, hopping over escapes (`\"`, `\\`).
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', json.get(i..).unwrap_or_default()) {
                        // Unterminated: not JSON, which the parser says next.
                        None => return false,
                        Some(k) if json[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k + 1;
                            break;
                        }
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Which parts of a JSON value to keep.
#[derive(Debug)]
enum Want {
    /// Keep a string or number as it is; anything else becomes `null` (unusable).
    Leaf,
    /// Keep these keys of an object (the last occurrence wins, as in a full parse);
    /// anything that is not an object becomes `null`.
    Object(&'static [(&'static str, Want)]),
}

/// The fields SPEC §4.3 reads to name an event.
const IDENTITY: Want = Want::Object(&[
    ("id", Want::Leaf),
    ("eventId", Want::Leaf),
    ("detail-type", Want::Leaf),
    ("topicName", Want::Leaf),
    ("metadata", Want::Object(&[("CorrelationId", Want::Leaf)])),
    (
        "detail",
        Want::Object(&[("metadata", Want::Object(&[("CorrelationId", Want::Leaf)]))]),
    ),
]);

impl<'de> DeserializeSeed<'de> for &Want {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &Want {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(self.leaf(|| Value::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(self.leaf(|| Value::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(self.leaf(|| Value::from(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(self.leaf(|| Value::from(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let fields = match self {
            Want::Object(fields) => *fields,
            Want::Leaf => &[],
        };
        let mut kept = Map::new();
        // Keys are matched as the parser reads them, never copied unless kept.
        while let Some(found) = map.next_key_seed(Field(fields))? {
            match found {
                Some((name, want)) => {
                    let v = map.next_value_seed(want)?;
                    kept.insert(String::from(*name), v);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match self {
            Want::Object(_) => Value::Object(kept),
            Want::Leaf => Value::Null,
        })
    }
}

/// Reads an object key and finds it among the wanted fields, without allocating for
/// a key that needs no unescaping (serde_json hands those over borrowed).
struct Field(&'static [(&'static str, Want)]);

impl<'de> DeserializeSeed<'de> for Field {
    type Value = Option<&'static (&'static str, Want)>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Field {
    type Value = Option<&'static (&'static str, Want)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().find(|(name, _)| *name == key))
    }
}

impl Want {
    fn leaf(&self, v: impl FnOnce() -> Value) -> Value {
        match self {
            Self::Leaf => v(),
            Self::Object(_) => Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{event_id, webhook_name};
    use http::HeaderMap;
    use proptest::prelude::*;
    use serde_json::json;

    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn brackets_inside_strings_and_escapes_do_not_nest() {
        // Escaped quotes and backslashes end no string early; brackets inside count not.
        let text = br#"{"a":"[[[\"{{{\\","b":["\\"],"c":"\\\"]]]"}"#;
        assert!(!nesting_exceeds(text, 2));
        assert!(nesting_exceeds(text, 1));
        // A key with an escape is still matched, and kept under its real name.
        let probe = inspect(br#"{"i\u0064":"esc-1","pad":"\"}{"}"#).unwrap();
        assert_eq!(probe["id"], "esc-1");
        // Cut off inside a string or right after a backslash: no panic, no verdict.
        assert!(!nesting_exceeds(br#"{"a":"abc"#, 1));
        assert!(!nesting_exceeds(br#"["a\"#, 1));
        assert!(nesting_exceeds(br#"[["a\"#, 1));
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        assert_eq!(inspect(b""), Err(BodyError::Empty));
        assert_eq!(inspect(b" \r\n\t"), Err(BodyError::Empty));
        assert_eq!(inspect(&[0xff, 0xfe, b'{', b'}']), Err(BodyError::NotUtf8));
        assert_eq!(inspect(b"{\"a\":\"\xff\"}"), Err(BodyError::NotUtf8));
        assert!(matches!(inspect(b"not json"), Err(BodyError::NotJson(_))));
        assert!(matches!(
            inspect(br#"{"a":1} trailing"#),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(inspect(br#"{"a":1"#), Err(BodyError::NotJson(_))));
        assert!(matches!(
            inspect(br#"{"a":tru}"#),
            Err(BodyError::NotJson(_))
        ));
    }

    #[test]
    fn depth_limit_is_exact() {
        assert!(inspect(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            inspect(nested(MAX_DEPTH + 1).as_bytes()),
            Err(BodyError::TooDeep)
        );
        // Brackets inside strings, escaped quotes included, are text, not nesting.
        let s = format!(r#"{{"a":"\"{}"}}"#, "[".repeat(500));
        assert!(inspect(s.as_bytes()).is_ok());
        // A megabyte of openers is refused without recursion.
        assert_eq!(
            inspect("[".repeat(1 << 20).as_bytes()),
            Err(BodyError::TooDeep)
        );
    }

    #[test]
    fn keeps_only_the_identity_fields() {
        let body = json!({
            "version": "0",
            "id": "eb-1",
            "detail-type": "v2.users.{id}.presence",
            "detail": {"metadata": {"CorrelationId": "c-9", "other": 1}, "eventBody": {"x": [1, 2]}},
            "eventId": 7,
            "topicName": ["not", "a", "string"],
        });
        let kept = inspect(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            kept,
            json!({
                "id": "eb-1",
                "detail-type": "v2.users.{id}.presence",
                "detail": {"metadata": {"CorrelationId": "c-9"}},
                "eventId": 7,
                "topicName": null,
            })
        );
        assert_eq!(inspect(b"[1,2,{\"id\":\"x\"}]").unwrap(), Value::Null);
        assert_eq!(inspect(b"\"just a string\"").unwrap(), Value::Null);
    }

    #[test]
    fn duplicate_keys_keep_the_last_as_a_full_parse_does() {
        let text =
            r#"{"id":"first","metadata":{"CorrelationId":"c-1"},"id":"second","metadata":"flat"}"#;
        let full: Value = serde_json::from_str(text).unwrap();
        let kept = inspect(text.as_bytes()).unwrap();
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&kept)),
            event_id(&HeaderMap::new(), Some(&full))
        );
        assert_eq!(kept["id"], "second");
        assert_eq!(kept["metadata"], Value::Null);
    }

    /// JSON values shaped like webhook bodies: the identity keys appear often, with
    /// values of every type, among arbitrary other keys.
    fn json_value() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("id".to_owned()),
            Just("eventId".to_owned()),
            Just("detail-type".to_owned()),
            Just("topicName".to_owned()),
            Just("metadata".to_owned()),
            Just("detail".to_owned()),
            Just("CorrelationId".to_owned()),
            "[a-zA-Z_-]{0,8}",
            "\\PC{0,6}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,20}".prop_map(Value::from),
            "[ -~]{0,300}".prop_map(Value::from),
        ];
        leaf.prop_recursive(6, 64, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn identity_matches_a_full_parse(v in json_value(), path in proptest::option::of("[a-z]{1,8}")) {
            let text = v.to_string();
            // Compared with a full parse of the same text (a float may not survive the
            // text round trip exactly, but both parses read the text the same way).
            let full: Value = serde_json::from_str(&text).unwrap();
            let kept = inspect(text.as_bytes()).unwrap();
            let h = HeaderMap::new();
            prop_assert_eq!(event_id(&h, Some(&kept)), event_id(&h, Some(&full)));
            prop_assert_eq!(
                webhook_name(path.as_deref(), &h, Some(&kept)),
                webhook_name(path.as_deref(), &h, Some(&full))
            );
            // Pretty-printed text is the same value.
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            prop_assert_eq!(inspect(pretty.as_bytes()).unwrap(), kept);
        }

        #[test]
        fn nesting_check_is_exact_on_valid_json(v in json_value(), limit in 0usize..8) {
            let text = v.to_string();
            prop_assert_eq!(nesting_exceeds(text.as_bytes(), limit), depth(&v) > limit);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_agree_with_serde_json(
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let full = std::str::from_utf8(&body).ok().and_then(|t| serde_json::from_str::<Value>(t).ok());
            match inspect(&body) {
                Ok(kept) => {
                    let h = HeaderMap::new();
                    if let Some(full) = full {
                        prop_assert_eq!(event_id(&h, Some(&kept)), event_id(&h, Some(&full)));
                    }
                }
                // Whatever a full parse accepts within the depth limit, inspect accepts.
                Err(e) => prop_assert!(
                    full.is_none_or(|f| depth(&f) > MAX_DEPTH),
                    "refused a body serde_json accepts: {e}"
                ),
            }
        }
    }
}
