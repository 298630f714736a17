-- Webhook endpoints of ours on Stripe that may outlive their connection, with the sealed API
-- key that can still delete them (the same sealing as the connection's: no plaintext):
--   * written before a connect registers an endpoint, and dropped once the connection that
--     holds it is committed (or the endpoint deleted again): a process killed, or a save that
--     failed while Stripe would not take the deletion, leaves the row, not a silent orphan;
--   * written in the transaction that deletes a connection whose endpoint Stripe would not
--     delete then.
-- A sweep lists the account's endpoints, deletes every one whose URL names `connection_id`
-- except the one a stored connection holds, and then drops the row.
CREATE TABLE endpoint_cleanups (
    cleanup_id         TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL,
    connection_id      TEXT NOT NULL,
    mode               TEXT NOT NULL,
    api_key_secret_id  TEXT NOT NULL UNIQUE,
    master_key_id      TEXT NOT NULL,
    wrapped_key        BYTEA NOT NULL,
    ciphertext         BYTEA NOT NULL,
    -- The next try; a process taking a row moves it forward first (its lease). A connect's
    -- row is due only once the connect has surely ended.
    due_at             TIMESTAMPTZ NOT NULL
);
CREATE INDEX endpoint_cleanups_due_at ON endpoint_cleanups (due_at);
