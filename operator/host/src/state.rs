//! Single-host state in SQLite: this instance's id, subnet and address allocations (stable
//! across restarts), VNC passwords, issued agent credentials, applied host tables, and each
//! workspace's phase for `status`.

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("no free {what} left (at most {max})")]
    Full { what: &'static str, max: u16 },
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS instance (id TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS projects (project TEXT PRIMARY KEY, subnet_index INTEGER NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS workspaces (project TEXT NOT NULL, workspace TEXT NOT NULL, host_index INTEGER NOT NULL, \
     vnc_password TEXT NOT NULL, cert_pem TEXT, key_pem TEXT, phase TEXT NOT NULL DEFAULT 'Pending', message TEXT, \
     updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')), PRIMARY KEY (project, workspace), \
     UNIQUE (project, host_index))",
    "CREATE TABLE IF NOT EXISTS host_tables (name TEXT PRIMARY KEY, hash TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
];

#[derive(Clone)]
pub struct State {
    pool: SqlitePool,
}

/// One row of `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkspaceRow {
    pub project: String,
    pub workspace: String,
    pub host_index: u8,
    pub phase: String,
    pub message: Option<String>,
    pub updated_at: String,
}

impl State {
    pub async fn open(path: &std::path::Path) -> Result<Self, StateError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(opts).await?;
        for s in SCHEMA {
            sqlx::query(s).execute(&pool).await?;
        }
        Ok(Self { pool })
    }

    /// This instance's id (made once, kept).
    pub async fn instance(&self) -> Result<String, StateError> {
        if let Some(row) = sqlx::query("SELECT id FROM instance").fetch_optional(&self.pool).await? {
            return Ok(row.get(0));
        }
        let id = crate::model::short_tag(&format!("{:?}{}", std::time::SystemTime::now(), std::process::id()));
        sqlx::query("INSERT INTO instance (id) VALUES (?)").bind(&id).execute(&self.pool).await?;
        Ok(id)
    }

    pub async fn setting(&self, key: &str) -> Result<Option<String>, StateError> {
        Ok(sqlx::query("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.get(0)))
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<(), StateError> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The project's subnet index, allocating the lowest free one.
    pub async fn project_index(&self, project: &str) -> Result<u8, StateError> {
        if let Some(row) = sqlx::query("SELECT subnet_index FROM projects WHERE project = ?")
            .bind(project)
            .fetch_optional(&self.pool)
            .await?
        {
            return Ok(row.get::<i64, _>(0) as u8);
        }
        let used: Vec<i64> = sqlx::query_scalar("SELECT subnet_index FROM projects").fetch_all(&self.pool).await?;
        let free =
            (0..=255i64).find(|i| !used.contains(i)).ok_or(StateError::Full { what: "project subnet", max: 256 })?;
        sqlx::query("INSERT INTO projects (project, subnet_index) VALUES (?, ?)")
            .bind(project)
            .bind(free)
            .execute(&self.pool)
            .await?;
        Ok(free as u8)
    }

    pub async fn projects(&self) -> Result<Vec<(String, u8)>, StateError> {
        let rows =
            sqlx::query("SELECT project, subnet_index FROM projects ORDER BY project").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<i64, _>(1) as u8)).collect())
    }

    pub async fn forget_project(&self, project: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM projects WHERE project = ?").bind(project).execute(&self.pool).await?;
        Ok(())
    }

    /// The workspace's host index and VNC password, allocating them on first sight.
    pub async fn workspace(
        &self,
        project: &str,
        workspace: &str,
        new_password: impl FnOnce() -> String,
    ) -> Result<(u8, String), StateError> {
        const GET: &str = "SELECT host_index, vnc_password FROM workspaces WHERE project = ? AND workspace = ?";
        if let Some(row) = sqlx::query(GET).bind(project).bind(workspace).fetch_optional(&self.pool).await? {
            return Ok((row.get::<i64, _>(0) as u8, row.get(1)));
        }
        let used: Vec<i64> = sqlx::query_scalar("SELECT host_index FROM workspaces WHERE project = ?")
            .bind(project)
            .fetch_all(&self.pool)
            .await?;
        let max = i64::from(crate::model::MAX_HOSTS);
        let free = (0..max)
            .find(|i| !used.contains(i))
            .ok_or(StateError::Full { what: "workspace address", max: crate::model::MAX_HOSTS })?;
        let password = new_password();
        sqlx::query("INSERT INTO workspaces (project, workspace, host_index, vnc_password) VALUES (?, ?, ?, ?)")
            .bind(project)
            .bind(workspace)
            .bind(free)
            .bind(&password)
            .execute(&self.pool)
            .await?;
        Ok((free as u8, password))
    }

    pub async fn credentials(&self, project: &str, workspace: &str) -> Result<Option<(String, String)>, StateError> {
        let row = sqlx::query("SELECT cert_pem, key_pem FROM workspaces WHERE project = ? AND workspace = ?")
            .bind(project)
            .bind(workspace)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| Some((r.get::<Option<String>, _>(0)?, r.get::<Option<String>, _>(1)?))))
    }

    pub async fn set_credentials(
        &self,
        project: &str,
        workspace: &str,
        cert: &str,
        key: &str,
    ) -> Result<(), StateError> {
        sqlx::query("UPDATE workspaces SET cert_pem = ?, key_pem = ? WHERE project = ? AND workspace = ?")
            .bind(cert)
            .bind(key)
            .bind(project)
            .bind(workspace)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_phase(
        &self,
        project: &str,
        workspace: &str,
        phase: &str,
        message: Option<&str>,
    ) -> Result<(), StateError> {
        sqlx::query(
            "UPDATE workspaces SET phase = ?, message = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%SZ','now') \
             WHERE project = ? AND workspace = ? AND (phase IS NOT ? OR message IS NOT ?)",
        )
        .bind(phase)
        .bind(message)
        .bind(project)
        .bind(workspace)
        .bind(phase)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn workspaces(&self) -> Result<Vec<WorkspaceRow>, StateError> {
        let rows = sqlx::query("SELECT project, workspace, host_index, phase, message, updated_at FROM workspaces ORDER BY project, workspace")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| WorkspaceRow {
                project: r.get(0),
                workspace: r.get(1),
                host_index: r.get::<i64, _>(2) as u8,
                phase: r.get(3),
                message: r.get(4),
                updated_at: r.get(5),
            })
            .collect())
    }

    pub async fn forget_workspace(&self, project: &str, workspace: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM workspaces WHERE project = ? AND workspace = ?")
            .bind(project)
            .bind(workspace)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn tables(&self) -> Result<Vec<(String, String)>, StateError> {
        let rows = sqlx::query("SELECT name, hash FROM host_tables").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn set_table(&self, name: &str, hash: Option<&str>) -> Result<(), StateError> {
        match hash {
            Some(h) => {
                sqlx::query("INSERT INTO host_tables (name, hash) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET hash = excluded.hash")
                    .bind(name)
                    .bind(h)
                    .execute(&self.pool)
                    .await?
            }
            None => sqlx::query("DELETE FROM host_tables WHERE name = ?").bind(name).execute(&self.pool).await?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn allocations_are_stable_and_reused_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("host.db")).await.unwrap();
        let id = s.instance().await.unwrap();
        assert_eq!(s.instance().await.unwrap(), id);
        assert_eq!(s.project_index("a").await.unwrap(), 0);
        assert_eq!(s.project_index("b").await.unwrap(), 1);
        assert_eq!(s.project_index("a").await.unwrap(), 0);
        s.forget_project("a").await.unwrap();
        assert_eq!(s.project_index("c").await.unwrap(), 0);
        let (h, pw) = s.workspace("a", "w1", || "pw1".into()).await.unwrap();
        assert_eq!((h, pw.as_str()), (0, "pw1"));
        assert_eq!(s.workspace("a", "w2", || "pw2".into()).await.unwrap().0, 1);
        assert_eq!(s.workspace("a", "w1", || "other".into()).await.unwrap(), (0, "pw1".into()));
        s.set_phase("a", "w1", "Running", None).await.unwrap();
        assert_eq!(s.workspaces().await.unwrap()[0].phase, "Running");
        s.set_table("noexit-a", Some("h")).await.unwrap();
        assert_eq!(s.tables().await.unwrap(), vec![("noexit-a".into(), "h".into())]);
        s.set_table("noexit-a", None).await.unwrap();
        assert!(s.tables().await.unwrap().is_empty());
    }
}
