-- The airlock: output requests get a life cycle (noexit_airlock::lifecycle), the control
-- plane's check report, reviews, single-use download tokens and signed release receipts.
-- Content is sealed at rest (noexit_airlock::seal); metadata and receipts outlive it.

-- Old states map onto the life cycle: nothing was ever reviewed before this migration.
UPDATE output_requests SET state = 'submitted' WHERE state = 'awaitingContent';
UPDATE output_requests SET state = 'checked' WHERE state = 'pendingReview';

-- The project person the request belongs to (the workspace owner when it was submitted);
-- submitted_by stays the workspace's local user.
ALTER TABLE output_requests ADD COLUMN requester TEXT;
-- The automatic checks' report (JSON of noexit_airlock::checks::Report), once content arrived.
ALTER TABLE output_requests ADD COLUMN report TEXT;
-- Optimistic concurrency: every state change is a compare-and-set on this number.
ALTER TABLE output_requests ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
-- When the request entered its current state (retention counts from here).
ALTER TABLE output_requests ADD COLUMN state_since TIMESTAMPTZ;
-- Set when the sweeper deleted the sealed content.
ALTER TABLE output_requests ADD COLUMN content_deleted_at TIMESTAMPTZ;
-- A companion (an OutputMetadata sidecar `<file>.sdc.json` or an ACRO `results.json`) names
-- the request of the file it describes; it is never reviewed or released on its own.
ALTER TABLE output_requests ADD COLUMN companion_of TEXT;
CREATE INDEX output_requests_project_state ON output_requests (project, state);

-- One decision per reviewer per request; decisions are final (never updated).
CREATE TABLE output_reviews (
    request_id TEXT NOT NULL,
    reviewer   TEXT NOT NULL,
    decision   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    at         TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (request_id, reviewer)
);

-- Download links: only the SHA-256 of the token is kept; a token is used at most once.
CREATE TABLE output_download_tokens (
    token_hash TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    issued_to  TEXT NOT NULL,
    issued_at  TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at    TIMESTAMPTZ
);
CREATE INDEX output_download_tokens_request ON output_download_tokens (request_id);

-- The signed release receipt (JSON, as given to the requester), kept forever.
CREATE TABLE output_receipts (
    request_id  TEXT PRIMARY KEY,
    receipt     TEXT NOT NULL,
    released_at TIMESTAMPTZ NOT NULL
);
