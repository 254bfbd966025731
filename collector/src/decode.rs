//! Turns a request body into a batch envelope, with every byte bounded.
//!
//! Reads the (compressed) body under a size cap and a deadline, sniffs gzip by its magic
//! bytes (the SDK sends gzip as `text/plain` with no `Content-Encoding`), inflates while
//! counting so a gzip bomb costs at most the cap, then parses the envelope with raw events.
//! A batch status query goes through the same steps under much smaller caps.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracklet_wire::types::{BatchEnvelope, BatchStatusRequest};
use uuid::Uuid;

use crate::limits::{
    MAX_BATCH_IDS_PER_QUERY, MAX_DECOMPRESSED_BYTES, MAX_DECOMPRESSION_RATIO, MAX_EVENTS_PER_BATCH,
    RATIO_FREE_DECOMPRESSED_BYTES,
};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("decompressed body larger than {limit} bytes")]
    DecompressedTooLarge { limit: usize },
    #[error("{count} events in one batch; at most {max} allowed", max = MAX_EVENTS_PER_BATCH)]
    TooManyEvents { count: usize },
    #[error("{count} batch ids in one query; at most {max} allowed", max = MAX_BATCH_IDS_PER_QUERY)]
    TooManyBatchIds { count: usize },
    #[error("request body not received in time")]
    Timeout,
    #[error("unsupported content encoding {0:?} (use gzip or none)")]
    UnsupportedEncoding(String),
    #[error("invalid gzip data: {0}")]
    InvalidGzip(String),
    #[error("body is not valid UTF-8")]
    InvalidUtf8,
    #[error("malformed batch: {0}")]
    Malformed(String),
    #[error("malformed batch status query: {0}")]
    MalformedQuery(String),
    #[error("could not read request body: {0}")]
    BodyRead(String),
    /// The collector's memory for request bodies is taken by other requests (a server-side
    /// condition: 503, retry later).
    #[error("too many large batches in progress; retry later")]
    MemoryBusy,
}

/// The memory all requests' bodies may hold at once, compressed and inflated, in bytes.
///
/// A request takes its share as its body arrives and as it inflates ([`Held`]), and gives it
/// back when its body is dropped, so the collector's memory is bounded by bytes actually
/// held, whatever mix of slow, large or compressed-bomb bodies arrives; a request that would
/// go past the budget gets 503. One project may hold at most half of it, so a write key
/// (which every page carries) cannot take the memory every other project needs.
#[derive(Clone, Debug)]
pub struct BodyMemory {
    budget: Arc<Semaphore>,
    total: usize,
    per_project: Arc<Mutex<HashMap<Uuid, Arc<Semaphore>>>>,
}

impl BodyMemory {
    pub fn new(bytes: usize) -> BodyMemory {
        let total = bytes.clamp(2, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        BodyMemory {
            budget: Arc::new(Semaphore::new(total)),
            total,
            per_project: Arc::default(),
        }
    }

    /// A share of nothing yet for a request of `project`, to grow as its body arrives.
    pub fn hold(&self, project: Uuid) -> Held {
        let project_budget = {
            let mut map = self
                .per_project
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            map.entry(project)
                .or_insert_with(|| Arc::new(Semaphore::new(self.total / 2)))
                .clone()
        };
        Held {
            budgets: [self.budget.clone(), project_budget],
            permits: [None, None],
        }
    }

    /// Bytes currently held by requests.
    pub fn in_use(&self) -> usize {
        self.total - self.budget.available_permits()
    }
}

/// One request's share of [`BodyMemory`] (of the whole and of its project's half); returned
/// when dropped.
#[derive(Debug)]
pub struct Held {
    budgets: [Arc<Semaphore>; 2],
    permits: [Option<OwnedSemaphorePermit>; 2],
}

impl Held {
    /// A share with no limit (tools and tests that decode outside a server).
    pub fn unbounded() -> Held {
        BodyMemory::new(usize::MAX).hold(Uuid::nil())
    }

    /// Grows the share to `bytes` in total, or fails without waiting.
    fn grow_to(&mut self, bytes: usize) -> Result<(), DecodeError> {
        let have = self.permits[0].as_ref().map_or(0, |p| p.num_permits());
        if bytes <= have {
            return Ok(());
        }
        let more = u32::try_from(bytes - have).map_err(|_| DecodeError::MemoryBusy)?;
        let mut taken = [None, None];
        for (budget, slot) in self.budgets.iter().zip(&mut taken) {
            let permit = budget
                .clone()
                .try_acquire_many_owned(more)
                .map_err(|_| DecodeError::MemoryBusy)?;
            *slot = Some(permit);
        }
        for (held, new) in self.permits.iter_mut().zip(taken) {
            match (held.as_mut(), new) {
                (Some(held), Some(new)) => held.merge(new),
                (None, new) => *held = new,
                (Some(_), None) => {}
            }
        }
        Ok(())
    }
}

/// How the body is compressed, from the `Content-Encoding` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    /// No header (or `identity`): gzip is still detected by its magic bytes.
    Sniff,
}

impl Encoding {
    pub fn from_header(value: Option<&str>) -> Result<Encoding, DecodeError> {
        match value.map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(Encoding::Sniff),
            Some(v) if v.is_empty() || v == "identity" => Ok(Encoding::Sniff),
            Some(v) if v == "gzip" || v == "x-gzip" => Ok(Encoding::Gzip),
            Some(v) => Err(DecodeError::UnsupportedEncoding(v)),
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes
/// ([`crate::limits::MAX_BODY_BYTES`] for a batch) or taking longer than `timeout`. A
/// `Content-Length` above the cap is refused before reading anything. The buffer is counted
/// in `held` as it grows.
pub async fn read_body(
    body: Body,
    content_length: Option<u64>,
    limit: usize,
    timeout: Duration,
    held: &mut Held,
) -> Result<Bytes, DecodeError> {
    if content_length.is_some_and(|len| len > limit as u64) {
        return Err(DecodeError::BodyTooLarge { limit });
    }
    let read = async move {
        let mut body = body;
        let mut buf = BytesMut::new();
        if let Some(len) = content_length {
            held.grow_to(len as usize)?;
            buf.reserve(len as usize);
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| DecodeError::BodyRead(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                let needed = buf.len() + data.len();
                if needed > limit {
                    return Err(DecodeError::BodyTooLarge { limit });
                }
                if needed > buf.capacity() {
                    let grown = needed.max(buf.capacity() * 2).min(limit);
                    held.grow_to(grown)?;
                    buf.reserve(grown - buf.len());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| DecodeError::Timeout)?
}

/// Most decompressed bytes allowed for `compressed_len` input bytes.
pub fn decompressed_limit(compressed_len: usize) -> usize {
    compressed_len
        .saturating_mul(MAX_DECOMPRESSION_RATIO)
        .clamp(RATIO_FREE_DECOMPRESSED_BYTES, MAX_DECOMPRESSED_BYTES)
}

/// The JSON text of a batch body: inflated when gzip (by header or magic bytes), else as is;
/// inflated output is capped by [`decompressed_limit`]. Not counted in any budget.
pub fn decompress(raw: Bytes, encoding: Encoding) -> Result<Bytes, DecodeError> {
    let limit = decompressed_limit(raw.len());
    decompress_capped(raw, encoding, limit, &mut Held::unbounded())
}

/// [`decompress`] with the inflated output capped at `limit` bytes, its buffer counted in
/// `held` (on top of the compressed body's bytes) as it grows.
pub fn decompress_capped(
    raw: Bytes,
    encoding: Encoding,
    limit: usize,
    held: &mut Held,
) -> Result<Bytes, DecodeError> {
    let is_gzip = encoding == Encoding::Gzip || raw.starts_with(&GZIP_MAGIC);
    if !is_gzip {
        return Ok(raw);
    }
    // Inflate straight into the output, growing it (and the share of memory) step by step,
    // never more than one byte past the cap: a gzip bomb costs at most the cap, and a large
    // body costs only what it really inflates to.
    let mut decoder = flate2::bufread::MultiGzDecoder::new(&raw[..]);
    let mut out = Vec::new();
    let mut goal = (64 * 1024).min(limit + 1);
    loop {
        held.grow_to(raw.len() + goal)?;
        out.reserve_exact(goal - out.len());
        let room = (goal - out.len()) as u64;
        (&mut decoder)
            .take(room)
            .read_to_end(&mut out)
            .map_err(|e| DecodeError::InvalidGzip(e.to_string()))?;
        if out.len() > limit {
            return Err(DecodeError::DecompressedTooLarge { limit });
        }
        if out.len() < goal {
            return Ok(Bytes::from(out));
        }
        goal = (goal * 2).min(limit + 1);
    }
}

/// Parses UTF-8 JSON text; a parse error becomes `malformed(message)`.
fn parse_json<'a, T: serde::Deserialize<'a>>(
    json: &'a [u8],
    malformed: fn(String) -> DecodeError,
) -> Result<T, DecodeError> {
    let text = std::str::from_utf8(json).map_err(|_| DecodeError::InvalidUtf8)?;
    serde_json::from_str(text).map_err(|e| malformed(e.to_string()))
}

/// Parses the envelope, keeping each event as raw JSON (decoded one by one later).
pub fn parse_envelope(json: &[u8]) -> Result<BatchEnvelope<'_>, DecodeError> {
    let envelope: BatchEnvelope = parse_json(json, DecodeError::Malformed)?;
    // The event list keeps at most the cap while parsing and counts the rest (see
    // `tracklet_wire::types::Events`): an oversized list costs no memory before this refusal.
    if envelope.events.total() > MAX_EVENTS_PER_BATCH {
        return Err(DecodeError::TooManyEvents {
            count: envelope.events.total(),
        });
    }
    Ok(envelope)
}

/// Parses a batch status query `{"batch_ids": [...]}` (unknown fields ignored); more than
/// [`MAX_BATCH_IDS_PER_QUERY`] ids is [`DecodeError::TooManyBatchIds`].
pub fn parse_status_request(json: &[u8]) -> Result<BatchStatusRequest, DecodeError> {
    let query: BatchStatusRequest = parse_json(json, DecodeError::MalformedQuery)?;
    if query.batch_ids.len() > MAX_BATCH_IDS_PER_QUERY {
        return Err(DecodeError::TooManyBatchIds {
            count: query.batch_ids.len(),
        });
    }
    Ok(query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_BODY_BYTES;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Bytes {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        Bytes::from(enc.finish().unwrap())
    }

    #[test]
    fn gzip_is_sniffed_without_header() {
        let body = gzip(br#"{"sent_at":1,"events":[]}"#);
        let out = decompress(body, Encoding::Sniff).unwrap();
        assert_eq!(&out[..], br#"{"sent_at":1,"events":[]}"#);
    }

    #[test]
    fn plain_body_passes_through() {
        let out = decompress(Bytes::from_static(b"{}"), Encoding::Sniff).unwrap();
        assert_eq!(&out[..], b"{}");
    }

    #[test]
    fn gzip_bomb_stops_at_the_ratio_cap() {
        // 50 MiB of zeros compresses to ~50 KiB: far beyond both caps.
        let bomb = gzip(&vec![0u8; 50 * 1024 * 1024]);
        let limit = decompressed_limit(bomb.len());
        assert!(limit < MAX_DECOMPRESSED_BYTES);
        assert!(matches!(
            decompress(bomb, Encoding::Sniff),
            Err(DecodeError::DecompressedTooLarge { .. })
        ));
    }

    #[test]
    fn decompressed_limit_is_ratio_bounded_and_capped() {
        assert_eq!(decompressed_limit(10), RATIO_FREE_DECOMPRESSED_BYTES);
        assert_eq!(decompressed_limit(20_000), 2_000_000);
        assert_eq!(decompressed_limit(MAX_BODY_BYTES), MAX_DECOMPRESSED_BYTES);
    }

    #[test]
    fn header_gzip_with_garbage_is_invalid() {
        assert!(matches!(
            decompress(Bytes::from_static(b"not gzip"), Encoding::Gzip),
            Err(DecodeError::InvalidGzip(_))
        ));
    }

    #[test]
    fn encodings_other_than_gzip_are_unsupported() {
        assert!(matches!(
            Encoding::from_header(Some("br")),
            Err(DecodeError::UnsupportedEncoding(_))
        ));
        assert_eq!(Encoding::from_header(Some("GZIP")).unwrap(), Encoding::Gzip);
        assert_eq!(Encoding::from_header(None).unwrap(), Encoding::Sniff);
    }

    #[test]
    fn envelope_caps_event_count() {
        let events = vec!["{}"; MAX_EVENTS_PER_BATCH + 1].join(",");
        let body = format!(r#"{{"sent_at":1,"events":[{events}]}}"#);
        assert!(matches!(
            parse_envelope(body.as_bytes()),
            Err(DecodeError::TooManyEvents { .. })
        ));
    }

    #[test]
    fn envelope_rejects_bad_utf8_and_types() {
        assert!(matches!(
            parse_envelope(b"{\"sent_at\":1,\"events\":[\"\xff\"]}"),
            Err(DecodeError::InvalidUtf8)
        ));
        assert!(matches!(
            parse_envelope(br#"{"sent_at":"x","events":[]}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            parse_envelope(br#"{"events":[]}"#),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn status_query_is_checked_and_capped() {
        let q = parse_status_request(br#"{"batch_ids":["a","b"]}"#).unwrap();
        assert_eq!(q.batch_ids, ["a", "b"]);
        for bad in [
            &b"{"[..],
            br#"{"batch_ids":"a"}"#,
            br#"{"batch_ids":[1]}"#,
            br#"{"ids":["a"]}"#,
            br#"["a"]"#,
        ] {
            assert!(
                matches!(
                    parse_status_request(bad),
                    Err(DecodeError::MalformedQuery(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse_status_request(b"{\"batch_ids\":[\"\xff\"]}"),
            Err(DecodeError::InvalidUtf8)
        ));
        let ids = vec!["\"x\""; MAX_BATCH_IDS_PER_QUERY + 1].join(",");
        assert!(matches!(
            parse_status_request(format!(r#"{{"batch_ids":[{ids}]}}"#).as_bytes()),
            Err(DecodeError::TooManyBatchIds { count: 101 })
        ));
    }

    #[test]
    fn capped_decompression_refuses_more_than_the_cap() {
        let body = gzip(&vec![b' '; 20_000]);
        assert!(matches!(
            decompress_capped(
                body.clone(),
                Encoding::Sniff,
                16 * 1024,
                &mut Held::unbounded()
            ),
            Err(DecodeError::DecompressedTooLarge { limit: 16384 })
        ));
        assert_eq!(
            decompress_capped(body, Encoding::Sniff, 20_000, &mut Held::unbounded())
                .unwrap()
                .len(),
            20_000
        );
    }

    #[test]
    fn inflating_counts_against_the_shared_body_memory() {
        let body = gzip(&vec![b' '; 1024 * 1024]);
        let memory = BodyMemory::new(1024 * 1024);
        let mut held = memory.hold(Uuid::nil());
        assert!(matches!(
            decompress_capped(body.clone(), Encoding::Sniff, 2 << 20, &mut held),
            Err(DecodeError::MemoryBusy)
        ));
        assert!(memory.in_use() > 0);
        drop(held);
        assert_eq!(
            memory.in_use(),
            0,
            "a request's share is returned when it ends"
        );
        let memory = BodyMemory::new(8 << 20);
        let mut held = memory.hold(Uuid::nil());
        let out = decompress_capped(body, Encoding::Sniff, 2 << 20, &mut held).unwrap();
        assert_eq!(out.len(), 1024 * 1024);
        assert!(memory.in_use() >= out.len() && memory.in_use() <= 2 * out.len() + 64 * 1024);
        // Another project still has its half while this one holds its own.
        let mut other = memory.hold(Uuid::from_u128(7));
        other.grow_to(2 << 20).unwrap();
        let mut same = memory.hold(Uuid::nil());
        assert!(matches!(
            same.grow_to(2 << 20),
            Err(DecodeError::MemoryBusy)
        ));
    }
}
