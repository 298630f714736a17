-- SQLite twin of migrations/postgres/20261207000020_notifications.sql: timestamps as
-- RFC 3339 text. Announcements to Atlas, written in the transaction of the change.

CREATE TABLE notifications (
    position         INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    tenant_id        TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    type             TEXT NOT NULL,
    body             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    lease_owner      TEXT,
    lease_until      TEXT,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       TEXT NOT NULL,
    delivered_at     TEXT,
    UNIQUE (tenant_id, seq)
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_tenant_pending ON notifications (tenant_id, seq) WHERE status = 'pending';
CREATE INDEX notifications_delivered ON notifications (delivered_at) WHERE status = 'delivered';
CREATE INDEX notifications_status ON notifications (status, position);

CREATE TABLE notification_tenants (
    tenant_id          TEXT PRIMARY KEY,
    seq                INTEGER NOT NULL,
    connection_status  TEXT NOT NULL
);
INSERT INTO notification_tenants (tenant_id, seq, connection_status)
    SELECT tenant_id, 0, status FROM stripe_connections;
