//! The unacknowledged events of this tab's view, ordered by id (UUIDv7, so by creation
//! time), with their total size. A sorted `Vec` rather than a `BTreeMap` or a `VecDeque`:
//! appends at the back are the common case, removals go in one pass ([`EventQueue::remove_all`]),
//! and it keeps the wasm small (a `BTreeMap` cost 9 KB, a `VecDeque` 1.5 KB gzipped).

use alloc::string::String;
use alloc::vec;
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

    /// The positions of `ids` (in any order; unknown ids are ignored).
    fn marks<S: AsRef<str>>(&self, ids: &[S]) -> Vec<bool> {
        let mut marked = vec![false; self.items.len()];
        for id in ids {
            if let Ok(i) = self.find(id.as_ref()) {
                marked[i] = true;
            }
        }
        marked
    }

    /// Removes the events at the marked positions in one pass; `removed` hears of each, in
    /// queue order, with whether its storage record has no event left.
    fn sweep(&mut self, marked: &[bool], mut removed: impl FnMut(&str, &Record, bool)) {
        let (bytes, chunks) = (&mut self.bytes, &mut self.chunks);
        let mut i = 0;
        self.items.retain(|(id, r)| {
            i += 1;
            if !marked[i - 1] {
                return true;
            }
            *bytes -= r.json.len();
            removed(id, r, chunk_sub(chunks, &r.chunk));
            false
        });
    }

    /// Removes the events with these ids (in any order; unknown ids are ignored), one pass
    /// over the queue however many there are. `removed` is told of each, as in `sweep`.
    pub fn remove_all(&mut self, ids: &[String], removed: impl FnMut(&str, &Record, bool)) {
        let marked = self.marks(ids);
        self.sweep(&marked, removed);
    }

    /// Keeps the events whose id is in `present` (any order) or for which `exempt` holds.
    pub fn retain_present(&mut self, present: &[&str], exempt: impl Fn(&str, &Record) -> bool) {
        let mut marked = self.marks(present);
        for (m, (id, r)) in marked.iter_mut().zip(&self.items) {
            *m = !*m && !exempt(id, r);
        }
        self.sweep(&marked, |_, _, _| {});
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

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// (id, emptied) of what `remove_all` took.
    fn taken(q: &mut EventQueue, list: &[&str]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        q.remove_all(&ids(list), |id, _, emptied| {
            out.push((id.to_string(), emptied))
        });
        out
    }

    fn rec(n: usize) -> Record {
        Record {
            json: "x".repeat(n),
            keep: false,
            persisted: true,
            chunk: String::from("c"),
            line: 0,
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
        assert_eq!(taken(&mut q, &["b"]), [("b".to_string(), false)]);
        assert!(taken(&mut q, &["b", "zz"]).is_empty());
        assert_eq!(q.bytes(), 6);
        q.retain_present(&["c", "d"], |id, _| id == "zz");
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 4);
        assert!(q.contains("d") && !q.contains("a"));
        assert_eq!(q.iter_mut_from("c").count(), 2);
        assert_eq!(q.iter_mut_from("cc").count(), 1);
        assert_eq!(q.chunk_len("c"), 2);
        // In queue order, whatever the order asked; the last one empties the record.
        assert_eq!(
            taken(&mut q, &["d", "c"]),
            [("c".to_string(), false), ("d".to_string(), true)]
        );
        assert_eq!(q.chunk_len("c"), 0);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }
}
