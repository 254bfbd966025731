//! The HTTP surface: routes, and the batch pipeline read top to bottom.
//!
//! `POST /v1/batch`: authenticate (key, origin; before reading any body) -> rate limit open?
//! (before reading any body) -> decode (capped, gzip-sniffed) -> rate limit (charge the
//! event count) -> validate (per event) -> enrich -> group commit (with the
//! batch's receipt) -> respond. `POST /v1/batch/status`: authenticate -> rate limit -> decode
//! (16 KiB) -> look receipts up -> respond.
//! Also `/healthz`, `/readyz`, `/metrics`, `/v1/stats` (and the stats API of [`analytics`]),
//! `/v1/export` ([`export`]), `/v1/destinations/status` ([`crate::webhooks`]),
//! CORS, the dashboard page ([`crate::dashboard`]), and the optional static files.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::value::RawValue;
use tracing::Instrument;
use tracklet_wire::types::{BatchResponse, BatchStatusResponse};

use crate::analytics;
use crate::auth::{self, AuthError, ProjectDirectory};
use crate::commit::GroupCommitter;
use crate::config::ServeConfig;
use crate::decode::{self, BodyMemory, DecodeError, Encoding, Held};
use crate::enrich::{self, EnrichError, Enricher};
use crate::error::{ApiError, UNAVAILABLE_RETRY_AFTER_SECS};
use crate::export;
use crate::health::{Counter, IngestHealth};
use crate::limits::{MAX_BATCH_STATUS_BODY_BYTES, MAX_BODY_BYTES};
use crate::metrics;
use crate::queue::publisher::EventPublisher;
use crate::ratelimit::RateLimiter;
use crate::receipts;
use crate::stats;
use crate::store::{BatchReceipt, EventRow, EventStore, Project, StoreError};
use crate::validate;

/// Everything a request handler needs, shared by all requests.
#[derive(Clone)]
pub struct AppState {
    config: Arc<ServeConfig>,
    store: Arc<dyn EventStore>,
    committer: GroupCommitter,
    projects: Arc<ProjectDirectory>,
    limiter: Arc<RateLimiter>,
    enricher: Arc<Enricher>,
    /// Permits for batches being decoded and processed (bounds the work in progress).
    inflight: Arc<tokio::sync::Semaphore>,
    /// Bytes all request bodies may hold at once, compressed and inflated (bounds memory).
    body_memory: BodyMemory,
    metrics: PrometheusHandle,
    /// Ingest health counts waiting for their flush ([`crate::health`]).
    health: Arc<IngestHealth>,
    /// `--queue`: accepted events are published to JetStream instead of committed here.
    publisher: Option<Arc<EventPublisher>>,
}

/// Why the state could not be built (the server does not start).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Enrich(#[from] EnrichError),
    #[error("cannot load the projects: {0}")]
    Projects(#[from] StoreError),
}

impl AppState {
    /// Loads the projects (and starts reloading them every
    /// [`ServeConfig::projects_refresh_interval`]), then starts the group committer. The
    /// returned task ends once every clone of the state is dropped and the commit queue is
    /// drained.
    pub async fn new(
        config: ServeConfig,
        store: Arc<dyn EventStore>,
    ) -> Result<(AppState, tokio::task::JoinHandle<()>), StartError> {
        let enricher = Enricher::new(config.geoip_db.as_deref())?;
        let projects =
            ProjectDirectory::start(store.clone(), config.projects_refresh_interval).await?;
        let (committer, task) = GroupCommitter::start(store.clone(), config.commit.clone());
        let health = Arc::new(IngestHealth::default());
        IngestHealth::start_flushing(health.clone(), store.clone());
        let state = AppState {
            health,
            projects,
            limiter: Arc::new(RateLimiter::new(config.rate_limit.clone())),
            inflight: Arc::new(tokio::sync::Semaphore::new(config.max_inflight_batches)),
            body_memory: BodyMemory::new(config.body_memory_bytes),
            config: Arc::new(config),
            store,
            committer,
            enricher: Arc::new(enricher),
            metrics: metrics::install(),
            publisher: None,
        };
        Ok((state, task))
    }

    /// Publishes accepted batches to the queue (`serve --queue`) instead of committing them.
    pub fn with_publisher(mut self, publisher: Arc<EventPublisher>) -> AppState {
        self.publisher = Some(publisher);
        self
    }

    /// The projects kept in memory (to stop their reloading at shutdown, or reload now).
    pub fn projects(&self) -> Arc<ProjectDirectory> {
        self.projects.clone()
    }

    /// Whether ingest is saturated (webhook deliveries yield to it while it is).
    pub fn ingest_pressure(&self) -> crate::commit::IngestPressure {
        self.committer.pressure()
    }

    /// The ingest health counts not yet written (flushed once more at shutdown).
    pub fn ingest_health(&self) -> Arc<IngestHealth> {
        self.health.clone()
    }
}

/// The collector's routes; files of `static_dir` (if any) are the fallback, GET only.
pub fn router(state: AppState) -> Router {
    let static_dir = state.config.static_dir.clone();
    let api = Router::new()
        .route(
            tracklet_wire::BATCH_PATH,
            post(post_batch).options(preflight),
        )
        .route(
            tracklet_wire::BATCH_STATUS_PATH,
            post(post_batch_status).options(preflight),
        )
        .route("/v1/project", get(get_project).options(preflight))
        .route("/v1/stats", get(get_stats).options(preflight))
        .route("/v1/stats/summary", get(get_summary).options(preflight))
        .route(
            "/v1/stats/timeseries",
            get(get_timeseries).options(preflight),
        )
        .route("/v1/stats/breakdown", get(get_breakdown).options(preflight))
        .route(
            "/v1/export",
            // gzip when the client accepts it (the stream is compressed as it goes).
            get(get_export)
                .options(preflight)
                .layer(tower_http::compression::CompressionLayer::new()),
        )
        .route(
            "/v1/destinations/status",
            get(get_destinations_status).options(preflight),
        )
        .route("/v1/stats/funnel", get(get_funnel).options(preflight))
        .route("/v1/stats/health", get(get_health).options(preflight))
        .route("/v1/stats/live", get(get_live).options(preflight))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .merge(crate::dashboard::routes())
        .with_state(state);
    let app = match static_dir {
        Some(dir) => api.fallback_service(tower_http::services::ServeDir::new(dir)),
        None => api.fallback(|| async { ApiError::NotFound }),
    };
    app.layer(middleware::from_fn(observe))
}

/// Request id, tracing span, and request count/latency metrics for every request.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".to_owned());
    let method = request.method().clone();
    let span = tracing::info_span!("request", id = %request_id, method = %method, route = %route);
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::debug!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request finished"
        )
    });
    metrics::request_finished(&route, &method, status, started.elapsed());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    response
}

fn header_str<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The answer (JSON, or the error) with CORS headers for `origin`. Every answer but "origin
/// not allowed" may be read by the page (none leaks data), so the SDK can see 429/503 and
/// their Retry-After.
fn cors_answer<T: Serialize>(origin: Option<&str>, result: Result<T, ApiError>) -> Response {
    let readable = !matches!(result, Err(ApiError::Auth(AuthError::OriginNotAllowed(_))));
    let mut response = match result {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    };
    if let (true, Some(origin)) = (readable, origin) {
        add_cors_headers(response.headers_mut(), origin);
    }
    response
}

/// `POST /v1/batch`.
async fn post_batch(State(state): State<AppState>, request: Request) -> Response {
    let origin = header_str(request.headers(), &header::ORIGIN).map(str::to_owned);
    let result = receive_batch(&state, request).await;
    cors_answer(origin.as_deref(), result)
}

/// The project whose write key the request carries, when the request's `Origin` may send
/// for it. Done first, before reading a byte of body: the cheapest refusal.
async fn writing_project(
    state: &AppState,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<Project, ApiError> {
    let key = auth::request_key(uri, headers).ok_or(AuthError::MissingKey)?;
    let project = state.projects.by_write_key(&key)?;
    auth::check_origin(&project, header_str(headers, &header::ORIGIN))?;
    Ok(project)
}

/// The project whose read key the request carries, when the request's `Origin` may read it
/// (the stats API, export, live view, destinations' status).
fn reading_project(
    state: &AppState,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<Project, ApiError> {
    let key = auth::request_key(uri, headers).ok_or(AuthError::MissingKey)?;
    let project = state.projects.by_read_key(&key)?;
    auth::check_origin(&project, header_str(headers, &header::ORIGIN))?;
    Ok(project)
}

/// The (still compressed) body: read under `limit` bytes and the body deadline.
async fn read_raw_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    held: &mut Held,
) -> Result<(Bytes, Encoding), DecodeError> {
    let encoding = Encoding::from_header(header_str(headers, &header::CONTENT_ENCODING))?;
    let content_length = header_str(headers, &header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
    let raw = decode::read_body(
        body,
        content_length,
        limit,
        state.config.body_read_timeout,
        held,
    )
    .await?;
    Ok((raw, encoding))
}

/// The batch pipeline.
async fn receive_batch(state: &AppState, request: Request) -> Result<BatchResponse, ApiError> {
    let received_at = Utc::now();
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;

    // Authenticate first: the cheapest refusal, before reading a byte of body.
    let project = writing_project(state, &parts.uri, headers).await?;
    // Refuse at once, before the body, when the project or the client has no tokens left.
    let client_ip = request_client_ip(state, &parts);
    state
        .limiter
        .check_open(&project, client_ip)
        .inspect_err(|_| {
            state
                .health
                .add(project.id, received_at, Counter::RateLimited, 1)
        })?;

    // Read the body first (at most 1 MiB, within the body deadline), holding no shared
    // permit: a client trickling its body slowly holds only its own connection, never a
    // permit every project needs.
    // Every byte of body held, compressed or inflated, counts against the collector's body
    // memory until the body is dropped (503 when it is all taken).
    let mut held = state.body_memory.hold(project.id);
    let (raw, encoding) = read_raw_body(state, headers, body, MAX_BODY_BYTES, &mut held)
        .await
        .map_err(ApiError::from)
        .inspect_err(|e| count_refused_batch(state, &project, received_at, e))?;

    // Bounded work in progress: shed load rather than buffer without limit. The permit covers
    // inflating and decoding (the memory-hungry part, up to 10 MiB per batch); once the rows
    // are built it is returned, and rows waiting for their commit are bounded by the commit
    // queue instead.
    let inflight = state
        .inflight
        .try_acquire()
        .map_err(|_| ApiError::Overloaded)?;

    // Enrichment facts of the request (user agent, client address), shared by its events.
    let request_facts = state
        .enricher
        .for_request(header_str(headers, &header::USER_AGENT), client_ip);

    // Decode, validate and enrich: CPU work on up to 10 MiB, done on the blocking pool so a
    // large batch never stalls the tasks that accept connections and answer other requests.
    let Decoded {
        rows,
        receipt,
        rejected,
        repeats,
    } = {
        let (state, project) = (state.clone(), project.clone());
        tokio::task::spawn_blocking(move || {
            let decoded = decode_batch(
                &state,
                &project,
                (raw, encoding),
                &mut held,
                (client_ip, request_facts),
                received_at,
            );
            // The body is no longer needed while waiting for the commit.
            drop(held);
            decoded
        })
        .await
        .map_err(|e| ApiError::Internal(format!("decoding task failed: {e}")))?
    }
    .inspect_err(|e| count_refused_batch(state, &project, received_at, e))?;
    drop(inflight);

    // With a queue: returns once JetStream has acknowledged the rows (a sink commits them;
    // events stored before are then dropped there, and counted here as accepted).
    let (accepted, duplicates) = if let Some(publisher) = &state.publisher {
        let published = publisher
            .publish(project.id, rows, receipt)
            .await
            .map_err(ApiError::from)
            .inspect_err(|e| count_refused_batch(state, &project, received_at, e))?;
        (published.events, published.duplicates + repeats)
    } else {
        // Group commit: returns only once the rows are committed.
        let inserted = state
            .committer
            .commit(rows, receipt)
            .await
            .map_err(ApiError::from)
            .inspect_err(|e| count_refused_batch(state, &project, received_at, e))?;
        let accepted = inserted.iter().filter(|new| **new).count() as u64;
        (accepted, (inserted.len() as u64 - accepted) + repeats)
    };
    metrics::events_accepted(accepted);
    metrics::events_duplicate(duplicates);
    state
        .health
        .add(project.id, received_at, Counter::Accepted, accepted);
    state
        .health
        .add(project.id, received_at, Counter::Duplicates, duplicates);
    Ok(BatchResponse {
        accepted,
        duplicates,
        rejected,
    })
}

/// Counts a whole batch refused for its content (a 4xx other than 429, which is counted as
/// rate-limited) in the project's ingest health, by its error code.
fn count_refused_batch(state: &AppState, project: &Project, at: DateTime<Utc>, e: &ApiError) {
    let (status, code, _) = e.status_code_and_retry();
    if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
        state
            .health
            .add(project.id, at, Counter::BatchRejected(code), 1);
    }
}

/// A batch decoded, validated and enriched: what waits for the commit and what is answered.
struct Decoded {
    rows: Vec<EventRow>,
    receipt: Option<BatchReceipt>,
    rejected: Vec<tracklet_wire::types::Rejected>,
    /// Repeats of an id within the batch (stored once, counted as duplicates).
    repeats: u64,
}

/// Inflates, parses, rate-limits, validates and enriches one batch (CPU-bound; run on the
/// blocking pool). `held` counts the inflated body against the collector's body memory.
fn decode_batch(
    state: &AppState,
    project: &Project,
    (raw, encoding): (Bytes, Encoding),
    held: &mut Held,
    (client_ip, request_facts): (Option<IpAddr>, Arc<enrich::Enrichment>),
    received_at: DateTime<Utc>,
) -> Result<Decoded, ApiError> {
    let inflated_limit = decode::decompressed_limit(raw.len());
    let json = decode::decompress_capped(raw, encoding, inflated_limit, held)?;
    let mut envelope = decode::parse_envelope(&json)?;
    let sent_at = i64::try_from(envelope.sent_at)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| DecodeError::Malformed("sent_at out of range".into()))?;
    metrics::batch_received(envelope.events.len());
    if envelope.dropped > 0 {
        metrics::sdk_dropped(envelope.dropped);
        state.health.add(
            project.id,
            received_at,
            Counter::SdkDropped,
            envelope.dropped,
        );
    }

    // Back-pressure: the batch costs its full event count (project and client address).
    state
        .limiter
        .charge(project, client_ip, envelope.events.len())
        .inspect_err(|_| {
            state
                .health
                .add(project.id, received_at, Counter::RateLimited, 1)
        })?;

    // Validate each event on its own; repeats of an id within the batch are stored once.
    let validated = validate::validate_batch(&envelope.events);
    for (_, code) in &validated.rejected {
        metrics::event_rejected(code);
        state
            .health
            .add(project.id, received_at, Counter::Rejected(code), 1);
    }
    let mut seen = HashSet::with_capacity(validated.valid.len());
    let (unique, repeats): (Vec<_>, Vec<_>) =
        validated.valid.into_iter().partition(|v| seen.insert(v.id));
    let repeats = repeats.len() as u64;
    let rejected: Vec<_> = validated.rejected.into_iter().map(|(r, _)| r).collect();

    // Enrich.
    let rows: Vec<EventRow> = unique
        .into_iter()
        .filter_map(|v| {
            let ts = DateTime::from_timestamp_millis(v.event.ts as i64)?;
            Some(EventRow {
                project_id: project.id,
                id: v.id,
                ts,
                sent_at,
                received_at,
                time: enrich::skew_corrected(v.event.ts, envelope.sent_at, received_at),
                enrichment: enrich::for_event(&request_facts, v.event.context),
                name: v.event.name,
                anonymous_id: v.event.anonymous_id,
                session_id: v.event.session_id,
                user_id: v.event.user_id,
                props: v.event.props.map(RawValue::to_owned),
                context: v.event.context.map(RawValue::to_owned),
            })
        })
        .collect();

    // "This batch arrived", committed with its rows (even when it has none to store: its
    // events were all rejected, or there were none).
    let receipt = envelope.batch_id.take().map(|batch_id| BatchReceipt {
        project_id: project.id,
        batch_id,
        received_at,
    });
    Ok(Decoded {
        rows,
        receipt,
        rejected,
        repeats,
    })
}

/// The client's address, as the enricher sees it (peer, or trusted `X-Forwarded-For`).
fn request_client_ip(state: &AppState, parts: &axum::http::request::Parts) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let forwarded_for = header_str(&parts.headers, &HeaderName::from_static("x-forwarded-for"));
    enrich::client_ip(peer, forwarded_for, state.config.trust_forwarded_for)
}

/// `POST /v1/batch/status`: which of the asked batches arrived.
async fn post_batch_status(State(state): State<AppState>, request: Request) -> Response {
    let origin = header_str(request.headers(), &header::ORIGIN).map(str::to_owned);
    let result = receive_status_query(&state, request).await;
    cors_answer(origin.as_deref(), result)
}

/// The batch status pipeline: same authentication, origin check and rate limit (one event's
/// worth per query) as a batch; a small body; one indexed lookup.
async fn receive_status_query(
    state: &AppState,
    request: Request,
) -> Result<BatchStatusResponse, ApiError> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    let project = writing_project(state, &parts.uri, headers).await?;
    state
        .limiter
        .charge(&project, request_client_ip(state, &parts), 1)?;
    let mut held = state.body_memory.hold(project.id);
    let (raw, encoding) =
        read_raw_body(state, headers, body, MAX_BATCH_STATUS_BODY_BYTES, &mut held).await?;
    let json = decode::decompress_capped(raw, encoding, MAX_BATCH_STATUS_BODY_BYTES, &mut held)?;
    let query = decode::parse_status_request(&json)?;
    let arrived = receipts::arrived(state.store.as_ref(), project.id, query.batch_ids).await?;
    Ok(BatchStatusResponse { arrived })
}

fn add_cors_headers(headers: &mut HeaderMap, origin: &str) {
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Retry-After"),
        );
    }
}

/// `OPTIONS` preflight: allowed when the origin is allowed for the key in the query (or when
/// the key comes in a header, which the preflight cannot show; the request itself is checked).
async fn preflight(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let Some(origin) = header_str(&headers, &header::ORIGIN) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    if let Some(key) = auth::request_key(&uri, &HeaderMap::new()) {
        // The batch routes take a write key; every other route with a key reads.
        let project = match uri.path() {
            tracklet_wire::BATCH_PATH | tracklet_wire::BATCH_STATUS_PATH => {
                state.projects.by_write_key(&key)
            }
            _ => state.projects.by_read_key(&key),
        };
        if let Ok(project) = project {
            if let Err(e) = auth::check_origin(&project, Some(origin)) {
                return ApiError::from(e).into_response();
            }
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    add_cors_headers(h, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization, Content-Encoding"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// `GET /v1/export?from=&to=&format=ndjson|csv` with the read key: the project's events in
/// `ts` order (all of them by default), streamed from a database cursor.
async fn get_export(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let origin = header_str(&headers, &header::ORIGIN);
    let prepared = (|| {
        let project = reading_project(&state, &uri, &headers)?;
        let format = match auth::query_param(&uri, "format") {
            None => export::Format::Ndjson,
            Some(f) => export::Format::parse(&f)
                .ok_or_else(|| ApiError::BadQuery("format must be ndjson or csv".into()))?,
        };
        let (from, to) = export::time_range(
            auth::query_param(&uri, "from").as_deref(),
            auth::query_param(&uri, "to").as_deref(),
        )?;
        Ok::<_, ApiError>((project, format, from, to))
    })();
    let (project, format, from, to) = match prepared {
        Ok(p) => p,
        Err(e) => return cors_answer(origin, Err::<(), _>(e)),
    };
    let rows = state.store.export_events(project.id, from, to);
    let mut response = Body::from_stream(export::byte_stream(rows, format)).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    let file = format!(
        "attachment; filename=\"tracklet-events.{}\"",
        format.extension()
    );
    if let Ok(v) = HeaderValue::from_str(&file) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(origin) = origin {
        add_cors_headers(h, origin);
    }
    response
}

/// `GET /v1/destinations/status` with the read key: the project's webhook destinations and
/// their delivery queues.
async fn get_destinations_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let origin = header_str(&headers, &header::ORIGIN);
    let result = async {
        let project = reading_project(&state, &uri, &headers)?;
        let destinations = match state.store.deliveries() {
            Some(queue) => queue.status(Some(project.id), Utc::now()).await?,
            None => Vec::new(),
        };
        Ok::<_, ApiError>(serde_json::json!({ "destinations": destinations }))
    }
    .await;
    cors_answer(origin, result)
}

/// `GET /v1/stats?from=&to=` with the read key.
/// What a read key reads: `GET /v1/project` answers `{"id", "name"}` (the dashboard signs in
/// with it and names the project in its picker).
async fn get_project(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    #[derive(Serialize)]
    struct ProjectAnswer {
        id: uuid::Uuid,
        name: String,
    }
    let origin = header_str(&headers, &header::ORIGIN);
    let result = reading_project(&state, &uri, &headers).map(|p| ProjectAnswer {
        id: p.id,
        name: p.name,
    });
    cors_answer(origin, result)
}

async fn get_stats(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let origin = header_str(&headers, &header::ORIGIN);
    let result = async {
        let project = reading_project(&state, &uri, &headers)?;
        let from = auth::query_param(&uri, "from");
        let to = auth::query_param(&uri, "to");
        let (from, to) = stats::range(from.as_deref(), to.as_deref(), Utc::now())?;
        Ok::<_, ApiError>(state.store.stats(project.id, from, to).await?)
    }
    .await;
    cors_answer(origin, result)
}

/// The project of the read key (and allowed origin), and the stats API query (range clamped
/// to 400 days, filters) the request asks for.
fn analytics_query(
    state: &AppState,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Result<analytics::Query, ApiError> {
    let project = reading_project(state, uri, headers)?;
    let from = auth::query_param(uri, "from");
    let to = auth::query_param(uri, "to");
    let (from, to) = stats::unbounded_range(from.as_deref(), to.as_deref(), Utc::now())?;
    let (from, to) = analytics::clamp_range(from, to);
    let filters = analytics::Filters::from_params(|name| auth::query_param(uri, name))?;
    Ok(analytics::Query {
        project_id: project.id,
        from,
        to,
        filters,
    })
}

/// Waits at most [`analytics::QUERY_TIMEOUT`] for a stats API answer (503 after).
async fn within_deadline<T>(
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(analytics::QUERY_TIMEOUT, work).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(ApiError::QueryTimeout),
    }
}

/// `GET /v1/stats/summary` with the read key.
async fn get_summary(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let result = async {
        let q = analytics_query(&state, &headers, &uri)?;
        let row = within_deadline(state.store.analytics_summary(&q)).await?;
        Ok(analytics::Summary::from_row(&q, row))
    }
    .await;
    cors_answer(header_str(&headers, &header::ORIGIN), result)
}

/// `GET /v1/stats/timeseries` with the read key: the range and the period before it.
async fn get_timeseries(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let result = async {
        let q = analytics_query(&state, &headers, &uri)?;
        let interval = analytics::Interval::for_range(q.from, q.to);
        let previous = analytics::Query {
            from: q.from - (q.to - q.from),
            to: q.from,
            ..q.clone()
        };
        let (rows, previous_rows) = within_deadline(async {
            let rows = state.store.analytics_timeseries(&q, interval).await?;
            let previous_rows = state
                .store
                .analytics_timeseries(&previous, interval)
                .await?;
            Ok((rows, previous_rows))
        })
        .await?;
        Ok(analytics::Timeseries {
            interval,
            from: q.from,
            to: q.to,
            buckets: analytics::fill_buckets(q.from, q.to, interval, &rows),
            previous: analytics::Series {
                from: previous.from,
                to: previous.to,
                buckets: analytics::fill_buckets(
                    previous.from,
                    previous.to,
                    interval,
                    &previous_rows,
                ),
            },
        })
    }
    .await;
    cors_answer(header_str(&headers, &header::ORIGIN), result)
}

/// `GET /v1/stats/breakdown?by=` with the read key.
async fn get_breakdown(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let result = async {
        let q = analytics_query(&state, &headers, &uri)?;
        let by: analytics::Dimension = auth::query_param(&uri, "by")
            .ok_or_else(|| ApiError::BadQuery("by is required".into()))?
            .parse()?;
        let limit = analytics::limit(auth::query_param(&uri, "limit").as_deref())?;
        let rows = within_deadline(state.store.analytics_breakdown(&q, &by, limit)).await?;
        Ok(analytics::Breakdown {
            from: q.from,
            to: q.to,
            rows: rows
                .into_iter()
                .map(|(key, visitors, events)| analytics::BreakdownRow {
                    key,
                    visitors,
                    events,
                })
                .collect(),
        })
    }
    .await;
    cors_answer(header_str(&headers, &header::ORIGIN), result)
}

/// `GET /v1/stats/funnel?steps=` with the read key.
async fn get_funnel(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let result = async {
        let q = analytics_query(&state, &headers, &uri)?;
        let steps = crate::funnel::parse_steps(auth::query_param(&uri, "steps").as_deref())?;
        let rows = within_deadline(state.store.analytics_funnel(&q, &steps)).await?;
        Ok(crate::funnel::assemble(&q, &steps, &rows))
    }
    .await;
    cors_answer(header_str(&headers, &header::ORIGIN), result)
}

/// `GET /v1/stats/health` with the read key: the project's ingest counts per hour, and this
/// collector's commit queue.
async fn get_health(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let result = async {
        let q = analytics_query(&state, &headers, &uri)?;
        let rows = within_deadline(state.store.analytics_health(&q)).await?;
        let mut health = crate::health::Health::assemble(
            &q,
            &rows,
            state.committer.queued_rows(),
            state.committer.feed().last_commit(),
        );
        if let Some(publisher) = &state.publisher {
            health.queue_lag = publisher.lag(&state.config.queue_consumer).await;
        }
        Ok(health)
    }
    .await;
    cors_answer(header_str(&headers, &header::ORIGIN), result)
}

/// `GET /v1/stats/live` with the read key (`?key=`, as `EventSource` cannot send headers, or
/// `Authorization: Bearer`): Server-Sent Events, see [`crate::live::sse_events`]. Refusals
/// and a failed first read are ordinary JSON errors, before the stream starts.
async fn get_live(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let origin = header_str(&headers, &header::ORIGIN);
    let result = async {
        let project = reading_project(&state, &uri, &headers)?;
        let source = state
            .committer
            .feed()
            .source(project.id, state.store.clone());
        let q = crate::live::live_query(project.id, Utc::now());
        let (visitors, recent) =
            within_deadline(state.store.analytics_live(&q, crate::live::RECENT_EVENTS)).await?;
        let snapshot = crate::live::Snapshot {
            visitors,
            window_minutes: crate::live::LIVE_WINDOW.num_minutes(),
            events: recent
                .into_iter()
                .filter_map(|row| crate::live::LiveEvent::from_recent(project.id, row))
                .collect(),
        };
        Ok::<_, ApiError>(crate::live::sse_events(snapshot, source))
    }
    .await;
    match result {
        Ok(events) => {
            let mut response = axum::response::sse::Sse::new(events)
                .keep_alive(axum::response::sse::KeepAlive::default())
                .into_response();
            if let Some(origin) = origin {
                add_cors_headers(response.headers_mut(), origin);
            }
            response
        }
        Err(e) => cors_answer::<()>(origin, Err(e)),
    }
}

/// Ends every live stream (`GET /v1/stats/live`), so connections can close at shutdown.
pub fn close_live_streams(state: &AppState) {
    state.committer.feed().close();
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the database answers and the commit queue is below its high-water mark; with
/// `--queue`, when NATS is connected (the database's state is reported, not required).
async fn readyz(State(state): State<AppState>) -> Response {
    let database = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("database ping timed out".to_owned()),
    };
    let queue_ok = state.committer.below_high_water();
    // With --queue, the batches go to JetStream: its connection is what readiness means.
    let stream = state
        .publisher
        .as_ref()
        .map(|p| (p.stream_name(), p.is_connected()));
    let stream_ok = stream.is_none_or(|(_, connected)| connected);
    // With --queue a batch needs JetStream, not the database (projects are held in memory):
    // a database outage must not take every collector out of the balancer.
    let ready = (database.is_ok() || stream.is_some()) && queue_ok && stream_ok;
    let mut body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "backend": state.store.backend(),
        "database": database.err().unwrap_or_else(|| "ok".to_owned()),
        "queued_rows": state.committer.queued_rows(),
        "queue_below_high_water": queue_ok,
    });
    if let Some((name, connected)) = stream {
        body["stream"] = serde_json::json!({
            "name": name,
            "status": if connected { "ok" } else { "unreachable" },
        });
    }
    let body = Json(body);
    if ready {
        (StatusCode::OK, body).into_response()
    } else {
        let retry = [(
            header::RETRY_AFTER,
            UNAVAILABLE_RETRY_AFTER_SECS.to_string(),
        )];
        (StatusCode::SERVICE_UNAVAILABLE, retry, body).into_response()
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
