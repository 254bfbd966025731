-- Projects: who may write (write key, origins), who may read (read key), and how fast.
CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    write_key   text NOT NULL UNIQUE,
    read_key    text NOT NULL UNIQUE,
    origins     text[] NOT NULL DEFAULT '{}',
    rate_limit  integer,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Events, partitioned by month of the CLIENT timestamp `ts`. `ts` is part of the event
-- (set once by the SDK, unchanged when a batch is retried), so the primary key
-- (project_id, id, ts) dedupes exactly like (project_id, id) for every retry, whatever its
-- `sent_at`. See docs/collector.md, "Partitioning and dedupe".
CREATE TABLE events (
    project_id      uuid NOT NULL,
    id              uuid NOT NULL,
    ts              timestamptz NOT NULL,
    name            text NOT NULL,
    anonymous_id    text NOT NULL,
    session_id      text NOT NULL,
    user_id         text,
    props           jsonb,
    context         jsonb,
    sent_at         timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    time            timestamptz NOT NULL,
    browser         text,
    browser_version text,
    os              text,
    device_type     text,
    is_bot          boolean NOT NULL DEFAULT false,
    bot_reason      text,
    ip              text,
    country         text,
    city            text,
    PRIMARY KEY (project_id, id, ts)
) PARTITION BY RANGE (ts);

-- Catches timestamps outside the monthly partitions created so far; partition maintenance
-- moves its rows into a month's partition when that partition is created.
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- The one secondary index: stats by project over skew-corrected time.
CREATE INDEX events_project_time ON events (project_id, time);
