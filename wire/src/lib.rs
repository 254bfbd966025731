//! Tracklet's wire format, defined once.
//!
//! The SDK writes batches with [`json`] (plain string building: no serde in the wasm, where
//! every kilobyte counts); the collector reads them with the serde types in [`types`]
//! (feature `serde`). The field names below are the single source of both, and
//! `docs/protocol.md` describes the same thing for people.

#![cfg_attr(not(any(test, feature = "serde")), no_std)]

extern crate alloc;

pub mod json;
#[cfg(feature = "serde")]
pub mod types;

/// Path of the batch endpoint, appended by the SDK to the configured `endpoint`.
pub const BATCH_PATH: &str = "/v1/batch";
/// Path of the endpoint that tells which batches (by `batch_id`) the collector committed:
/// body `{"batch_ids": [...]}`, answer `{"arrived": [...]}`.
pub const BATCH_STATUS_PATH: &str = "/v1/batch/status";
/// Query parameter that carries the project's write key (so a batch needs no custom
/// header and therefore no CORS preflight).
pub const KEY_PARAM: &str = "key";

/// Most events the collector accepts in one batch; more is a 413.
pub const MAX_EVENTS_PER_BATCH: usize = 1000;
/// Largest request body the SDK sends: unload beacons (`sendBeacon`, `fetch` keepalive)
/// are refused by browsers above 64 KiB in flight, so stay below it with room to spare.
pub const SDK_MAX_REQUEST_BYTES: usize = 60_000;
/// Largest (compressed) body the collector reads.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest decompressed body the collector produces before answering 413.
pub const MAX_DECOMPRESSED_BYTES: usize = 10 * 1024 * 1024;
/// Largest single event, as JSON, that the collector accepts.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Longest event name.
pub const MAX_NAME_LEN: usize = 200;
/// Longest `batch_id`, in characters (the SDK sends a UUID, 36).
pub const MAX_BATCH_ID_LEN: usize = 64;
/// Most batch ids one `BATCH_STATUS_PATH` query may ask about; more is a 413.
pub const MAX_BATCH_IDS_PER_QUERY: usize = 100;
/// Largest body of a `BATCH_STATUS_PATH` query, compressed or not (100 UUIDs take 4 KB).
pub const MAX_BATCH_STATUS_BODY_BYTES: usize = 16 * 1024;

/// Whether `id` is usable as a `batch_id`: 1 to [`MAX_BATCH_ID_LEN`] characters, none of
/// them a control character (Postgres refuses NUL in text). The collector ignores a batch's
/// id that is not (the batch itself is still stored), so such an id is never reported as
/// arrived.
pub fn is_valid_batch_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= MAX_BATCH_ID_LEN && !id.chars().any(char::is_control)
}

/// Field names of a batch and of its events.
pub mod field {
    pub const SENT_AT: &str = "sent_at";
    pub const DROPPED: &str = "dropped";
    pub const BATCH_ID: &str = "batch_id";
    pub const EVENTS: &str = "events";
    pub const ID: &str = "id";
    pub const NAME: &str = "name";
    pub const TS: &str = "ts";
    pub const ANONYMOUS_ID: &str = "anonymous_id";
    pub const SESSION_ID: &str = "session_id";
    pub const USER_ID: &str = "user_id";
    pub const PROPS: &str = "props";
    pub const CONTEXT: &str = "context";
    /// Of a batch status query: the ids asked about.
    pub const BATCH_IDS: &str = "batch_ids";
    /// Of a batch status answer: the asked ids the collector committed.
    pub const ARRIVED: &str = "arrived";
}

/// Error codes of the collector's JSON error body `{"error": code, "message": text}`.
pub mod error_code {
    pub const MALFORMED: &str = "malformed";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const ORIGIN_NOT_ALLOWED: &str = "origin_not_allowed";
    pub const TIMEOUT: &str = "timeout";
    pub const TOO_LARGE: &str = "too_large";
    pub const UNSUPPORTED_ENCODING: &str = "unsupported_encoding";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const UNAVAILABLE: &str = "unavailable";
}
