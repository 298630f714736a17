-- Per-tenant limits on connect and verify attempts: one row per tenant and kind holding the
-- GCRA "theoretical arrival time" in unix microseconds.
CREATE TABLE attempt_limits (
    tenant_id  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    tat_micros INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, kind)
);
