-- The usage tallies are updated far more than inserted: the writer adds to each
-- (token, tenant, minute) row at every flush within its minute. Room left on each page lets
-- those updates stay on the page (HOT: no new entry in either index, and less to vacuum).
ALTER TABLE key_fetches SET (fillfactor = 50);
ALTER TABLE stripe_calls SET (fillfactor = 50);
