//! Pod mode: the agent has no NET_ADMIN, the cluster's NetworkPolicy is the wall, and the agent
//! proves it holds by probing. A TCP connection to the canary (an address a workspace must never
//! reach, e.g. the Kubernetes API service) must fail, and one to the mirror must succeed — the
//! second shows the probe itself works, so a failing canary means "blocked", not "no network".

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use noexit_crds::agent::{AgentConfig, AgentMode, EgressState, Endpoint};
use tokio::sync::watch as tokio_watch;

use crate::egress::Net;

/// How long a probe connection may take. A NetworkPolicy usually drops silently, so a
/// blocked canary costs this much per probe.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a single TCP connection attempt saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    Connected,
    Refused,
    TimedOut,
    Failed(String),
}

impl Reach {
    fn describe(&self) -> String {
        match self {
            Self::Connected => "connected".into(),
            Self::Refused => "refused".into(),
            Self::TimedOut => "timed out".into(),
            Self::Failed(e) => e.clone(),
        }
    }
}

/// Probes the wall once with [`CONNECT_TIMEOUT`].
pub fn run(cfg: &AgentConfig) -> EgressState {
    run_with(cfg, CONNECT_TIMEOUT)
}

/// Probes the wall once.
pub fn run_with(cfg: &AgentConfig, timeout: Duration) -> EgressState {
    match probe(cfg, timeout) {
        Ok(detail) => state(true, detail),
        Err(detail) => state(false, detail),
    }
}

/// Re-probes every `interval` and publishes the result (for the heartbeat) until every
/// receiver is gone.
pub async fn watch(cfg: AgentConfig, interval: Duration, state: tokio_watch::Sender<EgressState>) {
    let cfg = std::sync::Arc::new(cfg);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !state.is_closed() {
        ticker.tick().await;
        let c = cfg.clone();
        let next = tokio::task::spawn_blocking(move || run(&c))
            .await
            .unwrap_or_else(|e| self::state(false, format!("probe task failed: {e}")));
        if !next.locked {
            tracing::warn!(detail = ?next.detail, "egress wall not proven");
        }
        state.send_if_modified(|s| {
            let changed = *s != next;
            *s = next;
            changed
        });
    }
}

fn probe(cfg: &AgentConfig, timeout: Duration) -> Result<String, String> {
    let canary = cfg.egress.canary.as_ref().ok_or("no canary configured (egress.canary): the wall cannot be proven")?;
    let canary_addr = socket_addr("egress.canary", canary)?;
    let (mirror_field, mirror) = mirror(cfg).ok_or("no endpoint to probe (egress.endpoints is empty)")?;
    let mirror_addr = socket_addr(&mirror_field, mirror)?;

    let canary_reach = connect(canary_addr, timeout);
    if canary_reach == Reach::Connected {
        return Err(format!("canary {} {canary_addr} is reachable: the network wall is open", canary.name));
    }
    let mirror_reach = connect(mirror_addr, timeout);
    if mirror_reach != Reach::Connected {
        return Err(format!(
            "probe inconclusive: {} {mirror_addr} {} (canary {} {canary_addr} {})",
            mirror.name,
            mirror_reach.describe(),
            canary.name,
            canary_reach.describe()
        ));
    }
    Ok(format!(
        "canary {} {canary_addr} blocked ({}); {} {mirror_addr} reachable",
        canary.name,
        canary_reach.describe(),
        mirror.name
    ))
}

/// The endpoint named `mirror`, else the first one.
fn mirror(cfg: &AgentConfig) -> Option<(String, &Endpoint)> {
    let eps = &cfg.egress.endpoints;
    let i = eps.iter().position(|e| e.name.eq_ignore_ascii_case("mirror")).or((!eps.is_empty()).then_some(0))?;
    Some((format!("egress.endpoints[{i}]"), &eps[i]))
}

fn socket_addr(field: &str, e: &Endpoint) -> Result<SocketAddr, String> {
    let net: Net = e.address.parse().map_err(|reason| format!("{field}.address ({}): {reason}", e.name))?;
    if !net.is_host() {
        return Err(format!("{field}.address ({}): `{}` is a block; a probe needs one address", e.name, e.address));
    }
    Ok(SocketAddr::new(net.addr, e.port))
}

/// One TCP connection attempt, closed at once.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Reach {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => Reach::Connected,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
            Reach::TimedOut
        }
        Err(e) => Reach::Failed(e.to_string()),
    }
}

fn state(locked: bool, detail: String) -> EgressState {
    EgressState { locked, mode: AgentMode::Pod, detail: Some(detail), blocked_since_last: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const T: Duration = Duration::from_millis(500);

    fn config(mirror_port: u16, canary: Option<(&str, u16)>) -> AgentConfig {
        let mut cfg: AgentConfig = serde_yaml::from_str(
            r#"
workspace: { project: ward-7, name: alice-r }
controlPlane: { url: "https://127.0.0.1:1", caFile: ca, certFile: crt, keyFile: key }
egress:
  resolvers: []
  endpoints: [{ name: controlPlane, address: 127.0.0.1, port: 1 }, { name: mirror, address: 127.0.0.1, port: 1 }]
  desktopPort: 5901
mode: pod
desktop: none
"#,
        )
        .unwrap();
        cfg.egress.endpoints[1].port = mirror_port;
        cfg.egress.canary = canary.map(|(a, p)| Endpoint { name: "kube-api".into(), address: a.into(), port: p });
        cfg
    }

    /// A port nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn wall_holds_when_canary_refused_and_mirror_reachable() {
        let mirror = TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = config(mirror.local_addr().unwrap().port(), Some(("127.0.0.1", closed_port())));
        let s = run_with(&cfg, T);
        assert!(s.locked, "{s:?}");
        assert_eq!(s.mode, AgentMode::Pod);
        let detail = s.detail.unwrap();
        assert!(detail.contains("canary kube-api") && detail.contains("blocked (refused)"), "{detail}");
    }

    #[test]
    fn reachable_canary_means_not_locked() {
        let mirror = TcpListener::bind("127.0.0.1:0").unwrap();
        let canary = TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = config(mirror.local_addr().unwrap().port(), Some(("127.0.0.1", canary.local_addr().unwrap().port())));
        let s = run_with(&cfg, T);
        assert!(!s.locked);
        assert!(s.detail.unwrap().contains("is reachable: the network wall is open"));
    }

    #[test]
    fn unreachable_mirror_makes_the_probe_inconclusive() {
        let cfg = config(closed_port(), Some(("127.0.0.1", closed_port())));
        let s = run_with(&cfg, T);
        assert!(!s.locked);
        assert!(s.detail.unwrap().starts_with("probe inconclusive: mirror"));
    }

    #[tokio::test]
    async fn watch_publishes_and_follows_changes() {
        let mirror = TcpListener::bind("127.0.0.1:0").unwrap();
        let canary = TcpListener::bind("127.0.0.1:0").unwrap();
        let canary_port = canary.local_addr().unwrap().port();
        let cfg = config(mirror.local_addr().unwrap().port(), Some(("127.0.0.1", canary_port)));
        let (tx, mut rx) = tokio_watch::channel(state(false, "starting".into()));
        let task = tokio::spawn(watch(cfg, Duration::from_millis(20), tx));
        let bound = Duration::from_secs(10);
        let s = tokio::time::timeout(bound, rx.wait_for(|s| s.detail.as_deref() != Some("starting"))).await;
        assert!(!s.unwrap().unwrap().locked, "canary reachable");
        drop(canary); // the wall closes
        let s = tokio::time::timeout(bound, rx.wait_for(|s| s.locked)).await.unwrap().unwrap().clone();
        assert!(s.detail.unwrap().contains("blocked (refused)"));
        task.abort();
    }

    #[test]
    fn missing_or_block_canary_is_refused() {
        let mirror = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = mirror.local_addr().unwrap().port();
        let s = run_with(&config(port, None), T);
        assert!(!s.locked);
        assert!(s.detail.unwrap().contains("no canary configured"));
        let s = run_with(&config(port, Some(("10.96.0.0/12", 443))), T);
        assert!(!s.locked);
        assert!(s.detail.unwrap().contains("egress.canary.address (kube-api)"));
    }
}
