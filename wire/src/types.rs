//! The collector's view of the wire format (feature `serde`).
//!
//! A batch is decoded in two steps: the envelope first, with each event kept as raw JSON,
//! then each event on its own, so that one malformed event rejects only itself.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

/// `POST /v1/batch` body. Unknown fields are ignored, so an older collector accepts batches
/// from a newer SDK.
#[derive(Debug, Deserialize)]
pub struct BatchEnvelope<'a> {
    /// Client clock when the batch was sent (ms since the Unix epoch).
    pub sent_at: u64,
    /// Events the SDK dropped for lack of space since its last acknowledged batch.
    #[serde(default)]
    pub dropped: u64,
    /// The batch's id, by which the SDK later asks whether it arrived. `None` when absent,
    /// and also when it is not a string passing [`crate::is_valid_batch_id`] (not a string,
    /// empty, longer than 64 characters, a control character): such an id is ignored rather
    /// than failing the batch, since the id only saves resends while a 400 would make the
    /// SDK drop the events.
    #[serde(default, deserialize_with = "usable_batch_id")]
    pub batch_id: Option<String>,
    #[serde(borrow)]
    pub events: Events<'a>,
}

/// A batch's `events`, each kept as raw JSON, read with bounded memory: at most
/// [`crate::MAX_EVENTS_PER_BATCH`] are kept; further ones are skipped without being stored
/// (a body of `[0,0,0,...]` costs no memory per element) and only counted, so the collector
/// can refuse the batch as too large with the count. Derefs to the kept events.
#[derive(Debug, Default)]
pub struct Events<'a> {
    kept: Vec<&'a RawValue>,
    total: usize,
}

impl<'a> Events<'a> {
    /// How many events the batch holds, counting those beyond the cap that were not kept.
    pub fn total(&self) -> usize {
        self.total
    }
}

impl<'a> std::ops::Deref for Events<'a> {
    type Target = [&'a RawValue];
    fn deref(&self) -> &Self::Target {
        &self.kept
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Events<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Events<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Events<'a>, A::Error> {
                let mut events = Events {
                    // The size hint comes from the sender: never trusted beyond the cap.
                    kept: Vec::with_capacity(
                        seq.size_hint()
                            .unwrap_or(0)
                            .min(crate::MAX_EVENTS_PER_BATCH),
                    ),
                    total: 0,
                };
                while events.total < crate::MAX_EVENTS_PER_BATCH {
                    match seq.next_element::<&'de RawValue>()? {
                        Some(raw) => events.kept.push(raw),
                        None => return Ok(events),
                    }
                    events.total += 1;
                }
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    events.total += 1;
                }
                Ok(events)
            }
        }
        d.deserialize_seq(Visit(std::marker::PhantomData))
    }
}

/// Reads any JSON value without failing; keeps it only when it is a usable batch id.
fn usable_batch_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let raw = Option::<&'de RawValue>::deserialize(d)?;
    Ok(raw
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .filter(|id| crate::is_valid_batch_id(id)))
}

/// `POST /v1/batch/status` body: which of these batches did the collector commit? At most
/// [`crate::MAX_BATCH_IDS_PER_QUERY`] ids. Unknown fields are ignored.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, Default)]
pub struct BatchStatusRequest {
    pub batch_ids: Vec<String>,
}

/// 200 answer to a batch status query.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, Default)]
pub struct BatchStatusResponse {
    /// The asked ids (each once, in the order asked) whose batch the collector committed and
    /// still remembers; an id not listed may or may not have arrived.
    pub arrived: Vec<String>,
}

/// One event, decoded from its raw JSON.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub name: String,
    /// Client clock when the event happened (ms since the Unix epoch).
    pub ts: u64,
    pub anonymous_id: String,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

/// 200 answer to a batch.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, Default)]
pub struct BatchResponse {
    /// Events newly stored.
    pub accepted: u64,
    /// Events already stored before (by id), including repeats inside this batch.
    pub duplicates: u64,
    /// Events that can never be accepted; the SDK drops them.
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
pub struct Rejected {
    /// Position of the event in the batch's `events` array.
    pub index: usize,
    /// The event's id when it could be read.
    pub id: Option<String>,
    pub reason: String,
}

/// Body of every non-2xx answer.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
pub struct ErrorBody {
    /// One of [`crate::error_code`].
    pub error: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{BatchJson, EventJson};

    /// The SDK's writer and the collector's reader agree, including on awkward strings, with
    /// and without a batch id.
    #[test]
    fn sdk_writer_round_trips_through_collector_types() {
        for batch_id in [
            None,
            Some("0190b6f0-aaaa-4bbb-8ccc-000000000001"),
            Some("q\"\\ü😀"),
        ] {
            round_trip(batch_id);
        }
    }

    fn round_trip(batch_id: Option<&str>) {
        let names = [
            "plain",
            "quote\"d",
            "back\\slash",
            "ctrl\u{7}\u{1f}",
            "ünï😀",
            "'; DROP TABLE events; --",
        ];
        let mut batch = match batch_id {
            None => BatchJson::new(1_700_000_000_000, 2),
            Some(id) => BatchJson::with_batch_id(1_700_000_000_000, 2, id),
        };
        for (i, name) in names.iter().enumerate() {
            let mut e = String::new();
            EventJson {
                id: &format!("0190b6f0-0000-7000-8000-00000000000{i}"),
                name,
                ts: 1_700_000_000_000 - i as u64,
                anonymous_id: "a\"non",
                session_id: "s",
                user_id: (i % 2 == 0).then_some("user\n1"),
                props: Some(r#"{"k":"v","n":1.5}"#),
                context: Some(r#"{"path":"/x"}"#),
            }
            .write(&mut e);
            batch.push_raw_event(&e);
        }
        let body = batch.finish();
        let env: BatchEnvelope = serde_json::from_str(&body).unwrap();
        assert_eq!(env.sent_at, 1_700_000_000_000);
        assert_eq!(env.dropped, 2);
        assert_eq!(env.batch_id.as_deref(), batch_id);
        assert_eq!(env.events.len(), names.len());
        for (i, raw) in env.events.iter().enumerate() {
            let ev: Event = serde_json::from_str(raw.get()).unwrap();
            assert_eq!(ev.name, names[i]);
            assert_eq!(ev.anonymous_id, "a\"non");
            assert_eq!(ev.user_id.as_deref(), (i % 2 == 0).then_some("user\n1"));
            assert_eq!(ev.props.as_ref().unwrap()["n"], 1.5);
            assert_eq!(ev.context.as_ref().unwrap()["path"], "/x");
        }
    }

    #[test]
    fn unusable_batch_ids_are_ignored_not_fatal() {
        let long = "x".repeat(crate::MAX_BATCH_ID_LEN + 1);
        let longest = "é".repeat(crate::MAX_BATCH_ID_LEN);
        for (value, expected) in [
            ("null".to_owned(), None),
            ("5".to_owned(), None),
            (r#"{"a":[1]}"#.to_owned(), None),
            (r#""""#.to_owned(), None),
            (format!("{long:?}"), None),
            (r#""a\u0000b""#.to_owned(), None),
            (format!("{longest:?}"), Some(longest.as_str())),
            (r#""b-1""#.to_owned(), Some("b-1")),
        ] {
            let body = format!(r#"{{"sent_at":1,"batch_id":{value},"events":[{{}}]}}"#);
            let env: BatchEnvelope = serde_json::from_str(&body).unwrap();
            assert_eq!(env.batch_id.as_deref(), expected, "{value}");
            assert_eq!(env.events.len(), 1);
        }
        let env: BatchEnvelope = serde_json::from_str(r#"{"sent_at":1,"events":[]}"#).unwrap();
        assert_eq!(env.batch_id, None);
    }

    #[test]
    fn events_beyond_the_cap_are_counted_not_kept() {
        let n = crate::MAX_EVENTS_PER_BATCH + 5000;
        let body = format!(r#"{{"sent_at":1,"events":[{}0]}}"#, "[0,{}],".repeat(n - 1));
        let env: BatchEnvelope = serde_json::from_str(&body).unwrap();
        assert_eq!(env.events.total(), n);
        assert_eq!(env.events.len(), crate::MAX_EVENTS_PER_BATCH);
        assert_eq!(env.events[0].get(), "[0,{}]");
        // Malformed JSON beyond the cap is still an error, not silently skipped.
        let body = format!(r#"{{"sent_at":1,"events":[{}}}]}}"#, "0,".repeat(n));
        assert!(serde_json::from_str::<BatchEnvelope>(&body).is_err());
        let env: BatchEnvelope =
            serde_json::from_str(r#"{"sent_at":1,"events":[{"a":1},2]}"#).unwrap();
        assert_eq!((env.events.total(), env.events.len()), (2, 2));
    }

    #[test]
    fn batch_status_shapes() {
        let q: BatchStatusRequest =
            serde_json::from_str(r#"{"batch_ids":["a","b"],"later":1}"#).unwrap();
        assert_eq!(q.batch_ids, ["a", "b"]);
        assert!(serde_json::from_str::<BatchStatusRequest>(r#"{"batch_ids":[1]}"#).is_err());
        assert!(serde_json::from_str::<BatchStatusRequest>("{}").is_err());
        let a = BatchStatusResponse {
            arrived: vec!["a".into()],
        };
        assert_eq!(serde_json::to_string(&a).unwrap(), r#"{"arrived":["a"]}"#);
    }
}
