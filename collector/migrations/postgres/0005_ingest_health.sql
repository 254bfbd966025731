-- Ingest health: per project and hour, counts of what became of the batches (accepted,
-- duplicates, rejected:<reason>, sdk_dropped, rate_limited). Collectors add to these rows
-- about once a second (upsert), off the requests' path. Read by GET /v1/stats/health.
CREATE TABLE ingest_health (
    project_id  uuid NOT NULL,
    hour        timestamptz NOT NULL,
    counter     text NOT NULL,
    count       bigint NOT NULL,
    PRIMARY KEY (project_id, hour, counter)
);
