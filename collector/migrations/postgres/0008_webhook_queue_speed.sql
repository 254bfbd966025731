-- The delivery queue, cheaper per delivery (measured with `cargo xtask bench webhooks`).
--
-- A delivery's events (about 50 KB of JSON for 100 events) are compressed when stored
-- (TOAST). Postgres's default, pglz, compresses at some 50 MB/s: at a few hundred
-- deliveries a second that took a large share of a core from ingest. lz4 does the same
-- several times faster, on the write (the outbox) and on the read (the claim). A server
-- built without lz4 keeps pglz: the statement is skipped with a notice.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE webhook_deliveries ALTER COLUMN events SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'webhook_deliveries.events keeps the default compression: %', SQLERRM;
END
$$;

-- Each claim counts a destination's leased deliveries (its requests in flight). Through
-- webhook_deliveries_due that visited every pending row of the destination, the whole
-- backlog, on every claim; this index holds the leased ones only.
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (destination_id, lease_until)
    WHERE state = 'pending' AND lease_until IS NOT NULL;
