-- Our webhook endpoint on the tenant's Stripe account, its sealed signing secret, and the
-- events Stripe delivers to it.
ALTER TABLE stripe_connections ADD COLUMN webhook_endpoint_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN webhook_secret_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN webhook_master_key_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN webhook_wrapped_key BYTEA;
ALTER TABLE stripe_connections ADD COLUMN webhook_ciphertext BYTEA;

-- Feed order is (txid, seq): the inserting transaction's id, then a sequence. The feed only
-- returns rows whose transaction is older than every transaction still running, so a
-- cursor never passes an event that commits later.
CREATE SEQUENCE webhook_event_seq;

CREATE TABLE webhook_events (
    tenant_id      TEXT NOT NULL,
    txid           BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    connection_id  TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    created        BIGINT NOT NULL,
    livemode       BOOLEAN NOT NULL,
    received_at    TIMESTAMPTZ NOT NULL,
    payload        TEXT NOT NULL,
    PRIMARY KEY (tenant_id, txid, seq),
    UNIQUE (connection_id, event_id)
);
