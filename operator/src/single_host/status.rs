//! `noexit-operator status`: workspaces, phases, the last heartbeat the API stored (with the
//! egress lock the agent reported), sessions, and how VMs are run.

use std::path::Path;

use noexit_host::state::State;
use sqlx::Row;

/// A heartbeat row from the API's database.
#[derive(Clone, Debug, Default)]
pub struct Beat {
    pub at: String,
    pub egress_locked: bool,
    pub active_sessions: i64,
}

async fn heartbeats(api_db: &Path) -> std::collections::BTreeMap<(String, String), Beat> {
    let mut out = std::collections::BTreeMap::new();
    if !api_db.exists() {
        return out;
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(api_db).read_only(true);
    let Ok(pool) = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(opts).await else {
        return out;
    };
    const SQL: &str = "SELECT project, workspace, at, egress_locked, active_sessions FROM agent_heartbeats";
    if let Ok(rows) = sqlx::query(SQL).fetch_all(&pool).await {
        for r in rows {
            out.insert((r.get(0), r.get(1)), Beat { at: r.get(2), egress_locked: r.get(3), active_sessions: r.get(4) });
        }
    }
    pool.close().await;
    out
}

/// The status table as text.
pub async fn render(state_dir: &Path) -> anyhow::Result<String> {
    let db = state_dir.join("host.db");
    anyhow::ensure!(
        db.exists(),
        "{}: no single-host state here (run `noexit-operator up -f …` first)",
        state_dir.display()
    );
    let state = State::open(&db).await?;
    let virt = state.setting("virt_type").await?.unwrap_or_else(|| "?".into());
    let why = state.setting("virt_type_reason").await?.unwrap_or_default();
    let beats = heartbeats(&state_dir.join("api.db")).await;
    let gateway = state.setting("gateway").await?.unwrap_or_else(|| "?".into());
    let services = state.setting("services").await?.unwrap_or_else(|| "?".into());
    let mut out = format!("virtualisation: {virt} ({why})\nservices: {services}\ngateway: {gateway}\n");
    if state_dir.join("api.db").exists() {
        out.push_str(&format!("audit: {}\n", super::audit::verify_command(state_dir)));
    }
    out.push_str(&format!(
        "{:<16} {:<20} {:<9} {:<21} {:<7} {:<8} {}\n",
        "PROJECT", "WORKSPACE", "PHASE", "LAST HEARTBEAT", "EGRESS", "SESSIONS", "MESSAGE"
    ));
    for w in state.workspaces().await? {
        let b = beats.get(&(w.project.clone(), w.workspace.clone()));
        out.push_str(&format!(
            "{:<16} {:<20} {:<9} {:<21} {:<7} {:<8} {}\n",
            w.project,
            w.workspace,
            w.phase,
            b.map_or("-".into(), |b| b.at.chars().take(19).collect::<String>() + "Z"),
            b.map_or("-", |b| if b.egress_locked { "locked" } else { "OPEN" }),
            b.map_or("-".into(), |b| b.active_sessions.to_string()),
            w.message.unwrap_or_default()
        ));
    }
    Ok(out)
}
