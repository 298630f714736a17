-- Calls through the Stripe proxy, per token, tenant and minute, like key_fetches: who
-- called Stripe for which tenant, without one row per call and without the call itself.
CREATE TABLE stripe_calls (
    token_id        TEXT NOT NULL,
    tenant_id       TEXT NOT NULL,
    window_start    TEXT NOT NULL,
    call_count      INTEGER NOT NULL,
    last_called_at  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, window_start, token_id)
);
CREATE INDEX stripe_calls_token ON stripe_calls (token_id, window_start);
