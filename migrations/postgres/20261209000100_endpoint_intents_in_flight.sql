-- A connect's intent (written before it registers an endpoint) names when that connect has
-- surely ended. While one is in flight, a sweep of another row of the same connection does
-- not delete: the endpoint the in-flight connect registered carries the same URL and is not
-- stored yet (a replacement keeps the connection id). NULL: a disconnect's kept key.
ALTER TABLE endpoint_cleanups ADD COLUMN in_flight_until TIMESTAMPTZ;
CREATE INDEX endpoint_cleanups_connection ON endpoint_cleanups (connection_id);
