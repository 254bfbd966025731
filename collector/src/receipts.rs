//! Batch receipts: which batches arrived, so the SDK need not resend them.
//!
//! A batch that carries a `batch_id` leaves a receipt, committed with its event rows by the
//! group committer ([`crate::commit`]). `POST /v1/batch/status` asks which of some ids have
//! one ([`arrived`]); receipts older than `--batch-receipt-ttl-days` are deleted in bounded
//! steps by a background task ([`keep_receipts`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::metrics;
use crate::shutdown::Shutdown;
use crate::store::{EventStore, StoreError};

/// How often expired receipts are deleted while serving (and once at start).
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Expired receipts deleted per statement, each its own short transaction.
pub const DELETE_BATCH: u32 = 10_000;

/// The asked ids that could have a receipt, each once, in the order asked: an id that is not
/// `tracklet_wire::is_valid_batch_id` was ignored when its batch arrived, so it has none.
pub fn askable(batch_ids: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::with_capacity(batch_ids.len());
    batch_ids
        .into_iter()
        .filter(|id| tracklet_wire::is_valid_batch_id(id) && seen.insert(id.clone()))
        .collect()
}

/// Those of `batch_ids` that have a receipt for `project_id`, each once, in the order asked.
pub async fn arrived(
    store: &dyn EventStore,
    project_id: Uuid,
    batch_ids: Vec<String>,
) -> Result<Vec<String>, StoreError> {
    let asked = askable(batch_ids);
    let asked_count = asked.len();
    let found: HashSet<String> = store
        .arrived_batches(project_id, &asked)
        .await?
        .into_iter()
        .collect();
    let arrived: Vec<String> = asked.into_iter().filter(|id| found.contains(id)).collect();
    metrics::batch_status_answered(asked_count, arrived.len());
    Ok(arrived)
}

/// Deletes every receipt received before `cutoff`, `batch` at a time (so no statement holds
/// locks for long), stopping early once `shutdown` fires; returns how many it deleted.
pub async fn remove_expired(
    store: &dyn EventStore,
    cutoff: DateTime<Utc>,
    batch: u32,
    shutdown: &Shutdown,
) -> Result<u64, StoreError> {
    let batch = batch.max(1);
    let mut deleted = 0;
    while !shutdown.is_triggered() {
        let n = store.delete_receipts_before(cutoff, batch).await?;
        deleted += n;
        metrics::receipts_expired(n);
        if n < u64::from(batch) {
            break;
        }
    }
    Ok(deleted)
}

/// Deletes receipts older than `ttl` now and every [`CLEANUP_INTERVAL`] until shutdown.
pub async fn keep_receipts(store: Arc<dyn EventStore>, ttl: Duration, shutdown: Shutdown) {
    loop {
        let cutoff = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| Utc::now().checked_sub_signed(ttl));
        if let Some(cutoff) = cutoff {
            match remove_expired(store.as_ref(), cutoff, DELETE_BATCH, &shutdown).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "expired batch receipts deleted"),
                Err(e) => {
                    tracing::warn!(error = %e, "deleting expired batch receipts failed; will retry")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CLEANUP_INTERVAL) => {}
            _ = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn askable_ids_are_valid_and_unique_in_order() {
        let ids = ["b", "a", "b", "", &"x".repeat(65), "c\u{0}", "c"];
        let asked = askable(ids.iter().map(|s| s.to_string()).collect());
        assert_eq!(asked, ["b", "a", "c"]);
    }
}
