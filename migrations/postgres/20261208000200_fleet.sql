-- A large fleet: the workers' "who is due" and the retention deletes are index range scans.

-- Re-verification claims connections in next_verify_at order. Revoked connections are never
-- probed again, so their next_verify_at stays in the past: in a full index every claim
-- would walk past all of them first. The partial index holds only connections that can be
-- due (the claim's own predicate).
DROP INDEX stripe_connections_next_verify_at;
CREATE INDEX stripe_connections_due ON stripe_connections (next_verify_at)
    WHERE status <> 'revoked';

-- Event recovery claims cursors in due_at order among those whose key may read Events.
DROP INDEX recovery_cursors_due_at;
CREATE INDEX recovery_cursors_due ON recovery_cursors (due_at) WHERE event_recovery = 'on';

-- Retention deletes the oldest rows first: the feed by when each event was received, the
-- usage tallies by minute.
CREATE INDEX webhook_events_received_at ON webhook_events (received_at);
CREATE INDEX key_fetches_window ON key_fetches (window_start);
CREATE INDEX stripe_calls_window ON stripe_calls (window_start);

-- The last time any instance's event-recovery worker swept: the first instance back after
-- a longer stop makes every cursor due (deliveries may have been lost meanwhile).
CREATE TABLE fleet_heartbeats (
    name     TEXT PRIMARY KEY,
    beat_at  TIMESTAMPTZ NOT NULL
);
