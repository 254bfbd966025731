//! The one place where errors become HTTP answers.
//!
//! Each pipeline stage has its own error enum; [`ApiError`] gathers them and
//! [`ApiError::status_code_and_retry`] maps every case to a status, a wire error code and
//! (for 429/503) a `Retry-After`, so the mapping can be reviewed at a glance.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracklet_wire::error_code;
use tracklet_wire::types::ErrorBody;

use crate::auth::AuthError;
use crate::commit::CommitError;
use crate::decode::DecodeError;
use crate::queue::QueueError;
use crate::ratelimit::RateLimited;
use crate::store::StoreError;

/// Seconds a client should wait after a 503.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `serve --queue`: JetStream did not take the batch (unreachable, full, too slow).
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("invalid query: {0}")]
    BadQuery(String),
    /// A stats API query ran past its deadline: the server's load, not the client's fault.
    #[error("the query took too long; retry later")]
    QueryTimeout,
    #[error("too many batches in progress; retry later")]
    Overloaded,
    #[error("no such route")]
    NotFound,
    /// A bug or a crashed task on the server: never the client's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Status, wire error code and optional `Retry-After` seconds for every error.
    pub fn status_code_and_retry(&self) -> (StatusCode, &'static str, Option<u64>) {
        use StatusCode as S;
        let unavailable = (
            S::SERVICE_UNAVAILABLE,
            error_code::UNAVAILABLE,
            Some(UNAVAILABLE_RETRY_AFTER_SECS),
        );
        match self {
            ApiError::Decode(e) => match e {
                DecodeError::BodyTooLarge { .. }
                | DecodeError::DecompressedTooLarge { .. }
                | DecodeError::TooManyEvents { .. }
                | DecodeError::TooManyBatchIds { .. } => {
                    (S::PAYLOAD_TOO_LARGE, error_code::TOO_LARGE, None)
                }
                DecodeError::Timeout => (S::REQUEST_TIMEOUT, error_code::TIMEOUT, None),
                DecodeError::MemoryBusy => unavailable,
                DecodeError::UnsupportedEncoding(_) => (
                    S::UNSUPPORTED_MEDIA_TYPE,
                    error_code::UNSUPPORTED_ENCODING,
                    None,
                ),
                DecodeError::InvalidGzip(_)
                | DecodeError::InvalidUtf8
                | DecodeError::Malformed(_)
                | DecodeError::MalformedQuery(_)
                | DecodeError::BodyRead(_) => (S::BAD_REQUEST, error_code::MALFORMED, None),
            },
            ApiError::Auth(e) => match e {
                AuthError::MissingKey | AuthError::UnknownKey => {
                    (S::UNAUTHORIZED, error_code::UNAUTHORIZED, None)
                }
                AuthError::OriginNotAllowed(_) => {
                    (S::FORBIDDEN, error_code::ORIGIN_NOT_ALLOWED, None)
                }
            },
            ApiError::RateLimited(e) => (
                S::TOO_MANY_REQUESTS,
                error_code::RATE_LIMITED,
                Some(e.retry_after_secs),
            ),
            ApiError::Commit(e) => match e {
                CommitError::QueueFull | CommitError::Unavailable(_) | CommitError::Stopped => {
                    unavailable
                }
                // Only a database error proven to blame the data (see `StoreError::Refused`);
                // every other failure is the server's and answered 503 above.
                CommitError::Refused(_) => (S::BAD_REQUEST, error_code::MALFORMED, None),
            },
            ApiError::Store(_)
            | ApiError::Queue(_)
            | ApiError::Overloaded
            | ApiError::QueryTimeout => unavailable,
            ApiError::BadQuery(_) => (S::BAD_REQUEST, error_code::MALFORMED, None),
            ApiError::NotFound => (S::NOT_FOUND, error_code::MALFORMED, None),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, error_code::UNAVAILABLE, None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retry_after) = self.status_code_and_retry();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        let body = ErrorBody {
            error: code.to_owned(),
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}
