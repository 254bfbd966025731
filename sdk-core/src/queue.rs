//! The unacknowledged events of this tab's view, ordered by id (UUIDv7, so by creation
//! time), with their total size. A sorted `Vec` rather than a `BTreeMap` or a `VecDeque`:
//! appends at the back are the common case, removals go in one pass ([`EventQueue::remove_marked`]),
//! and it keeps the wasm small (a `BTreeMap` cost 9 KB, a `VecDeque` 1.5 KB gzipped).

use alloc::string::String;
use alloc::vec::Vec;

#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub json: String,
    /// Never sampled nor dropped for space.
    pub keep: bool,
    /// Written to storage (else it lives only in this tab's memory, for now or for good).
    pub persisted: bool,
    /// The storage record holding it (a [`Chunk`]'s serial number).
    pub chunk: u32,
    /// Its line in that record (0 for the first), once written: what its record's
    /// gone-list names when it is gone.
    pub line: u32,
    /// Part of the batch this tab has on the wire.
    pub in_flight: bool,
    /// Part of a batch sent without an answer seen (the unload beacon): not sent again
    /// until the collector says whether it arrived.
    pub held: bool,
    /// To be taken out by the next [`EventQueue::remove_marked`].
    pub marked: bool,
}

/// A storage record holding queued events.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// `tl1:e:<id of the record's first event>`.
    pub key: String,
    /// Numbers records in the order this tab met them: what [`Record::chunk`] holds.
    pub serial: u32,
    /// Its events still queued: none left, the record can go.
    count: u32,
    /// Its gone-list: the lines whose events are gone (the value of its `tl1:a:` key).
    pub gone: String,
    /// Changed by [`EventQueue::remove_marked`] since [`EventQueue::take_touched`].
    touched: bool,
}

#[derive(Default)]
pub(crate) struct EventQueue {
    items: Vec<(String, Record)>,
    bytes: usize,
    /// The records holding queued events, by serial number.
    chunks: Vec<Chunk>,
    next_serial: u32,
}

impl EventQueue {
    fn find(&self, id: &str) -> Result<usize, usize> {
        // Fast path: a new event sorts last.
        match self.items.last() {
            Some((last, _)) if last.as_str() < id => Err(self.items.len()),
            None => Err(0),
            _ => self.items.binary_search_by(|(k, _)| k.as_str().cmp(id)),
        }
    }

    /// A new record, keyed `key`; returns its serial number.
    pub fn new_chunk(&mut self, key: String) -> u32 {
        let serial = self.next_serial;
        self.next_serial += 1;
        self.chunks.push(Chunk {
            key,
            serial,
            count: 0,
            gone: String::new(),
            touched: false,
        });
        serial
    }

    /// The serial number of the record keyed `key`, if it holds queued events.
    pub fn serial_of(&self, key: &str) -> Option<u32> {
        let c = self.chunks.iter().find(|c| c.key == key)?;
        Some(c.serial)
    }

    pub fn chunk(&mut self, serial: u32) -> Option<&mut Chunk> {
        let at = self
            .chunks
            .binary_search_by_key(&serial, |c| c.serial)
            .ok()?;
        self.chunks.get_mut(at)
    }

    /// Inserts unless the id is already there.
    pub fn insert(&mut self, id: String, record: Record) {
        if let Err(at) = self.find(&id) {
            self.bytes += record.json.len();
            if let Some(c) = self.chunk(record.chunk) {
                c.count += 1;
            }
            self.items.insert(at, (id, record));
        }
    }

    /// Removes the marked events in one pass. The lines of those that were written join
    /// their records' gone-lists, unless `quietly` (another tab removed them from storage).
    /// Returns how many went; [`EventQueue::take_touched`] tells which records changed.
    pub fn remove_marked(&mut self, quietly: bool) -> usize {
        // Compacts in place: the kept items move down over the removed ones, in order.
        let mut kept = 0;
        let len = self.items.len();
        for i in 0..len {
            let r = &self.items[i].1;
            if r.marked {
                self.bytes -= r.json.len();
                let (chunk, line, persisted) = (r.chunk, r.line, r.persisted && !quietly);
                if let Some(c) = self.chunk(chunk) {
                    c.count -= 1;
                    if persisted {
                        // It just left the queue, so its line is not in the list yet: a
                        // burst of thousands of events is acknowledged in linear time.
                        append_line(&mut c.gone, line);
                    }
                    c.touched |= persisted || c.count == 0;
                }
            } else {
                self.items.swap(kept, i);
                kept += 1;
            }
        }
        self.items.truncate(kept);
        len - kept
    }

    /// Tells `f` of each record changed since the last call (with whether it has no event
    /// left), then forgets the records with no event left.
    pub fn take_touched(&mut self, mut f: impl FnMut(&Chunk, bool)) {
        for c in self.chunks.iter_mut().filter(|c| c.touched) {
            c.touched = false;
            f(c, c.count == 0);
        }
        self.chunks.retain(|c| c.count > 0);
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Record> {
        let at = self.find(id).ok()?;
        self.items.get_mut(at).map(|(_, r)| r)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Record> {
        self.items.iter_mut().map(|(_, r)| r)
    }

    /// Marks (for [`EventQueue::remove_marked`]) the events for which `f` holds.
    pub fn mark(&mut self, mut f: impl FnMut(&Record) -> bool) {
        for r in self.iter_mut() {
            r.marked = f(r);
        }
    }

    /// Events queued in storage record `key`.
    #[cfg(test)]
    pub fn chunk_len(&self, key: &str) -> u32 {
        self.chunks
            .iter()
            .find(|c| c.key == key)
            .map_or(0, |c| c.count)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.items.iter().map(|(k, r)| (k, r))
    }

    /// The events whose id is `id` or later.
    pub fn iter_mut_from(&mut self, id: &str) -> impl Iterator<Item = &mut Record> {
        let at = self.find(id).unwrap_or_else(|at| at);
        self.items[at..].iter_mut().map(|(_, r)| r)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Appends a line number to a gone-list.
pub(crate) fn append_line(list: &mut String, line: u32) {
    if !list.is_empty() {
        list.push(crate::storage::LINE as char);
    }
    tracklet_wire::json::push_u64(list, line as u64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// (gone-list, emptied) of the records `remove_marked` changed, after marking `list`.
    fn taken(q: &mut EventQueue, list: &[&str]) -> Vec<(String, bool)> {
        for id in list {
            if let Some(r) = q.get_mut(id) {
                r.marked = true;
            }
        }
        q.remove_marked(false);
        let mut out = Vec::new();
        q.take_touched(|c, emptied| out.push((c.gone.clone(), emptied)));
        out
    }

    fn rec(id: &str, chunk: u32, line: usize) -> Record {
        Record {
            json: id.repeat(2),
            keep: false,
            persisted: true,
            chunk,
            line: line as u32,
            in_flight: false,
            held: false,
            marked: false,
        }
    }

    #[test]
    fn stays_sorted_counts_bytes_and_keeps_gone_lists() {
        let mut q = EventQueue::default();
        let c = q.new_chunk("tl1:e:c".into());
        for (line, id) in ["c", "a", "d", "b", "a"].into_iter().enumerate() {
            q.insert(id.to_string(), rec(id, c, line));
        }
        assert_eq!(
            q.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(q.bytes(), 8);
        assert_eq!(q.chunk_len("tl1:e:c"), 4);
        assert_eq!(taken(&mut q, &["b"]), [("3".to_string(), false)]);
        assert!(taken(&mut q, &["b", "zz"]).is_empty());
        assert_eq!(q.bytes(), 6);
        // Quietly: the record's gone-list is not told.
        q.mark(|r| r.json == "aa");
        assert_eq!(q.remove_marked(true), 1);
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 4);
        assert!(q.get_mut("d").is_some() && q.get_mut("a").is_none());
        assert_eq!(q.iter_mut_from("c").count(), 2);
        assert_eq!(q.iter_mut_from("cc").count(), 1);
        assert_eq!(q.chunk_len("tl1:e:c"), 2);
        // In queue order, whatever the order asked; the last one empties the record,
        // which is then forgotten.
        assert_eq!(taken(&mut q, &["d", "c"]), [("3\n0\n2".to_string(), true)]);
        assert_eq!(q.chunk_len("tl1:e:c"), 0);
        assert!(q.chunk(c).is_none());
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }
}
