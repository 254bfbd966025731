//! The queue as storage holds it: the events by id with the records (`tl1:e:`) and
//! gone-lists (`tl1:a:`) that hold them, the count dropped for space (`tl1:drop`) and the
//! batches whose fate is unknown (`tl1:b:`), read back by restore and refresh.
//!
//! It also keeps the list of storage [`Action`]s for the binding. The other parts add
//! their writes (identity, lease, retry) to the same list, so every write reaches storage
//! in the order it was made: a lease release after the removals it follows, for one.

use alloc::string::String;
use alloc::vec::Vec;

use crate::ids;
use crate::queue::{self, EventQueue, Record};
use crate::{storage, Action, Config};
use tracklet_wire::json::{push_str_literal, push_u64};

#[derive(Default)]
pub(crate) struct Store {
    /// Unacknowledged events by id; UUIDv7 ids sort by creation time.
    queue: EventQueue,
    /// Events dropped for space and not yet reported to the collector.
    dropped: u64,
    /// The storage record (its serial number in the queue's table) this task's events go
    /// into, written by the next [`Store::take_actions`] (which the binding calls before
    /// the task ends).
    open_chunk: Option<u32>,
    /// Batches sent without an answer seen (the unload beacon, a request cut off by the
    /// page going away), by this page or an earlier one: their events are held back until
    /// the collector says which arrived ([`Store::confirm`]).
    unconfirmed: Vec<Unconfirmed>,
    /// Storage changes not yet handed to the binding, in order.
    pub actions: Vec<Action>,
}

/// A batch whose fate is unknown (`tl1:b:<batch id>`).
struct Unconfirmed {
    batch_id: String,
    /// When it was sent (ms).
    sent_at: u64,
    events: Vec<String>,
}

/// `tl1:a:<first id>`: the gone-list of record `tl1:e:<first id>`.
fn gone_key(chunk: &str) -> String {
    let mut k = String::from(storage::GONE);
    k.push_str(chunk.get(storage::EVENT.len()..).unwrap_or_default());
    k
}

/// Merges a stored gone-list (another tab's view) into ours; returns the merged list as
/// [`storage::gone_lines`] reads it.
fn merge_gone(list: &mut String, stored: &str) -> Vec<bool> {
    if !list.is_empty() {
        list.push(storage::LINE as char);
    }
    list.push_str(stored);
    let lines = storage::gone_lines(list);
    list.clear();
    for (l, &gone) in lines.iter().enumerate() {
        if gone {
            queue::append_line(list, l as u32);
        }
    }
    lines
}

/// `tl1:b:<batch id>`: an unconfirmed batch.
fn unconfirmed_key(batch_id: &str) -> String {
    let mut k = String::from(storage::UNCONFIRMED);
    k.push_str(batch_id);
    k
}

fn event_key(id: &str) -> String {
    let mut k = String::with_capacity(storage::EVENT.len() + id.len());
    k.push_str(storage::EVENT);
    k.push_str(id);
    k
}

/// Whether a stored event line is of an `always_keep` event.
fn is_keep_record(always_keep: &[String], id_len: usize, value: &str) -> bool {
    always_keep.iter().any(|name| {
        let mut literal = String::new();
        push_str_literal(&mut literal, name);
        storage::event_name_is(value, id_len, &literal)
    })
}

impl Store {
    /// Reads the stored queue: records, gone-lists, the dropped count and unconfirmed
    /// batches. `first`: at start-up (else a refresh, which also forgets the persisted
    /// events that other tabs removed from storage). Corrupt records are removed.
    ///
    /// (`entries` is read more than once, hence `Clone`: no copy of the snapshot is made.)
    pub fn adopt<'a>(
        &mut self,
        entries: impl Iterator<Item = (&'a str, &'a str)> + Clone,
        first: bool,
        cfg: &Config,
    ) {
        // Gone-lists first: their lines are not queued, whatever their records say.
        // (first id, list, whether its record was met).
        let mut lists: Vec<(&str, &str, bool)> = Vec::new();
        for (key, value) in entries.clone() {
            if let Some(first_id) = key.strip_prefix(storage::GONE) {
                lists.push((first_id, value, false));
            }
        }
        if !first {
            // Persisted events gone from storage were acknowledged (or cleared) by another
            // tab: those not seen below go. Ours in flight stay until our own answer comes.
            self.queue.mark(|r| r.persisted && !r.in_flight);
        }
        let mut dropped = 0;
        for (key, value) in entries {
            if let Some(first_id) = key.strip_prefix(storage::EVENT) {
                let mut stored = "";
                for list in lists.iter_mut().filter(|l| l.0 == first_id) {
                    list.2 = true;
                    stored = list.1;
                }
                // The record's entry in the queue: found through one of its queued events
                // (a record is read whole, so no other entry has its key), else made anew.
                let mut chunk = None;
                for line in value.split(storage::LINE as char) {
                    if let Some(r) =
                        storage::event_line_id(line).and_then(|id| self.queue.get_mut(id))
                    {
                        chunk = Some(r.chunk);
                        break;
                    }
                }
                let chunk = match chunk {
                    Some(c) => c,
                    None => self.queue.new_chunk(key.into()),
                };
                // Its gone lines: ours and the stored ones.
                let gone = match self.queue.chunk(chunk) {
                    Some(c) => merge_gone(&mut c.gone, stored),
                    None => Vec::new(),
                };
                let mut valid = false;
                for (at, line) in value.split(storage::LINE as char).enumerate() {
                    let Some(id) = storage::event_line_id(line) else {
                        continue;
                    };
                    valid = true;
                    if gone.get(at).is_some_and(|&g| g) {
                        continue;
                    }
                    if let Some(r) = self.queue.get_mut(id) {
                        r.marked = false;
                    } else {
                        let keep = is_keep_record(&cfg.always_keep, id.len(), line);
                        let record = Record {
                            json: line.into(),
                            keep,
                            persisted: true,
                            chunk,
                            line: at as u32,
                            in_flight: false,
                            held: false,
                            marked: false,
                        };
                        self.queue.insert(id.into(), record);
                    }
                }
                if !valid {
                    self.actions.push(Action::Remove(key.into()));
                }
            } else if key == storage::DROPPED {
                dropped = value.parse().unwrap_or(0);
            } else if let Some(batch_id) = key.strip_prefix(storage::UNCONFIRMED) {
                if first && !self.unconfirmed.iter().any(|u| u.batch_id == batch_id) {
                    let mut lines = value.split(storage::LINE as char);
                    let sent_at = lines
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                    self.unconfirmed.push(Unconfirmed {
                        batch_id: batch_id.into(),
                        sent_at,
                        events: lines.filter(|l| !l.is_empty()).map(String::from).collect(),
                    });
                }
            }
        }
        for (first_id, _, met) in lists {
            if !met {
                // Its record is gone: so is the list.
                let mut k = String::from(storage::GONE);
                k.push_str(first_id);
                self.actions.push(Action::Remove(k));
            }
        }
        self.queue.remove_marked(true);
        // (And forgets the records met above with none of their events queued.)
        self.queue.take_touched(|_, _| {});
        self.hold_unconfirmed();
        self.dropped = dropped;
    }

    /// Queues an event just tracked, in this task's record (written by the next
    /// [`Store::take_actions`]: one storage write for all the events of a task).
    pub fn push_tracked(&mut self, id: String, json: String, keep: bool) {
        let chunk = match self.open_chunk {
            Some(c) => c,
            None => {
                let c = self.queue.new_chunk(event_key(&id));
                self.open_chunk = Some(c);
                c
            }
        };
        self.queue.insert(
            id,
            Record {
                json,
                keep,
                persisted: false,
                chunk,
                line: 0,
                in_flight: false,
                held: false,
                marked: false,
            },
        );
    }

    /// Storage changes to carry out now, in order, after enforcing the queue's bounds and
    /// writing this task's record.
    pub fn take_actions(&mut self, cfg: &Config) -> Vec<Action> {
        self.enforce_caps(cfg);
        self.write_open_chunk();
        core::mem::take(&mut self.actions)
    }

    /// Drops the oldest events beyond the count and byte bounds (never `always_keep` ones,
    /// never those in flight), counting them for the next batch's `dropped`.
    pub fn enforce_caps(&mut self, cfg: &Config) {
        if self.queue.len() <= cfg.max_queue_events && self.queue.bytes() <= cfg.max_queue_bytes {
            return;
        }
        let (max_events, max_bytes) = (cfg.max_queue_events, cfg.max_queue_bytes);
        let mut count = self.queue.len();
        let mut bytes = self.queue.bytes();
        self.queue.mark(|r| {
            let victim = (count > max_events || bytes > max_bytes) && !r.keep && !r.in_flight;
            if victim {
                count -= 1;
                bytes -= r.json.len();
            }
            victim
        });
        let dropped = self.remove_events();
        if dropped == 0 {
            return;
        }
        self.dropped += dropped as u64;
        let mut d = String::new();
        push_u64(&mut d, self.dropped);
        self.actions.push(Action::Set(storage::DROPPED.into(), d));
    }

    /// Writes this task's record: the events tracked since the last `take_actions`.
    fn write_open_chunk(&mut self) {
        let Some(chunk) = self.open_chunk.take() else {
            return;
        };
        let Some(key) = self.queue.chunk(chunk).map(|c| c.key.clone()) else {
            return;
        };
        // A record's events all come at or after its first event (the key's id).
        let first = key.get(storage::EVENT.len()..).unwrap_or_default();
        let mut value = String::new();
        let records = self.queue.iter_mut_from(first).filter(|r| r.chunk == chunk);
        for (line, r) in records.enumerate() {
            if line > 0 {
                value.push(storage::LINE as char);
            }
            value.push_str(&r.json);
            r.persisted = true;
            r.line = line as u32;
        }
        if !value.is_empty() {
            self.actions.push(Action::Set(key, value));
        }
    }

    /// Removes the marked events from the queue and from storage: a record with none of
    /// its events left is removed, otherwise their lines join the record's gone-list.
    /// Records are never rewritten (see [`storage::EVENT`]). Returns how many went.
    fn remove_events(&mut self) -> usize {
        let removed = self.queue.remove_marked(false);
        let (actions, open) = (&mut self.actions, &mut self.open_chunk);
        self.queue.take_touched(|c, emptied| {
            if !emptied {
                actions.push(Action::Set(gone_key(&c.key), c.gone.clone()));
            } else if *open == Some(c.serial) {
                // Never written: nothing to remove, and this task's next events start a
                // new record.
                *open = None;
            } else {
                actions.push(Action::Remove(gone_key(&c.key)));
                actions.push(Action::Remove(c.key.clone()));
            }
        });
        removed
    }

    /// The binding could not write this key (quota exceeded, storage disabled): its events
    /// live on in memory only, and a refresh must not mistake them for acknowledged.
    pub fn persist_failed(&mut self, key: &str) {
        let chunk = self.queue.serial_of(key);
        for r in self.queue.iter_mut().filter(|r| Some(r.chunk) == chunk) {
            r.persisted = false;
        }
    }

    /// Discards every queued event that is not in flight; returns how many.
    pub fn clear(&mut self) -> usize {
        self.queue.mark(|r| !r.in_flight);
        let n = self.remove_events();
        self.hold_unconfirmed();
        n
    }

    /// Events not yet acknowledged, in flight included.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The events that may go in a batch (not in flight, not held), oldest first, as
    /// `(id, json)`.
    pub fn sendable(&self) -> impl Iterator<Item = (&String, &String)> {
        self.queue
            .iter()
            .filter(|(_, r)| !r.in_flight && !r.held)
            .map(|(id, r)| (id, &r.json))
    }

    /// When the oldest event that may go in a batch was tracked (ms), if there is one.
    pub fn oldest_ms(&self) -> Option<u64> {
        let (id, _) = self.sendable().next()?;
        Some(ids::uuid_v7_ms(id).unwrap_or(0))
    }

    /// Marks the first `events` events not held as the batch in flight.
    pub fn mark_in_flight(&mut self, events: usize) {
        for r in self.queue.iter_mut().filter(|r| !r.held).take(events) {
            r.in_flight = true;
        }
    }

    /// The ids of the events in flight.
    pub fn in_flight_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for (id, r) in self.queue.iter() {
            if r.in_flight {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// The batch in flight was answered: its events are queued like the others again.
    pub fn end_flight(&mut self) {
        for r in self.queue.iter_mut() {
            r.in_flight = false;
        }
    }

    /// Removes the batch in flight from the queue and from storage.
    pub fn remove_in_flight(&mut self) {
        self.queue.mark(|r| r.in_flight);
        self.remove_events();
    }

    /// Events dropped for space and not yet reported (the next batch's `dropped`).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The collector accepted a batch that reported `reported` dropped events: those
    /// need not be reported again.
    pub fn dropped_reported(&mut self, reported: u64) {
        if reported == 0 {
            return;
        }
        self.dropped = self.dropped.saturating_sub(reported);
        self.actions.push(if self.dropped == 0 {
            Action::Remove(storage::DROPPED.into())
        } else {
            let mut d = String::new();
            push_u64(&mut d, self.dropped);
            Action::Set(storage::DROPPED.into(), d)
        });
    }

    /// Writes `tl1:b:<batch id>` (`<sent at>` then the event ids, one per line) and holds
    /// the events back.
    pub fn remember_unconfirmed(&mut self, batch_id: String, sent_at: u64, events: Vec<String>) {
        let mut value = String::new();
        push_u64(&mut value, sent_at);
        for id in &events {
            value.push(storage::LINE as char);
            value.push_str(id);
        }
        self.actions
            .push(Action::Set(unconfirmed_key(&batch_id), value));
        self.unconfirmed.retain(|u| u.batch_id != batch_id);
        self.unconfirmed.push(Unconfirmed {
            batch_id,
            sent_at,
            events,
        });
        self.hold_unconfirmed();
    }

    pub fn forget_unconfirmed(&mut self, batch_id: &str) {
        let before = self.unconfirmed.len();
        self.unconfirmed.retain(|u| u.batch_id != batch_id);
        if self.unconfirmed.len() != before {
            self.actions.push(Action::Remove(unconfirmed_key(batch_id)));
        }
    }

    /// Marks the queued events of unconfirmed batches as held (not sent until confirmed);
    /// forgets unconfirmed batches none of whose events is queued any more.
    fn hold_unconfirmed(&mut self) {
        let mut gone = Vec::new();
        for u in &self.unconfirmed {
            let mut any = false;
            for id in &u.events {
                if let Some(r) = self.queue.get_mut(id) {
                    if !r.in_flight {
                        r.held = true;
                    }
                    any = true;
                }
            }
            if !any {
                gone.push(u.batch_id.clone());
            }
        }
        for id in gone {
            self.forget_unconfirmed(&id);
        }
    }

    /// The unconfirmed batches to ask the collector about now, if any: those sent at
    /// least `delay_ms` ago (a beacon may still be on its way to the database).
    pub fn unconfirmed_due(&self, now: u64, delay_ms: u64) -> Option<Vec<String>> {
        let due: Vec<String> = self
            .unconfirmed
            .iter()
            .filter(|u| u.sent_at.saturating_add(delay_ms) <= now)
            .map(|u| u.batch_id.clone())
            .take(tracklet_wire::MAX_BATCH_IDS_PER_QUERY)
            .collect();
        (!due.is_empty()).then_some(due)
    }

    /// When the oldest unconfirmed batch becomes due for the question, if any.
    pub fn unconfirmed_at(&self, delay_ms: u64) -> Option<u64> {
        self.unconfirmed
            .iter()
            .map(|u| u.sent_at.saturating_add(delay_ms))
            .min()
    }

    /// The collector's answer about the unconfirmed batches `asked`: `arrived` lists those
    /// it committed (their events are acknowledged and leave the queue), `None` when it
    /// could not say (no answer, an error): then, as for those not listed, their events
    /// are released and sent again (the collector drops duplicates by event id).
    /// Returns how many events were acknowledged.
    pub fn confirm(&mut self, asked: &[String], arrived: Option<&[String]>) -> usize {
        let mut acknowledged = 0;
        for batch_id in asked {
            let Some(at) = self
                .unconfirmed
                .iter()
                .position(|u| &u.batch_id == batch_id)
            else {
                continue;
            };
            let u = self.unconfirmed.remove(at);
            self.actions.push(Action::Remove(unconfirmed_key(batch_id)));
            let came = arrived.is_some_and(|a| a.contains(batch_id));
            for id in &u.events {
                if let Some(r) = self.queue.get_mut(id) {
                    if !r.in_flight {
                        r.held = false;
                        r.marked = came;
                    }
                }
            }
            if came {
                acknowledged += self.remove_events();
            }
        }
        // An event in two unconfirmed batches stays held by the other.
        self.hold_unconfirmed();
        acknowledged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn gone_lists_of_two_tabs_merge_to_their_union() {
        let mut gone = "1\n4".to_string();
        let lines = merge_gone(&mut gone, "0\n4\n2");
        assert_eq!(gone, "0\n1\n2\n4");
        assert_eq!(lines, [true, true, true, false, true]);
        let mut gone = String::new();
        merge_gone(&mut gone, "3\nx");
        queue::append_line(&mut gone, 5);
        assert_eq!(gone, "3\n5");
        merge_gone(&mut gone, "");
        assert_eq!(gone, "3\n5");
    }
}
