-- Rebuilds of the rollups owed by a migration, and the UTM dimensions in `rollup_hourly`.
--
-- A migration that changes what the rollups hold adds a row here. After migrating, the
-- collector that first takes the rollup lock refills the rollups from the stored events
-- (`rollup::rebuild_if_requested`) and deletes the rows in the same transaction, so a
-- rebuild happens once however many collectors start together, and a rebuild cut short
-- (the process killed) is done again at the next start. Before this table the collector
-- rebuilt when it saw the rollup tables appear, which two collectors starting at once on a
-- fresh database both did.
--
-- This migration's own request: `rollup_hourly` now holds the UTM source, medium and
-- campaign of events (dimension codes 8, 9 and 10 in `rollup::DIMENSIONS`), which the
-- hourly rows written before it lack. The table is created whether or not the rollups
-- exist (the hll extension); without them a request waits, harmless, until they do.
CREATE TABLE rollup_rebuild_requests (
    reason       text PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO rollup_rebuild_requests (reason)
VALUES ('0009: UTM source, medium and campaign in rollup_hourly');
