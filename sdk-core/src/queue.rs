//! The unacknowledged events of this tab's view, ordered by id (UUIDv7, so by creation
//! time), with their total size. A sorted `Vec` rather than a `BTreeMap` or a `VecDeque`:
//! appends at the back are the common case, removals go in one pass ([`EventQueue::remove_all`]),
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
    /// The storage record holding it: `tl1:e:<id of the record's first event>`.
    pub chunk: String,
    /// Its line in that record (0 for the first), once written: what its record's
    /// gone-list names when it is gone.
    pub line: u32,
    /// Part of the batch this tab has on the wire.
    pub in_flight: bool,
    /// To be taken out by the next [`EventQueue::remove_marked`].
    pub marked: bool,
}

#[derive(Default)]
pub(crate) struct EventQueue {
    items: Vec<(String, Record)>,
    bytes: usize,
    /// Events queued per storage record (sorted by record key), to know when a record has
    /// none left and can be removed.
    chunks: Vec<(String, u32)>,
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

    fn chunk_add(&mut self, key: &str) {
        match chunk_slot(&self.chunks, key) {
            Ok(i) => self.chunks[i].1 += 1,
            Err(i) => self.chunks.insert(i, (key.into(), 1)),
        }
    }

    /// Inserts unless the id is already there.
    pub fn insert(&mut self, id: String, record: Record) {
        if let Err(at) = self.find(&id) {
            self.bytes += record.json.len();
            self.chunk_add(&record.chunk);
            self.items.insert(at, (id, record));
        }
    }

    /// Removes the marked events in one pass; `removed` hears of each, in queue order,
    /// with whether its storage record has no event left. Returns how many went.
    pub fn remove_marked(&mut self, mut removed: impl FnMut(&Record, bool)) -> usize {
        // Compacts in place: the kept items move down over the removed ones, in order.
        let mut kept = 0;
        let len = self.items.len();
        for i in 0..len {
            let r = &self.items[i].1;
            if r.marked {
                self.bytes -= r.json.len();
                removed(r, chunk_sub(&mut self.chunks, &r.chunk));
            } else {
                self.items.swap(kept, i);
                kept += 1;
            }
        }
        self.items.truncate(kept);
        len - kept
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
        chunk_slot(&self.chunks, key).map_or(0, |i| self.chunks[i].1)
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

fn chunk_slot(chunks: &[(String, u32)], key: &str) -> Result<usize, usize> {
    match chunks.last() {
        Some((last, _)) if last.as_str() < key => Err(chunks.len()),
        _ => chunks.binary_search_by(|(k, _)| k.as_str().cmp(key)),
    }
}

/// Counts one event less in record `key`; returns whether the record has none left.
fn chunk_sub(chunks: &mut Vec<(String, u32)>, key: &str) -> bool {
    let Ok(i) = chunk_slot(chunks, key) else {
        return true;
    };
    chunks[i].1 -= 1;
    let emptied = chunks[i].1 == 0;
    if emptied {
        chunks.remove(i);
    }
    emptied
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// (first byte of json, emptied) of what `remove_marked` took, after marking `list`.
    fn taken(q: &mut EventQueue, list: &[&str]) -> Vec<(String, bool)> {
        for id in list {
            if let Some(r) = q.get_mut(id) {
                r.marked = true;
            }
        }
        let mut out = Vec::new();
        q.remove_marked(|r, emptied| out.push((r.json.clone(), emptied)));
        out
    }

    fn rec(id: &str) -> Record {
        Record {
            json: id.repeat(2),
            keep: false,
            persisted: true,
            chunk: String::from("c"),
            line: 0,
            in_flight: false,
            marked: false,
        }
    }

    #[test]
    fn stays_sorted_and_counts_bytes() {
        let mut q = EventQueue::default();
        for id in ["c", "a", "d", "b", "a"] {
            q.insert(id.to_string(), rec(id));
        }
        assert_eq!(
            q.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(q.bytes(), 8);
        assert_eq!(q.chunk_len("c"), 4);
        assert_eq!(taken(&mut q, &["b"]), [("bb".to_string(), false)]);
        assert!(taken(&mut q, &["b", "zz"]).is_empty());
        assert_eq!(q.bytes(), 6);
        q.mark(|r| r.json == "aa");
        assert_eq!(q.remove_marked(|_, _| {}), 1);
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 4);
        assert!(q.get_mut("d").is_some() && q.get_mut("a").is_none());
        assert_eq!(q.iter_mut_from("c").count(), 2);
        assert_eq!(q.iter_mut_from("cc").count(), 1);
        assert_eq!(q.chunk_len("c"), 2);
        // In queue order, whatever the order asked; the last one empties the record.
        assert_eq!(
            taken(&mut q, &["d", "c"]),
            [("cc".to_string(), false), ("dd".to_string(), true)]
        );
        assert_eq!(q.chunk_len("c"), 0);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }
}
