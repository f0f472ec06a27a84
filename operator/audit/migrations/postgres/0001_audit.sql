-- The append-only audit log (see docs/auditor.md for the hash encoding).
CREATE TABLE audit_log (
    seq             BIGINT  PRIMARY KEY,   -- 1, 2, 3, … without gaps
    time_us         BIGINT  NOT NULL,      -- microseconds since the Unix epoch, UTC
    actor           TEXT    NOT NULL,
    role            TEXT,
    action          TEXT    NOT NULL,
    object          TEXT    NOT NULL,
    outcome         TEXT    NOT NULL CHECK (outcome IN ('allowed', 'refused')),
    reason          TEXT,
    source          TEXT,
    detail          TEXT    NOT NULL,      -- JSON text exactly as hashed (not jsonb: it would reorder keys)
    idempotency_key TEXT    UNIQUE,
    prev_hash       BYTEA   NOT NULL,
    hash            BYTEA   NOT NULL
);
CREATE INDEX audit_log_time ON audit_log (time_us);
CREATE INDEX audit_log_actor ON audit_log (actor);
CREATE INDEX audit_log_action ON audit_log (action);
CREATE INDEX audit_log_object ON audit_log (object);

-- Signed Merkle roots over consecutive ranges of the log.
CREATE TABLE audit_checkpoint (
    id          BIGINT  PRIMARY KEY,       -- 1, 2, 3, …
    first_seq   BIGINT  NOT NULL,
    last_seq    BIGINT  NOT NULL,
    time_us     BIGINT  NOT NULL,
    merkle_root BYTEA   NOT NULL,
    head_hash   BYTEA   NOT NULL,          -- hash of entry last_seq
    key_id      TEXT    NOT NULL,
    signature   BYTEA   NOT NULL
);

CREATE FUNCTION noexit_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION noexit_audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION noexit_audit_append_only();
CREATE TRIGGER audit_checkpoint_append_only BEFORE UPDATE OR DELETE ON audit_checkpoint
    FOR EACH ROW EXECUTE FUNCTION noexit_audit_append_only();
CREATE TRIGGER audit_checkpoint_no_truncate BEFORE TRUNCATE ON audit_checkpoint
    FOR EACH STATEMENT EXECUTE FUNCTION noexit_audit_append_only();
