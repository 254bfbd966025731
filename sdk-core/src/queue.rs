//! The unacknowledged events of this tab's view, ordered by id (UUIDv7, so by creation
//! time), with their total size. A sorted `Vec` rather than a `BTreeMap`: appends are the
//! common case, and it keeps the wasm about 9 KB smaller.

use alloc::string::String;
use alloc::vec::Vec;

#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub json: String,
    /// Never sampled nor dropped for space.
    pub keep: bool,
    /// Written to storage (else it lives only in this tab's memory).
    pub persisted: bool,
}

#[derive(Default)]
pub(crate) struct EventQueue {
    items: Vec<(String, Record)>,
    bytes: usize,
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

    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_ok()
    }

    /// Inserts unless the id is already there.
    pub fn insert(&mut self, id: String, record: Record) {
        if let Err(at) = self.find(&id) {
            self.bytes += record.json.len();
            self.items.insert(at, (id, record));
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Record> {
        let at = self.find(id).ok()?;
        let (_, r) = self.items.remove(at);
        self.bytes -= r.json.len();
        Some(r)
    }

    /// Keeps only the events for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Record) -> bool) {
        let mut bytes = self.bytes;
        self.items.retain(|(id, r)| {
            let k = keep(id, r);
            if !k {
                bytes -= r.json.len();
            }
            k
        });
        self.bytes = bytes;
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
        Some(&mut self.items[at].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.items.iter().map(|(k, r)| (k, r))
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

    fn rec(n: usize) -> Record {
        Record {
            json: "x".repeat(n),
            keep: false,
            persisted: true,
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
        assert!(q.remove("b").is_some());
        assert!(q.remove("b").is_none());
        assert_eq!(q.bytes(), 6);
        q.retain(|id, _| id != "a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 4);
        assert!(q.contains("d") && !q.contains("a"));
    }
}
