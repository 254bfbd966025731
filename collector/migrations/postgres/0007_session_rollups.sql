-- Rollups off the insert's path, and per-hour session figures (collector/src/rollup.rs).
--
-- `rollup_inbox`: the statement that inserts events now only adds here the columns the
-- rollups are computed from, of each new event that is not a bot's, in the commit's
-- transaction. A rollup task drains it in bulk (`DELETE ... RETURNING` under an advisory
-- lock, the rollups upserted in the same transaction), so every committed event is counted
-- exactly once, whoever drains it. No index: it is only ever read whole (carrying the
-- columns spares the drain an index probe into `events` per event).
--
-- `rollup_session_hours` and `rollup_session_ends`: per project and hour of a session's
-- start, its sessions, bounces and summed length; and per entry (kind 0) or exit (kind 1)
-- page, its sessions and a HyperLogLog of their visitors. When a later batch changes a
-- session, the drain moves its contribution (the old figures out, the new ones in). A
-- HyperLogLog cannot lose a visitor: a row that lost a session is marked `stale`, the stats
-- queries recompute its visitors from `rollup_sessions`, and the drain recomputes it later.
--
-- Created only where migration 0004 created the rollups (the hll extension); the collector
-- fills them from the stored events right after this migration (`rollup::rebuild`).
DO $$
BEGIN
    IF to_regclass('rollup_sessions') IS NULL THEN
        RETURN;
    END IF;

    CREATE TABLE rollup_inbox (
        project_id      uuid NOT NULL,
        id              uuid NOT NULL,
        time            timestamptz NOT NULL,
        name            text NOT NULL,
        anonymous_id    text NOT NULL,
        session_id      text NOT NULL,
        context         jsonb,
        browser         text,
        os              text,
        device_type     text,
        country         text
    );

    CREATE TABLE rollup_session_hours (
        project_id  uuid NOT NULL,
        hour        timestamptz NOT NULL,
        sessions    int8 NOT NULL,
        -- Sessions of one page view and nothing else.
        bounces     int8 NOT NULL,
        -- Summed last_time - first_time, in microseconds (exact under moves).
        micros      int8 NOT NULL,
        -- An upper bound of the longest session starting in this hour (never lowered): the
        -- stats queries find the sessions crossing a range's ends with it.
        max_micros  int8 NOT NULL,
        PRIMARY KEY (project_id, hour)
    );

    CREATE TABLE rollup_session_ends (
        project_id  uuid NOT NULL,
        kind        smallint NOT NULL,
        hour        timestamptz NOT NULL,
        page        text NOT NULL,
        sessions    int8 NOT NULL,
        visitors    hll NOT NULL,
        stale       boolean NOT NULL DEFAULT false,
        PRIMARY KEY (project_id, kind, hour, page)
    );
    CREATE INDEX rollup_session_ends_stale ON rollup_session_ends (project_id) WHERE stale;

    -- The stats queries now read sessions by their start (the range's partial hours, the
    -- sessions crossing its ends, stale rows); the index by last_time is no longer read.
    CREATE INDEX rollup_sessions_first_time ON rollup_sessions (project_id, first_time)
        INCLUDE (last_time, events, pageviews, entry_page, entry_visitor, exit_page,
            exit_visitor);
    DROP INDEX rollup_sessions_last_time;
END
$$;
