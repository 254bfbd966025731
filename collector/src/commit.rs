//! Group commit: one task turns the rows of many concurrent requests into few transactions.
//!
//! Requests hand their rows to the [`GroupCommitter`] and wait on a oneshot channel; the
//! committer task gathers whatever is queued (up to N rows, waiting at most T), inserts it in
//! one transaction and only then answers each request, so a 200 always means "committed".
//! The queue is bounded in rows and in bytes (a row may carry up to 32 KiB of props): when
//! either is full, requests get 503 instead of growing memory.
//!
//! A request may also hand over its batch's receipt ([`BatchReceipt`]); it is written in the
//! same transaction as the rows (one row of queue capacity), so "the batch arrived" is
//! committed exactly when its events are, even when it has no rows to store.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::CommitConfig;
use crate::live::CommitFeed;
use crate::metrics;
use crate::store::{BatchReceipt, EventRow, EventStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("commit queue is full")]
    QueueFull,
    /// The database could not store the rows (an outage or a server-side failure): 503.
    #[error("{0}")]
    Unavailable(String),
    /// The database refused the rows' data (see `StoreError::Refused`).
    #[error("{0}")]
    Refused(String),
    #[error("the collector is shutting down")]
    Stopped,
}

/// Whether ingest is saturated: every commit slot was busy with rows waiting for one within
/// the last [`IngestPressure::MEMORY`]. Work that can wait (webhook deliveries) yields to
/// ingest while it is: a request waits for its commit, a delivery only runs a little later.
#[derive(Clone)]
pub struct IngestPressure {
    since: Instant,
    /// Milliseconds after `since` when the committer last found every slot busy;
    /// `u64::MAX`: never.
    last_full: Arc<AtomicU64>,
}

impl IngestPressure {
    /// How long one moment of saturation keeps the pressure high.
    pub const MEMORY: Duration = Duration::from_secs(1);

    /// A pressure that is high only once [`IngestPressure::mark_full`] is called (a
    /// collector without a committer of its own never calls it).
    pub fn new() -> IngestPressure {
        IngestPressure {
            since: Instant::now(),
            last_full: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Every commit slot is busy and a job waits for one.
    pub fn mark_full(&self) {
        self.last_full.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn high(&self) -> bool {
        let last = self.last_full.load(Ordering::Relaxed);
        last != u64::MAX && self.now_ms().saturating_sub(last) < Self::MEMORY.as_millis() as u64
    }
}

impl Default for IngestPressure {
    fn default() -> Self {
        IngestPressure::new()
    }
}

/// Rows of one request waiting for their transaction.
struct Job {
    rows: Vec<EventRow>,
    receipt: Option<BatchReceipt>,
    reply: oneshot::Sender<Result<Vec<bool>, CommitError>>,
    /// Queue capacity (rows, bytes) held by these rows until they are committed (or failed).
    _capacity: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl Job {
    /// Rows this job holds in the queue: its events and its receipt.
    fn weight(&self) -> usize {
        self.rows.len() + usize::from(self.receipt.is_some())
    }
}

/// The requests' handle on the committer task. Cloning is cheap; the task ends once every
/// clone is dropped and the queue is drained.
#[derive(Clone)]
pub struct GroupCommitter {
    jobs: mpsc::UnboundedSender<Job>,
    capacity: Arc<Semaphore>,
    capacity_bytes: Arc<Semaphore>,
    byte_capacity: usize,
    queued_rows: Arc<AtomicUsize>,
    config: CommitConfig,
    /// Told of every successful commit (last commit time, live events).
    feed: Arc<CommitFeed>,
    pressure: IngestPressure,
}

impl GroupCommitter {
    /// Starts the committer task; await the handle after dropping every `GroupCommitter` to
    /// know that everything accepted has been committed.
    pub fn start(
        store: Arc<dyn EventStore>,
        config: CommitConfig,
    ) -> (GroupCommitter, JoinHandle<()>) {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let queued_rows = Arc::new(AtomicUsize::new(0));
        let feed = Arc::new(CommitFeed::default());
        let pressure = IngestPressure::new();
        let task = tokio::spawn(run_committer(
            store,
            receiver,
            config.clone(),
            queued_rows.clone(),
            feed.clone(),
            pressure.clone(),
        ));
        let byte_capacity = config
            .queue_capacity_bytes
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let committer = GroupCommitter {
            jobs,
            capacity: Arc::new(Semaphore::new(config.queue_capacity_rows)),
            capacity_bytes: Arc::new(Semaphore::new(byte_capacity)),
            byte_capacity,
            queued_rows,
            config,
            feed,
            pressure,
        };
        (committer, task)
    }

    /// Commits `rows` and the batch's `receipt` (with the rows of concurrent requests) and
    /// tells, per row, whether it was newly stored. Returns only after the transaction has
    /// committed.
    pub async fn commit(
        &self,
        rows: Vec<EventRow>,
        receipt: Option<BatchReceipt>,
    ) -> Result<Vec<bool>, CommitError> {
        let n = rows.len() + usize::from(receipt.is_some());
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes: usize = rows.iter().map(EventRow::approx_bytes).sum();
        let permits = u32::try_from(n).map_err(|_| CommitError::QueueFull)?;
        // A batch larger than the whole byte capacity still passes through an empty queue.
        let byte_permits =
            u32::try_from(bytes.min(self.byte_capacity)).map_err(|_| CommitError::QueueFull)?;
        let capacity = (
            self.capacity
                .clone()
                .try_acquire_many_owned(permits)
                .map_err(|_| CommitError::QueueFull)?,
            self.capacity_bytes
                .clone()
                .try_acquire_many_owned(byte_permits)
                .map_err(|_| CommitError::QueueFull)?,
        );
        let (reply, answer) = oneshot::channel();
        self.queued_rows.fetch_add(n, Ordering::Relaxed);
        metrics::queue_depth(self.queued_rows());
        if self
            .jobs
            .send(Job {
                rows,
                receipt,
                reply,
                _capacity: capacity,
            })
            .is_err()
        {
            self.queued_rows.fetch_sub(n, Ordering::Relaxed);
            return Err(CommitError::Stopped);
        }
        answer.await.map_err(|_| CommitError::Stopped)?
    }

    /// Rows accepted but not yet committed.
    pub fn queued_rows(&self) -> usize {
        self.queued_rows.load(Ordering::Relaxed)
    }

    /// What the committer has just committed (last commit time, live events).
    pub fn feed(&self) -> Arc<CommitFeed> {
        self.feed.clone()
    }

    /// Whether ingest is saturated (see [`IngestPressure`]).
    pub fn pressure(&self) -> IngestPressure {
        self.pressure.clone()
    }

    /// False when the queue is above its high-water mark (`/readyz` then says not ready).
    pub fn below_high_water(&self) -> bool {
        self.queued_rows() < self.config.high_water_rows
    }
}

async fn run_committer(
    store: Arc<dyn EventStore>,
    mut receiver: mpsc::UnboundedReceiver<Job>,
    config: CommitConfig,
    queued_rows: Arc<AtomicUsize>,
    feed: Arc<CommitFeed>,
    pressure: IngestPressure,
) {
    // Up to `concurrency` transactions in flight: while one waits for its commit record to be
    // flushed, the next one gathers the rows that arrived meanwhile and inserts them. Rows
    // are inserted in key order, so concurrent transactions that share a key wait for each
    // other instead of deadlocking, and the later one sees the row as a duplicate.
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                // Every transaction slot was busy; if rows waited for one meanwhile, ingest
                // is saturated.
                if !receiver.is_empty() {
                    pressure.mark_full();
                }
                slot
            }
        };
        while in_flight.try_join_next().is_some() {}
        let Some(first) = receiver.recv().await else {
            break;
        };
        let mut rows = first.weight();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + config.max_delay;
        while rows < config.max_rows {
            let next = match receiver.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, receiver.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            match next {
                Some(job) => {
                    rows += job.weight();
                    jobs.push(job);
                }
                None => break,
            }
        }
        let (store, config, queued_rows, feed) = (
            store.clone(),
            config.clone(),
            queued_rows.clone(),
            feed.clone(),
        );
        in_flight.spawn(async move {
            commit_jobs(store.as_ref(), jobs, &config, &feed).await;
            queued_rows.fetch_sub(rows, Ordering::Relaxed);
            metrics::queue_depth(queued_rows.load(Ordering::Relaxed));
            drop(slot);
        });
    }
    // Everything accepted is committed before the committer reports that it has stopped.
    while in_flight.join_next().await.is_some() {}
    tracing::debug!("commit queue drained; committer stopped");
}

/// Commits the rows of `jobs` in one transaction and answers each job. If the transaction
/// fails for any reason but an outage, each job is retried alone so that one request whose
/// rows the database will not take cannot fail the others.
async fn commit_jobs(
    store: &dyn EventStore,
    jobs: Vec<Job>,
    config: &CommitConfig,
    feed: &CommitFeed,
) {
    // Move (not copy) every job's rows and receipt into one slice each; each job keeps its
    // ranges.
    let mut rows = Vec::with_capacity(jobs.iter().map(|j| j.rows.len()).sum());
    let mut receipts = Vec::new();
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (start, receipt_start) = (rows.len(), receipts.len());
        rows.extend(job.rows);
        receipts.extend(job.receipt);
        answers.push((
            start..rows.len(),
            receipt_start..receipts.len(),
            job.reply,
            job._capacity,
        ));
    }
    match insert_with_retry(store, &rows, &receipts, config).await {
        Ok(inserted) => {
            for (range, _, reply, _capacity) in answers {
                let _ = reply.send(Ok(inserted.get(range).unwrap_or_default().to_vec()));
            }
            // After the answers: the requests never wait for the live view.
            feed.committed(&rows, &inserted);
        }
        Err(e) if !e.is_outage() && answers.len() > 1 => {
            tracing::warn!(error = %e, jobs = answers.len(), "group commit refused; committing requests one by one");
            for (range, receipt_range, reply, _capacity) in answers {
                let result = insert_with_retry(
                    store,
                    &rows[range.clone()],
                    &receipts[receipt_range],
                    config,
                )
                .await
                .map_err(to_commit_error);
                if let Ok(inserted) = &result {
                    feed.committed(&rows[range], inserted);
                }
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, rows = rows.len(), "commit failed");
            let (transient, message) = (e.is_transient(), e.to_string());
            for (_, _, reply, _capacity) in answers {
                let _ = reply.send(Err(commit_error(transient, message.clone())));
            }
        }
    }
}

fn to_commit_error(e: StoreError) -> CommitError {
    commit_error(e.is_transient(), e.to_string())
}

fn commit_error(transient: bool, message: String) -> CommitError {
    if transient {
        CommitError::Unavailable(message)
    } else {
        CommitError::Refused(message)
    }
}

/// Inserts, retrying with backoff (up to `max_attempts`) unless the database refused the
/// data itself: an outage may end, a partition being attached is attached a moment later.
async fn insert_with_retry(
    store: &dyn EventStore,
    rows: &[EventRow],
    receipts: &[BatchReceipt],
    config: &CommitConfig,
) -> Result<Vec<bool>, StoreError> {
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let started = Instant::now();
        let result = store.insert_events(rows, receipts).await;
        metrics::commit_finished(started.elapsed(), rows.len(), result.is_ok());
        match result {
            Err(e) if e.is_transient() && attempt < config.max_attempts => {
                tracing::warn!(error = %e, attempt, "commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 3;
                attempt += 1;
            }
            other => return other,
        }
    }
}
