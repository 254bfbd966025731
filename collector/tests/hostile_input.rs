//! Fuzz-style property tests of the request path's pure stages (decode -> parse ->
//! validate) on stable Rust: arbitrary bytes, and valid batches (plain or gzip) with random
//! bytes changed, must never panic, never inflate past the cap, and account for every event.

use bytes::Bytes;
use flate2::write::GzEncoder;
use proptest::prelude::*;
use std::io::Write;
use tracklet_collector::decode::{decompress, decompressed_limit, parse_envelope, Encoding};
use tracklet_collector::validate::validate_batch;
use tracklet_wire::json::{BatchJson, EventJson};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn valid_batch(n: usize, name: &str) -> Vec<u8> {
    let mut batch = BatchJson::new(1_763_800_000_000, 0);
    for i in 0..n {
        let mut e = String::new();
        let id = format!("0190b6f0-0000-7000-8000-{i:012}");
        EventJson {
            id: &id,
            name,
            ts: 1_763_800_000_000 + i as u64,
            anonymous_id: "anon",
            session_id: "sess",
            user_id: None,
            props: Some(r#"{"k":[1,2,{"x":"y"}]}"#),
            context: Some(r#"{"path":"/"}"#),
        }
        .write(&mut e);
        batch.push_raw_event(&e);
    }
    batch.finish().into_bytes()
}

/// Runs the pure stages; returns (events in the envelope, valid, rejected) when it parsed.
fn pipeline(body: Vec<u8>) -> Option<(usize, usize, usize)> {
    let compressed_len = body.len();
    let json = match decompress(Bytes::from(body), Encoding::Sniff) {
        Ok(json) => json,
        Err(_) => return None,
    };
    assert!(json.len() <= decompressed_limit(compressed_len).max(compressed_len));
    let envelope = parse_envelope(&json).ok()?;
    let checked = validate_batch(&envelope.events);
    Some((
        envelope.events.len(),
        checked.valid.len(),
        checked.rejected.len(),
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..4096), gz in any::<bool>()) {
        let body = if gz { gzip(&body) } else { body };
        if let Some((n, valid, rejected)) = pipeline(body) {
            prop_assert_eq!(valid + rejected, n);
        }
    }

    #[test]
    fn mutated_batches_never_panic_and_account_for_every_event(
        n in 1usize..20,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        gz in any::<bool>(),
        name in "\\PC{1,40}",
    ) {
        let mut body = valid_batch(n, &name);
        prop_assert_eq!(pipeline(body.clone()), Some((n, n, 0)), "the unmutated batch is all valid");
        if gz {
            body = gzip(&body);
        }
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        if let Some((n, valid, rejected)) = pipeline(body) {
            prop_assert_eq!(valid + rejected, n);
        }
    }
}
