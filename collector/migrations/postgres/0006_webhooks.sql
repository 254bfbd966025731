-- Webhook destinations and their delivery queue (see docs/webhooks.md).
--
-- A destination receives a project's committed events, signed with its secret (Standard
-- Webhooks). During a rotation the previous secret signs too, until previous_secret_until.
CREATE TABLE webhook_destinations (
    id                    uuid PRIMARY KEY,
    project_id            uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    url                   text NOT NULL,
    -- Event names delivered; empty: every event.
    events                text[] NOT NULL DEFAULT '{}',
    batch_size            integer NOT NULL,
    secret                text NOT NULL,
    previous_secret       text,
    previous_secret_until timestamptz,
    enabled               boolean NOT NULL DEFAULT true,
    disabled_reason       text,
    last_error            text,
    last_error_at         timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_destinations_project ON webhook_destinations (project_id);

-- The outbox: one row per (destination, group of newly stored events), written in the same
-- transaction as the events. `events` is the JSON array sent (events as stored). A row is
-- claimed by a worker with a lease (lease_owner, lease_until); an expired lease makes it
-- claimable again. state: pending -> delivered | failed (failed ones can be replayed).
CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY,
    destination_id  uuid NOT NULL REFERENCES webhook_destinations (id) ON DELETE CASCADE,
    -- The group's first event: a group of events is queued once per destination.
    first_event     uuid NOT NULL,
    event_count     integer NOT NULL,
    events          text NOT NULL,
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    lease_owner     uuid,
    lease_until     timestamptz,
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    UNIQUE (destination_id, first_event)
);

-- Claims look for due pending rows per destination.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (destination_id, next_attempt_at)
    WHERE state = 'pending';

-- The periodic delete of delivered rows past their retention.
CREATE INDEX webhook_deliveries_delivered ON webhook_deliveries (finished_at)
    WHERE state = 'delivered';
