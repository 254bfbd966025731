//! Every cap the collector applies to untrusted input, in one place.
//!
//! The wire crate owns the limits the SDK must know about; this module re-exports them and
//! adds the collector's own, so a reviewer can audit all bounds at a glance.

use std::time::Duration;

pub use tracklet_wire::{
    MAX_BATCH_IDS_PER_QUERY, MAX_BATCH_ID_LEN, MAX_BATCH_STATUS_BODY_BYTES, MAX_BODY_BYTES,
    MAX_DECOMPRESSED_BYTES, MAX_EVENTS_PER_BATCH, MAX_EVENT_BYTES, MAX_NAME_LEN,
};

/// Beyond this much decompressed output, the output may be at most
/// [`MAX_DECOMPRESSION_RATIO`] times the compressed input (gzip bombs reach 1000:1).
pub const RATIO_FREE_DECOMPRESSED_BYTES: usize = 1024 * 1024;
/// Largest decompressed/compressed ratio accepted beyond [`RATIO_FREE_DECOMPRESSED_BYTES`].
pub const MAX_DECOMPRESSION_RATIO: usize = 100;
/// Longest `id`, `anonymous_id`, `session_id` and `user_id`, in characters.
pub const MAX_ID_LEN: usize = 200;
/// Deepest nesting of objects/arrays inside `props` and `context`.
pub const MAX_PROPS_DEPTH: usize = 10;
/// Time allowed to receive a whole request body before answering 408.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Earliest client timestamp accepted (2000-01-01T00:00:00Z), in ms since the epoch.
pub const MIN_TS_MS: u64 = 946_684_800_000;
/// Latest client timestamp accepted (9999-12-31T23:59:59Z), in ms since the epoch.
pub const MAX_TS_MS: u64 = 253_402_300_799_000;
