//! The airlock's tables (migration 0004): output requests and their life cycle, reviews,
//! download tokens, receipts. Every state change is a compare-and-set on `version`, taken as the
//! first write of its transaction, so two reviewers deciding at once never both count against a
//! stale state: the loser retries on the new one.

use chrono::{DateTime, Utc};
use noexit_airlock::lifecycle::State;
use noexit_crds::agent::{OutboxManifest, WorkspaceIdentity};
use serde::Serialize;
use uuid::Uuid;

use super::store::{ApiStore, StoreError, clamp_i64, on_db};

const COLUMNS: &str = "id, project, workspace, file_name, size, sha256, submitted_by, scan, state, content_path, \
    requester, report, version, state_since, content_deleted_at, companion_of, created_at, uploaded_at";

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct OutputRequestRow {
    pub id: String,
    pub project: String,
    pub workspace: String,
    pub file_name: String,
    pub size: i64,
    pub sha256: String,
    pub submitted_by: String,
    pub scan: String,
    pub state: String,
    pub content_path: Option<String>,
    pub requester: Option<String>,
    pub report: Option<String>,
    pub version: i64,
    pub state_since: Option<DateTime<Utc>>,
    pub content_deleted_at: Option<DateTime<Utc>>,
    pub companion_of: Option<String>,
    pub created_at: DateTime<Utc>,
    pub uploaded_at: Option<DateTime<Utc>>,
}

impl OutputRequestRow {
    /// The life-cycle state (an unknown name reads as `submitted`, the most restricted).
    pub fn life(&self) -> State {
        State::parse(&self.state).unwrap_or(State::Submitted)
    }

    /// The project person the request belongs to.
    pub fn requester(&self) -> &str {
        self.requester.as_deref().unwrap_or(&self.submitted_by)
    }

    /// When the current state began.
    pub fn since(&self) -> DateTime<Utc> {
        self.state_since.or(self.uploaded_at).unwrap_or(self.created_at)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRow {
    #[serde(skip)]
    pub request_id: String,
    pub reviewer: String,
    pub decision: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRow {
    pub token_hash: String,
    pub request_id: String,
    pub issued_to: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// What redeeming a download token found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redeemed {
    /// The token was valid and is now used.
    Fresh(TokenRow),
    Unknown,
    Used(TokenRow),
    Expired(TokenRow),
}

/// A new output request.
pub struct NewOutput<'a> {
    pub ws: &'a WorkspaceIdentity,
    pub manifest: &'a OutboxManifest,
    pub requester: &'a str,
    pub companion_of: Option<&'a str>,
}

impl ApiStore {
    /// Record an outbox manifest once. Returns the stored row (the existing one on a resend).
    pub async fn insert_output_request(&self, new: &NewOutput<'_>) -> Result<OutputRequestRow, StoreError> {
        const SQL: &str = "INSERT INTO output_requests \
            (id, project, workspace, file_name, size, sha256, submitted_by, scan, state, created_at, requester, \
            companion_of, state_since, version) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $10, 0) ON CONFLICT (id) DO NOTHING";
        let m = new.manifest;
        let scan = serde_json::to_string(&m.scan).unwrap_or_else(|_| "{}".into());
        on_db!(self.db(), pool => sqlx::query(SQL)
            .bind(m.id.to_string())
            .bind(&new.ws.project)
            .bind(&new.ws.name)
            .bind(&m.file_name)
            .bind(clamp_i64(m.size))
            .bind(&m.sha256)
            .bind(&m.submitted_by)
            .bind(scan)
            .bind(State::Submitted.as_str())
            .bind(Utc::now())
            .bind(new.requester)
            .bind(new.companion_of)
            .execute(pool)
            .await
            .map(|_| ())?);
        self.output_request(m.id)
            .await?
            .ok_or_else(|| StoreError::Unavailable(format!("output request {} vanished after insert", m.id)))
    }

    pub async fn output_request(&self, id: Uuid) -> Result<Option<OutputRequestRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM output_requests WHERE id = $1");
        Ok(on_db!(self.db(), pool => sqlx::query_as::<_, OutputRequestRow>(&sql)
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?))
    }

    /// A project's requests, newest first; only `requester`'s when given.
    pub async fn output_requests(
        &self,
        project: &str,
        requester: Option<&str>,
    ) -> Result<Vec<OutputRequestRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM output_requests WHERE project = $1 AND ($2 IS NULL OR requester = $2) \
             ORDER BY created_at DESC, id"
        );
        Ok(on_db!(self.db(), pool => sqlx::query_as::<_, OutputRequestRow>(&sql)
            .bind(project)
            .bind(requester)
            .fetch_all(pool)
            .await?))
    }

    /// A workspace's requests, oldest first.
    pub async fn workspace_outputs(&self, ws: &WorkspaceIdentity) -> Result<Vec<OutputRequestRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM output_requests WHERE project = $1 AND workspace = $2 ORDER BY created_at, id"
        );
        Ok(on_db!(self.db(), pool => sqlx::query_as::<_, OutputRequestRow>(&sql)
            .bind(&ws.project)
            .bind(&ws.name)
            .fetch_all(pool)
            .await?))
    }

    /// Every request whose content is still stored or whose state may still expire (the sweeper).
    pub async fn sweepable_outputs(&self) -> Result<Vec<OutputRequestRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM output_requests WHERE content_deleted_at IS NULL");
        Ok(on_db!(self.db(), pool => sqlx::query_as::<_, OutputRequestRow>(&sql).fetch_all(pool).await?))
    }

    pub async fn reviews(&self, id: &str) -> Result<Vec<ReviewRow>, StoreError> {
        const SQL: &str = "SELECT request_id, reviewer, decision, reason, at FROM output_reviews \
            WHERE request_id = $1 ORDER BY at, reviewer";
        Ok(on_db!(self.db(), pool => sqlx::query_as::<_, ReviewRow>(SQL).bind(id).fetch_all(pool).await?))
    }

    /// Reviews of every request of a workspace (one query for the agent's poll).
    pub async fn workspace_reviews(&self, ws: &WorkspaceIdentity) -> Result<Vec<ReviewRow>, StoreError> {
        const SQL: &str = "SELECT r.request_id, r.reviewer, r.decision, r.reason, r.at FROM output_reviews r \
            JOIN output_requests o ON o.id = r.request_id WHERE o.project = $1 AND o.workspace = $2 \
            ORDER BY r.at, r.reviewer";
        Ok(on_db!(self.db(), pool => sqlx::query_as::<_, ReviewRow>(SQL)
            .bind(&ws.project)
            .bind(&ws.name)
            .fetch_all(pool)
            .await?))
    }

    /// Move `id` from `version` to `to`, with an optional review and receipt in the same
    /// transaction. `false` if another change came first (re-read and decide again).
    pub async fn change_state(
        &self,
        id: &str,
        version: i64,
        to: State,
        review: Option<&ReviewRow>,
        receipt: Option<&str>,
    ) -> Result<bool, StoreError> {
        const CAS: &str = "UPDATE output_requests SET state = $1, version = version + 1, state_since = $2 \
            WHERE id = $3 AND version = $4";
        const REVIEW: &str =
            "INSERT INTO output_reviews (request_id, reviewer, decision, reason, at) VALUES ($1, $2, $3, $4, $5)";
        const RECEIPT: &str = "INSERT INTO output_receipts (request_id, receipt, released_at) VALUES ($1, $2, $3)";
        let now = Utc::now();
        let done: Result<bool, sqlx::Error> = on_db!(self.db(), pool => {
            let mut tx = pool.begin().await?;
            let changed = sqlx::query(CAS)
                .bind(to.as_str())
                .bind(now)
                .bind(id)
                .bind(version)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if changed != 1 {
                tx.rollback().await?;
                Ok(false)
            } else {
                if let Some(r) = review {
                    sqlx::query(REVIEW)
                        .bind(id)
                        .bind(&r.reviewer)
                        .bind(&r.decision)
                        .bind(&r.reason)
                        .bind(r.at)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(receipt) = receipt {
                    sqlx::query(RECEIPT).bind(id).bind(receipt).bind(now).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(true)
            }
        });
        Ok(done?)
    }

    /// The content arrived, matched, and was checked: `submitted` → `checked`.
    pub async fn mark_checked(
        &self,
        id: &str,
        version: i64,
        content_path: &str,
        report: &str,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE output_requests SET state = $1, content_path = $2, report = $3, uploaded_at = $4, \
            state_since = $4, version = version + 1 WHERE id = $5 AND version = $6 AND state = $7";
        let done = on_db!(self.db(), pool => sqlx::query(SQL)
            .bind(State::Checked.as_str())
            .bind(content_path)
            .bind(report)
            .bind(Utc::now())
            .bind(id)
            .bind(version)
            .bind(State::Submitted.as_str())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Replace the report of a request no one has reviewed yet (a companion arrived later).
    pub async fn replace_report(&self, id: &str, version: i64, report: &str) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE output_requests SET report = $1, version = version + 1 \
            WHERE id = $2 AND version = $3 AND state = $4";
        let done = on_db!(self.db(), pool => sqlx::query(SQL)
            .bind(report)
            .bind(id)
            .bind(version)
            .bind(State::Checked.as_str())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    pub async fn mark_content_deleted(&self, id: &str) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE output_requests SET content_deleted_at = $1 WHERE id = $2";
        on_db!(self.db(), pool => sqlx::query(SQL).bind(Utc::now()).bind(id).execute(pool).await.map(|_| ())?);
        Ok(())
    }

    pub async fn insert_download_token(
        &self,
        token_hash: &str,
        request_id: &str,
        issued_to: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO output_download_tokens (token_hash, request_id, issued_to, issued_at, expires_at) \
            VALUES ($1, $2, $3, $4, $5)";
        on_db!(self.db(), pool => sqlx::query(SQL)
            .bind(token_hash)
            .bind(request_id)
            .bind(issued_to)
            .bind(Utc::now())
            .bind(expires_at)
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }

    /// The token whose SHA-256 is `token_hash`, used or not.
    pub async fn download_token(&self, token_hash: &str) -> Result<Option<TokenRow>, StoreError> {
        const GET: &str = "SELECT token_hash, request_id, issued_to, issued_at, expires_at, used_at \
            FROM output_download_tokens WHERE token_hash = $1";
        Ok(on_db!(self.db(), pool => sqlx::query_as::<_, TokenRow>(GET).bind(token_hash).fetch_optional(pool).await?))
    }

    /// Use a token at most once: the `used_at IS NULL` guard makes the winner of two
    /// concurrent uses the only one. A token for another request or another person is
    /// `Unknown` and stays unused (nobody can burn someone else's link).
    pub async fn redeem_download_token(
        &self,
        token_hash: &str,
        request_id: &str,
        user: &str,
        now: DateTime<Utc>,
    ) -> Result<Redeemed, StoreError> {
        const GET: &str = "SELECT token_hash, request_id, issued_to, issued_at, expires_at, used_at \
            FROM output_download_tokens WHERE token_hash = $1";
        const USE: &str = "UPDATE output_download_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL";
        let row = on_db!(self.db(), pool => sqlx::query_as::<_, TokenRow>(GET)
            .bind(token_hash)
            .fetch_optional(pool)
            .await?);
        let Some(row) = row.filter(|r| r.request_id == request_id && r.issued_to == user) else {
            return Ok(Redeemed::Unknown);
        };
        if row.used_at.is_some() {
            return Ok(Redeemed::Used(row));
        }
        if row.expires_at <= now {
            return Ok(Redeemed::Expired(row));
        }
        let won = on_db!(self.db(), pool => sqlx::query(USE)
            .bind(now)
            .bind(token_hash)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(if won == 1 { Redeemed::Fresh(row) } else { Redeemed::Used(row) })
    }

    pub async fn receipt(&self, id: &str) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT receipt FROM output_receipts WHERE request_id = $1";
        Ok(on_db!(self.db(), pool => sqlx::query_scalar::<_, String>(SQL).bind(id).fetch_optional(pool).await?))
    }
}
