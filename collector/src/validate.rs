//! Decides, event by event, what can be stored; one bad event rejects only itself.
//!
//! Each raw event from the envelope is size-checked, decoded on its own, and checked for id
//! format, string lengths, nesting depth, timestamps and NUL characters (which Postgres
//! refuses in text and jsonb, and which would otherwise fail a whole group commit).

use serde_json::value::RawValue;
use serde_json::Value;
use tracklet_wire::types::{Event, Rejected};
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

/// An event that passed every check, with its parsed id.
#[derive(Debug, Clone)]
pub struct ValidEvent {
    /// Position in the batch's `events` array.
    pub index: usize,
    pub id: Uuid,
    pub event: Event,
}

/// The events of one batch, split into the valid ones and the rejections.
#[derive(Debug, Default)]
pub struct Validated {
    pub valid: Vec<ValidEvent>,
    pub rejected: Vec<(Rejected, &'static str)>,
}

/// Validates every raw event of a batch.
pub fn validate_batch(events: &[&RawValue]) -> Validated {
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
pub fn validate_event(raw: &RawValue) -> Result<(Uuid, Event), EventRejection> {
    let text = raw.get();
    if text.len() > MAX_EVENT_BYTES {
        return Err(EventRejection::TooLarge { bytes: text.len() });
    }
    let event: Event =
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
    for (field, map) in [("props", &event.props), ("context", &event.context)] {
        if let Some(map) = map {
            check_json(field, map.iter(), 1)?;
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

/// Checks depth and NUL characters of an object's entries; `depth` is the object's own level.
fn check_json<'a>(
    field: &'static str,
    entries: impl Iterator<Item = (&'a String, &'a Value)>,
    depth: usize,
) -> Result<(), EventRejection> {
    if depth > MAX_PROPS_DEPTH {
        return Err(EventRejection::TooDeep { field });
    }
    for (key, value) in entries {
        if key.contains('\0') {
            return Err(EventRejection::NulCharacter);
        }
        check_value(field, value, depth)?;
    }
    Ok(())
}

fn check_value(field: &'static str, value: &Value, depth: usize) -> Result<(), EventRejection> {
    match value {
        Value::String(s) if s.contains('\0') => Err(EventRejection::NulCharacter),
        Value::Object(map) => check_json(field, map.iter(), depth + 1),
        Value::Array(items) => {
            if depth + 1 > MAX_PROPS_DEPTH {
                return Err(EventRejection::TooDeep { field });
            }
            items
                .iter()
                .try_for_each(|v| check_value(field, v, depth + 1))
        }
        _ => Ok(()),
    }
}

/// The event's `id` for the rejection report, when it is a (reasonably short) string.
fn probe_id(raw: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Value,
    }
    match serde_json::from_str::<IdOnly>(raw.get()).ok()?.id {
        Value::String(s) if s.chars().count() <= MAX_ID_LEN => Some(s),
        _ => None,
    }
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

    fn check(json: &str) -> Result<(Uuid, Event), EventRejection> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        validate_event(&raw)
    }

    #[test]
    fn valid_event_passes_and_unknown_fields_are_ignored() {
        let (id, ev) = check(&event(r#","future_field":[1,2],"props":{"a":{"b":1}}"#)).unwrap();
        assert_eq!(id.to_string(), ID);
        assert_eq!(ev.name, "page_view");
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
