-- Each entry names the component that wrote it and carries that writer's ed25519 signature over
-- the entry hash (see docs/auditor.md). SQLite has no roles: the signatures alone bind entries
-- to writers.
ALTER TABLE audit_log ADD COLUMN writer TEXT;
ALTER TABLE audit_log ADD COLUMN signature BLOB;
