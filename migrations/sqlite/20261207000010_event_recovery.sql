-- Recovery of events Stripe could not deliver (listed again from GET /v1/events).

-- Where a stored event came from: delivered to our endpoint, or found in Stripe's event
-- log after a missed delivery. Unique on (connection_id, event_id) as before, so an event
-- both delivered and recovered is stored once.
ALTER TABLE webhook_events ADD COLUMN source TEXT NOT NULL DEFAULT 'webhook'
    CHECK (source IN ('webhook', 'recovered'));

-- One row per connection: the durable cursor, the progress of a run (Stripe lists newest
-- first, so a run's pages move backwards: `run_after` is the oldest event of the last
-- committed page, and `recovered_through` moves to `run_until` only once the run ends),
-- and a lease so that one process works on a connection at a time.
CREATE TABLE recovery_cursors (
    connection_id      TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL,
    -- 'off' while the key may not read Events.
    event_recovery     TEXT NOT NULL DEFAULT 'on' CHECK (event_recovery IN ('on', 'off')),
    -- What the last verification found of our endpoint on Stripe.
    webhook_status     TEXT NOT NULL DEFAULT 'enabled'
        CHECK (webhook_status IN ('enabled', 'disabled', 'missing')),
    -- Every event created before this is stored (listing starts a little earlier).
    recovered_through  TEXT NOT NULL,
    due_at             TEXT NOT NULL,
    -- An on-demand recovery's starting point, until a run takes it.
    requested_since    TEXT,
    run_since          TEXT,
    run_until          TEXT,
    run_after          TEXT,
    lease_owner        TEXT,
    lease_until        TEXT,
    last_run_at        TEXT
);
CREATE INDEX recovery_cursors_due_at ON recovery_cursors (due_at);
