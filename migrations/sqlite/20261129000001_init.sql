-- SQLite twin of migrations/postgres: timestamps as RFC 3339 text, bytes as BLOB.
-- Tenants, service tokens, sealed secrets, Stripe connections and the audit trail.
-- Released migrations are never edited; add a new file instead.

CREATE TABLE tenants (
    tenant_id   TEXT PRIMARY KEY,
    mode        TEXT NOT NULL CHECK (mode IN ('test', 'live')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE service_tokens (
    token_id     TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    -- SHA-256 of the token's secret part; the token itself is shown once and never stored.
    secret_hash  BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    revoked_at   TEXT
);

-- One row per connected tenant, holding its sealed API key (envelope-encrypted: no column
-- holds plaintext), so the key fetch is one primary-key lookup.
CREATE TABLE stripe_connections (
    tenant_id          TEXT PRIMARY KEY REFERENCES tenants (tenant_id),
    connection_id      TEXT NOT NULL UNIQUE,
    -- Names this key in its sealed form's associated data; a new key gets a new id.
    api_key_secret_id  TEXT NOT NULL UNIQUE,
    master_key_id      TEXT NOT NULL,
    wrapped_key        BLOB NOT NULL,
    ciphertext         BLOB NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('active', 'needs_attention', 'revoked')),
    mode               TEXT NOT NULL CHECK (mode IN ('test', 'live')),
    key_type           TEXT NOT NULL CHECK (key_type IN ('secret', 'restricted')),
    key_last4          TEXT NOT NULL,
    key_fingerprint    BLOB NOT NULL,
    permissions        TEXT NOT NULL,
    warnings           TEXT NOT NULL,
    verified_at        TEXT NOT NULL,
    connected_at       TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);
CREATE INDEX stripe_connections_status ON stripe_connections (status);
CREATE INDEX stripe_connections_master_key_id ON stripe_connections (master_key_id);

CREATE TABLE audit_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at  TEXT NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    tenant_id    TEXT,
    -- JSON with non-secret facts only (key type, last 4, connection id, …).
    detail       TEXT NOT NULL
);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, id);
