-- Control-plane API state (the audit log itself is in 0001). Every agent event is keyed by the
-- idempotency id the agent made, so a resent spool stores nothing twice.

CREATE TABLE agent_sessions (
    id           TEXT PRIMARY KEY,
    project      TEXT NOT NULL,
    workspace    TEXT NOT NULL,
    at           TIMESTAMPTZ NOT NULL,
    action       TEXT NOT NULL,
    username     TEXT NOT NULL,
    session      TEXT,
    source       TEXT,
    idle_seconds BIGINT,
    received_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX agent_sessions_workspace ON agent_sessions (project, workspace, at);

CREATE TABLE agent_violations (
    id          TEXT PRIMARY KEY,
    project     TEXT NOT NULL,
    workspace   TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    kind        TEXT NOT NULL,
    count       BIGINT NOT NULL,
    detail      TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX agent_violations_workspace ON agent_violations (project, workspace, at);

-- The latest heartbeat of each workspace (history lives in the metrics, not here).
CREATE TABLE agent_heartbeats (
    project         TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    at              TIMESTAMPTZ NOT NULL,
    agent_version   TEXT NOT NULL,
    egress_locked   BOOLEAN NOT NULL,
    egress_detail   TEXT,
    spool_depth     BIGINT NOT NULL,
    active_sessions BIGINT NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project, workspace)
);

CREATE TABLE output_requests (
    id           TEXT PRIMARY KEY,
    project      TEXT NOT NULL,
    workspace    TEXT NOT NULL,
    file_name    TEXT NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    submitted_by TEXT NOT NULL,
    scan         TEXT NOT NULL,
    state        TEXT NOT NULL,
    content_path TEXT,
    created_at   TIMESTAMPTZ NOT NULL,
    uploaded_at  TIMESTAMPTZ
);
CREATE INDEX output_requests_workspace ON output_requests (project, workspace);

CREATE TABLE certificate_revocations (
    serial     TEXT PRIMARY KEY,
    project    TEXT NOT NULL,
    workspace  TEXT NOT NULL,
    reason     TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL
);
