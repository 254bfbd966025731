-- Rollups for the stats API (collector/src/rollup.rs): hourly counts per project and
-- dimension value, and one row per session. The statement that inserts events updates them
-- from the rows it actually inserted (duplicates never reach them), so they are committed
-- exactly when the events are. Events already stored are counted into them by the collector
-- right after this migration.
--
-- They need the `hll` extension (HyperLogLog visitor counts; Debian package
-- postgresql-15-hll). Without it, or without the right to create it, nothing is created
-- here and the stats API reads raw events (the collector says so once in its log).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'hll') THEN
        RAISE NOTICE 'tracklet: the hll extension is not installed; no rollups';
        RETURN;
    END IF;
    BEGIN
        CREATE EXTENSION IF NOT EXISTS hll;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'tracklet: no privilege to create the hll extension; no rollups';
        RETURN;
    END;

    -- One row per (project, dimension, hour, value). `dim` 0 is the total (key ''); the
    -- codes of the others are `rollup::DIMENSIONS`. Bot events are not counted.
    CREATE TABLE rollup_hourly (
        project_id  uuid NOT NULL,
        dim         smallint NOT NULL,
        hour        timestamptz NOT NULL,
        key         text NOT NULL,
        events      int8 NOT NULL,
        pageviews   int8 NOT NULL,
        -- hll_add_agg(hll_hash_text(anonymous_id)) of the hour's events with this value.
        visitors    hll NOT NULL,
        PRIMARY KEY (project_id, dim, hour, key)
    );

    -- One row per session (its events that are not bots): what bounce rate, session length
    -- and entry and exit pages are computed from. Entry: the first page view by (time, id),
    -- exit: the last (NULL without page views); its path and visitor.
    CREATE TABLE rollup_sessions (
        project_id      uuid NOT NULL,
        session_id      text NOT NULL,
        first_time      timestamptz NOT NULL,
        last_time       timestamptz NOT NULL,
        events          int8 NOT NULL,
        pageviews       int8 NOT NULL,
        entry_time      timestamptz,
        entry_id        uuid,
        entry_page      text,
        entry_visitor   text,
        exit_time       timestamptz,
        exit_id         uuid,
        exit_page       text,
        exit_visitor    text,
        PRIMARY KEY (project_id, session_id)
    );
    -- The stats queries read only this index (sessions ending in or after the range).
    CREATE INDEX rollup_sessions_last_time ON rollup_sessions (project_id, last_time)
        INCLUDE (first_time, events, pageviews, entry_page, entry_visitor, exit_page,
            exit_visitor);
END
$$;
