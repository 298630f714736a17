-- Per-tenant limits on connect and verify attempts, shared by every instance: one row per
-- tenant and kind holding the GCRA "theoretical arrival time" in unix microseconds.
CREATE TABLE attempt_limits (
    tenant_id  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    tat_micros BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, kind)
);
