-- Each entry names the component that wrote it and carries that writer's ed25519 signature over
-- the entry hash (see docs/auditor.md). Older rows have neither; `verify` reports them unsigned.
ALTER TABLE audit_log ADD COLUMN writer TEXT, ADD COLUMN signature BYTEA;

-- Which database role writes as which writer, and which actions it may append. Filled by
-- `noexit-operator audit-roles`; a role not listed here (the owner that runs migrations) is
-- not restricted by the trigger below, only by what it was granted.
CREATE TABLE audit_writers (
    role_name     TEXT PRIMARY KEY,
    writer        TEXT NOT NULL,
    action_prefix TEXT              -- NULL: every action that no other writer owns
);

CREATE FUNCTION noexit_audit_writer_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    w audit_writers%ROWTYPE;
BEGIN
    SELECT * INTO w FROM audit_writers WHERE role_name = current_user;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    IF NEW.writer IS DISTINCT FROM w.writer THEN
        RAISE EXCEPTION 'audit_log: role % writes as writer %, not %', current_user, w.writer, NEW.writer;
    END IF;
    IF w.action_prefix IS NOT NULL THEN
        IF NOT starts_with(NEW.action, w.action_prefix) THEN
            RAISE EXCEPTION 'audit_log: role % may append only %* entries, not %', current_user, w.action_prefix, NEW.action;
        END IF;
    ELSIF EXISTS (SELECT 1 FROM audit_writers o
                  WHERE o.action_prefix IS NOT NULL AND starts_with(NEW.action, o.action_prefix)) THEN
        RAISE EXCEPTION 'audit_log: role % may not append %: that action belongs to another writer', current_user, NEW.action;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER audit_log_writer BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION noexit_audit_writer_check();
