//! The unacknowledged events of this tab's view, ordered by id (UUIDv7, so by creation
//! time), with their total size. A sorted `VecDeque` rather than a `BTreeMap`: appends at
//! the back and removals at the front are the common cases, and it keeps the wasm about
//! 9 KB smaller.

use alloc::collections::VecDeque;
use alloc::string::String;

#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub json: String,
    /// Never sampled nor dropped for space.
    pub keep: bool,
    /// Written to storage (else it lives only in this tab's memory, for now or for good).
    pub persisted: bool,
    /// The storage record holding it: `tl1:e:<id of the record's first event>`.
    pub chunk: String,
    /// Part of the batch this tab has on the wire.
    pub in_flight: bool,
}

#[derive(Default)]
pub(crate) struct EventQueue {
    items: VecDeque<(String, Record)>,
    bytes: usize,
    /// Events queued per storage record (sorted by record key), to know when a record has
    /// none left and can be removed.
    chunks: alloc::vec::Vec<(String, u32)>,
}

impl EventQueue {
    fn find(&self, id: &str) -> Result<usize, usize> {
        // Fast path: a new event sorts last.
        match self.items.back() {
            Some((last, _)) if last.as_str() < id => Err(self.items.len()),
            None => Err(0),
            _ => self.items.binary_search_by(|(k, _)| k.as_str().cmp(id)),
        }
    }

    fn chunk_slot(&self, key: &str) -> Result<usize, usize> {
        match self.chunks.last() {
            Some((last, _)) if last.as_str() < key => Err(self.chunks.len()),
            _ => self.chunks.binary_search_by(|(k, _)| k.as_str().cmp(key)),
        }
    }

    fn chunk_add(&mut self, key: &str) {
        match self.chunk_slot(key) {
            Ok(i) => self.chunks[i].1 += 1,
            Err(i) => self.chunks.insert(i, (key.into(), 1)),
        }
    }

    /// Returns whether the record `key` has no event left.
    fn chunk_sub(&mut self, key: &str) -> bool {
        let Ok(i) = self.chunk_slot(key) else {
            return true;
        };
        self.chunks[i].1 -= 1;
        let emptied = self.chunks[i].1 == 0;
        if emptied {
            self.chunks.remove(i);
        }
        emptied
    }

    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_ok()
    }

    /// Inserts unless the id is already there.
    pub fn insert(&mut self, id: String, record: Record) {
        if let Err(at) = self.find(&id) {
            self.bytes += record.json.len();
            self.chunk_add(&record.chunk);
            self.items.insert(at, (id, record));
        }
    }

    /// Removes an event; the flag says whether its storage record has no event left.
    pub fn remove(&mut self, id: &str) -> Option<(Record, bool)> {
        let at = self.find(id).ok()?;
        let (_, r) = self.items.remove(at)?;
        self.bytes -= r.json.len();
        let emptied = self.chunk_sub(&r.chunk);
        Some((r, emptied))
    }

    /// Keeps only the events for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Record) -> bool) {
        let mut bytes = self.bytes;
        let mut gone = alloc::vec::Vec::new();
        self.items.retain(|(id, r)| {
            let k = keep(id, r);
            if !k {
                bytes -= r.json.len();
                gone.push(r.chunk.clone());
            }
            k
        });
        self.bytes = bytes;
        for chunk in gone {
            self.chunk_sub(&chunk);
        }
    }

    /// Keeps the events whose id is in `present` (any order) or for which `exempt` holds.
    pub fn retain_present(&mut self, present: &[&str], exempt: impl Fn(&str, &Record) -> bool) {
        let mut seen = alloc::vec![false; self.items.len()];
        for id in present {
            if let Ok(i) = self.find(id) {
                seen[i] = true;
            }
        }
        let mut i = 0;
        self.retain(|id, r| {
            i += 1;
            seen[i - 1] || exempt(id, r)
        });
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Record> {
        let at = self.find(id).ok()?;
        self.items.get_mut(at).map(|(_, r)| r)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Record> {
        self.items.iter_mut().map(|(_, r)| r)
    }

    /// Events queued in storage record `key`.
    #[cfg(test)]
    pub fn chunk_len(&self, key: &str) -> u32 {
        self.chunk_slot(key).map_or(0, |i| self.chunks[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.items.iter().map(|(k, r)| (k, r))
    }

    /// The events whose id is `id` or later.
    pub fn iter_mut_from(&mut self, id: &str) -> impl Iterator<Item = &mut Record> {
        let at = self.find(id).unwrap_or_else(|at| at);
        self.items.range_mut(at..).map(|(_, r)| r)
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

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    fn rec(n: usize) -> Record {
        Record {
            json: "x".repeat(n),
            keep: false,
            persisted: true,
            chunk: String::from("c"),
            in_flight: false,
        }
    }

    #[test]
    fn stays_sorted_and_counts_bytes() {
        let mut q = EventQueue::default();
        for id in ["c", "a", "d", "b", "a"] {
            q.insert(id.to_string(), rec(2));
        }
        assert_eq!(
            q.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(q.bytes(), 8);
        assert_eq!(q.chunk_len("c"), 4);
        assert!(matches!(q.remove("b"), Some((_, false))));
        assert!(q.remove("b").is_none());
        assert_eq!(q.bytes(), 6);
        q.retain(|id, _| id != "a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 4);
        assert!(q.contains("d") && !q.contains("a"));
        assert_eq!(q.iter_mut_from("c").count(), 2);
        assert_eq!(q.iter_mut_from("cc").count(), 1);
        assert_eq!(q.chunk_len("c"), 2);
        assert!(matches!(q.remove("c"), Some((_, false))));
        assert!(
            matches!(q.remove("d"), Some((_, true))),
            "the last event of its record"
        );
        assert_eq!(q.chunk_len("c"), 0);
    }
}
