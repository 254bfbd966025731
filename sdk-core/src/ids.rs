//! Identifiers from injected randomness: the core never asks the platform for entropy.
//!
//! The binding seeds [`Rng`] once from `crypto.getRandomValues`; tests seed it with a
//! constant and get the same ids every run.

use alloc::string::String;

/// wyrand: tiny, fast and good enough for ids and jitter (not for secrets).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// A uniform value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// True with probability `rate` (clamped to 0..=1).
    pub fn chance(&mut self, rate: f64) -> bool {
        if rate >= 1.0 {
            return true;
        }
        if rate <= 0.0 || rate.is_nan() {
            return false;
        }
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= rate
    }
}

/// Makes UUIDv7 strings (RFC 9562): 48 bits of ms timestamp, then random bits. Within one
/// millisecond a 12-bit counter keeps ids of one tab increasing, so sorting by id sorts
/// by creation.
#[derive(Clone, Debug, Default)]
pub struct UuidV7 {
    last_ms: u64,
    counter: u16,
}

impl UuidV7 {
    pub fn next(&mut self, now_ms: u64, rng: &mut Rng) -> String {
        let mut ms = now_ms.max(self.last_ms);
        if ms == self.last_ms {
            self.counter += 1;
            if self.counter > 0xfff {
                // 4096 ids in one millisecond: borrow the next one.
                ms += 1;
                self.counter = (rng.next_u64() & 0x3ff) as u16;
            }
        } else {
            // Start low in the range so the counter has room to grow.
            self.counter = (rng.next_u64() & 0x3ff) as u16;
        }
        self.last_ms = ms;
        let r = rng.next_u64();
        let hi = (ms << 16) | 0x7000 | self.counter as u64;
        let lo = (r & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format_uuid(hi, lo)
    }
}

/// A random (version 4) UUID, for anonymous and session ids.
pub fn uuid_v4(rng: &mut Rng) -> String {
    let hi = (rng.next_u64() & !0xf000) | 0x4000;
    let lo = (rng.next_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format_uuid(hi, lo)
}

fn format_uuid(hi: u64, lo: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [b'-'; 36];
    let mut at = 0;
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            at += 1;
        }
        let word = if i < 16 { hi } else { lo };
        buf[at] = HEX[((word >> (60 - (i % 16) * 4)) & 0xf) as usize];
        at += 1;
    }
    let mut s = String::with_capacity(36);
    // SAFETY: hex digits and dashes are ASCII.
    unsafe { tracklet_wire::json::push_ascii(&mut s, &buf) };
    s
}

/// Milliseconds encoded in the first 48 bits of a UUIDv7 string, if it is one.
pub fn uuid_v7_ms(id: &str) -> Option<u64> {
    let b = id.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[14] != b'7' {
        return None;
    }
    let mut ms = 0u64;
    for (i, &c) in b[..13].iter().enumerate() {
        let digit = match c {
            _ if i == 8 => continue,
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        ms = (ms << 4) | digit as u64;
    }
    Some(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_ids_are_well_formed_time_ordered_and_unique() {
        let mut rng = Rng::new(7);
        let mut gen = UuidV7::default();
        let mut ids = alloc::vec::Vec::new();
        for i in 0..10_000u64 {
            ids.push(gen.next(1_700_000_000_000 + i / 100, &mut rng));
        }
        for id in &ids {
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "7");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "ids sort in creation order");
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        assert_eq!(uuid_v7_ms(&ids[0]), Some(1_700_000_000_000));
    }

    #[test]
    fn v4_ids() {
        let mut rng = Rng::new(1);
        let id = uuid_v4(&mut rng);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, uuid_v4(&mut rng));
        assert_eq!(uuid_v7_ms(&id), None);
    }

    #[test]
    fn clock_going_backwards_keeps_order() {
        let mut rng = Rng::new(3);
        let mut gen = UuidV7::default();
        let a = gen.next(2_000, &mut rng);
        let b = gen.next(1_000, &mut rng);
        assert!(b > a);
    }

    #[test]
    fn chance_respects_rate() {
        let mut rng = Rng::new(9);
        let kept = (0..100_000).filter(|_| rng.chance(0.1)).count();
        assert!((9_000..11_000).contains(&kept), "{kept}");
        assert!(!rng.chance(0.0));
        assert!(rng.chance(1.0));
    }
}
