-- Ingress (the door in): files an analyst or admin submits for a workspace, approved by another
-- admin, then placed read-only in the workspace's /inbox by its agent. The content itself is
-- stored sealed under the API's data directory; `sealed_path` names it.

CREATE TABLE inbox_items (
    id           TEXT PRIMARY KEY,
    project      TEXT NOT NULL,
    workspace    TEXT NOT NULL,
    file_name    TEXT NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    media        TEXT NOT NULL,
    submitted_by TEXT NOT NULL,
    submitted_at TIMESTAMPTZ NOT NULL,
    state        TEXT NOT NULL,
    decided_by   TEXT,
    decided_at   TIMESTAMPTZ,
    reason       TEXT,
    delivered_at TIMESTAMPTZ,
    placed_as    TEXT,
    sealed_path  TEXT NOT NULL
);
CREATE INDEX inbox_items_project ON inbox_items (project, submitted_at);
CREATE INDEX inbox_items_workspace ON inbox_items (project, workspace, state);
