//! Decides, event by event, what can be stored; one bad event rejects only itself.
//!
//! Each raw event from the envelope is size-checked, decoded on its own, and checked for id
//! format, string lengths, nesting depth, timestamps and NUL characters (which Postgres
//! refuses in text and jsonb, and which would otherwise fail a whole group commit).
//!
//! `props` and `context` are not decoded into a tree: they stay raw JSON text (already
//! syntax-checked by the JSON parser), are scanned once for what Postgres' `jsonb` would
//! refuse (NUL, lone surrogates, numbers out of range) and for depth, and are stored as sent.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use tracklet_wire::types::Rejected;
use uuid::Uuid;

use crate::limits::{
    MAX_EVENT_BYTES, MAX_ID_LEN, MAX_NAME_LEN, MAX_PROPS_DEPTH, MAX_TS_MS, MIN_TS_MS,
};

/// Why one event was rejected; [`EventRejection::code`] is its stable, short name.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventRejection {
    #[error("event is {bytes} bytes; at most {max} allowed", max = MAX_EVENT_BYTES)]
    TooLarge { bytes: usize },
    #[error("{0}")]
    Malformed(String),
    #[error("id is not a UUID")]
    InvalidId,
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} is nested deeper than {max} levels", max = MAX_PROPS_DEPTH)]
    TooDeep { field: &'static str },
    #[error("ts is outside the supported range")]
    TsOutOfRange,
    #[error("a string contains a NUL character")]
    NulCharacter,
}

impl EventRejection {
    pub fn code(&self) -> &'static str {
        match self {
            EventRejection::TooLarge { .. } => "too_large",
            EventRejection::Malformed(_) => "malformed",
            EventRejection::InvalidId => "invalid_id",
            EventRejection::Empty { .. } => "empty_field",
            EventRejection::TooLong { .. } => "too_long",
            EventRejection::TooDeep { .. } => "too_deep",
            EventRejection::TsOutOfRange => "ts_out_of_range",
            EventRejection::NulCharacter => "nul_character",
        }
    }

    /// `code: explanation`, as sent in [`Rejected::reason`].
    pub fn reason(&self) -> String {
        format!("{}: {}", self.code(), self)
    }
}

/// One event as received (the fields of `tracklet_wire::types::Event`; unknown fields are
/// ignored), with `props` and `context` kept as raw JSON text.
#[derive(Debug, Deserialize)]
pub struct IncomingEvent<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    pub name: String,
    /// Client clock when the event happened (ms since the Unix epoch).
    pub ts: u64,
    pub anonymous_id: String,
    pub session_id: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default, borrow)]
    pub props: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub context: Option<&'a RawValue>,
}

/// An event that passed every check, with its parsed id.
#[derive(Debug)]
pub struct ValidEvent<'a> {
    /// Position in the batch's `events` array.
    pub index: usize,
    pub id: Uuid,
    pub event: IncomingEvent<'a>,
}

/// The events of one batch, split into the valid ones and the rejections.
#[derive(Debug, Default)]
pub struct Validated<'a> {
    pub valid: Vec<ValidEvent<'a>>,
    pub rejected: Vec<(Rejected, &'static str)>,
}

/// Validates every raw event of a batch.
pub fn validate_batch<'a>(events: &[&'a RawValue]) -> Validated<'a> {
    let mut out = Validated::default();
    for (index, raw) in events.iter().enumerate() {
        match validate_event(raw) {
            Ok((id, event)) => out.valid.push(ValidEvent { index, id, event }),
            Err(rejection) => out.rejected.push((
                Rejected {
                    index,
                    id: probe_id(raw),
                    reason: rejection.reason(),
                },
                rejection.code(),
            )),
        }
    }
    out
}

/// Decodes and checks one event.
pub fn validate_event(raw: &RawValue) -> Result<(Uuid, IncomingEvent<'_>), EventRejection> {
    let text = raw.get();
    if text.len() > MAX_EVENT_BYTES {
        return Err(EventRejection::TooLarge { bytes: text.len() });
    }
    let event: IncomingEvent =
        serde_json::from_str(text).map_err(|e| EventRejection::Malformed(e.to_string()))?;
    check_string("id", &event.id, MAX_ID_LEN)?;
    let id = Uuid::try_parse(&event.id).map_err(|_| EventRejection::InvalidId)?;
    check_string("name", &event.name, MAX_NAME_LEN)?;
    check_string("anonymous_id", &event.anonymous_id, MAX_ID_LEN)?;
    check_string("session_id", &event.session_id, MAX_ID_LEN)?;
    if let Some(user_id) = &event.user_id {
        check_string("user_id", user_id, MAX_ID_LEN)?;
    }
    if !(MIN_TS_MS..=MAX_TS_MS).contains(&event.ts) {
        return Err(EventRejection::TsOutOfRange);
    }
    for (field, raw) in [("props", event.props), ("context", event.context)] {
        if let Some(raw) = raw {
            check_raw_object(field, raw.get())?;
        }
    }
    Ok((id, event))
}

fn check_string(field: &'static str, value: &str, max: usize) -> Result<(), EventRejection> {
    if value.is_empty() {
        return Err(EventRejection::Empty { field });
    }
    if value.chars().count() > max {
        return Err(EventRejection::TooLong { field, max });
    }
    if value.contains('\0') {
        return Err(EventRejection::NulCharacter);
    }
    Ok(())
}

/// Checks the raw JSON text of `props`/`context` (syntactically valid JSON, as cut out by the
/// parser): an object, nested at most [`MAX_PROPS_DEPTH`] levels (the object itself is level
/// 1), no `\u0000`, no lone UTF-16 surrogate escapes, no number beyond `f64` range. These are
/// what Postgres' `jsonb` input would refuse, failing a whole group-commit transaction.
pub fn check_raw_object(field: &'static str, text: &str) -> Result<(), EventRejection> {
    let b = text.as_bytes();
    if b.first() != Some(&b'{') {
        return Err(EventRejection::Malformed(format!(
            "invalid type: {field} must be an object"
        )));
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_PROPS_DEPTH {
                    return Err(EventRejection::TooDeep { field });
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => i = scan_string(b, i + 1)?,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                check_number(&text[start..i])?;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Scans a JSON string whose opening quote is just before `i`; returns the index after its
/// closing quote.
fn scan_string(b: &[u8], mut i: usize) -> Result<usize, EventRejection> {
    let lone = || EventRejection::Malformed("lone surrogate in hex escape".into());
    // A high surrogate escape must be followed at once by a low surrogate escape.
    let mut want_low = false;
    loop {
        if !want_low {
            // Plain characters need no look: jump to the next quote or backslash.
            i += memchr::memchr2(b'"', b'\\', b.get(i..).unwrap_or_default())
                .ok_or_else(|| EventRejection::Malformed("unterminated string".into()))?;
        }
        match b.get(i) {
            None => return Err(EventRejection::Malformed("unterminated string".into())),
            Some(b'"') if !want_low => return Ok(i + 1),
            Some(b'\\') if b.get(i + 1) == Some(&b'u') => {
                let hex = b
                    .get(i + 2..i + 6)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let unit = hex
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                    .ok_or_else(|| EventRejection::Malformed("invalid escape".into()))?;
                match unit {
                    0 => return Err(EventRejection::NulCharacter),
                    0xD800..=0xDBFF if !want_low => want_low = true,
                    0xDC00..=0xDFFF if want_low => want_low = false,
                    0xD800..=0xDFFF => return Err(lone()),
                    _ if want_low => return Err(lone()),
                    _ => {}
                }
                i += 6;
            }
            Some(_) if want_low => return Err(lone()),
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
        }
    }
}

/// Largest display scale (digits after the decimal point) Postgres' `numeric`, and so
/// `jsonb`, accepts: `1e-16383` is stored, `1e-16384` and `1.0e-16383` are refused.
const MAX_NUMERIC_SCALE: i64 = 16383;

/// A JSON number `jsonb` would refuse: beyond `f64` range (the JSON parser would have refused
/// it as a value too), or with more digits after the decimal point than Postgres' `numeric`
/// keeps. `1e-20000` is a finite `f64` (0.0) but fails the insert; it is refused here so it
/// rejects only its own event instead of failing a group commit.
fn check_number(token: &str) -> Result<(), EventRejection> {
    let out_of_range = || Err(EventRejection::Malformed("number out of range".into()));
    let plain_integer = token.len() <= 18 && !token.contains(['.', 'e', 'E']);
    if plain_integer {
        return Ok(());
    }
    if !token.parse::<f64>().is_ok_and(f64::is_finite) {
        return out_of_range();
    }
    let (mantissa, exponent) = match token.find(['e', 'E']) {
        Some(at) => (&token[..at], &token[at + 1..]),
        None => (token, "0"),
    };
    let fraction_digits = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i64;
    // An exponent too long for i64 is far beyond any scale Postgres keeps either way.
    let Ok(exponent) = exponent.parse::<i64>() else {
        return out_of_range();
    };
    if fraction_digits.saturating_sub(exponent) > MAX_NUMERIC_SCALE {
        return out_of_range();
    }
    Ok(())
}

/// The event's `id` for the rejection report, when it is a (reasonably short) string. The id
/// is cut out as raw text (no allocation, whatever its size) and decoded only when it is a
/// string of plausible length: an `id` of five million zeros costs a scan, not a tree.
fn probe_id(raw: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: &'a RawValue,
    }
    let id = serde_json::from_str::<IdOnly>(raw.get()).ok()?.id.get();
    // Each character is at most 6 bytes of JSON (`\uXXXX`), plus the quotes.
    if !id.starts_with('"') || id.len() > MAX_ID_LEN * 6 + 2 {
        return None;
    }
    serde_json::from_str::<String>(id)
        .ok()
        .filter(|s| s.chars().count() <= MAX_ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0190b6f0-0000-7000-8000-000000000001";

    fn event(extra: &str) -> String {
        format!(
            r#"{{"id":"{ID}","name":"page_view","ts":1763800000000,"anonymous_id":"a","session_id":"s"{extra}}}"#
        )
    }

    fn check(json: &str) -> Result<Uuid, EventRejection> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        validate_event(&raw).map(|(id, _)| id)
    }

    #[test]
    fn valid_event_passes_and_unknown_fields_are_ignored() {
        let json = event(r#","future_field":[1,2],"props":{"a":{"b":1}}"#);
        let raw: Box<RawValue> = serde_json::from_str(&json).unwrap();
        let (id, ev) = validate_event(&raw).unwrap();
        assert_eq!(id.to_string(), ID);
        assert_eq!(ev.name, "page_view");
        assert_eq!(ev.props.unwrap().get(), r#"{"a":{"b":1}}"#);
    }

    #[test]
    fn rules() {
        let cases = [
            (event(r#","props":"not an object""#), "malformed"),
            (
                r#"{"id":"x","name":"n","ts":1763800000000,"anonymous_id":"a","session_id":"s"}"#
                    .to_owned(),
                "invalid_id",
            ),
            (
                format!(
                    r#"{{"id":"{ID}","ts":1763800000000,"anonymous_id":"a","session_id":"s"}}"#
                ),
                "malformed",
            ),
            (
                format!(
                    r#"{{"id":"{ID}","name":"","ts":1763800000000,"anonymous_id":"a","session_id":"s"}}"#
                ),
                "empty_field",
            ),
            (
                format!(
                    r#"{{"id":"{ID}","name":"{}","ts":1763800000000,"anonymous_id":"a","session_id":"s"}}"#,
                    "n".repeat(201)
                ),
                "too_long",
            ),
            (
                format!(r#"{{"id":"{ID}","name":"n","ts":5,"anonymous_id":"a","session_id":"s"}}"#),
                "ts_out_of_range",
            ),
            (
                format!(
                    r#"{{"id":"{ID}","name":"n","ts":-5,"anonymous_id":"a","session_id":"s"}}"#
                ),
                "malformed",
            ),
            (
                format!(
                    r#"{{"id":"{ID}","name":"n\u0000","ts":1763800000000,"anonymous_id":"a","session_id":"s"}}"#
                ),
                "nul_character",
            ),
            (event(r#","props":{"k":"v\u0000"}"#), "nul_character"),
            (event(r#","context":{"k\u0000":1}"#), "nul_character"),
            (event(r#","props":{"k":"\ud83d"}"#), "malformed"),
            (event(r#","props":{"k":"\udc00x"}"#), "malformed"),
            (event(r#","props":{"k":"\ud83d\u0041"}"#), "malformed"),
            (event(r#","props":{"k":1e400}"#), "malformed"),
            (event(r#","props":{"k":1e-20000}"#), "malformed"),
            (event(r#","props":{"k":[1e-16384]}"#), "malformed"),
            (event(r#","context":{"k":1.0e-16383}"#), "malformed"),
            (
                event(r#","props":{"k":0.5e-99999999999999999999999}"#),
                "malformed",
            ),
            (event(r#","props":[1]"#), "malformed"),
            (event(r#","context":"x""#), "malformed"),
            (
                event(&format!(
                    r#","props":{{"k":{}1{}}}"#,
                    "[".repeat(10),
                    "]".repeat(10)
                )),
                "too_deep",
            ),
            (
                event(&format!(
                    r#","props":{{"s":"{}"}}"#,
                    "x".repeat(MAX_EVENT_BYTES)
                )),
                "too_large",
            ),
        ];
        for (json, code) in cases {
            let err = check(&json).expect_err(&json);
            assert_eq!(err.code(), code, "{json}: {err}");
        }
        // What jsonb accepts passes: escaped backslash before "u0000", surrogate pairs,
        // big but finite numbers, nested strings with brackets, null props.
        check(&event(
            r#","props":{"a":"\\u0000","b":"\ud83d\ude00","c":[1e300,-0.5,12345678901234567890,1e-16383,1.5E-16382,-1e-400],"d":"{[\"]}"},"context":null"#,
        ))
        .unwrap();
        // Whitespace around the value is not part of the raw text.
        check(&event(r#","props" :  { "a" : [ 1 , 2 ] } ,"context":	{}"#)).unwrap();
        // Nine levels of arrays below props (depth 10 in total) is still fine.
        check(&event(&format!(
            r#","props":{{"k":{}1{}}}"#,
            "[".repeat(9),
            "]".repeat(9)
        )))
        .unwrap();
    }

    #[test]
    fn rejection_reports_index_and_readable_id() {
        let raws: Vec<Box<RawValue>> = [
            event(""),
            r#"{"id":"not-a-uuid"}"#.to_owned(),
            "42".to_owned(),
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let refs: Vec<&RawValue> = raws.iter().map(|r| r.as_ref()).collect();
        let out = validate_batch(&refs);
        assert_eq!(out.valid.len(), 1);
        assert_eq!(out.rejected[0].0.index, 1);
        assert_eq!(out.rejected[0].0.id.as_deref(), Some("not-a-uuid"));
        assert_eq!(out.rejected[1].0.index, 2);
        assert_eq!(out.rejected[1].0.id, None);
    }
}
