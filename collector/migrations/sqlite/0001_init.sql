-- Embedded store: same columns as Postgres, times in ms since the epoch, JSON as text.
CREATE TABLE projects (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    write_key   TEXT NOT NULL UNIQUE,
    read_key    TEXT NOT NULL UNIQUE,
    origins     TEXT NOT NULL DEFAULT '[]',
    rate_limit  INTEGER,
    created_at  INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER) * 1000)
);

CREATE TABLE events (
    project_id      TEXT NOT NULL,
    id              TEXT NOT NULL,
    ts              INTEGER NOT NULL,
    name            TEXT NOT NULL,
    anonymous_id    TEXT NOT NULL,
    session_id      TEXT NOT NULL,
    user_id         TEXT,
    props           TEXT,
    context         TEXT,
    sent_at         INTEGER NOT NULL,
    received_at     INTEGER NOT NULL,
    time            INTEGER NOT NULL,
    browser         TEXT,
    browser_version TEXT,
    os              TEXT,
    device_type     TEXT,
    is_bot          INTEGER NOT NULL DEFAULT 0,
    bot_reason      TEXT,
    ip              TEXT,
    country         TEXT,
    city            TEXT,
    PRIMARY KEY (project_id, id)
) WITHOUT ROWID;

CREATE INDEX events_project_time ON events (project_id, time);
