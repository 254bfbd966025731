//! The persisted layout (version 1): one key per event, so one corrupt record loses only
//! itself, plus a few small keys of state shared by every tab of the origin.
//!
//! Bumping the version means a new prefix; old keys are left for a migration to read.

/// Every key the SDK writes starts with this.
pub const PREFIX: &str = "tl1:";
/// `tl1:e:<event id>` -> the event's JSON, exactly as it goes on the wire.
pub const EVENT: &str = "tl1:e:";
/// Anonymous id of this browser.
pub const ANON: &str = "tl1:anon";
/// User id set by `identify()`.
pub const USER: &str = "tl1:user";
/// `<session id> <last activity ms>`.
pub const SESSION: &str = "tl1:sess";
/// Shared retry state, see [`crate::backoff::RetryState`].
pub const RETRY: &str = "tl1:retry";
/// Events dropped for space and not yet reported to the collector.
pub const DROPPED: &str = "tl1:drop";
/// `<tab id> <until ms>`: the tab allowed to send until then.
pub const LEASE: &str = "tl1:lease";
/// Present when the user opted out.
pub const OPT_OUT: &str = "tl1:optout";
/// Calls made before the wasm was ready, kept by the JavaScript facade (`tl1:p:<seq>`).
pub const PRE_READY: &str = "tl1:p:";

/// Parses `<text> <number>`, the shape of [`SESSION`] and [`LEASE`].
pub fn split_pair(value: &str) -> Option<(&str, u64)> {
    let (a, b) = value.split_once(' ')?;
    if a.is_empty() {
        return None;
    }
    Some((a, b.parse().ok()?))
}

/// Whether `value` can be an event record written by this version: an object whose `id`
/// is `id`. Cheap: records are checked at start-up, before anything is sent.
pub fn looks_like_event(id: &str, value: &str) -> bool {
    let b = value.as_bytes();
    b.len() > 12 + id.len()
        && value.starts_with("{\"id\":\"")
        && value[7..].starts_with(id)
        && value[7 + id.len()..].starts_with("\",\"name\":\"")
        && b[b.len() - 1] == b'}'
}

/// Whether the event record's name is `escaped_name` (a JSON string literal, quotes
/// included).
pub fn event_name_is(value: &str, id_len: usize, escaped_name: &str) -> bool {
    value.get(7 + id_len + 9..).is_some_and(|rest| {
        rest.starts_with(escaped_name) && rest[escaped_name.len()..].starts_with(',')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs() {
        assert_eq!(split_pair("abc 12"), Some(("abc", 12)));
        assert_eq!(split_pair(" 12"), None);
        assert_eq!(split_pair("abc x"), None);
        assert_eq!(split_pair("abc"), None);
    }

    #[test]
    fn event_records() {
        let v = r#"{"id":"X1","name":"play","ts":1}"#;
        assert!(looks_like_event("X1", v));
        assert!(!looks_like_event("X2", v));
        assert!(!looks_like_event("X1", &v[..v.len() - 1]));
        assert!(!looks_like_event("X1", "garbage"));
        assert!(event_name_is(v, 2, "\"play\""));
        assert!(!event_name_is(v, 2, "\"pla\""));
    }
}
