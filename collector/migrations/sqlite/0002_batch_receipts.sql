-- Batch receipts: "this batch arrived", written in the same transaction as the batch's
-- event rows (see the Postgres migration). received_at in ms since the epoch.
CREATE TABLE batch_receipts (
    project_id  TEXT NOT NULL,
    batch_id    TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, batch_id)
) WITHOUT ROWID;

CREATE INDEX batch_receipts_received_at ON batch_receipts (received_at);
