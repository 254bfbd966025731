//! gzip framing (RFC 1952) around miniz_oxide's DEFLATE: synchronous, so it also works
//! inside `pagehide`, where nothing asynchronous is guaranteed to finish.
//!
//! The header and the CRC are ours (18 bytes and a 16-entry table); the compressor is
//! miniz_oxide's, at level 3. Batches are compressed on the page's thread, so speed
//! counts as much as bytes: in `cargo xtask bench sdk` (2026-12-01) level 6 made 24.3 B
//! per event but a 1,000-event backlog took a 50 to 115 ms long task and `track()` ran at
//! 55,000 to 75,000 calls/s around it; level 3 makes 25.5 B per event, rarely a long task,
//! and 90,000 to 128,000 calls/s; level 1 makes 28 B per event.

use alloc::vec::Vec;

/// miniz_oxide's compression level for batches (see the module docs).
const LEVEL: u8 = 3;

/// CRC-32 (IEEE) with a 16-entry table: small code, fast enough for 60 KB batches.
pub fn crc32(data: &[u8]) -> u32 {
    const T: [u32; 16] = [
        0x00000000, 0x1db71064, 0x3b6e20c8, 0x26d930ac, 0x76dc4190, 0x6b6b51f4, 0x4db26158,
        0x5005713c, 0xedb88320, 0xf00f9344, 0xd6d6a3e8, 0xcb61b38c, 0x9b64c2b0, 0x86d3d2d4,
        0xa00ae278, 0xbdbdf21c,
    ];
    let mut c = !0u32;
    for &b in data {
        c = T[((c ^ b as u32) & 0xf) as usize] ^ (c >> 4);
        c = T[((c ^ (b as u32 >> 4)) & 0xf) as usize] ^ (c >> 4);
    }
    !c
}

/// Compresses `data` into a gzip member.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let deflated = miniz_oxide::deflate::compress_to_vec(data, LEVEL);
    let mut out = Vec::with_capacity(deflated.len() + 18);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::String;
    use proptest::prelude::*;

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        assert_eq!(&gz[..3], &[0x1f, 0x8b, 8], "gzip magic and DEFLATE");
        let body = &gz[10..gz.len() - 8];
        let inflated = miniz_oxide::inflate::decompress_to_vec(body).unwrap();
        let tail = &gz[gz.len() - 8..];
        assert_eq!(
            u32::from_le_bytes(tail[..4].try_into().unwrap()),
            crc32(&inflated)
        );
        assert_eq!(
            u32::from_le_bytes(tail[4..].try_into().unwrap()) as usize,
            inflated.len()
        );
        inflated
    }

    /// A batch as the SDK writes it: `n` events with distinct ids and a few props.
    fn batch(n: usize) -> String {
        let mut s = String::from(r#"{"sent_at":1763800000123,"events":["#);
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                r#"{{"id":"019aab3c-5d1e-7a2b-8c3d-{i:012x}","name":"Song Played","ts":{},"anonymous_id":"c0a8f3e2-1b4d-4e5f-8a9b-0c1d2e3f4a5b","session_id":"9f1e2d3c-4b5a-4968-8776-655443322110","props":{{"songId":{},"title":"Blue in Green"}},"context":{{"url":"https://example.com/music/","path":"/music/","sdk":"tracklet/0.2.0"}}}}"#,
                1763800000000u64 + i as u64 * 37,
                i % 7
            ));
        }
        s.push_str("]}");
        s
    }

    #[test]
    fn crc_matches_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf43926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn output_is_a_gzip_member_that_inflates_back() {
        for text in [
            Vec::new(),
            b"x".to_vec(),
            batch(1).into_bytes(),
            batch(50).into_bytes(),
        ] {
            assert_eq!(gunzip(&gzip(&text)), text);
        }
    }

    /// What the SDK relies on for its request budget: a batch of events shrinks by at
    /// least 4x (the core halves a batch until its gzip body fits 60 KB; a 1,000-event
    /// backlog must fit in a few requests, not hundreds).
    #[test]
    fn batches_compress_well() {
        for n in [5, 50, 1000] {
            let text = batch(n);
            let gz = gzip(text.as_bytes());
            assert!(
                gz.len() * 4 < text.len(),
                "{n} events: {} -> {} bytes",
                text.len(),
                gz.len()
            );
        }
        // 1,000 events fit under the 60 KB request cap.
        assert!(gzip(batch(1000).as_bytes()).len() < tracklet_wire::SDK_MAX_REQUEST_BYTES);
    }

    proptest! {
        #[test]
        fn round_trips_anything(data in proptest::collection::vec(any::<u8>(), 0..5_000)) {
            prop_assert_eq!(gunzip(&gzip(&data)), data);
        }
    }
}
