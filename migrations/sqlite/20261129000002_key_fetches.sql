-- Who fetched which tenant's key, aggregated per minute: attributable without one row per
-- charge. Written in batches off the request path (see README, "Key-fetch accounting").
CREATE TABLE key_fetches (
    token_id         TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    window_start     TEXT NOT NULL,
    fetch_count      INTEGER NOT NULL,
    last_fetched_at  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, window_start, token_id)
);
CREATE INDEX key_fetches_token ON key_fetches (token_id, window_start);
