-- Ingest health (see the Postgres migration); hour in ms since the epoch.
CREATE TABLE ingest_health (
    project_id  TEXT NOT NULL,
    hour        INTEGER NOT NULL,
    counter     TEXT NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (project_id, hour, counter)
) WITHOUT ROWID;
