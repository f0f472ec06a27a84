//! The gateway's server-side state: sign-in sessions (the cookie holds only a random id),
//! pending sign-ins, the live desktop session of each workspace and recent ones.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use crate::directory::Directory;
use crate::metrics::Metrics;
use crate::oidc::{OidcClient, Pending, SignedIn};
use crate::record::{GatewayEvent, Recorder};
use crate::rfb::DropReason;

/// How many ended sessions the session list keeps in memory.
const HISTORY: usize = 500;

#[derive(Clone, Debug)]
pub struct Config {
    /// `https://gateway.example` — WebSocket `Origin` must equal it.
    pub public_origin: String,
    /// How often a live session's access is checked again (at most 30 s).
    pub recheck: Duration,
    /// Refuse sign-ins without a second factor.
    pub require_mfa: bool,
    /// Longest sign-in session, whatever the ID token says.
    pub max_signin: Duration,
    /// Directory with noVNC (`core/rfb.js`).
    pub novnc_dir: PathBuf,
}

/// One signed-in person, found by the cookie's id.
#[derive(Clone, Debug)]
pub struct SignIn {
    pub who: SignedIn,
    pub csrf: String,
    pub ends: DateTime<Utc>,
}

pub type LiveKey = (String, String);

pub struct Live {
    pub id: Uuid,
    pub user: String,
    pub cancel: watch::Sender<Option<String>>,
}

/// A desktop session as the session list shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub id: Uuid,
    pub user: String,
    pub project: String,
    pub workspace: String,
    pub source: String,
    pub started: DateTime<Utc>,
    pub ended: Option<DateTime<Utc>>,
    pub end_reason: Option<String>,
    /// Drops by reason.
    pub drops: HashMap<&'static str, u64>,
}

pub struct Gateway {
    pub directory: Arc<dyn Directory>,
    pub recorder: Arc<dyn Recorder>,
    pub metrics: Metrics,
    pub oidc: OidcClient,
    pub config: Config,
    pub signins: Mutex<HashMap<String, SignIn>>,
    pub pending: Mutex<HashMap<String, Pending>>,
    pub live: Mutex<HashMap<LiveKey, Live>>,
    pub sessions: Mutex<VecDeque<SessionInfo>>,
}

impl Gateway {
    pub fn new(
        directory: Arc<dyn Directory>,
        recorder: Arc<dyn Recorder>,
        oidc: OidcClient,
        config: Config,
    ) -> Arc<Self> {
        Arc::new(Self {
            directory,
            recorder,
            metrics: Metrics::default(),
            oidc,
            config,
            signins: Mutex::default(),
            pending: Mutex::default(),
            live: Mutex::default(),
            sessions: Mutex::default(),
        })
    }

    /// Record an audit event; a failure to record is logged (the decision stands).
    pub async fn audit(&self, event: GatewayEvent) {
        if let Some(reason) = &event.refused {
            tracing::info!(actor = %event.actor, action = %event.action, object = %event.object, %reason, "refused");
        }
        if let Err(e) = self.recorder.audit(event).await {
            tracing::error!(error = %e, "cannot record an audit event");
        }
    }

    /// Count and audit a refusal.
    pub async fn refuse(
        &self,
        actor: &str,
        action: &str,
        object: &str,
        code: &'static str,
        reason: &str,
        source: &str,
    ) {
        self.metrics.refusals.get_or_create(&crate::metrics::ReasonLabels { reason: code }).inc();
        self.audit(GatewayEvent {
            actor: actor.into(),
            action: action.into(),
            object: object.into(),
            refused: Some(reason.into()),
            source: Some(source.into()),
            detail: serde_json::json!({"code": code}),
        })
        .await;
    }

    pub fn count_drop(&self, id: Uuid, reason: DropReason) {
        if let Ok(mut sessions) = self.sessions.lock()
            && let Some(s) = sessions.iter_mut().find(|s| s.id == id)
        {
            *s.drops.entry(reason.as_str()).or_default() += 1;
        }
    }

    pub fn session_started(&self, info: SessionInfo) {
        if let Ok(mut sessions) = self.sessions.lock() {
            if sessions.len() >= HISTORY
                && let Some(pos) = sessions.iter().position(|s| s.ended.is_some())
            {
                sessions.remove(pos);
            }
            sessions.push_back(info);
        }
    }

    pub fn session_ended(&self, id: Uuid, reason: &str) -> Option<SessionInfo> {
        let mut sessions = self.sessions.lock().ok()?;
        let s = sessions.iter_mut().find(|s| s.id == id)?;
        s.ended = Some(Utc::now());
        s.end_reason = Some(reason.into());
        Some(s.clone())
    }

    /// Close every live session of `user` (sign-out).
    pub fn cancel_user(&self, user: &str, why: &str) {
        if let Ok(live) = self.live.lock() {
            for l in live.values().filter(|l| l.user == user) {
                let _ = l.cancel.send(Some(why.into()));
            }
        }
    }
}
