-- A million tenants (issue 26), the SQLite side: the same maintained counts, recovery
-- cursors made with their connection, and indexes (see the PostgreSQL migration).

-- Sealed secrets per (purpose, master key, connection status, mode), kept by the triggers
-- below so that every writer keeps it right. A row whose count fell to 0 stays (readers
-- skip it).
CREATE TABLE connection_counts (
    purpose        TEXT NOT NULL CHECK (purpose IN ('stripe_api_key', 'webhook_signing_secret')),
    master_key_id  TEXT NOT NULL,
    status         TEXT NOT NULL,
    mode           TEXT NOT NULL,
    n              INTEGER NOT NULL,
    PRIMARY KEY (purpose, master_key_id, status, mode)
);

-- Row triggers (SQLite has no statement triggers): one writer at a time and no round trip,
-- so a row's upsert costs microseconds and never waits for another transaction.
CREATE TRIGGER stripe_connections_counted_insert AFTER INSERT ON stripe_connections
BEGIN
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        VALUES ('stripe_api_key', NEW.master_key_id, NEW.status, NEW.mode, 1)
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n + 1;
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        SELECT 'webhook_signing_secret', NEW.webhook_master_key_id, NEW.status, NEW.mode, 1
        WHERE NEW.webhook_master_key_id IS NOT NULL
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER stripe_connections_counted_delete AFTER DELETE ON stripe_connections
BEGIN
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        VALUES ('stripe_api_key', OLD.master_key_id, OLD.status, OLD.mode, -1)
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n - 1;
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        SELECT 'webhook_signing_secret', OLD.webhook_master_key_id, OLD.status, OLD.mode, -1
        WHERE OLD.webhook_master_key_id IS NOT NULL
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n - 1;
END;

-- Only updates that change a counted column (a lease or a schedule change writes nothing).
CREATE TRIGGER stripe_connections_counted_update
    AFTER UPDATE OF master_key_id, status, mode, webhook_master_key_id ON stripe_connections
    WHEN OLD.master_key_id IS NOT NEW.master_key_id OR OLD.status IS NOT NEW.status
        OR OLD.mode IS NOT NEW.mode OR OLD.webhook_master_key_id IS NOT NEW.webhook_master_key_id
BEGIN
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        VALUES ('stripe_api_key', OLD.master_key_id, OLD.status, OLD.mode, -1)
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n - 1;
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        SELECT 'webhook_signing_secret', OLD.webhook_master_key_id, OLD.status, OLD.mode, -1
        WHERE OLD.webhook_master_key_id IS NOT NULL
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n - 1;
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        VALUES ('stripe_api_key', NEW.master_key_id, NEW.status, NEW.mode, 1)
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n + 1;
    INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
        SELECT 'webhook_signing_secret', NEW.webhook_master_key_id, NEW.status, NEW.mode, 1
        WHERE NEW.webhook_master_key_id IS NOT NULL
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = n + 1;
END;

INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
    SELECT 'stripe_api_key', master_key_id, status, mode, COUNT(*) FROM stripe_connections
    GROUP BY master_key_id, status, mode;
INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
    SELECT 'webhook_signing_secret', webhook_master_key_id, status, mode, COUNT(*)
    FROM stripe_connections WHERE webhook_master_key_id IS NOT NULL
    GROUP BY webhook_master_key_id, status, mode;

DROP INDEX stripe_connections_master_key_id;
CREATE INDEX stripe_connections_master_key_secret
    ON stripe_connections (master_key_id, api_key_secret_id);
CREATE INDEX stripe_connections_webhook_master_key_secret
    ON stripe_connections (webhook_master_key_id, webhook_secret_id)
    WHERE webhook_master_key_id IS NOT NULL;

DROP INDEX stripe_connections_status;
CREATE INDEX stripe_connections_status_connection
    ON stripe_connections (status, connection_id);

-- Every connection has its cursor from the transaction that saved it; the mode is copied
-- in (fixed while the connection exists).
ALTER TABLE recovery_cursors ADD COLUMN mode TEXT NOT NULL DEFAULT 'test'
    CHECK (mode IN ('test', 'live'));
DELETE FROM recovery_cursors WHERE NOT EXISTS
    (SELECT 1 FROM stripe_connections c WHERE c.connection_id = recovery_cursors.connection_id);
UPDATE recovery_cursors SET mode = (SELECT c.mode FROM stripe_connections c
    WHERE c.connection_id = recovery_cursors.connection_id);
INSERT INTO recovery_cursors (connection_id, tenant_id, mode, recovered_through, due_at)
    SELECT c.connection_id, c.tenant_id, c.mode, c.connected_at, c.connected_at
    FROM stripe_connections c WHERE true
    ON CONFLICT (connection_id) DO NOTHING;
CREATE INDEX recovery_cursors_oldest ON recovery_cursors (mode, recovered_through)
    WHERE event_recovery = 'on';

CREATE TABLE verify_requirements (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    resources  TEXT NOT NULL
);
