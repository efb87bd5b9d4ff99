CREATE TABLE IF NOT EXISTS knoxgate_revocation_log (
    id bigserial PRIMARY KEY,
    logged_at timestamp with time zone NOT NULL DEFAULT clock_timestamp(),
    kind text NOT NULL,
    user_id text NOT NULL,
    token_key text
);
CREATE INDEX IF NOT EXISTS knoxgate_revocation_log_logged_at ON knoxgate_revocation_log (logged_at);

CREATE OR REPLACE FUNCTION knoxgate_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- knoxgate token trigger: INSERTs and moved keys logged, user ids escaped
    IF TG_OP = 'INSERT' THEN
        -- Logged like a removal, so that a relay's replay brings back the INSERTs its stream
        -- missed and instances' key filters learn them without reloading.
        INSERT INTO knoxgate_revocation_log (kind, user_id, token_key) VALUES ('i', NEW.user_id::text, NEW.token_key);
        PERFORM pg_notify('knoxgate', 'i|' || replace(replace(NEW.user_id::text, '%', '%25'), '|', '%7C') || '|' || NEW.token_key);
        RETURN NULL;
    END IF;
    INSERT INTO knoxgate_revocation_log (kind, user_id, token_key) VALUES ('t', OLD.user_id::text, OLD.token_key);
    PERFORM pg_notify('knoxgate', 't|' || replace(replace(OLD.user_id::text, '%', '%25'), '|', '%7C') || '|' || OLD.token_key);
    IF TG_OP = 'UPDATE' AND (NEW.token_key IS DISTINCT FROM OLD.token_key OR NEW.user_id IS DISTINCT FROM OLD.user_id) THEN
        INSERT INTO knoxgate_revocation_log (kind, user_id, token_key) VALUES ('t', NEW.user_id::text, NEW.token_key);
        PERFORM pg_notify('knoxgate', 't|' || replace(replace(NEW.user_id::text, '%', '%25'), '|', '%7C') || '|' || NEW.token_key);
        -- The row under its new key is, for key filters, a new token.
        INSERT INTO knoxgate_revocation_log (kind, user_id, token_key) VALUES ('i', NEW.user_id::text, NEW.token_key);
        PERFORM pg_notify('knoxgate', 'i|' || replace(replace(NEW.user_id::text, '%', '%25'), '|', '%7C') || '|' || NEW.token_key);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION knoxgate_user_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO knoxgate_revocation_log (kind, user_id) VALUES ('u', OLD.id::text);
    PERFORM pg_notify('knoxgate', 'u|' || replace(replace(OLD.id::text, '%', '%25'), '|', '%7C') || '|');
    RETURN NULL;
END $$;

-- TRUNCATE fires no row trigger and says nothing about which rows went: every token is revoked.
CREATE OR REPLACE FUNCTION knoxgate_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO knoxgate_revocation_log (kind, user_id) VALUES ('a', '');
    PERFORM pg_notify('knoxgate', 'a||');
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS knoxgate_token_changed ON knox_authtoken;
CREATE TRIGGER knoxgate_token_changed
    AFTER INSERT OR DELETE OR UPDATE OF digest, token_key, user_id, expiry ON knox_authtoken
    FOR EACH ROW EXECUTE FUNCTION knoxgate_token_changed();

DROP TRIGGER IF EXISTS knoxgate_user_changed ON auth_user;
CREATE TRIGGER knoxgate_user_changed
    AFTER UPDATE OF is_active, password, is_staff, is_superuser, username, email ON auth_user
    FOR EACH ROW
    WHEN (OLD.is_active IS DISTINCT FROM NEW.is_active OR OLD.password IS DISTINCT FROM NEW.password OR OLD.is_staff IS DISTINCT FROM NEW.is_staff OR OLD.is_superuser IS DISTINCT FROM NEW.is_superuser OR OLD.username IS DISTINCT FROM NEW.username OR OLD.email IS DISTINCT FROM NEW.email)
    EXECUTE FUNCTION knoxgate_user_changed();

DROP TRIGGER IF EXISTS knoxgate_user_deleted ON auth_user;
CREATE TRIGGER knoxgate_user_deleted
    AFTER DELETE ON auth_user
    FOR EACH ROW EXECUTE FUNCTION knoxgate_user_changed();

DROP TRIGGER IF EXISTS knoxgate_token_truncated ON knox_authtoken;
CREATE TRIGGER knoxgate_token_truncated
    AFTER TRUNCATE ON knox_authtoken
    FOR EACH STATEMENT EXECUTE FUNCTION knoxgate_truncated();

DROP TRIGGER IF EXISTS knoxgate_user_truncated ON auth_user;
CREATE TRIGGER knoxgate_user_truncated
    AFTER TRUNCATE ON auth_user
    FOR EACH STATEMENT EXECUTE FUNCTION knoxgate_truncated();

-- Fire under session_replication_role = replica too (pg_restore, logical replication).
ALTER TABLE knox_authtoken ENABLE ALWAYS TRIGGER knoxgate_token_changed;
ALTER TABLE knox_authtoken ENABLE ALWAYS TRIGGER knoxgate_token_truncated;
ALTER TABLE auth_user ENABLE ALWAYS TRIGGER knoxgate_user_changed;
ALTER TABLE auth_user ENABLE ALWAYS TRIGGER knoxgate_user_deleted;
ALTER TABLE auth_user ENABLE ALWAYS TRIGGER knoxgate_user_truncated;
CREATE OR REPLACE FUNCTION knoxgate_membership_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO knoxgate_revocation_log (kind, user_id) VALUES ('u', OLD.user_id::text);
        PERFORM pg_notify('knoxgate', 'u|' || replace(replace(OLD.user_id::text, '%', '%25'), '|', '%7C') || '|');
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO knoxgate_revocation_log (kind, user_id) VALUES ('u', NEW.user_id::text);
        PERFORM pg_notify('knoxgate', 'u|' || replace(replace(NEW.user_id::text, '%', '%25'), '|', '%7C') || '|');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION knoxgate_group_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    member text;
BEGIN
    -- Django deletes a group's memberships before the group (which fires the trigger above);
    -- this covers renames, and deletes made with SQL while members remain.
    FOR member IN SELECT DISTINCT ug.user_id::text FROM auth_user_groups ug WHERE ug.group_id = OLD.id LOOP
        INSERT INTO knoxgate_revocation_log (kind, user_id) VALUES ('u', member);
        PERFORM pg_notify('knoxgate', 'u|' || replace(replace(member, '%', '%25'), '|', '%7C') || '|');
    END LOOP;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS knoxgate_membership_changed ON auth_user_groups;
CREATE TRIGGER knoxgate_membership_changed
    AFTER INSERT OR DELETE OR UPDATE ON auth_user_groups
    FOR EACH ROW EXECUTE FUNCTION knoxgate_membership_changed();

DROP TRIGGER IF EXISTS knoxgate_group_renamed ON auth_group;
CREATE TRIGGER knoxgate_group_renamed
    AFTER UPDATE OF name ON auth_group
    FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name)
    EXECUTE FUNCTION knoxgate_group_changed();

DROP TRIGGER IF EXISTS knoxgate_group_deleted ON auth_group;
CREATE TRIGGER knoxgate_group_deleted
    AFTER DELETE ON auth_group
    FOR EACH ROW EXECUTE FUNCTION knoxgate_group_changed();

DROP TRIGGER IF EXISTS knoxgate_membership_truncated ON auth_user_groups;
CREATE TRIGGER knoxgate_membership_truncated
    AFTER TRUNCATE ON auth_user_groups
    FOR EACH STATEMENT EXECUTE FUNCTION knoxgate_truncated();

ALTER TABLE auth_user_groups ENABLE ALWAYS TRIGGER knoxgate_membership_changed;
ALTER TABLE auth_user_groups ENABLE ALWAYS TRIGGER knoxgate_membership_truncated;
ALTER TABLE auth_group ENABLE ALWAYS TRIGGER knoxgate_group_renamed;
ALTER TABLE auth_group ENABLE ALWAYS TRIGGER knoxgate_group_deleted;
