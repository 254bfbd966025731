//! Writing batches as JSON without serde: the SDK side of the wire format.
//!
//! Property and context objects arrive already serialised (the browser's `JSON.stringify`),
//! so the writer only escapes the strings it is given and splices the rest verbatim.

use crate::field;
use alloc::string::String;

/// Appends `s` as a JSON string literal (with quotes) to `out`. Quotes, backslashes and
/// control characters are written as `\u00XX`: one rule, less code than the short forms.
pub fn push_str_literal(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if b < 0x20 || b == b'"' || b == b'\\' {
            // `start` and `i` sit next to ASCII bytes, so `get` always succeeds.
            out.push_str(s.get(start..i).unwrap_or_default());
            // SAFETY: `\u00` and hex digits are ASCII.
            unsafe {
                push_ascii(
                    out,
                    &[
                        b'\\',
                        b'u',
                        b'0',
                        b'0',
                        HEX[(b >> 4) as usize],
                        HEX[(b & 0xf) as usize],
                    ],
                )
            };
            start = i + 1;
        }
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
}

/// Appends an unsigned integer in decimal.
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // SAFETY: decimal digits are ASCII.
    unsafe { push_ascii(out, &buf[i..]) };
}

/// Appends ASCII bytes (cheaper than `String::push`, which encodes any `char` as UTF-8).
///
/// # Safety
/// `ascii` must be ASCII, or the string would no longer be valid UTF-8.
pub unsafe fn push_ascii(out: &mut String, ascii: &[u8]) {
    debug_assert!(ascii.is_ascii());
    // SAFETY: ASCII bytes are valid UTF-8 on their own (the caller's promise).
    unsafe { out.as_mut_vec() }.extend_from_slice(ascii);
}

fn push_key(out: &mut String, key: &str) {
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
}

/// One event as the SDK writes it. `props` and `context` are JSON objects already
/// serialised; `None` or an empty string leaves the field out.
pub struct EventJson<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub ts: u64,
    pub anonymous_id: &'a str,
    pub session_id: &'a str,
    pub user_id: Option<&'a str>,
    pub props: Option<&'a str>,
    pub context: Option<&'a str>,
}

impl EventJson<'_> {
    /// Appends the event as one JSON object.
    pub fn write(&self, out: &mut String) {
        out.push('{');
        push_key(out, field::ID);
        push_str_literal(out, self.id);
        out.push(',');
        push_key(out, field::NAME);
        push_str_literal(out, self.name);
        out.push(',');
        push_key(out, field::TS);
        push_u64(out, self.ts);
        out.push(',');
        push_key(out, field::ANONYMOUS_ID);
        push_str_literal(out, self.anonymous_id);
        out.push(',');
        push_key(out, field::SESSION_ID);
        push_str_literal(out, self.session_id);
        if let Some(user) = self.user_id {
            out.push(',');
            push_key(out, field::USER_ID);
            push_str_literal(out, user);
        }
        for (key, raw) in [(field::PROPS, self.props), (field::CONTEXT, self.context)] {
            if let Some(raw) = raw.filter(|r| !r.is_empty()) {
                out.push(',');
                push_key(out, key);
                out.push_str(raw);
            }
        }
        out.push('}');
    }
}

/// Builds a batch body from events that are each already one JSON object.
pub struct BatchJson {
    out: String,
    count: usize,
}

impl BatchJson {
    pub fn new(sent_at: u64, dropped: u64) -> Self {
        Self::open_events(Self::head(sent_at, dropped))
    }

    /// Like [`BatchJson::new`], with `"batch_id"` after `sent_at`/`dropped`: the id by which
    /// the SDK later asks the collector whether this batch arrived
    /// ([`crate::BATCH_STATUS_PATH`]). The collector ignores an id that is not
    /// [`crate::is_valid_batch_id`].
    pub fn with_batch_id(sent_at: u64, dropped: u64, batch_id: &str) -> Self {
        let mut out = Self::head(sent_at, dropped);
        out.push(',');
        push_key(&mut out, field::BATCH_ID);
        push_str_literal(&mut out, batch_id);
        Self::open_events(out)
    }

    /// `{"sent_at":N` and, when not zero, `,"dropped":N`.
    fn head(sent_at: u64, dropped: u64) -> String {
        let mut out = String::with_capacity(1024);
        out.push('{');
        push_key(&mut out, field::SENT_AT);
        push_u64(&mut out, sent_at);
        if dropped > 0 {
            out.push(',');
            push_key(&mut out, field::DROPPED);
            push_u64(&mut out, dropped);
        }
        out
    }

    /// Appends `,"events":[` to the head.
    fn open_events(mut out: String) -> Self {
        out.push(',');
        push_key(&mut out, field::EVENTS);
        out.push('[');
        BatchJson { out, count: 0 }
    }

    /// Appends one event object (as written by [`EventJson::write`]).
    pub fn push_raw_event(&mut self, event_json: &str) {
        if self.count > 0 {
            self.out.push(',');
        }
        self.out.push_str(event_json);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes written so far (before the closing brackets).
    pub fn byte_len(&self) -> usize {
        self.out.len()
    }

    pub fn finish(mut self) -> String {
        self.out.push_str("]}");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_quotes_backslashes_and_control_characters() {
        let mut out = String::new();
        push_str_literal(&mut out, "a\"b\\c\nd\u{1}é😀");
        assert_eq!(out, r#""a\u0022b\u005cc\u000ad\u0001é😀""#);
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é😀");
    }

    #[test]
    fn numbers() {
        for n in [0u64, 7, 10, 1_700_000_000_123, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    #[test]
    fn batch_is_valid_json_with_optional_fields() {
        let mut e1 = String::new();
        EventJson {
            id: "0190b6f0-0000-7000-8000-000000000001",
            name: "play \"song\"",
            ts: 5,
            anonymous_id: "anon",
            session_id: "sess",
            user_id: Some("u1"),
            props: Some(r#"{"a":[1,2,{"b":null}]}"#),
            context: None,
        }
        .write(&mut e1);
        let mut e2 = String::new();
        EventJson {
            id: "0190b6f0-0000-7000-8000-000000000002",
            name: "x",
            ts: 6,
            anonymous_id: "anon",
            session_id: "sess",
            user_id: None,
            props: Some(""),
            context: Some(r#"{"path":"/"}"#),
        }
        .write(&mut e2);
        let mut b = BatchJson::new(99, 3);
        b.push_raw_event(&e1);
        b.push_raw_event(&e2);
        assert_eq!(b.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&b.finish()).unwrap();
        assert_eq!(v["sent_at"], 99);
        assert_eq!(v["dropped"], 3);
        assert_eq!(v["events"][0]["name"], "play \"song\"");
        assert_eq!(v["events"][0]["user_id"], "u1");
        assert_eq!(
            v["events"][0]["props"]["a"][2]["b"],
            serde_json::Value::Null
        );
        assert!(v["events"][1].get("props").is_none());
        assert!(v["events"][1].get("user_id").is_none());
        assert_eq!(v["events"][1]["context"]["path"], "/");
    }

    #[test]
    fn dropped_is_left_out_when_zero() {
        let b = BatchJson::new(1, 0);
        assert_eq!(b.finish(), r#"{"sent_at":1,"events":[]}"#);
    }

    #[test]
    fn batch_id_follows_sent_at_and_dropped_escaped() {
        let b = BatchJson::with_batch_id(1, 0, "0190b6f0-0000-4000-8000-000000000001");
        assert_eq!(
            b.finish(),
            r#"{"sent_at":1,"batch_id":"0190b6f0-0000-4000-8000-000000000001","events":[]}"#
        );
        let mut b = BatchJson::with_batch_id(2, 3, "q\"b");
        b.push_raw_event("{}");
        assert_eq!(
            b.finish(),
            r#"{"sent_at":2,"dropped":3,"batch_id":"q\u0022b","events":[{}]}"#
        );
    }
}
