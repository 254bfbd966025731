-- Batch receipts: "this batch arrived". Written in the same statement (so the same
-- transaction) as the batch's event rows, so a receipt exists exactly when the rows are
-- committed. The SDK asks `POST /v1/batch/status` which of its unacknowledged batches
-- arrived before resending them. Deleted after `--batch-receipt-ttl-days` (default 30).
CREATE TABLE batch_receipts (
    project_id  uuid NOT NULL,
    batch_id    text NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, batch_id)
);

-- For the periodic, bounded delete of expired receipts.
CREATE INDEX batch_receipts_received_at ON batch_receipts (received_at);
