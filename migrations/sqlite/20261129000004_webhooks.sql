-- Our webhook endpoint on the tenant's Stripe account, its sealed signing secret, and the
-- events Stripe delivers to it.
ALTER TABLE stripe_connections ADD COLUMN webhook_endpoint_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN webhook_secret_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN webhook_master_key_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN webhook_wrapped_key BLOB;
ALTER TABLE stripe_connections ADD COLUMN webhook_ciphertext BLOB;

-- Per-tenant event sequence, taken in the writing transaction: SQLite has one writer at a
-- time, so sequence order is commit order. txid is always 0 here (see the PostgreSQL twin).
ALTER TABLE tenants ADD COLUMN event_seq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE webhook_events (
    tenant_id      TEXT NOT NULL,
    txid           INTEGER NOT NULL DEFAULT 0,
    seq            INTEGER NOT NULL,
    connection_id  TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    created        INTEGER NOT NULL,
    livemode       BOOLEAN NOT NULL,
    received_at    TEXT NOT NULL,
    payload        TEXT NOT NULL,
    PRIMARY KEY (tenant_id, txid, seq),
    UNIQUE (connection_id, event_id)
);
