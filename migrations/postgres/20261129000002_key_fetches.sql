-- Who fetched which tenant's key, aggregated per minute: attributable without one row per
-- charge. Written in batches off the request path (see README, "Key-fetch accounting").
CREATE TABLE key_fetches (
    token_id         TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    window_start     TIMESTAMPTZ NOT NULL,
    fetch_count      BIGINT NOT NULL,
    last_fetched_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, window_start, token_id)
);
CREATE INDEX key_fetches_token ON key_fetches (token_id, window_start);
