//! gzip framing (RFC 1952) around [`crate::deflate`]: synchronous, so it also works inside
//! `pagehide`, where nothing asynchronous is guaranteed to finish.

use alloc::vec::Vec;

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
    let deflated = crate::deflate::deflate(data);
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

    #[test]
    fn crc_matches_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf43926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn output_is_a_gzip_member_that_inflates_back() {
        let text =
            br#"{"sent_at":1,"events":[{"name":"Song Played"},{"name":"Song Played"}]}"#.repeat(50);
        let gz = gzip(&text);
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        assert!(gz.len() < text.len() / 5);
        let body = &gz[10..gz.len() - 8];
        let inflated = miniz_oxide::inflate::decompress_to_vec(body).unwrap();
        assert_eq!(inflated, text);
        let tail = &gz[gz.len() - 8..];
        assert_eq!(
            u32::from_le_bytes(tail[..4].try_into().unwrap()),
            crc32(&text)
        );
        assert_eq!(
            u32::from_le_bytes(tail[4..].try_into().unwrap()) as usize,
            text.len()
        );
    }
}
