-- Every change to service_tokens (the CLI, another instance, an operator's SQL) notifies
-- channel atlas_service_tokens at commit: instances that keep vouched-for tokens in memory
-- forget them (see src/auth/token_cache.rs).
CREATE FUNCTION atlas_notify_service_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('atlas_service_tokens', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER service_tokens_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON service_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION atlas_notify_service_tokens();
