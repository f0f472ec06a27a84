-- The append-only audit log (see docs/auditor.md for the hash encoding).
CREATE TABLE audit_log (
    seq             INTEGER PRIMARY KEY,   -- 1, 2, 3, … without gaps
    time_us         INTEGER NOT NULL,      -- microseconds since the Unix epoch, UTC
    actor           TEXT    NOT NULL,
    role            TEXT,
    action          TEXT    NOT NULL,
    object          TEXT    NOT NULL,
    outcome         TEXT    NOT NULL CHECK (outcome IN ('allowed', 'refused')),
    reason          TEXT,
    source          TEXT,
    detail          TEXT    NOT NULL,      -- JSON text exactly as hashed
    idempotency_key TEXT    UNIQUE,
    prev_hash       BLOB    NOT NULL,
    hash            BLOB    NOT NULL
);
CREATE INDEX audit_log_time ON audit_log (time_us);
CREATE INDEX audit_log_actor ON audit_log (actor);
CREATE INDEX audit_log_action ON audit_log (action);
CREATE INDEX audit_log_object ON audit_log (object);

-- Signed Merkle roots over consecutive ranges of the log.
CREATE TABLE audit_checkpoint (
    id          INTEGER PRIMARY KEY,       -- 1, 2, 3, …
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    time_us     INTEGER NOT NULL,
    merkle_root BLOB    NOT NULL,
    head_hash   BLOB    NOT NULL,          -- hash of entry last_seq
    key_id      TEXT    NOT NULL,
    signature   BLOB    NOT NULL
);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END;
CREATE TRIGGER audit_checkpoint_no_update BEFORE UPDATE ON audit_checkpoint
BEGIN SELECT RAISE(ABORT, 'audit_checkpoint is append-only: UPDATE refused'); END;
CREATE TRIGGER audit_checkpoint_no_delete BEFORE DELETE ON audit_checkpoint
BEGIN SELECT RAISE(ABORT, 'audit_checkpoint is append-only: DELETE refused'); END;
