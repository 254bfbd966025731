//! Events out of the database and back in: `export` (NDJSON or CSV, streamed in `ts`
//! order with constant memory), `import` (an NDJSON export restored, deduplicated by event
//! id) and scheduled backups (`serve --backup-dir`, one gzipped NDJSON file per project per
//! run, rotated).
//!
//! One row format, [`StoredEvent`], serves all three: an event as stored (ids, times,
//! props, context and the server's enrichment). Exports and backups are written by a
//! blocking writer thread fed through a small bounded channel, so a slow disk or pipe slows
//! the database cursor down instead of growing memory.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::enrich::Enrichment;
use crate::shutdown::Shutdown;
use crate::store::{EventRow, EventStore, StoreError};

/// One stored event, as exported, backed up and imported. Times are RFC 3339 in UTC with
/// six fractional digits (Postgres keeps microseconds), so they sort as text too.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: Uuid,
    pub name: String,
    /// Client clock when the event happened.
    #[serde(serialize_with = "micros")]
    pub ts: DateTime<Utc>,
    /// Skew-corrected time (see `docs/collector.md`).
    #[serde(serialize_with = "micros")]
    pub time: DateTime<Utc>,
    #[serde(serialize_with = "micros")]
    pub sent_at: DateTime<Utc>,
    #[serde(serialize_with = "micros")]
    pub received_at: DateTime<Utc>,
    pub anonymous_id: String,
    pub session_id: String,
    pub user_id: Option<String>,
    pub props: Option<Box<RawValue>>,
    pub context: Option<Box<RawValue>>,
    pub enrichment: Enrichment,
}

impl StoredEvent {
    /// The row that stores this event in `project_id` again.
    fn into_row(self, project_id: Uuid) -> EventRow {
        EventRow {
            project_id,
            id: self.id,
            name: self.name,
            ts: self.ts,
            sent_at: self.sent_at,
            received_at: self.received_at,
            time: self.time,
            anonymous_id: self.anonymous_id,
            session_id: self.session_id,
            user_id: self.user_id,
            props: self.props,
            context: self.context,
            enrichment: Arc::new(self.enrichment),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line ([`StoredEvent`]).
    Ndjson,
    /// A header row, then one row per event; props and context as JSON text.
    Csv,
}

impl Format {
    pub fn parse(value: &str) -> Option<Format> {
        match value {
            "ndjson" | "json" => Some(Format::Ndjson),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Ndjson => "ndjson",
            Format::Csv => "csv",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the export: {0}")]
    Write(#[from] std::io::Error),
    #[error("cannot encode an event: {0}")]
    Encode(String),
}

/// The CSV columns, in order.
const CSV_HEADER: [&str; 20] = [
    "id",
    "name",
    "ts",
    "time",
    "sent_at",
    "received_at",
    "anonymous_id",
    "session_id",
    "user_id",
    "props",
    "context",
    "browser",
    "browser_version",
    "os",
    "device_type",
    "is_bot",
    "bot_reason",
    "ip",
    "country",
    "city",
];

/// Bytes gathered before they are handed to the writer (or the HTTP body).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Turns events into the bytes of one format, a chunk at a time.
pub struct Encoder {
    format: Format,
    buf: Vec<u8>,
}

impl Encoder {
    /// A CSV encoder starts with the header row.
    pub fn new(format: Format) -> Result<Encoder, ExportError> {
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 4096);
        if format == Format::Csv {
            csv_row(&mut buf, CSV_HEADER)?;
        }
        Ok(Encoder { format, buf })
    }

    pub fn push(&mut self, e: &StoredEvent) -> Result<(), ExportError> {
        match self.format {
            Format::Ndjson => {
                serde_json::to_writer(&mut self.buf, e)
                    .map_err(|err| ExportError::Encode(err.to_string()))?;
                self.buf.push(b'\n');
            }
            Format::Csv => {
                let x = &e.enrichment;
                let opt = |v: &Option<String>| v.clone().unwrap_or_default();
                let raw = |v: &Option<Box<RawValue>>| v.as_ref().map(|r| r.get().to_owned());
                csv_row(
                    &mut self.buf,
                    [
                        e.id.to_string(),
                        e.name.clone(),
                        time_text(e.ts),
                        time_text(e.time),
                        time_text(e.sent_at),
                        time_text(e.received_at),
                        e.anonymous_id.clone(),
                        e.session_id.clone(),
                        opt(&e.user_id),
                        raw(&e.props).unwrap_or_default(),
                        raw(&e.context).unwrap_or_default(),
                        opt(&x.browser),
                        opt(&x.browser_version),
                        opt(&x.os),
                        opt(&x.device_type),
                        x.is_bot.to_string(),
                        opt(&x.bot_reason),
                        opt(&x.ip),
                        opt(&x.country),
                        opt(&x.city),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Whether a chunk's worth is gathered.
    pub fn full(&self) -> bool {
        self.buf.len() >= CHUNK_BYTES
    }

    /// The bytes gathered so far.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES + 4096))
    }
}

/// Appends one CSV record (quoted as needed) to `buf`.
fn csv_row<I, F>(buf: &mut Vec<u8>, fields: I) -> Result<(), ExportError>
where
    I: IntoIterator<Item = F>,
    F: AsRef<[u8]>,
{
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .buffer_capacity(1024)
        .from_writer(buf);
    w.write_record(fields)
        .and_then(|()| Ok(w.flush()?))
        .map_err(|e| ExportError::Encode(e.to_string()))
}

/// RFC 3339 in UTC with microseconds, as in the NDJSON.
fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub(crate) fn micros<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&time_text(*t))
}

/// Writes the project's events with `from <= ts < to` to `out` in `format` (gzipped when
/// `gzip`), in `ts` order; returns how many. Memory stays constant whatever the count: the
/// rows are read from a database cursor, and the bytes go to a writer thread a few chunks
/// at a time.
pub async fn export_to<W: Write + Send + 'static>(
    store: &dyn EventStore,
    project_id: Uuid,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    format: Format,
    gzip: bool,
    out: W,
) -> Result<u64, ExportError> {
    let (chunks, mut receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let out = std::io::BufWriter::new(out);
        if gzip {
            let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            write_chunks(&mut receiver, &mut gz)?;
            gz.finish()?.flush()
        } else {
            let mut out = out;
            write_chunks(&mut receiver, &mut out)?;
            out.flush()
        }
    });
    let produced = async {
        let mut rows = store.export_events(project_id, from, to);
        let mut encoder = Encoder::new(format)?;
        let mut count = 0u64;
        while let Some(row) = rows.next().await {
            encoder.push(&row?)?;
            count += 1;
            if encoder.full() && chunks.send(encoder.take()).await.is_err() {
                break; // The writer failed; its error is reported below.
            }
        }
        let _ = chunks.send(encoder.take()).await;
        Ok::<u64, ExportError>(count)
    }
    .await;
    drop(chunks);
    let written = writer
        .await
        .map_err(|e| ExportError::Write(std::io::Error::other(e.to_string())))?;
    let count = produced?;
    written?;
    Ok(count)
}

/// The bytes of an export in `format`, a chunk at a time, for an HTTP body. A database
/// failure midway ends the stream with an error (the response is cut short, never
/// completed with rows missing).
pub fn byte_stream(
    rows: crate::store::BoxStream<'static, Result<StoredEvent, StoreError>>,
    format: Format,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    let encoder = Encoder::new(format).map_err(|e| std::io::Error::other(e.to_string()));
    futures_util::stream::unfold(Some((rows, encoder)), |state| async move {
        let (mut rows, encoder) = state?;
        let mut encoder = match encoder {
            Ok(encoder) => encoder,
            Err(e) => return Some((Err(e), None)),
        };
        loop {
            match rows.next().await {
                Some(Ok(row)) => {
                    if let Err(e) = encoder.push(&row) {
                        return Some((Err(std::io::Error::other(e.to_string())), None));
                    }
                    if encoder.full() {
                        let chunk = bytes::Bytes::from(encoder.take());
                        return Some((Ok(chunk), Some((rows, Ok(encoder)))));
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "export cut short by a database error");
                    return Some((Err(std::io::Error::other(e.to_string())), None));
                }
                None => {
                    let rest = encoder.take();
                    return (!rest.is_empty()).then(|| (Ok(bytes::Bytes::from(rest)), None));
                }
            }
        }
    })
    // Bodies may be polled again after their end (tower-http's compression is): fused, the
    // stream keeps answering "ended" instead of panicking.
    .fuse()
}

fn write_chunks(
    chunks: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    while let Some(chunk) = chunks.blocking_recv() {
        out.write_all(&chunk)?;
    }
    Ok(())
}

/// Every time an export can hold: the Unix epoch (the SDK's clock never goes earlier) to
/// the end of year 9999.
pub fn all_time() -> (DateTime<Utc>, DateTime<Utc>) {
    let end = DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
    (DateTime::<Utc>::UNIX_EPOCH, end)
}

/// The range `[from, to)` of optional times (what `/v1/stats` accepts: ms since the epoch,
/// RFC 3339 or `YYYY-MM-DD`), each end defaulting to [`all_time`]'s: for `export`,
/// `GET /v1/export` and `destinations replay`.
pub fn time_range(
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), crate::error::ApiError> {
    let (all_from, all_to) = all_time();
    let from = from
        .map(crate::stats::parse_time)
        .transpose()?
        .unwrap_or(all_from);
    let to = to
        .map(crate::stats::parse_time)
        .transpose()?
        .unwrap_or(all_to);
    if from > to {
        return Err(crate::error::ApiError::BadQuery("from is after to".into()));
    }
    Ok((from, to))
}

/// What `import` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Events read from the file.
    pub read: u64,
    /// Newly stored.
    pub stored: u64,
    /// Already stored (same event id): skipped.
    pub duplicates: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the file: {0}")]
    Read(#[from] std::io::Error),
    /// A line that is not an exported event; the lines before it are stored.
    #[error("line {line}: {message}")]
    BadLine { line: u64, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Rows per import transaction.
const IMPORT_CHUNK: usize = 1_000;

/// Reads an NDJSON export (gzipped or not: told by its first bytes) and stores its events
/// in `project_id`, skipping the ids already stored. Stops at the first line that is not an
/// event, after storing the lines before it.
pub async fn import(
    store: &dyn EventStore,
    project_id: Uuid,
    input: impl Read,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    let mut input = std::io::BufReader::new(input);
    let gzipped = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let lines: Box<dyn BufRead> = if gzipped {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            input,
        )))
    } else {
        Box::new(input)
    };
    let mut rows = Vec::with_capacity(IMPORT_CHUNK);
    for (n, line) in lines.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| ImportError::BadLine {
            line: n as u64 + 1,
            message,
        };
        let event = match parse_line(&line) {
            Ok(event) => event,
            Err(message) => {
                store_chunk(store, &mut rows, report).await?;
                return Err(bad(message));
            }
        };
        report.read += 1;
        rows.push(event.into_row(project_id));
        if rows.len() == IMPORT_CHUNK {
            store_chunk(store, &mut rows, report).await?;
        }
    }
    store_chunk(store, &mut rows, report).await?;
    Ok(())
}

/// One exported event; its props and context must be objects, as on ingest.
fn parse_line(line: &str) -> Result<StoredEvent, String> {
    let event: StoredEvent = serde_json::from_str(line).map_err(|e| e.to_string())?;
    for (field, raw) in [("props", &event.props), ("context", &event.context)] {
        if raw.as_ref().is_some_and(|r| !r.get().starts_with('{')) {
            return Err(format!("{field} must be a JSON object or null"));
        }
    }
    Ok(event)
}

async fn store_chunk(
    store: &dyn EventStore,
    rows: &mut Vec<EventRow>,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    if rows.is_empty() {
        return Ok(());
    }
    let new = store.insert_events(rows, &[]).await?;
    let stored = new.iter().filter(|n| **n).count() as u64;
    report.stored += stored;
    report.duplicates += rows.len() as u64 - stored;
    rows.clear();
    Ok(())
}

/// `serve --backup-dir`: where, how often, how many to keep.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub dir: PathBuf,
    pub every: Duration,
    /// Backups kept per project; older ones are deleted after each run.
    pub keep: usize,
}

/// Suffix of a finished backup; an unfinished one ends in `.partial`.
const BACKUP_SUFFIX: &str = ".ndjson.gz";
const PARTIAL_SUFFIX: &str = ".partial";

/// Backs every project up every `config.every`, until shutdown. The first run is due one
/// interval after the newest backup already in the directory (at once when there is none),
/// so restarts do not pile up backups.
pub async fn keep_backups(store: Arc<dyn EventStore>, config: BackupConfig, shutdown: Shutdown) {
    let due_in = newest_backup(&config.dir)
        .map(|t| {
            let age = (Utc::now() - t).to_std().unwrap_or_default();
            config.every.saturating_sub(age)
        })
        .unwrap_or_default();
    tokio::select! {
        _ = tokio::time::sleep(due_in) => {}
        _ = shutdown.wait() => return,
    }
    loop {
        match backup_all(store.as_ref(), &config).await {
            Ok(files) => tracing::info!(files, dir = %config.dir.display(), "backup written"),
            Err(e) => tracing::warn!(error = %e, "backup failed; will retry at the next run"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.every) => {}
            _ = shutdown.wait() => return,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup directory {0}: {1}")]
    Dir(String, std::io::Error),
    #[error("project {0}: {1}")]
    Project(String, ExportError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One backup run: a file per project, then rotation. Returns how many files it wrote.
pub async fn backup_all(
    store: &dyn EventStore,
    config: &BackupConfig,
) -> Result<usize, BackupError> {
    let dir_error = |e| BackupError::Dir(config.dir.display().to_string(), e);
    std::fs::create_dir_all(&config.dir).map_err(dir_error)?;
    // Leftovers of a run that was cut short.
    for entry in std::fs::read_dir(&config.dir).map_err(dir_error)?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(PARTIAL_SUFFIX)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let mut written = 0;
    for project in store.list_projects().await? {
        let prefix = backup_prefix(&project.name);
        let file = config.dir.join(format!("{prefix}{stamp}{BACKUP_SUFFIX}"));
        let partial = PathBuf::from(format!("{}{PARTIAL_SUFFIX}", file.display()));
        let result = async {
            let out = std::fs::File::create(&partial)?;
            export_to(store, project.id, all_time(), Format::Ndjson, true, out).await?;
            std::fs::rename(&partial, &file)?;
            Ok::<(), ExportError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(BackupError::Project(project.name, e));
        }
        written += 1;
        rotate(&config.dir, &prefix, config.keep).map_err(dir_error)?;
    }
    Ok(written)
}

/// `tracklet-<name>-`, the name reduced to letters, digits, `-` and `_`.
fn backup_prefix(project: &str) -> String {
    let safe: String = project
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("tracklet-{safe}-")
}

/// Deletes the oldest finished backups of one project beyond `keep` (names sort by time).
fn rotate(dir: &Path, prefix: &str, keep: usize) -> std::io::Result<()> {
    let mut files: Vec<PathBuf> = backups(dir)?
        .into_iter()
        .filter(|(name, _)| {
            name.strip_prefix(prefix)
                .is_some_and(|rest| stamp_of(rest).is_some())
        })
        .map(|(_, path)| path)
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(keep.max(1));
    for old in &files[..excess] {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

/// Finished backups in `dir`: (file name, path).
fn backups(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(name, _)| name.starts_with("tracklet-") && name.ends_with(BACKUP_SUFFIX))
        .collect())
}

/// The time in `<name>-<stamp>.ndjson.gz` (what follows the prefix), if it is one.
fn stamp_of(rest: &str) -> Option<DateTime<Utc>> {
    let stamp = rest.strip_suffix(BACKUP_SUFFIX)?;
    let stamp = stamp.rsplit('-').next()?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|t| t.and_utc())
}

/// When the newest finished backup in `dir` was taken.
fn newest_backup(dir: &Path) -> Option<DateTime<Utc>> {
    backups(dir)
        .ok()?
        .iter()
        .filter_map(|(name, _)| stamp_of(name.strip_prefix("tracklet-")?))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_names_sort_by_time_and_parse_back() {
        let prefix = backup_prefix("my shop/éu");
        assert_eq!(prefix, "tracklet-my_shop__u-");
        let name = format!("{prefix}20261201T120000Z{BACKUP_SUFFIX}");
        let rest = name.strip_prefix(&prefix).unwrap();
        assert_eq!(
            stamp_of(rest).unwrap().to_rfc3339(),
            "2026-12-01T12:00:00+00:00"
        );
        assert!(stamp_of("x-2026.ndjson.gz").is_none());
    }

    #[test]
    fn csv_quotes_json_and_keeps_the_columns() {
        let e: StoredEvent = serde_json::from_str(
            r#"{"id":"0190b4b2-6d5e-7c3a-9f1e-1a2b3c4d5e6f","name":"Song, \"Played\"",
                "ts":"2026-12-01T10:00:00.123Z","time":"2026-12-01T10:00:00.123Z",
                "sent_at":"2026-12-01T10:00:01Z","received_at":"2026-12-01T10:00:01Z",
                "anonymous_id":"a","session_id":"s","user_id":null,
                "props":{"title":"x,y"},"context":null,
                "enrichment":{"browser":"Chrome","browser_version":null,"os":null,
                  "device_type":"desktop","is_bot":false,"bot_reason":null,"ip":null,
                  "country":null,"city":null}}"#,
        )
        .unwrap();
        let mut enc = Encoder::new(Format::Csv).unwrap();
        enc.push(&e).unwrap();
        let text = String::from_utf8(enc.take()).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, CSV_HEADER);
        let row = reader.records().next().unwrap().unwrap();
        assert_eq!(&row[1], "Song, \"Played\"");
        assert_eq!(&row[2], "2026-12-01T10:00:00.123000Z");
        assert_eq!(&row[9], r#"{"title":"x,y"}"#);
        assert_eq!(&row[10], "");
        assert_eq!(&row[11], "Chrome");
        assert_eq!(&row[15], "false");
    }
}
