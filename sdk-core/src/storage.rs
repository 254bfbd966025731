//! The persisted layout (version 1): one key per event, so one corrupt record loses only
//! itself, plus a few small keys of state shared by every tab of the origin.
//!
//! Bumping the version means a new prefix; old keys are left for a migration to read.

/// Every key the SDK writes starts with this.
pub const PREFIX: &str = "tl1:";
/// `tl1:e:<id of its first event>` -> the events tracked in one task of one page, one JSON
/// object per line, each exactly as it goes on the wire. One storage write per task keeps
/// `track()` cheap (a localStorage write costs 15-25 µs whatever its size); a corrupt line
/// loses only itself, a corrupt record only its task's events. A record is written once
/// and never rewritten, only removed when none of its events is left: another tab's stale
/// copy can then never bring back an event that was acknowledged.
pub const EVENT: &str = "tl1:e:";
/// `tl1:a:<id of the record's first event>` -> the lines of that record (0 for the first)
/// whose events are gone (acknowledged, rejected, dropped or cleared) while others in it
/// are still queued, one number per line. Records are never rewritten, so a line number
/// names its event for good; numbers keep the list short and checked in constant time.
pub const GONE: &str = "tl1:a:";

/// Most lines a gone-list may name (a record holds the events of one task): larger numbers
/// are corrupt and ignored, so a damaged list cannot make the core allocate much.
pub const MAX_RECORD_LINES: u64 = 1 << 20;

/// The lines a gone-list names, as flags by line number.
pub fn gone_lines(list: &str) -> alloc::vec::Vec<bool> {
    let mut lines = alloc::vec::Vec::new();
    for n in list.split(LINE as char) {
        let n = n.parse::<u64>().ok().unwrap_or(MAX_RECORD_LINES);
        if n < MAX_RECORD_LINES {
            while lines.len() <= n as usize {
                lines.push(false);
            }
            lines[n as usize] = true;
        }
    }
    lines
}
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
/// `tl1:b:<batch id>` -> a batch sent without an answer seen (the unload beacon, a request
/// cut off by the page going away): `<sent at ms>`, then the ids of its events, one per
/// line. The next page asks the collector whether it arrived before sending them again.
pub const UNCONFIRMED: &str = "tl1:b:";
/// Calls made before the wasm was ready, kept by the JavaScript facade (`tl1:p:<seq>`).
pub const PRE_READY: &str = "tl1:p:";

/// Parses `<text> <number>`, the shape of [`SESSION`] and [`LEASE`].
pub fn split_pair(value: &str) -> Option<(&str, u64)> {
    let (a, b) = value.split_once(' ')?;
    if a.is_empty() {
        return None;
    }
    Some((a, b.parse::<u64>().ok()?))
}

/// Writes `<text> <number>`, the shape of [`SESSION`] and [`LEASE`].
pub(crate) fn join_pair(a: &str, n: u64) -> alloc::string::String {
    let mut s = alloc::string::String::with_capacity(a.len() + 14);
    s.push_str(a);
    s.push(' ');
    tracklet_wire::json::push_u64(&mut s, n);
    s
}

/// The id of one event line of a record, if the line looks like an event written by this
/// version: an object starting with its `id`, then its `name`. Cheap: records are checked
/// at start-up, before anything is sent.
pub fn event_line_id(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("{\"id\":\"")?;
    let end = rest.bytes().position(|b| b == b'"')?;
    let (id, after) = rest.split_at_checked(end)?;
    (!id.is_empty() && after.starts_with("\",\"name\":\"") && line.as_bytes().last() == Some(&b'}'))
        .then_some(id)
}

/// Whether the event line's name is `escaped_name` (a JSON string literal, quotes
/// included).
pub fn event_name_is(line: &str, id_len: usize, escaped_name: &str) -> bool {
    line.get(7 + id_len + 9..).is_some_and(|rest| {
        rest.strip_prefix(escaped_name)
            .is_some_and(|r| r.as_bytes().first() == Some(&b','))
    })
}

/// Events of one record are separated by newlines (never inside the JSON the core writes).
pub const LINE: u8 = b'\n';

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn pairs() {
        assert_eq!(split_pair("abc 12"), Some(("abc", 12)));
        assert_eq!(split_pair(&join_pair("abc", 12)), Some(("abc", 12)));
        assert_eq!(split_pair(" 12"), None);
        assert_eq!(split_pair("abc x"), None);
        assert_eq!(split_pair("abc"), None);
    }

    #[test]
    fn gone_lines_are_flags_by_line_number() {
        assert_eq!(gone_lines(""), Vec::<bool>::new());
        assert_eq!(gone_lines("0\n2"), [true, false, true]);
        // Corrupt entries (an old list of ids, garbage, a huge number) are ignored.
        let old = "019aab3c-5d1e-7a2b-8c3d-4e5f60700001\nx\n\n99999999999\n1";
        assert_eq!(gone_lines(old), [false, true]);
    }

    #[test]
    fn event_lines() {
        let v = r#"{"id":"X1","name":"play","ts":1}"#;
        assert_eq!(event_line_id(v), Some("X1"));
        assert_eq!(event_line_id(&v[..v.len() - 1]), None);
        assert_eq!(event_line_id("garbage"), None);
        assert_eq!(event_line_id(r#"{"id":"","name":"x"}"#), None);
        assert_eq!(event_line_id(r#"{"id":"X1","ts":1}"#), None);
        assert!(event_name_is(v, 2, "\"play\""));
        assert!(!event_name_is(v, 2, "\"pla\""));
    }
}
