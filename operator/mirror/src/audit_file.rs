//! An [`AuditSink`] that appends JSON lines to a file, for sites (and tests) without the
//! audit store yet.
//!
//! Group commit: events are queued to one writer thread, which appends everything queued
//! since its last write and then calls `fdatasync` once for the whole group; every caller's
//! future resolves only when its line is on disk. Under load many requests share one sync
//! instead of each paying its own, so durability costs roughly one sync per group, not per
//! request, and the async workers never block on disk.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use noexit_audit::{AuditError, AuditEvent, AuditSink};

/// Where an auditing component (the mirror, the DNS server) writes: the shared tamper-evident
/// log as `writer` (its entries signed with `audit_key`), or a JSON-lines file. `what` names the
/// component in the refusal to run unaudited.
pub async fn open_sink(
    writer: &'static str,
    database_url: Option<&str>,
    audit_key: Option<&Path>,
    audit_file: Option<&Path>,
) -> anyhow::Result<std::sync::Arc<dyn AuditSink>> {
    use anyhow::Context;
    match (database_url, audit_file) {
        (Some(url), _) => {
            let writer = match audit_key {
                Some(path) => Some(noexit_audit::writers::Writer::load(writer, path)?),
                None => {
                    tracing::warn!(
                        writer,
                        "no --audit-key: these audit entries are unsigned and verify will report them"
                    );
                    None
                }
            };
            let options = noexit_audit::StoreOptions { writer, ..Default::default() };
            Ok(std::sync::Arc::new(
                noexit_audit::Store::connect_with(url, options)
                    .await
                    .with_context(|| format!("--database-url {}", noexit_audit::store::redact(url)))?,
            ))
        }
        (None, Some(path)) => Ok(std::sync::Arc::new(
            FileAuditSink::open(path).with_context(|| format!("--audit-file {}", path.display()))?,
        )),
        (None, None) => {
            anyhow::bail!("no audit sink: give --database-url or --audit-file ({writer} does not run unaudited)")
        }
    }
}

/// Most events appended under one sync.
const MAX_GROUP: usize = 4096;

type Pending = (AuditEvent, oneshot::Sender<Result<(), String>>);

pub struct FileAuditSink {
    queue: mpsc::UnboundedSender<Pending>,
    path: PathBuf,
}

impl FileAuditSink {
    /// Open (create, append) `path` and start the writer thread.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let (queue, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("mirror-audit".into()).spawn(move || writer(file, rx))?;
        Ok(Self { queue, path: path.to_owned() })
    }
}

fn writer(mut file: std::fs::File, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut group: Vec<Pending> = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        buf.clear();
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        for (event, _) in &group {
            let mut line = serde_json::json!({ "time": time });
            if let (Some(obj), Ok(serde_json::Value::Object(ev))) = (line.as_object_mut(), serde_json::to_value(event))
            {
                obj.extend(ev);
            }
            // Serialising a Value cannot fail.
            let _ = serde_json::to_writer(&mut buf, &line);
            buf.push(b'\n');
        }
        let result = file.write_all(&buf).and_then(|()| file.sync_data()).map_err(|e| e.to_string());
        for (_, done) in group.drain(..) {
            let _ = done.send(result.clone());
        }
    }
}

impl AuditSink for FileAuditSink {
    fn record(&self, event: AuditEvent) -> BoxFuture<'_, Result<(), AuditError>> {
        let (done, wait) = oneshot::channel();
        let queued = self.queue.send((event, done));
        async move {
            let path = self.path.display();
            queued.map_err(|_| AuditError::Unavailable(format!("audit writer for {path} has stopped")))?;
            match wait.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(AuditError::Unavailable(format!("cannot append to {path}: {e}"))),
                Err(_) => Err(AuditError::Unavailable(format!("audit writer for {path} has stopped"))),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_audit::Outcome;

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            actor: "workspace:p/w".into(),
            role: None,
            action: "mirror.fetch".into(),
            object: format!("package:x@{i}"),
            outcome: Outcome::Allowed,
            source: Some("10.0.0.1".into()),
            detail: serde_json::json!({}),
        }
    }

    #[tokio::test]
    async fn concurrent_records_are_all_durable_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        let sink = std::sync::Arc::new(FileAuditSink::open(&path).unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let sink = sink.clone();
                tokio::spawn(async move { sink.record(event(i)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 200);
        assert!(lines.iter().all(|l| l["action"] == "mirror.fetch" && l["time"].is_string()));
        assert_eq!(lines.iter().filter(|l| l["object"] == "package:x@7").count(), 1);
    }
}
