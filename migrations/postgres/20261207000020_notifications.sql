-- Announcements to Atlas (docs/API.md, "Announcements to Atlas"): an outbox written in the
-- transaction of the change it announces, delivered at least once and in order per tenant.

CREATE TABLE notifications (
    -- Global order: the list's newest-first paging.
    position         BIGSERIAL PRIMARY KEY,
    -- The Standard Webhooks message id (`msg_…`), the same on every attempt.
    id               TEXT NOT NULL UNIQUE,
    tenant_id        TEXT NOT NULL,
    -- Per-tenant order, taken under the tenant's row in notification_tenants, so it
    -- follows commit order.
    seq              BIGINT NOT NULL,
    type             TEXT NOT NULL,
    -- The exact JSON body posted (and signed) on every attempt. Never a key or secret.
    body             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    lease_owner      TEXT,
    lease_until      TIMESTAMPTZ,
    last_status_code BIGINT,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    delivered_at     TIMESTAMPTZ,
    UNIQUE (tenant_id, seq)
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_tenant_pending ON notifications (tenant_id, seq) WHERE status = 'pending';
CREATE INDEX notifications_delivered ON notifications (delivered_at) WHERE status = 'delivered';
CREATE INDEX notifications_status ON notifications (status, position);

-- One row per tenant that ever had an announcement: the sequence of its next one, and the
-- connection status last announced (what a re-verification's result is compared with).
CREATE TABLE notification_tenants (
    tenant_id          TEXT PRIMARY KEY,
    seq                BIGINT NOT NULL,
    connection_status  TEXT NOT NULL
);
INSERT INTO notification_tenants (tenant_id, seq, connection_status)
    SELECT tenant_id, 0, status FROM stripe_connections;
