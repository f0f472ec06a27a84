//! Single-host mode's one audit log: the API, the mirror, the DNS server and the gateway all
//! append to the hash chain in the API's SQLite database (`api.db`), each as its own writer
//! signing with its own key, as on Kubernetes. The keys are made on first start in the state
//! directory (mode 0600, public halves beside them), so `noexit audit verify` with the public
//! keys authenticates every entry.
//!
//! One SQLite file, several stores in one process: each append is a `BEGIN IMMEDIATE`
//! transaction (the store's), so writers queue on SQLite's write lock (busy timeout, WAL) and
//! none reads a stale chain head. [`prepare`] migrates the database before any of them opens
//! it, so no two run the migrations at once.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::audit::keys;
use crate::audit::writers::{API, DNS, GATEWAY, MIRROR};
use crate::audit::{Store, StoreOptions};

/// The writers of single-host mode (the webhook has no counterpart here).
pub const WRITERS: [&str; 4] = [API, MIRROR, DNS, GATEWAY];

/// The shared database.
pub fn database_url(state_dir: &Path) -> String {
    format!("sqlite:{}", state_dir.join("api.db").display())
}

/// A writer's private key. The API's keeps its historical place (it also signs checkpoints).
pub fn key_path(state_dir: &Path, writer: &str) -> PathBuf {
    if writer == API {
        state_dir.join("audit-signing.pem")
    } else {
        state_dir.join("audit-keys").join(format!("{writer}.pem"))
    }
}

/// The public half next to a private key (`mirror.pem` → `mirror.pub.pem`).
pub fn public_path(private: &Path) -> PathBuf {
    private.with_extension("pub.pem")
}

/// Makes each writer's key pair that is missing (never replaces one) and migrates the database,
/// before any writer opens it.
pub async fn prepare(state_dir: &Path) -> anyhow::Result<()> {
    let dir = state_dir.join("audit-keys");
    super::secure_dir(&dir)?;
    for writer in WRITERS {
        let key = key_path(state_dir, writer);
        if !key.exists() {
            keys::write_key_pair(&key, &public_path(&key))
                .with_context(|| format!("making the {writer} writer's audit key"))?;
            tracing::info!(writer, key = %key.display(), "created an audit writer key");
        }
    }
    let url = database_url(state_dir);
    let store = Store::connect_with(&url, StoreOptions::default()).await.with_context(|| format!("migrating {url}"))?;
    store.close().await;
    Ok(())
}

/// `noexit audit … verify` with every writer's public key, as arguments after `noexit`.
pub fn verify_args(state_dir: &Path) -> Vec<String> {
    let mut v = vec![
        "audit".to_owned(),
        "--database-url".to_owned(),
        database_url(state_dir),
        "verify".to_owned(),
        "--checkpoint-key-pub".to_owned(),
        public_path(&key_path(state_dir, API)).display().to_string(),
    ];
    for writer in WRITERS.into_iter().filter(|w| *w != API) {
        v.push("--writer-key".to_owned());
        v.push(format!("{writer}={}", public_path(&key_path(state_dir, writer)).display()));
    }
    v
}

/// The command line that authenticates the whole log, for people.
pub fn verify_command(state_dir: &Path) -> String {
    std::iter::once("noexit".to_owned()).chain(verify_args(state_dir)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::AuditEvent;
    use crate::audit::writers::Writer;
    use crate::gateway_store::StoreRecorder;
    use noexit_gateway::record::{GatewayEvent, Recorder};

    #[test]
    fn keys_live_in_the_state_dir() {
        let s = Path::new("/st");
        assert_eq!(key_path(s, "api"), Path::new("/st/audit-signing.pem"));
        assert_eq!(public_path(&key_path(s, "dns")), Path::new("/st/audit-keys/dns.pub.pem"));
        assert_eq!(
            verify_command(s),
            "noexit audit --database-url sqlite:/st/api.db verify --checkpoint-key-pub /st/audit-signing.pub.pem \
             --writer-key mirror=/st/audit-keys/mirror.pub.pem --writer-key dns=/st/audit-keys/dns.pub.pem \
             --writer-key gateway=/st/audit-keys/gateway.pub.pem"
        );
    }

    /// The four writers of `up`, opened as `up` opens them (the mirror's and DNS server's sinks
    /// from their own options, the gateway's recorder, the API's store that seals checkpoints),
    /// appending at once to one SQLite file: nothing lost, one unbroken chain, and the command
    /// `up` prints authenticates every entry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_writer_signs_into_the_one_chain_and_the_printed_command_verifies_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        prepare(state).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        for w in WRITERS {
            let mode = std::fs::metadata(key_path(state, w)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{w}");
        }
        // A second start keeps the keys.
        let before = std::fs::read(key_path(state, MIRROR)).unwrap();
        prepare(state).await.unwrap();
        assert_eq!(std::fs::read(key_path(state, MIRROR)).unwrap(), before);

        let url = database_url(state);
        let sink = |w: &'static str| {
            let url = url.clone();
            async move {
                crate::mirror::audit_file::open_sink(w, Some(&url), Some(&key_path(state, w)), None).await.unwrap()
            }
        };
        let (mirror, dns) = (sink(MIRROR).await, sink(DNS).await);
        let gateway_store = Arc::new(
            Store::connect_with(
                &url,
                StoreOptions {
                    writer: Some(Writer::load(GATEWAY, &key_path(state, GATEWAY)).unwrap()),
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
        );
        let gateway = Arc::new(StoreRecorder::new(gateway_store.clone()));
        let api_key = keys::load_signing_key(&key_path(state, API)).unwrap();
        let api = Arc::new(
            Store::connect_with(
                &url,
                StoreOptions {
                    writer: Some(Writer::new(API, api_key.clone())),
                    signing_key: Some(api_key),
                    checkpoint_every: 25,
                    checkpoint_interval: std::time::Duration::from_millis(50),
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
        );
        const N: usize = 60;
        let mut tasks = tokio::task::JoinSet::new();
        for (name, sink) in [("mirror.fetch", mirror.clone()), ("dns.refused", dns.clone())] {
            tasks.spawn(async move {
                for i in 0..N {
                    sink.record(AuditEvent::allowed(format!("workspace:p/w{i}"), name, "x")).await.unwrap();
                }
            });
        }
        let g = gateway.clone();
        tasks.spawn(async move {
            for i in 0..N {
                let e = GatewayEvent {
                    actor: format!("user:u{i}"),
                    action: "gateway.connect".into(),
                    object: "workspace:p/w".into(),
                    refused: None,
                    source: None,
                    detail: serde_json::json!({}),
                };
                g.audit(e).await.unwrap();
            }
        });
        let a = api.clone();
        tasks.spawn(async move {
            for i in 0..N {
                a.append(AuditEvent::allowed(format!("user:u{i}"), "agent.heartbeat", "workspace:p/w")).await.unwrap();
            }
        });
        tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("concurrent writers finish (no deadlock)");
        drop((mirror, dns, gateway));
        gateway_store.close().await;
        api.close().await;

        let args: crate::cli::audit::AuditArgs =
            super::super::services::parse("audit", verify_args(state)[1..].to_vec()).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = crate::cli::audit::run_with(args, &mut out, &mut err).await;
        let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
        eprintln!("{out}{err}");
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("audit log intact"), "{out}");
        let total = 4 * N;
        assert!(out.contains(&format!("{total} entries")), "{out}");
        let report = crate::audit::verify::verify(
            &Store::open_read_only(&url).await.unwrap(),
            &crate::audit::verify::VerifyOptions {
                keys: vec![keys::load_verifying_key(&public_path(&key_path(state, API))).unwrap()],
                writers: Some({
                    let mut k = crate::audit::writers::WriterKeys::new();
                    for w in WRITERS {
                        k.add(w, keys::load_verifying_key(&public_path(&key_path(state, w))).unwrap());
                    }
                    k
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.entries_authenticated, total as u64);
        for w in WRITERS {
            assert_eq!(report.writers.get(w), Some(&(N as u64)), "{w}: {:?}", report.writers);
        }
    }
}
