//! A small DEFLATE encoder (RFC 1951): LZ77 with hash chains and lazy matching, one block
//! with a Huffman code made for the data (never the fixed code: on JSON the made code
//! wins even for one event, and leaving the fixed code out saved 360 B of the gzipped
//! module). About 4 KB of wasm where miniz_oxide's compressor costs 12 KB gzipped;
//! on Tracklet's batches (repetitive JSON) it compresses within about 15 % of miniz's
//! level 6, measured by `ratio_is_close_to_miniz` below. Synchronous, so it works inside
//! `pagehide`.

use alloc::vec;
use alloc::vec::Vec;

const WINDOW: usize = 1 << 15;
const HASH_BITS: u32 = 13;
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
/// Candidates tried per position: enough for JSON, where the best match is usually the
/// same key of the previous event.
const MAX_CHAIN: usize = 24;
const NONE: u32 = u32::MAX;

/// Writes bits least-significant first, as DEFLATE wants.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, bits: u32) {
        self.acc |= (value as u64) << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code: written most-significant bit first.
    fn code(&mut self, code: u32, bits: u32) {
        self.put(code.reverse_bits() >> (32 - bits), bits);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// The symbol (257..=285) of a match length (3..=258), with its extra bits: (symbol,
/// how many extra bits, their value). Computed rather than looked up (RFC 1951, 3.2.5:
/// four symbols per power of two); the tests check it against the RFC's table.
fn len_code(len: usize) -> (usize, u32, u32) {
    let l = len - 3;
    if len == 258 {
        return (285, 0, 0);
    }
    if l < 8 {
        return (257 + l, 0, 0);
    }
    let log = usize::BITS - 1 - l.leading_zeros();
    let extra = log - 2;
    let symbol = 253 + 4 * log as usize + ((l >> extra) & 3);
    (symbol, extra, (l & ((1 << extra) - 1)) as u32)
}

/// The code (0..=29) of a match distance (1..=32768), with its extra bits, as
/// [`len_code`] (two codes per power of two).
fn dist_code(dist: usize) -> (usize, u32, u32) {
    let d = dist - 1;
    if d < 4 {
        return (d, 0, 0);
    }
    let log = usize::BITS - 1 - d.leading_zeros();
    let extra = log - 1;
    let code = 2 * log as usize + ((d >> extra) & 1);
    (code, extra, (d & ((1 << extra) - 1)) as u32)
}

fn hash(d: &[u8], i: usize) -> usize {
    let v = (d[i] as u32) | (d[i + 1] as u32) << 8 | (d[i + 2] as u32) << 16;
    (v.wrapping_mul(0x9e37_79b1) >> (32 - HASH_BITS)) as usize
}

/// An LZ77 token: a literal byte, or a match of `len` bytes `dist` back.
#[derive(Clone, Copy)]
enum Token {
    Literal(u8),
    Match { len: u16, dist: u16 },
}

/// The longest earlier match for position `i`: (length, distance), length 0 for none.
fn longest(data: &[u8], head: &[u32], prev: &[u32], i: usize) -> (usize, usize) {
    let (mut best_len, mut best_dist) = (0, 0);
    if i + MIN_MATCH > data.len() {
        return (0, 0);
    }
    let max = (data.len() - i).min(MAX_MATCH);
    let mut cand = head[hash(data, i)];
    let mut chain = MAX_CHAIN;
    while cand != NONE && chain > 0 {
        let c = cand as usize;
        if c >= i || i - c > WINDOW - 1 {
            break;
        }
        let probe = best_len.min(max - 1);
        if data[c + probe] == data[i + probe] {
            let mut len = 0;
            while len < max && data[c + len] == data[i + len] {
                len += 1;
            }
            if len > best_len {
                best_len = len;
                best_dist = i - c;
                if len == max {
                    break;
                }
            }
        }
        let next = prev[c % WINDOW];
        // Chains only go back in time; anything else is a stale slot.
        if next == NONE || next as usize >= c {
            break;
        }
        cand = next;
        chain -= 1;
    }
    (best_len, best_dist)
}

/// LZ77 with hash chains and one step of lazy matching (a literal, then a longer match at
/// the next byte, beats a shorter match now).
fn tokenize(data: &[u8]) -> Vec<Token> {
    let mut tokens = Vec::with_capacity(data.len() / 3);
    let mut head = vec![NONE; 1 << HASH_BITS];
    let mut prev = vec![NONE; WINDOW];
    let insert = |head: &mut [u32], prev: &mut [u32], i: usize| {
        if i + MIN_MATCH <= data.len() {
            let h = hash(data, i);
            prev[i % WINDOW] = head[h];
            head[h] = i as u32;
        }
    };
    let mut i = 0;
    while i < data.len() {
        let (len, dist) = longest(data, &head, &prev, i);
        insert(&mut head, &mut prev, i);
        if len >= MIN_MATCH {
            let (next_len, _) = if len < 32 {
                longest(data, &head, &prev, i + 1)
            } else {
                (0, 0)
            };
            if next_len > len {
                tokens.push(Token::Literal(data[i]));
                i += 1;
                continue;
            }
            tokens.push(Token::Match {
                len: len as u16,
                dist: dist as u16,
            });
            for j in i + 1..i + len {
                insert(&mut head, &mut prev, j);
            }
            i += len;
        } else {
            tokens.push(Token::Literal(data[i]));
            i += 1;
        }
    }
    tokens
}

/// Huffman code lengths for `freq`, none longer than `limit` (frequencies are scaled
/// down until the tree fits: simple, and near optimal for the shallow trees DEFLATE allows).
/// At most `1 << limit` symbols may occur (DEFLATE has 286 within 15 bits, 19 within 7).
fn code_lengths(freq: &[u32], limit: u8) -> Vec<u8> {
    let n = freq.len();
    let mut lens = vec![0u8; n];
    let mut scale = 0;
    loop {
        // Nodes: the symbols first (weight 0: unused), then the tree's inner nodes, each
        // made after its two children.
        let mut weight: Vec<u32> = Vec::with_capacity(2 * n);
        let mut live: Vec<u32> = Vec::new();
        for (sym, &f) in freq.iter().enumerate() {
            weight.push(if f == 0 { 0 } else { (f >> scale) | 1 });
            if f > 0 {
                live.push(sym as u32);
            }
        }
        if live.len() < 2 {
            for &sym in &live {
                lens[sym as usize] = 1;
            }
            return lens;
        }
        let mut parent = vec![0u32; 2 * n];
        while live.len() > 1 {
            let node = weight.len() as u32;
            let mut sum = 0;
            for _ in 0..2 {
                // The lightest live node, by linear search: at most 286 symbols, and no
                // sort routine in the wasm.
                let mut at = 0;
                for k in 1..live.len() {
                    if weight[live[k] as usize] < weight[live[at] as usize] {
                        at = k;
                    }
                }
                let lightest = live.swap_remove(at) as usize;
                parent[lightest] = node;
                sum += weight[lightest];
            }
            weight.push(sum);
            live.push(node);
        }
        // Depths from the root (the last node) down: a parent comes after its children.
        let mut depth = vec![0u8; weight.len()];
        let mut max = 0;
        for i in (0..weight.len() - 1).rev() {
            if weight[i] > 0 {
                depth[i] = depth[parent[i] as usize] + 1;
            }
            if i < n {
                lens[i] = depth[i];
                max = max.max(depth[i]);
            }
        }
        if max <= limit {
            return lens;
        }
        scale += 1;
    }
}

/// Canonical codes for code lengths (RFC 1951, 3.2.2).
fn canonical(lens: &[u8]) -> Vec<u32> {
    let mut count = [0u32; 16];
    for &l in lens {
        count[l as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u32; 16];
    let mut code = 0;
    for bits in 1..16 {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    let mut codes = Vec::with_capacity(lens.len());
    for &l in lens {
        let c = next[l as usize];
        next[l as usize] += 1;
        codes.push(c);
    }
    codes
}

/// Run-length codes of a code-length sequence: (symbol 0..=18, extra bits value).
fn rle(lens: &[u8]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let l = lens[i];
        let run = lens[i..].iter().take_while(|&&x| x == l).count();
        if l == 0 && run >= 3 {
            let n = run.min(138);
            out.push(if n <= 10 {
                (17, (n - 3) as u8)
            } else {
                (18, (n - 11) as u8)
            });
            i += n;
        } else if l != 0 && run >= 4 {
            out.push((l, 0));
            let n = (run - 1).min(6);
            out.push((16, (n - 3) as u8));
            i += 1 + n;
        } else {
            out.push((l, 0));
            i += 1;
        }
    }
    out
}

const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// One final block of `tokens` with the given code lengths; `header` writes what comes
/// between the block type and the data.
fn block(
    tokens: &[Token],
    lit_lens: &[u8],
    dist_lens: &[u8],
    header: impl FnOnce(&mut Bits),
) -> Vec<u8> {
    let mut bits = Bits {
        out: Vec::with_capacity(tokens.len()),
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // BFINAL
    bits.put(2, 2); // BTYPE: dynamic Huffman codes
    header(&mut bits);
    let (lit_codes, dist_codes) = (canonical(lit_lens), canonical(dist_lens));
    let sym = |bits: &mut Bits, s: usize| bits.code(lit_codes[s], lit_lens[s] as u32);
    for t in tokens {
        match *t {
            Token::Literal(b) => sym(&mut bits, b as usize),
            Token::Match { len, dist } => {
                let (len, dist) = (len as usize, dist as usize);
                let (l, extra, value) = len_code(len);
                sym(&mut bits, l);
                bits.put(value, extra);
                let (d, extra, value) = dist_code(dist);
                bits.code(dist_codes[d], dist_lens[d] as u32);
                bits.put(value, extra);
            }
        }
    }
    sym(&mut bits, 256);
    bits.finish()
}

/// Raw DEFLATE of `data` (no zlib or gzip framing): one block, with a code made for it.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let tokens = tokenize(data);
    let mut lit_freq = vec![0u32; 286];
    let mut dist_freq = vec![0u32; 30];
    lit_freq[256] = 1;
    for t in &tokens {
        match *t {
            Token::Literal(b) => lit_freq[b as usize] += 1,
            Token::Match { len, dist } => {
                lit_freq[len_code(len as usize).0] += 1;
                dist_freq[dist_code(dist as usize).0] += 1;
            }
        }
    }
    let lit_lens = code_lengths(&lit_freq, 15);
    let mut dist_lens = code_lengths(&dist_freq, 15);
    if dist_lens.iter().all(|&l| l == 0) {
        dist_lens[0] = 1; // at least one distance code must be described
    }
    let hlit = 257.max(lit_lens.iter().rposition(|&l| l > 0).map_or(0, |p| p + 1));
    let hdist = 1.max(dist_lens.iter().rposition(|&l| l > 0).map_or(0, |p| p + 1));
    let mut all = lit_lens[..hlit].to_vec();
    all.extend_from_slice(&dist_lens[..hdist]);
    let runs = rle(&all);
    let mut cl_freq = vec![0u32; 19];
    for &(s, _) in &runs {
        cl_freq[s as usize] += 1;
    }
    let cl_lens = code_lengths(&cl_freq, 7);
    let cl_codes = canonical(&cl_lens);
    let hclen = 4.max(
        CL_ORDER
            .iter()
            .rposition(|&s| cl_lens[s] > 0)
            .map_or(0, |p| p + 1),
    );
    block(&tokens, &lit_lens, &dist_lens, |bits| {
        bits.put((hlit - 257) as u32, 5);
        bits.put((hdist - 1) as u32, 5);
        bits.put((hclen - 4) as u32, 4);
        for &s in &CL_ORDER[..hclen] {
            bits.put(cl_lens[s] as u32, 3);
        }
        for &(s, extra) in &runs {
            bits.code(cl_codes[s as usize], cl_lens[s as usize] as u32);
            match s {
                16 => bits.put(extra as u32, 2),
                17 => bits.put(extra as u32, 3),
                18 => bits.put(extra as u32, 7),
                _ => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Rng;
    use alloc::format;
    use alloc::string::String;
    use proptest::prelude::*;

    /// Base lengths of codes 257..=285, and their extra bits.
    const LEN_BASE: [u16; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const LEN_EXTRA: [u8; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    /// Base distances of codes 0..=29, and their extra bits.
    const DIST_BASE: [u16; 30] = [
        1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
        2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
    ];
    const DIST_EXTRA: [u8; 30] = [
        0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
        13, 13,
    ];

    #[test]
    fn length_and_distance_codes_match_the_rfc_tables() {
        // The last table entry whose base is at most `v`.
        let slot = |base: &[u16], v: usize| base.iter().rposition(|&b| b as usize <= v).unwrap();
        for len in 3..=258 {
            let l = slot(&LEN_BASE, len);
            let want = (
                257 + l,
                LEN_EXTRA[l] as u32,
                (len - LEN_BASE[l] as usize) as u32,
            );
            assert_eq!(len_code(len), want, "length {len}");
        }
        for dist in 1..=32768 {
            let d = slot(&DIST_BASE, dist);
            let want = (
                d,
                DIST_EXTRA[d] as u32,
                (dist - DIST_BASE[d] as usize) as u32,
            );
            assert_eq!(dist_code(dist), want, "distance {dist}");
        }
    }

    fn inflate(d: &[u8]) -> Vec<u8> {
        miniz_oxide::inflate::decompress_to_vec(d).expect("valid deflate")
    }

    #[test]
    fn round_trips_edge_cases() {
        let long_run = vec![b'a'; 100_000];
        let mut rng = Rng::new(1);
        let noise: Vec<u8> = (0..70_000).map(|_| rng.next_u64() as u8).collect();
        let mut far = noise[..40_000].to_vec();
        far.extend_from_slice(&noise[..1_000]); // a repeat beyond the window
        for case in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcabcabcabc",
            &long_run,
            &noise,
            &far,
        ] {
            assert_eq!(inflate(&deflate(case)), case, "len {}", case.len());
        }
        assert!(deflate(&long_run).len() < 1_000);
    }

    #[test]
    fn ratio_is_close_to_miniz() {
        let mut json = String::from("{\"sent_at\":1763800000000,\"events\":[");
        for i in 0..50 {
            json.push_str(&format!(
                "{{\"id\":\"019aab3c-5d1e-7a2b-8c3d-4e5f607{i:05}\",\"name\":\"Song Played\",\"ts\":17638000{i:05},\
                 \"anonymous_id\":\"c0a8f1e2-3b4c-4d5e-8f70-123456789abc\",\"session_id\":\"9f1e2d3c-4b5a-4c6d-8e7f-abcdef012345\",\
                 \"props\":{{\"songId\":{i},\"title\":\"Song {i}\",\"duration\":180,\"seq\":{i}}},\
                 \"context\":{{\"url\":\"http://127.0.0.1:8080/music/\",\"path\":\"/music/\",\"screen\":\"1920x1080\",\
                 \"viewport\":\"1280x720\",\"language\":\"en-US\",\"timezone\":\"Europe/Paris\",\"sdk\":\"tracklet/0.1.0\"}}}},"
            ));
        }
        json.push_str("]}");
        let ours = deflate(json.as_bytes()).len();
        let miniz = miniz_oxide::deflate::compress_to_vec(json.as_bytes(), 6).len();
        assert_eq!(inflate(&deflate(json.as_bytes())), json.as_bytes());
        assert!(ours * 100 <= miniz * 110, "ours {ours} B, miniz {miniz} B");
        extern crate std;
        std::eprintln!("deflate: ours {ours} B, miniz level 6 {miniz} B");
    }

    proptest! {
        /// Lengths are a complete or incomplete prefix code (Kraft sum at most 1), within
        /// the limit, for exactly the symbols that occur, however skewed the counts.
        #[test]
        fn code_lengths_are_a_prefix_code_within_the_limit(
            freq in proptest::collection::vec(prop_oneof![Just(0u32), 1u32..4, 1u32..1_000_000], 1..300),
            limit in 9u8..=15,
            short in any::<bool>(),
        ) {
            // DEFLATE's two cases: up to 286 symbols within 15 bits, 19 within 7 bits (any
            // limit above log2 of the symbol count works).
            let (freq, limit) = if short { (&freq[..freq.len().min(19)], 7) } else { (&freq[..], limit) };
            let lens = code_lengths(freq, limit);
            let used = freq.iter().filter(|&&f| f > 0).count();
            let mut kraft = 0u64;
            for (&f, &l) in freq.iter().zip(&lens) {
                prop_assert_eq!(f > 0, l > 0);
                prop_assert!(l <= limit);
                if l > 0 {
                    kraft += 1 << (15 - l);
                }
            }
            prop_assert!(kraft <= 1 << 15);
            if used >= 2 {
                // Two symbols or more: a full tree (Kraft sum exactly 1).
                prop_assert_eq!(kraft, 1 << 15);
            }
        }
    }

    proptest! {
        #[test]
        fn round_trips_anything(data in proptest::collection::vec(any::<u8>(), 0..5_000), alphabet in 1u8..8) {
            // Small alphabets make long, overlapping matches; the raw bytes make literals.
            let squeezed: Vec<u8> = data.iter().map(|b| b % alphabet).collect();
            prop_assert_eq!(inflate(&deflate(&squeezed)), squeezed);
            prop_assert_eq!(inflate(&deflate(&data)), data);
        }
    }
}
