-- Our webhook endpoints that a disconnect could not delete from Stripe (Stripe gave no
-- conclusive answer at that moment). Written in the transaction that deletes the
-- connection, with the connection's sealed API key (same secret id, same associated data),
-- so that a later try can still delete the endpoint; the row goes once it is gone.
-- Without it, the endpoint outlives the connection on an account we no longer hold.
CREATE TABLE endpoint_cleanups (
    endpoint_id        TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL,
    connection_id      TEXT NOT NULL,
    mode               TEXT NOT NULL,
    api_key_secret_id  TEXT NOT NULL UNIQUE,
    master_key_id      TEXT NOT NULL,
    wrapped_key        BYTEA NOT NULL,
    ciphertext         BYTEA NOT NULL,
    -- The next try; a process taking a row moves it forward first (its lease).
    due_at             TIMESTAMPTZ NOT NULL
);
CREATE INDEX endpoint_cleanups_due_at ON endpoint_cleanups (due_at);
