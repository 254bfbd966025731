//! The core's text helpers: splitting on an ASCII byte and reading decimal numbers.
//! `str::split(char)` and `str::parse` are generic over patterns and types; these two
//! small functions serve every separator and number the core reads, and keep the wasm
//! smaller (about 1 KB before gzip).

/// The parts of `s` between `sep` bytes, as `str::split` gives them. `sep` must be ASCII,
/// so every part is valid UTF-8.
pub fn fields(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    debug_assert!(sep.is_ascii());
    let mut rest = Some(s);
    core::iter::from_fn(move || {
        let r = rest?;
        match r.bytes().position(|b| b == sep) {
            Some(i) => {
                rest = r.get(i + 1..);
                r.get(..i)
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// `s` split at the first `sep` byte (ASCII), as `str::split_once`.
pub fn split_once(s: &str, sep: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == sep)?;
    Some((s.get(..i)?, s.get(i + 1..)?))
}

/// A non-negative decimal integer: digits only, at least one, no overflow.
pub fn number(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(d as u64)
    })
}

/// A set of the parts of a `sep`-separated list, for membership tests in constant time:
/// gone-lists can name thousands of ids, checked against thousands of stored events.
/// Open addressing over FNV-1a hashes; the parts themselves are compared on a hit.
pub struct Parts<'a> {
    parts: alloc::vec::Vec<&'a str>,
    /// Index + 1 into `parts`, 0 for an empty slot; the length is a power of two.
    slots: alloc::vec::Vec<u32>,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl<'a> Parts<'a> {
    pub fn new(list: &'a str, sep: u8) -> Self {
        let parts: alloc::vec::Vec<&str> = fields(list, sep).collect();
        let mask = (parts.len() * 2).next_power_of_two() - 1;
        let mut slots = alloc::vec![0u32; mask + 1];
        for (i, p) in parts.iter().enumerate() {
            let mut at = fnv(p) as usize & mask;
            while slots[at] != 0 {
                at = (at + 1) & mask;
            }
            slots[at] = i as u32 + 1;
        }
        Parts { parts, slots }
    }

    pub fn contains(&self, s: &str) -> bool {
        let mask = self.slots.len() - 1;
        let mut at = fnv(s) as usize & mask;
        loop {
            match self.slots[at] {
                0 => return false,
                i if self.parts[i as usize - 1] == s => return true,
                _ => at = (at + 1) & mask,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[test]
    fn numbers() {
        assert_eq!(number("0"), Some(0));
        assert_eq!(number("1763800000000"), Some(1_763_800_000_000));
        assert_eq!(number("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.5",
            "x",
            "18446744073709551616",
        ] {
            assert_eq!(number(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn fields_match_str_split(s in "[a-c\u{e9}\u{1F600},\n]{0,40}") {
            for sep in [b',', b'\n'] {
                let ours: Vec<&str> = fields(&s, sep).collect();
                let std: Vec<&str> = s.split(sep as char).collect();
                prop_assert_eq!(ours, std);
                prop_assert_eq!(split_once(&s, sep), s.split_once(sep as char));
            }
        }

        #[test]
        fn parts_contain_exactly_the_fields(list in "[a-d\n]{0,60}", probes in proptest::collection::vec("[a-d]{0,3}", 0..20)) {
            let set = Parts::new(&list, b'\n');
            for p in probes.iter().map(String::as_str).chain(fields(&list, b'\n')) {
                prop_assert_eq!(set.contains(p), fields(&list, b'\n').any(|f| f == p), "{:?} in {:?}", p, list);
            }
        }

        #[test]
        fn number_matches_parse(s in "[0-9]{0,22}|[0-9a -]{0,5}") {
            prop_assert_eq!(number(&s), s.parse::<u64>().ok().filter(|_| !s.starts_with('+')));
        }
    }
}
