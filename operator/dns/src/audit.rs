//! Refused names into the audit log: the same store the mirror writes (`--database-url`, the
//! API's tamper-evident log) or a JSON-lines file (`--audit-file`). Writes go through a bounded
//! queue to one task, so a slow store never holds up answers; the per-workspace limit in
//! [`super::handler`] keeps the rows bounded however many names a workspace tries.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use noexit_audit::{AuditEvent, AuditSink};
use noexit_mirror::clients::ClientId;

/// Action of every DNS audit entry.
pub const ACTION: &str = "dns.query";

/// What one refused query says in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused<'a> {
    pub workspace: Option<&'a ClientId>,
    pub source: IpAddr,
    /// The name as [`super::answer::audit_name`] shows it (escaped, bounded).
    pub name: &'a str,
    pub qtype: &'a str,
    pub category: &'static str,
    pub reason: String,
    /// Refused queries from this workspace left out of the log since its previous entry.
    pub suppressed: u64,
}

/// The audit entry for a refused name: actor the workspace (`workspace:<project>/<name>`, or
/// `unknown` for an address no workspace holds), object the name.
pub fn refusal_event(r: &Refused<'_>) -> AuditEvent {
    let actor = r.workspace.map_or_else(|| "unknown".to_owned(), |w| format!("workspace:{w}"));
    let mut event = AuditEvent::refused(actor, ACTION, format!("dns:{}", r.name), r.reason.clone());
    event.source = Some(r.source.to_string());
    event.detail = serde_json::json!({
        "qtype": r.qtype,
        "category": r.category,
        "suppressedSincePrevious": r.suppressed,
    });
    event
}

/// Queue for the writer task; [`Writer::send`] never waits.
pub struct Writer {
    queue: mpsc::Sender<AuditEvent>,
}

/// Why an entry was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum NotQueued {
    Full,
    Closed,
}

impl Writer {
    /// Start the task that records queued events into `sink`, one at a time, in order.
    /// `failed` is called for each event the sink refused. The task ends when every `Writer`
    /// is dropped and the queue is drained.
    pub fn start(
        sink: Arc<dyn AuditSink>,
        depth: usize,
        failed: impl Fn(&noexit_audit::AuditError) + Send + 'static,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, mut rx) = mpsc::channel::<AuditEvent>(depth.max(1));
        let task = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Err(e) = sink.record(event).await {
                    tracing::error!(error = %e, "cannot audit a refused DNS name");
                    failed(&e);
                }
            }
        });
        (Self { queue }, task)
    }

    pub fn send(&self, event: AuditEvent) -> Result<(), NotQueued> {
        self.queue.try_send(event).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NotQueued::Full,
            mpsc::error::TrySendError::Closed(_) => NotQueued::Closed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_audit::Outcome;

    #[test]
    fn the_entry_names_the_workspace_the_name_and_what_was_left_out() {
        let ws: ClientId = "ward-7/alice-r".parse().unwrap();
        let e = refusal_event(&Refused {
            workspace: Some(&ws),
            source: "10.244.1.17".parse().unwrap(),
            name: "c2VjcmV0.example.org.",
            qtype: "A",
            category: "not_a_workspace_name",
            reason: "not a name workspaces may resolve".into(),
            suppressed: 7,
        });
        assert_eq!(e.actor, "workspace:ward-7/alice-r");
        assert_eq!(e.action, "dns.query");
        assert_eq!(e.object, "dns:c2VjcmV0.example.org.");
        assert!(matches!(e.outcome, Outcome::Refused(ref r) if r.contains("may resolve")));
        assert_eq!(e.source.as_deref(), Some("10.244.1.17"));
        assert_eq!(e.detail["suppressedSincePrevious"], 7);
        let unknown = refusal_event(&Refused {
            workspace: None,
            source: "10.0.0.9".parse().unwrap(),
            name: "x.",
            qtype: "TXT",
            category: "not_a_workspace_name",
            reason: String::new(),
            suppressed: 0,
        });
        assert_eq!(unknown.actor, "unknown");
    }

    #[tokio::test]
    async fn the_writer_records_in_order_and_never_blocks_the_caller() {
        let sink = Arc::new(noexit_audit::MemorySink::new());
        let (writer, task) = Writer::start(sink.clone(), 2, |_| {});
        let ev = |i: u32| AuditEvent::refused("unknown", ACTION, format!("dns:{i}."), "r");
        let mut queued = 0;
        for i in 0..100 {
            if writer.send(ev(i)).is_ok() {
                queued += 1;
            }
        }
        assert!(queued >= 2, "{queued}");
        drop(writer);
        task.await.unwrap();
        let got = sink.with_action(ACTION);
        assert_eq!(got.len(), queued);
        assert_eq!(got[0].object, "dns:0.");
    }
}
