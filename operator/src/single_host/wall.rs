//! The services table (`inet noexit-services.<instance>`, see
//! [`noexit_host::render::services`]) in the audit log: each time `up` applies it (which
//! interfaces and networks it lets reach the API, mirror and DNS) or removes it (`up --once`,
//! `down`), an entry by the Unix user who ran `up`, appended by [`super::refusals::Recorder`]
//! as the API's writer like `up`'s refusals. What to record is pure.

use noexit_host::plan::Step;
use noexit_host::render::services::{ServicesWall, TABLE_PREFIX};

use crate::audit::AuditEvent;

/// The table was applied (made, or replaced because its input changed).
pub const ACTION_APPLY: &str = "host.services-table.apply";
/// The table was removed.
pub const ACTION_REMOVE: &str = "host.services-table.remove";

/// What a pass (or `down`) did to the services table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Applied(ServicesWall),
    Removed { table: String },
}

/// The change a step that went through made, if it touched a services table. `wall` is what
/// the pass applied (`World::services`).
pub fn change_of(step: &Step, wall: Option<&ServicesWall>) -> Option<Change> {
    match step {
        Step::ApplyTable { name, .. } => wall.filter(|w| w.table_name() == *name).cloned().map(Change::Applied),
        Step::DeleteTable { name } if name.starts_with(TABLE_PREFIX) => Some(Change::Removed { table: name.clone() }),
        _ => None,
    }
}

/// The audit entry for a change.
pub fn event(actor: &str, change: &Change) -> AuditEvent {
    match change {
        Change::Applied(w) => {
            let mut bridges = w.bridges.clone();
            bridges.sort();
            let mut allow: Vec<String> = w.api_allow.iter().map(ToString::to_string).collect();
            allow.sort();
            AuditEvent {
                detail: serde_json::json!({
                    "ports": { "api": w.ports.api, "mirror": w.ports.mirror, "dns": w.ports.dns },
                    "bridges": bridges,
                    "apiAllow": allow,
                    "hash": w.hash(),
                }),
                ..AuditEvent::allowed(actor, ACTION_APPLY, object(&w.table_name()))
            }
        }
        Change::Removed { table } => AuditEvent::allowed(actor, ACTION_REMOVE, object(table)),
    }
}

fn object(table: &str) -> String {
    format!("nft-table:inet {table}")
}

#[cfg(test)]
mod tests {
    use noexit_host::model::HostPorts;

    use super::*;
    use crate::audit::{Outcome, writers};

    fn wall() -> ServicesWall {
        ServicesWall {
            instance: "i1".into(),
            ports: HostPorts { api: 8443, mirror: 8080, dns: 5353 },
            bridges: vec!["nxb".into(), "nxa".into()],
            api_allow: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn applying_and_removing_the_services_table_are_audited() {
        let w = wall();
        let apply = Step::ApplyTable { name: w.table_name(), script: w.replace_script(), hash: w.hash() };
        let c = change_of(&apply, Some(&w)).unwrap();
        let e = event("unix:root", &c);
        assert_eq!((e.actor.as_str(), e.action.as_str()), ("unix:root", "host.services-table.apply"));
        assert_eq!(e.object, "nft-table:inet noexit-services.i1");
        assert_eq!(e.outcome, Outcome::Allowed);
        assert_eq!(e.detail["bridges"], serde_json::json!(["nxa", "nxb"]));
        assert_eq!(e.detail["apiAllow"], serde_json::json!(["192.0.2.0/24"]));
        assert_eq!(e.detail["ports"]["mirror"], 8080);
        let removed = change_of(&Step::DeleteTable { name: w.table_name() }, None).unwrap();
        assert_eq!(event("unix:root", &removed).action, "host.services-table.remove");
        // The project tables are not this table.
        assert_eq!(
            change_of(&Step::ApplyTable { name: "noexit-p".into(), script: "".into(), hash: "".into() }, Some(&w)),
            None
        );
        assert_eq!(change_of(&Step::DeleteTable { name: "noexit-p".into() }, None), None);
        // Signed by the API's writer, as `up`'s refusals are.
        assert_eq!(writers::owner_of(ACTION_APPLY.as_bytes()), writers::API);
        assert_eq!(writers::owner_of(ACTION_REMOVE.as_bytes()), writers::API);
    }
}
