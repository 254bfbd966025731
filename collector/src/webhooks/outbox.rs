//! The outbox: deliveries written in the transaction that stores the events.
//!
//! Called by each backend's `insert_events` inside its transaction, with the rows and which
//! of them were newly stored: only new rows are queued (a batch sent again queues nothing),
//! and the deliveries commit or roll back with the events. Each enabled destination of a
//! row's project whose event filter matches gets the rows in groups of up to its batch size
//! (in `ts` order), one delivery per group; the group's first event id is unique per
//! destination, so a group can never be queued twice.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::Row;
use uuid::Uuid;

use crate::enrich::Enrichment;
use crate::export::{micros, StoredEvent};
use crate::store::{EventRow, StoreError};

/// A destination as the outbox sees it.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub id: Uuid,
    pub project_id: Uuid,
    /// Event names; empty: all.
    pub events: Vec<String>,
    pub batch_size: u32,
}

impl Subscriber {
    fn wants(&self, row: &EventRow) -> bool {
        row.project_id == self.project_id
            && (self.events.is_empty() || self.events.contains(&row.name))
    }
}

/// A delivery to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    pub id: Uuid,
    pub destination_id: Uuid,
    pub first_event: Uuid,
    pub event_count: i32,
    /// JSON array of [`StoredEvent`]s.
    pub events: String,
}

/// An event row as the webhook body carries it (the export's format).
pub fn stored_event(row: &EventRow) -> StoredEvent {
    StoredEvent {
        id: row.id,
        name: row.name.clone(),
        ts: row.ts,
        time: row.time,
        sent_at: row.sent_at,
        received_at: row.received_at,
        anonymous_id: row.anonymous_id.clone(),
        session_id: row.session_id.clone(),
        user_id: row.user_id.clone(),
        props: row.props.clone(),
        context: row.context.clone(),
        enrichment: (*row.enrichment).clone(),
    }
}

/// An event row as the webhook body carries it: [`StoredEvent`]'s fields in its order and
/// format, borrowed from the row (the outbox encodes every new event it queues, on the
/// commit path: no copies).
#[derive(Serialize)]
struct EventJson<'a> {
    id: Uuid,
    name: &'a str,
    #[serde(serialize_with = "micros")]
    ts: DateTime<Utc>,
    #[serde(serialize_with = "micros")]
    time: DateTime<Utc>,
    #[serde(serialize_with = "micros")]
    sent_at: DateTime<Utc>,
    #[serde(serialize_with = "micros")]
    received_at: DateTime<Utc>,
    anonymous_id: &'a str,
    session_id: &'a str,
    user_id: Option<&'a str>,
    props: Option<&'a RawValue>,
    context: Option<&'a RawValue>,
    enrichment: &'a Enrichment,
}

impl<'a> EventJson<'a> {
    fn of(row: &'a EventRow) -> EventJson<'a> {
        EventJson {
            id: row.id,
            name: &row.name,
            ts: row.ts,
            time: row.time,
            sent_at: row.sent_at,
            received_at: row.received_at,
            anonymous_id: &row.anonymous_id,
            session_id: &row.session_id,
            user_id: row.user_id.as_deref(),
            props: row.props.as_deref(),
            context: row.context.as_deref(),
            enrichment: &row.enrichment,
        }
    }
}

/// The deliveries for the newly stored (`new[i]`) `rows`, given the destinations.
pub fn plan(
    rows: &[EventRow],
    new: &[bool],
    subscribers: &[Subscriber],
) -> Result<Vec<NewDelivery>, serde_json::Error> {
    let mut fresh: Vec<&EventRow> = rows
        .iter()
        .zip(new)
        .filter(|(_, new)| **new)
        .map(|(row, _)| row)
        .collect();
    fresh.sort_by_key(|r| (r.ts, r.id));
    // Each event is encoded once, however many destinations receive it.
    let encoded: Vec<Option<String>> = fresh
        .iter()
        .map(|row| {
            subscribers
                .iter()
                .any(|s| s.wants(row))
                .then(|| serde_json::to_string(&EventJson::of(row)))
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    let mut deliveries = Vec::new();
    for subscriber in subscribers {
        let wanted: Vec<usize> = (0..fresh.len())
            .filter(|&i| subscriber.wants(fresh[i]))
            .collect();
        for group in wanted.chunks(subscriber.batch_size.max(1) as usize) {
            let jsons: Vec<&str> = group
                .iter()
                .filter_map(|&i| encoded[i].as_deref())
                .collect();
            let mut events =
                String::with_capacity(jsons.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
            events.push('[');
            for (n, json) in jsons.iter().enumerate() {
                if n > 0 {
                    events.push(',');
                }
                events.push_str(json);
            }
            events.push(']');
            deliveries.push(NewDelivery {
                id: Uuid::now_v7(),
                destination_id: subscriber.id,
                first_event: fresh[group[0]].id,
                event_count: group.len() as i32,
                events,
            });
        }
    }
    Ok(deliveries)
}

fn encode_error(e: serde_json::Error) -> StoreError {
    StoreError::Failed(sqlx::Error::Encode(Box::new(e)))
}

/// The distinct projects of the new rows.
fn new_projects(rows: &[EventRow], new: &[bool]) -> Vec<Uuid> {
    let mut projects: Vec<Uuid> = rows
        .iter()
        .zip(new)
        .filter(|(_, new)| **new)
        .map(|(r, _)| r.project_id)
        .collect();
    projects.sort_unstable();
    projects.dedup();
    projects
}

/// Queues the deliveries of `rows` inside the Postgres transaction `tx` stores them in.
pub async fn enqueue_postgres(
    tx: &mut sqlx::PgConnection,
    rows: &[EventRow],
    new: &[bool],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let projects = new_projects(rows, new);
    if projects.is_empty() {
        return Ok(());
    }
    let subscribers: Vec<Subscriber> = sqlx::query(
        "SELECT id, project_id, events, batch_size FROM webhook_destinations \
         WHERE enabled AND project_id = ANY($1) ORDER BY id",
    )
    .bind(&projects)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|row| {
        Ok::<_, sqlx::Error>(Subscriber {
            id: row.try_get("id")?,
            project_id: row.try_get("project_id")?,
            events: row.try_get("events")?,
            batch_size: row.try_get::<i32, _>("batch_size")?.max(1) as u32,
        })
    })
    .collect::<Result<_, _>>()?;
    if subscribers.is_empty() {
        return Ok(());
    }
    let deliveries = plan(rows, new, &subscribers).map_err(encode_error)?;
    let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
    let destinations: Vec<Uuid> = deliveries.iter().map(|d| d.destination_id).collect();
    let firsts: Vec<Uuid> = deliveries.iter().map(|d| d.first_event).collect();
    let counts: Vec<i32> = deliveries.iter().map(|d| d.event_count).collect();
    let events: Vec<&str> = deliveries.iter().map(|d| d.events.as_str()).collect();
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, destination_id, first_event, event_count, events, \
             next_attempt_at, created_at) \
         SELECT id, destination_id, first_event, event_count, events, $6, $6 \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::text[]) \
             AS u(id, destination_id, first_event, event_count, events) \
         ON CONFLICT (destination_id, first_event) DO NOTHING",
    )
    .bind(&ids)
    .bind(&destinations)
    .bind(&firsts)
    .bind(&counts)
    .bind(&events)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Queues the deliveries of `rows` inside the SQLite transaction `tx` stores them in.
pub async fn enqueue_sqlite(
    tx: &mut sqlx::SqliteConnection,
    rows: &[EventRow],
    new: &[bool],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let projects = new_projects(rows, new);
    let mut subscribers = Vec::new();
    for project in projects {
        let found = sqlx::query(
            "SELECT id, events, batch_size FROM webhook_destinations \
             WHERE enabled AND project_id = ? ORDER BY id",
        )
        .bind(project.to_string())
        .fetch_all(&mut *tx)
        .await?;
        for row in found {
            let decode = |e: Box<dyn std::error::Error + Send + Sync>| sqlx::Error::Decode(e);
            let id: String = row.try_get("id")?;
            let events: String = row.try_get("events")?;
            subscribers.push(Subscriber {
                id: Uuid::parse_str(&id).map_err(|e| decode(Box::new(e)))?,
                project_id: project,
                events: serde_json::from_str(&events).map_err(|e| decode(Box::new(e)))?,
                batch_size: row
                    .try_get::<i64, _>("batch_size")?
                    .clamp(1, i64::from(u32::MAX)) as u32,
            });
        }
    }
    if subscribers.is_empty() {
        return Ok(());
    }
    for d in plan(rows, new, &subscribers).map_err(encode_error)? {
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, destination_id, first_event, event_count, \
                 events, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (destination_id, first_event) DO NOTHING",
        )
        .bind(d.id.to_string())
        .bind(d.destination_id.to_string())
        .bind(d.first_event.to_string())
        .bind(d.event_count)
        .bind(&d.events)
        .bind(now.timestamp_millis())
        .bind(now.timestamp_millis())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn row(project: Uuid, n: u128, name: &str) -> EventRow {
        let t = DateTime::from_timestamp_millis(1_763_800_000_000 + n as i64).unwrap();
        EventRow {
            project_id: project,
            id: Uuid::from_u128(n),
            name: name.to_owned(),
            ts: t,
            sent_at: t,
            received_at: t,
            time: t,
            anonymous_id: "a".into(),
            session_id: "s".into(),
            user_id: None,
            props: None,
            context: None,
            enrichment: Arc::default(),
        }
    }

    #[test]
    fn only_new_matching_events_are_grouped_by_batch_size() {
        let (p, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        // Out of ts order, one duplicate, one of another project.
        let rows = vec![
            row(p, 14, "buy"),
            row(p, 10, "view"),
            row(p, 11, "buy"),
            row(p, 12, "view"),
            row(p, 13, "view"),
            row(other, 20, "view"),
        ];
        let new = [true, true, true, false, true, true];
        let all = Subscriber {
            id: Uuid::from_u128(100),
            project_id: p,
            events: vec![],
            batch_size: 2,
        };
        let buys = Subscriber {
            id: Uuid::from_u128(101),
            project_id: p,
            events: vec!["buy".into()],
            batch_size: 100,
        };
        let plan = plan(&rows, &new, &[all, buys]).unwrap();
        let ids = |d: &NewDelivery| -> Vec<String> {
            let events: Vec<serde_json::Value> = serde_json::from_str(&d.events).unwrap();
            events
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let id = |n: u128| Uuid::from_u128(n).to_string();
        assert_eq!(plan.len(), 3);
        assert_eq!(ids(&plan[0]), [id(10), id(11)]);
        assert_eq!(ids(&plan[1]), [id(13), id(14)]);
        assert_eq!(plan[1].first_event, Uuid::from_u128(13));
        assert_eq!(ids(&plan[2]), [id(11), id(14)]);
        assert_eq!(plan[2].destination_id, Uuid::from_u128(101));
        assert_eq!(plan[2].event_count, 2);
        assert!(plan.iter().all(|d| d.id != plan[0].id || d == &plan[0]));
    }

    #[test]
    fn events_are_encoded_as_the_export_encodes_them() {
        let mut full = row(Uuid::from_u128(1), 7, "buy");
        full.user_id = Some("u \"1\"".into());
        full.props = Some(RawValue::from_string(r#"{"sku":"a","n":[1,2]}"#.into()).unwrap());
        full.context = Some(RawValue::from_string(r#"{"page":{"path":"/"}}"#.into()).unwrap());
        full.ts += chrono::Duration::microseconds(123_456);
        full.enrichment = Arc::new(Enrichment {
            browser: Some("Firefox".into()),
            country: Some("DE".into()),
            is_bot: true,
            ..Enrichment::default()
        });
        for row in [full, row(Uuid::from_u128(1), 8, "view")] {
            assert_eq!(
                serde_json::to_string(&EventJson::of(&row)).unwrap(),
                serde_json::to_string(&stored_event(&row)).unwrap()
            );
        }
    }
}
