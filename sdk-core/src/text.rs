//! The core's text helpers: splitting on an ASCII byte and reading decimal numbers.
//! `str::split(char)` and `str::parse` are generic over patterns and types; these two
//! small functions serve every separator and number the core reads, and keep the wasm
//! smaller (about 1 KB before gzip).

/// The parts of `s` between `sep` bytes, as `str::split` gives them. `sep` must be ASCII,
/// so every part is valid UTF-8.
pub fn fields(s: &str, sep: u8) -> impl Iterator<Item = &str> + Clone {
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
    let mut n = 0u64;
    for &b in s.as_bytes() {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(d as u64)?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        fn number_matches_parse(s in "[0-9]{0,22}|[0-9a -]{0,5}") {
            prop_assert_eq!(number(&s), s.parse::<u64>().ok().filter(|_| !s.starts_with('+')));
        }
    }
}
