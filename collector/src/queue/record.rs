//! What one queue message holds: the accepted, enriched events of (part of) one batch and,
//! with its last part, the batch's receipt. JSON, versioned, its own shape (not the store's
//! structs), so collectors and sinks of neighbouring versions can share a stream.
//!
//! A batch becomes one message unless its JSON would pass the server's `max_payload` (1 MiB
//! by default; a batch may inflate to 10 MiB): it is then split into parts, each its own
//! message. Every message carries a `Nats-Msg-Id` derived from its content ([`msg_id`]), so a
//! batch sent again within the stream's duplicate window is stored in the stream once; past
//! the window, the sinks' dedupe by event id keeps the store exact.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::enrich::Enrichment;
use crate::store::{BatchReceipt, EventRow};

/// Version of the message format; a sink refuses (and reports) messages of another.
pub const FORMAT_VERSION: u32 = 1;

/// Namespace of the message ids (a UUID v5 of the message's content).
const MSG_ID_NAMESPACE: Uuid = Uuid::from_u128(0x7472_6163_6b6c_6574_0071_7565_7565_0001);

/// One queue message.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueueRecord {
    pub v: u32,
    pub project_id: Uuid,
    /// The batch's receipt (`batch_id`, first arrival), carried by the batch's last part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<QueuedReceipt>,
    /// Enrichments shared by the events (usually one per request), referred to by index.
    pub enrichments: Vec<QueuedEnrichment>,
    pub events: Vec<QueuedEvent>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueuedReceipt {
    pub batch_id: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedEnrichment {
    pub browser: Option<String>,
    pub browser_version: Option<String>,
    pub os: Option<String>,
    pub device_type: Option<String>,
    pub is_bot: bool,
    pub bot_reason: Option<String>,
    pub ip: Option<String>,
    pub country: Option<String>,
    pub city: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueuedEvent {
    pub id: Uuid,
    pub name: String,
    pub ts: DateTime<Utc>,
    pub sent_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub time: DateTime<Utc>,
    pub anonymous_id: String,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Box<RawValue>>,
    /// Index into [`QueueRecord::enrichments`].
    pub e: usize,
}

/// Why a message could not be read back (it is terminated, not retried: it never will be).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not a queue record: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("queue record format {0} (this sink reads {FORMAT_VERSION})")]
    Version(u32),
    #[error("event {0} refers to enrichment {1}, which the record does not have")]
    Enrichment(Uuid, usize),
}

impl From<&Enrichment> for QueuedEnrichment {
    fn from(e: &Enrichment) -> Self {
        QueuedEnrichment {
            browser: e.browser.clone(),
            browser_version: e.browser_version.clone(),
            os: e.os.clone(),
            device_type: e.device_type.clone(),
            is_bot: e.is_bot,
            bot_reason: e.bot_reason.clone(),
            ip: e.ip.clone(),
            country: e.country.clone(),
            city: e.city.clone(),
        }
    }
}

impl From<QueuedEnrichment> for Enrichment {
    fn from(e: QueuedEnrichment) -> Self {
        Enrichment {
            browser: e.browser,
            browser_version: e.browser_version,
            os: e.os,
            device_type: e.device_type,
            is_bot: e.is_bot,
            bot_reason: e.bot_reason,
            ip: e.ip,
            country: e.country,
            city: e.city,
        }
    }
}

impl QueueRecord {
    /// The record of `rows` (all of `project_id`) and the batch's `receipt`.
    pub fn new(project_id: Uuid, rows: Vec<EventRow>, receipt: Option<BatchReceipt>) -> Self {
        let mut shared: Vec<Arc<Enrichment>> = Vec::new();
        let mut enrichments = Vec::new();
        let events = rows
            .into_iter()
            .map(|r| {
                // Rows of one request share one Arc; compare pointers first, values after.
                let e = match shared
                    .iter()
                    .position(|s| Arc::ptr_eq(s, &r.enrichment) || **s == *r.enrichment)
                {
                    Some(i) => i,
                    None => {
                        enrichments.push(QueuedEnrichment::from(r.enrichment.as_ref()));
                        shared.push(r.enrichment.clone());
                        shared.len() - 1
                    }
                };
                QueuedEvent {
                    id: r.id,
                    name: r.name,
                    ts: r.ts,
                    sent_at: r.sent_at,
                    received_at: r.received_at,
                    time: r.time,
                    anonymous_id: r.anonymous_id,
                    session_id: r.session_id,
                    user_id: r.user_id,
                    props: r.props,
                    context: r.context,
                    e,
                }
            })
            .collect();
        QueueRecord {
            v: FORMAT_VERSION,
            project_id,
            receipt: receipt.map(|r| QueuedReceipt {
                batch_id: r.batch_id,
                received_at: r.received_at,
            }),
            enrichments,
            events,
        }
    }

    /// Reads a message's payload back.
    pub fn decode(payload: &[u8]) -> Result<QueueRecord, RecordError> {
        let record: QueueRecord = serde_json::from_slice(payload)?;
        if record.v != FORMAT_VERSION {
            return Err(RecordError::Version(record.v));
        }
        Ok(record)
    }

    /// The rows and receipt to commit.
    pub fn into_rows(self) -> Result<(Vec<EventRow>, Option<BatchReceipt>), RecordError> {
        let enrichments: Vec<Arc<Enrichment>> = self
            .enrichments
            .into_iter()
            .map(|e| Arc::new(Enrichment::from(e)))
            .collect();
        let project_id = self.project_id;
        let rows = self
            .events
            .into_iter()
            .map(|q| {
                let enrichment = enrichments
                    .get(q.e)
                    .cloned()
                    .ok_or(RecordError::Enrichment(q.id, q.e))?;
                Ok(EventRow {
                    project_id,
                    id: q.id,
                    name: q.name,
                    ts: q.ts,
                    sent_at: q.sent_at,
                    received_at: q.received_at,
                    time: q.time,
                    anonymous_id: q.anonymous_id,
                    session_id: q.session_id,
                    user_id: q.user_id,
                    props: q.props,
                    context: q.context,
                    enrichment,
                })
            })
            .collect::<Result<Vec<_>, RecordError>>()?;
        let receipt = self.receipt.map(|r| BatchReceipt {
            project_id,
            batch_id: r.batch_id,
            received_at: r.received_at,
        });
        Ok((rows, receipt))
    }

    /// The message's JSON, split into parts of at most `max_bytes` each where needed (a
    /// single event larger than that still makes a part of its own; the publish then fails
    /// and the collector answers 503). The receipt stays with the last part.
    pub fn encode_parts(self, max_bytes: usize) -> Result<Vec<EncodedPart>, serde_json::Error> {
        let mut parts = Vec::new();
        self.encode_into(max_bytes, &mut parts)?;
        Ok(parts)
    }

    fn encode_into(
        self,
        max_bytes: usize,
        parts: &mut Vec<EncodedPart>,
    ) -> Result<(), serde_json::Error> {
        let payload = serde_json::to_vec(&self)?;
        if payload.len() <= max_bytes || self.events.len() <= 1 {
            parts.push(EncodedPart {
                msg_id: msg_id(&self),
                events: self.events.len(),
                payload: payload.into(),
            });
            return Ok(());
        }
        let QueueRecord {
            v,
            project_id,
            receipt,
            enrichments,
            mut events,
        } = self;
        let second = events.split_off(events.len() / 2);
        let first = QueueRecord {
            v,
            project_id,
            receipt: None,
            enrichments: enrichments.clone(),
            events,
        };
        let second = QueueRecord {
            v,
            project_id,
            receipt,
            enrichments,
            events: second,
        };
        first.encode_into(max_bytes, parts)?;
        second.encode_into(max_bytes, parts)
    }
}

/// One message to publish.
#[derive(Debug)]
pub struct EncodedPart {
    /// `Nats-Msg-Id`: the same events and receipt always give the same id.
    pub msg_id: String,
    /// Events in this part.
    pub events: usize,
    pub payload: bytes::Bytes,
}

/// The content id of a record: project, batch id (if any) and event ids, in order. Two
/// messages with one id hold the same events (by id) and receipt, so JetStream may keep
/// either and the store ends up the same.
pub fn msg_id(record: &QueueRecord) -> String {
    let mut key = Vec::with_capacity(16 + 66 + record.events.len() * 16);
    key.extend_from_slice(record.project_id.as_bytes());
    match &record.receipt {
        Some(r) => {
            key.push(1);
            key.extend_from_slice(r.batch_id.as_bytes());
            key.push(0);
        }
        None => key.push(0),
    }
    for e in &record.events {
        key.extend_from_slice(e.id.as_bytes());
    }
    Uuid::new_v5(&MSG_ID_NAMESPACE, &key).simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(project_id: Uuid, n: u128, enrichment: &Arc<Enrichment>) -> EventRow {
        let t = DateTime::from_timestamp_millis(1_763_800_000_000).unwrap_or_default();
        EventRow {
            project_id,
            id: Uuid::from_u128(n),
            name: "page_view".into(),
            ts: t,
            sent_at: t,
            received_at: t,
            time: t,
            anonymous_id: format!("anon-{n}"),
            session_id: "s".into(),
            user_id: n.is_multiple_of(2).then(|| "u".to_owned()),
            props: RawValue::from_string(format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(200)))
                .ok(),
            context: None,
            enrichment: enrichment.clone(),
        }
    }

    #[test]
    fn rows_and_receipt_round_trip_through_split_parts() {
        let project = Uuid::from_u128(7);
        let bot = Arc::new(Enrichment {
            is_bot: true,
            bot_reason: Some("ua:crawler".into()),
            ..Enrichment::default()
        });
        let human = Arc::new(Enrichment {
            browser: Some("Firefox".into()),
            ip: Some("192.0.2.0".into()),
            ..Enrichment::default()
        });
        let rows: Vec<EventRow> = (0..40)
            .map(|n| row(project, n, if n % 3 == 0 { &bot } else { &human }))
            .collect();
        let receipt = BatchReceipt {
            project_id: project,
            batch_id: "b-1".into(),
            received_at: rows[0].received_at,
        };
        let record = QueueRecord::new(project, rows.clone(), Some(receipt.clone()));
        assert_eq!(
            record.enrichments.len(),
            2,
            "shared enrichments stored once"
        );
        let parts = record.encode_parts(2_000).unwrap();
        assert!(parts.len() > 1, "a large batch is split");
        assert!(parts.iter().all(|p| p.payload.len() <= 2_000));
        let ids: std::collections::HashSet<_> = parts.iter().map(|p| &p.msg_id).collect();
        assert_eq!(ids.len(), parts.len(), "every part has its own id");

        let mut back = Vec::new();
        let mut receipts = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let (r, rec) = QueueRecord::decode(&part.payload)
                .unwrap()
                .into_rows()
                .unwrap();
            assert_eq!(
                rec.is_some(),
                i == parts.len() - 1,
                "receipt in the last part"
            );
            back.extend(r);
            receipts.extend(rec);
        }
        assert_eq!(receipts, [receipt]);
        assert_eq!(back.len(), rows.len());
        for (a, b) in back.iter().zip(&rows) {
            assert_eq!((a.project_id, a.id, &a.name), (b.project_id, b.id, &b.name));
            assert_eq!((a.ts, a.time, &a.user_id), (b.ts, b.time, &b.user_id));
            assert_eq!(
                a.props.as_ref().map(|p| p.get()),
                b.props.as_ref().map(|p| p.get())
            );
            assert_eq!(*a.enrichment, *b.enrichment);
        }
    }

    #[test]
    fn msg_id_follows_the_content() {
        let project = Uuid::from_u128(7);
        let e = Arc::new(Enrichment::default());
        let make = |ids: &[u128], batch: Option<&str>| {
            let rows = ids.iter().map(|n| row(project, *n, &e)).collect();
            let receipt = batch.map(|b| BatchReceipt {
                project_id: project,
                batch_id: b.into(),
                received_at: Utc::now(),
            });
            msg_id(&QueueRecord::new(project, rows, receipt))
        };
        assert_eq!(make(&[1, 2], Some("a")), make(&[1, 2], Some("a")));
        assert_ne!(make(&[1, 2], Some("a")), make(&[1, 3], Some("a")));
        assert_ne!(make(&[1, 2], Some("a")), make(&[1, 2], Some("b")));
        assert_ne!(make(&[1, 2], Some("a")), make(&[1, 2], None));
    }

    #[test]
    fn another_format_version_is_refused() {
        let payload = br#"{"v":2,"project_id":"00000000-0000-0000-0000-000000000007","enrichments":[],"events":[]}"#;
        assert!(matches!(
            QueueRecord::decode(payload),
            Err(RecordError::Version(2))
        ));
        assert!(QueueRecord::decode(b"{").is_err());
    }
}
