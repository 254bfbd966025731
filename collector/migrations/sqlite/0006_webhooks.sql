-- Webhook destinations and their delivery queue (see the Postgres migration and
-- docs/webhooks.md). Times in ms since the epoch, lists as JSON text.
CREATE TABLE webhook_destinations (
    id                    TEXT PRIMARY KEY,
    project_id            TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    url                   TEXT NOT NULL,
    events                TEXT NOT NULL DEFAULT '[]',
    batch_size            INTEGER NOT NULL,
    secret                TEXT NOT NULL,
    previous_secret       TEXT,
    previous_secret_until INTEGER,
    enabled               INTEGER NOT NULL DEFAULT 1,
    disabled_reason       TEXT,
    last_error            TEXT,
    last_error_at         INTEGER,
    created_at            INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER) * 1000)
);

CREATE INDEX webhook_destinations_project ON webhook_destinations (project_id);

CREATE TABLE webhook_deliveries (
    id              TEXT PRIMARY KEY,
    destination_id  TEXT NOT NULL REFERENCES webhook_destinations (id) ON DELETE CASCADE,
    first_event     TEXT NOT NULL,
    event_count     INTEGER NOT NULL,
    events          TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until     INTEGER,
    last_attempt_at INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    UNIQUE (destination_id, first_event)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (destination_id, next_attempt_at)
    WHERE state = 'pending';

-- The periodic delete of delivered rows past their retention.
CREATE INDEX webhook_deliveries_delivered ON webhook_deliveries (finished_at)
    WHERE state = 'delivered';
