-- A million tenants on one cluster (issue 26): the counts the service shows are maintained
-- rather than recounted, every connection has its recovery cursor from the transaction that
-- created it, and the hot reads have the index their plan needs.

-- Sealed secrets per (purpose, master key, connection status, mode): what /readyz, /metrics
-- and `keys status` show, read in a few rows however many connections there are. Kept by
-- the triggers below, so every writer keeps it right: the service, the rewrap's batch
-- UPDATE, the seeding tool's COPY, an operator's SQL. A row whose count fell to 0 stays
-- (readers skip it); there are at most a few dozen.
CREATE TABLE connection_counts (
    purpose        TEXT NOT NULL CHECK (purpose IN ('stripe_api_key', 'webhook_signing_secret')),
    master_key_id  TEXT NOT NULL,
    status         TEXT NOT NULL,
    mode           TEXT NOT NULL,
    n              BIGINT NOT NULL,
    PRIMARY KEY (purpose, master_key_id, status, mode)
);
-- The counter rows are updated in place at every change: room on the page keeps those
-- updates HOT.
ALTER TABLE connection_counts SET (fillfactor = 50);

-- Statement-level triggers with transition tables: one upsert per statement and per counter
-- row it changes, however many rows the statement wrote (a rewrap batch of 5,000 rows moves
-- two counters once each). A statement whose rows change no counted column (a lease claim,
-- a re-verification that keeps the status) nets to zero and writes nothing, so it takes no
-- counter row's lock. Rows are upserted in key order: two transactions never lock two
-- counter rows in opposite orders within a statement.
-- (A trigger with transition tables takes one event only, hence three triggers.)
CREATE FUNCTION atlas_count_connections() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO connection_counts AS k (purpose, master_key_id, status, mode, n)
        SELECT purpose, master_key_id, status, mode, SUM(d) FROM (
            SELECT 'stripe_api_key' AS purpose, master_key_id, status, mode, 1 AS d
                FROM new_rows
            UNION ALL SELECT 'webhook_signing_secret', webhook_master_key_id, status, mode, 1
                FROM new_rows WHERE webhook_master_key_id IS NOT NULL
        ) delta GROUP BY purpose, master_key_id, status, mode
        ORDER BY purpose, master_key_id, status, mode
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = k.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO connection_counts AS k (purpose, master_key_id, status, mode, n)
        SELECT purpose, master_key_id, status, mode, SUM(d) FROM (
            SELECT 'stripe_api_key' AS purpose, master_key_id, status, mode, -1 AS d
                FROM old_rows
            UNION ALL SELECT 'webhook_signing_secret', webhook_master_key_id, status, mode, -1
                FROM old_rows WHERE webhook_master_key_id IS NOT NULL
        ) delta GROUP BY purpose, master_key_id, status, mode
        ORDER BY purpose, master_key_id, status, mode
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = k.n + excluded.n;
    ELSE
        INSERT INTO connection_counts AS k (purpose, master_key_id, status, mode, n)
        SELECT purpose, master_key_id, status, mode, SUM(d) FROM (
            SELECT 'stripe_api_key' AS purpose, master_key_id, status, mode, 1 AS d
                FROM new_rows
            UNION ALL SELECT 'webhook_signing_secret', webhook_master_key_id, status, mode, 1
                FROM new_rows WHERE webhook_master_key_id IS NOT NULL
            UNION ALL SELECT 'stripe_api_key', master_key_id, status, mode, -1
                FROM old_rows
            UNION ALL SELECT 'webhook_signing_secret', webhook_master_key_id, status, mode, -1
                FROM old_rows WHERE webhook_master_key_id IS NOT NULL
        ) delta GROUP BY purpose, master_key_id, status, mode HAVING SUM(d) <> 0
        ORDER BY purpose, master_key_id, status, mode
        ON CONFLICT (purpose, master_key_id, status, mode) DO UPDATE SET n = k.n + excluded.n;
    END IF;
    RETURN NULL;
END
$$;

-- Created before the backfill: creating a trigger locks the table against writes until
-- this migration commits, so the backfill sees every committed row and every later change
-- goes through the triggers.
CREATE TRIGGER stripe_connections_counted_insert AFTER INSERT ON stripe_connections
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION atlas_count_connections();
CREATE TRIGGER stripe_connections_counted_update AFTER UPDATE ON stripe_connections
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION atlas_count_connections();
CREATE TRIGGER stripe_connections_counted_delete AFTER DELETE ON stripe_connections
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION atlas_count_connections();

INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
    SELECT 'stripe_api_key', master_key_id, status, mode, COUNT(*) FROM stripe_connections
    GROUP BY master_key_id, status, mode;
INSERT INTO connection_counts (purpose, master_key_id, status, mode, n)
    SELECT 'webhook_signing_secret', webhook_master_key_id, status, mode, COUNT(*)
    FROM stripe_connections WHERE webhook_master_key_id IS NOT NULL
    GROUP BY webhook_master_key_id, status, mode;

-- The rewrap reads only what is left under one old master key, in secret-id order: a range
-- scan that starts where the last batch ended, never past rows already rewrapped.
DROP INDEX stripe_connections_master_key_id;
CREATE INDEX stripe_connections_master_key_secret
    ON stripe_connections (master_key_id, api_key_secret_id);
CREATE INDEX stripe_connections_webhook_master_key_secret
    ON stripe_connections (webhook_master_key_id, webhook_secret_id)
    WHERE webhook_master_key_id IS NOT NULL;

-- The connections list filtered by status, in connection-id order: a range scan of one
-- status from `after`, on the last page as on the first.
DROP INDEX stripe_connections_status;
CREATE INDEX stripe_connections_status_connection
    ON stripe_connections (status, connection_id);

-- Recovery cursors exist for every connection from the transaction that saved it and go
-- with it (they used to be made on first read, and checked against every connection at
-- each worker tick). The connection's mode is copied in: it cannot change while the
-- connection exists (a tenant with a connection keeps its mode), and the oldest cursor per
-- mode is then one index range.
ALTER TABLE recovery_cursors ADD COLUMN mode TEXT;
DELETE FROM recovery_cursors WHERE NOT EXISTS
    (SELECT 1 FROM stripe_connections c WHERE c.connection_id = recovery_cursors.connection_id);
UPDATE recovery_cursors r SET mode = c.mode FROM stripe_connections c
    WHERE c.connection_id = r.connection_id;
INSERT INTO recovery_cursors (connection_id, tenant_id, mode, recovered_through, due_at)
    SELECT c.connection_id, c.tenant_id, c.mode, c.connected_at, c.connected_at
    FROM stripe_connections c
    ON CONFLICT (connection_id) DO NOTHING;
ALTER TABLE recovery_cursors ALTER COLUMN mode SET NOT NULL;
ALTER TABLE recovery_cursors ADD CONSTRAINT recovery_cursors_mode CHECK (mode IN ('test', 'live'));
CREATE INDEX recovery_cursors_oldest ON recovery_cursors (mode, recovered_through)
    WHERE event_recovery = 'on';

-- The required resources that start-up last marked connections due for: start-up marks
-- only for a resource added since, instead of reading every connection at every start.
CREATE TABLE verify_requirements (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    resources  TEXT NOT NULL
);
