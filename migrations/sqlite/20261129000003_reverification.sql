-- Background re-verification: when each connection is next due, and which process holds
-- it (a lease, so several processes never verify one connection at once).
ALTER TABLE stripe_connections ADD COLUMN next_verify_at TEXT;
ALTER TABLE stripe_connections ADD COLUMN lease_owner TEXT;
ALTER TABLE stripe_connections ADD COLUMN lease_until TEXT;
UPDATE stripe_connections SET next_verify_at = verified_at;
CREATE INDEX stripe_connections_next_verify_at ON stripe_connections (next_verify_at);
