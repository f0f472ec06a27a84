//! What to do: the difference between what should exist (rendered from the manifests) and what
//! exists (read from libvirt, nftables and the state database). Pure.
//!
//! Ownership: an object counts as ours only if it carries noexit's metadata with this
//! instance's id (one state directory = one instance). A desired name held by anything else —
//! made by hand, by another tool, or by another noexit instance — is a [`Clash`]: reported, and
//! nothing at all is changed in that pass. Objects of ours that are no longer desired are
//! removed.

use std::collections::BTreeMap;

use crate::model::Lease;

/// Marker read back from an object's noexit metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub instance: String,
    pub hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedNetwork {
    pub owner: Option<Owner>,
    pub active: bool,
    pub leases: Vec<Lease>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedDomain {
    pub owner: Option<Owner>,
    pub active: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actual {
    pub networks: BTreeMap<String, ObservedNetwork>,
    pub domains: BTreeMap<String, ObservedDomain>,
    /// Live host tables named like ours, with the hash we recorded when we applied them (None:
    /// the table exists but this instance did not make it).
    pub tables: BTreeMap<String, Option<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredNetwork {
    pub xml: String,
    pub hash: String,
    pub leases: Vec<Lease>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTable {
    pub script: String,
    pub hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredDomain {
    pub xml: String,
    pub hash: String,
    pub running: bool,
    /// Project network the domain needs.
    pub network: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub instance: String,
    pub networks: BTreeMap<String, DesiredNetwork>,
    pub tables: BTreeMap<String, DesiredTable>,
    pub domains: BTreeMap<String, DesiredDomain>,
}

/// One step, in the order to run them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Define and start a network (redefine if ours and changed: its domains are stopped first).
    DefineNetwork {
        name: String,
        xml: String,
        replace: bool,
    },
    AddLease {
        network: String,
        lease: Lease,
    },
    RemoveLease {
        network: String,
        lease: Lease,
    },
    ApplyTable {
        name: String,
        script: String,
        hash: String,
    },
    /// Write the domain's files (home disk if missing, seed) then define it (replacing ours).
    DefineDomain {
        name: String,
        xml: String,
        replace: bool,
    },
    StartDomain {
        name: String,
    },
    StopDomain {
        name: String,
    },
    /// Stop and undefine; the workspace's files (home, seed) are removed with it.
    DeleteDomain {
        name: String,
    },
    DeleteTable {
        name: String,
    },
    DeleteNetwork {
        name: String,
    },
}

/// A name we want that someone else holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Clash {
    #[error(
        "libvirt domain {0:?} exists and was not made by this noexit; it is left alone (rename the workspace or remove that domain yourself)"
    )]
    Domain(String),
    #[error(
        "libvirt network {0:?} exists and was not made by this noexit; it is left alone (rename the project or remove that network yourself)"
    )]
    Network(String),
    #[error("nftables table inet {0:?} exists and was not made by this noexit; it is left alone")]
    Table(String),
}

fn ours(owner: &Option<Owner>, instance: &str) -> bool {
    owner.as_ref().is_some_and(|o| o.instance == instance)
}

/// The steps from `actual` to `desired`, or every clash (then nothing may be done).
pub fn plan(desired: &Desired, actual: &Actual) -> Result<Vec<Step>, Vec<Clash>> {
    let me = desired.instance.as_str();
    let mut clashes = Vec::new();
    for name in desired.networks.keys() {
        if let Some(o) = actual.networks.get(name)
            && !ours(&o.owner, me)
        {
            clashes.push(Clash::Network(name.clone()));
        }
    }
    for name in desired.domains.keys() {
        if let Some(o) = actual.domains.get(name)
            && !ours(&o.owner, me)
        {
            clashes.push(Clash::Domain(name.clone()));
        }
    }
    for name in desired.tables.keys() {
        if let Some(None) = actual.tables.get(name) {
            clashes.push(Clash::Table(name.clone()));
        }
    }
    if !clashes.is_empty() {
        return Err(clashes);
    }

    let mut steps = Vec::new();
    // Domains of ours no longer wanted go first (they hold the networks).
    for (name, o) in &actual.domains {
        if ours(&o.owner, me) && !desired.domains.contains_key(name) {
            steps.push(Step::DeleteDomain { name: name.clone() });
        }
    }
    // Networks: define missing or changed; fix leases live.
    let mut replaced_networks = Vec::new();
    for (name, want) in &desired.networks {
        match actual.networks.get(name) {
            None => steps.push(Step::DefineNetwork { name: name.clone(), xml: want.xml.clone(), replace: false }),
            Some(o) if o.owner.as_ref().map(|x| &x.hash) != Some(&want.hash) || !o.active => {
                replaced_networks.push(name.clone());
                steps.push(Step::DefineNetwork { name: name.clone(), xml: want.xml.clone(), replace: true });
            }
            Some(o) => {
                for lease in o.leases.iter().filter(|l| !want.leases.contains(l)) {
                    steps.push(Step::RemoveLease { network: name.clone(), lease: lease.clone() });
                }
                for lease in want.leases.iter().filter(|l| !o.leases.contains(l)) {
                    steps.push(Step::AddLease { network: name.clone(), lease: lease.clone() });
                }
            }
        }
    }
    for (name, want) in &desired.tables {
        if actual.tables.get(name) != Some(&Some(want.hash.clone())) {
            steps.push(Step::ApplyTable { name: name.clone(), script: want.script.clone(), hash: want.hash.clone() });
        }
    }
    for (name, want) in &desired.domains {
        let observed = actual.domains.get(name);
        let changed = observed.is_none_or(|o| o.owner.as_ref().map(|x| &x.hash) != Some(&want.hash));
        // A domain on a network being redefined lost its link: restart it.
        let relink = replaced_networks.contains(&want.network) && observed.is_some_and(|o| o.active);
        let active = observed.is_some_and(|o| o.active) && !changed && !relink;
        if changed {
            steps.push(Step::DefineDomain { name: name.clone(), xml: want.xml.clone(), replace: observed.is_some() });
        } else if relink {
            steps.push(Step::StopDomain { name: name.clone() });
        }
        match (want.running, active) {
            (true, false) => steps.push(Step::StartDomain { name: name.clone() }),
            (false, true) => steps.push(Step::StopDomain { name: name.clone() }),
            _ => {}
        }
    }
    for (name, recorded) in &actual.tables {
        if recorded.is_some() && !desired.tables.contains_key(name) {
            steps.push(Step::DeleteTable { name: name.clone() });
        }
    }
    for (name, o) in &actual.networks {
        if ours(&o.owner, me) && !desired.networks.contains_key(name) {
            steps.push(Step::DeleteNetwork { name: name.clone() });
        }
    }
    Ok(steps)
}

/// Everything `down` does: stop and undefine our domains (their files stay), remove our tables
/// and networks.
pub fn down(instance: &str, actual: &Actual) -> Vec<Step> {
    let mut steps = Vec::new();
    for (name, o) in &actual.domains {
        if ours(&o.owner, instance) {
            steps.push(Step::StopDomain { name: name.clone() });
        }
    }
    for (name, recorded) in &actual.tables {
        if recorded.is_some() {
            steps.push(Step::DeleteTable { name: name.clone() });
        }
    }
    for (name, o) in &actual.networks {
        if ours(&o.owner, instance) {
            steps.push(Step::DeleteNetwork { name: name.clone() });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const ME: &str = "i1";

    fn owner(hash: &str) -> Option<Owner> {
        Some(Owner { instance: ME.into(), hash: hash.into() })
    }

    fn lease(n: u8) -> Lease {
        Lease { mac: format!("52:54:00:d5:00:{n:02x}"), ip: Ipv4Addr::new(10, 213, 0, n), name: format!("w{n}") }
    }

    fn desired() -> Desired {
        let mut d = Desired { instance: ME.into(), ..Default::default() };
        d.networks.insert(
            "noexit-p".into(),
            DesiredNetwork { xml: "<network/>".into(), hash: "n1".into(), leases: vec![lease(10)] },
        );
        d.tables.insert("noexit-p".into(), DesiredTable { script: "table".into(), hash: "t1".into() });
        d.domains.insert(
            "noexit-p-w".into(),
            DesiredDomain { xml: "<domain/>".into(), hash: "d1".into(), running: true, network: "noexit-p".into() },
        );
        d
    }

    fn converged() -> Actual {
        let mut a = Actual::default();
        a.networks
            .insert("noexit-p".into(), ObservedNetwork { owner: owner("n1"), active: true, leases: vec![lease(10)] });
        a.tables.insert("noexit-p".into(), Some("t1".into()));
        a.domains.insert("noexit-p-w".into(), ObservedDomain { owner: owner("d1"), active: true });
        a
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::DefineNetwork { name, replace, .. } => format!("define-net {name} {replace}"),
                Step::AddLease { lease, .. } => format!("add-lease {}", lease.name),
                Step::RemoveLease { lease, .. } => format!("remove-lease {}", lease.name),
                Step::ApplyTable { name, .. } => format!("table {name}"),
                Step::DefineDomain { name, replace, .. } => format!("define {name} {replace}"),
                Step::StartDomain { name } => format!("start {name}"),
                Step::StopDomain { name } => format!("stop {name}"),
                Step::DeleteDomain { name } => format!("delete {name}"),
                Step::DeleteTable { name } => format!("delete-table {name}"),
                Step::DeleteNetwork { name } => format!("delete-net {name}"),
            })
            .collect()
    }

    #[test]
    fn from_nothing_in_order() {
        let steps = plan(&desired(), &Actual::default()).unwrap();
        assert_eq!(
            names(&steps),
            ["define-net noexit-p false", "table noexit-p", "define noexit-p-w false", "start noexit-p-w"]
        );
    }

    #[test]
    fn converged_is_no_steps() {
        assert_eq!(plan(&desired(), &converged()).unwrap(), vec![]);
    }

    #[test]
    fn changed_domain_is_redefined_and_restarted() {
        let mut d = desired();
        d.domains.get_mut("noexit-p-w").unwrap().hash = "d2".into();
        assert_eq!(names(&plan(&d, &converged()).unwrap()), ["define noexit-p-w true", "start noexit-p-w"]);
        let mut d = desired();
        d.domains.get_mut("noexit-p-w").unwrap().running = false;
        assert_eq!(names(&plan(&d, &converged()).unwrap()), ["stop noexit-p-w"]);
    }

    #[test]
    fn leases_change_live() {
        let mut d = desired();
        d.networks.get_mut("noexit-p").unwrap().leases = vec![lease(11)];
        assert_eq!(names(&plan(&d, &converged()).unwrap()), ["remove-lease w10", "add-lease w11"]);
    }

    #[test]
    fn removed_objects_are_deleted_domains_first_networks_last() {
        let d = Desired { instance: ME.into(), ..Default::default() };
        assert_eq!(
            names(&plan(&d, &converged()).unwrap()),
            ["delete noexit-p-w", "delete-table noexit-p", "delete-net noexit-p"]
        );
    }

    #[test]
    fn clashes_stop_everything_and_foreign_objects_are_never_touched() {
        let mut a = converged();
        a.domains.get_mut("noexit-p-w").unwrap().owner = None;
        a.networks.get_mut("noexit-p").unwrap().owner = Some(Owner { instance: "other".into(), hash: "n1".into() });
        let err = plan(&desired(), &a).unwrap_err();
        assert_eq!(err, vec![Clash::Network("noexit-p".into()), Clash::Domain("noexit-p-w".into())]);
        assert!(err[1].to_string().contains("not made by this noexit"));
        // Not desired and not ours: left alone.
        let mut a = Actual::default();
        a.domains.insert("noexit-x-y".into(), ObservedDomain { owner: None, active: true });
        a.tables.insert("noexit-x".into(), None);
        let d = Desired { instance: ME.into(), ..Default::default() };
        assert_eq!(plan(&d, &a).unwrap(), vec![]);
        assert_eq!(down(ME, &a), vec![]);
    }

    #[test]
    fn down_stops_domains_and_removes_walls_and_networks() {
        assert_eq!(names(&down(ME, &converged())), ["stop noexit-p-w", "delete-table noexit-p", "delete-net noexit-p"]);
    }

    /// The services table is one more table of ours: applied with the project tables (after the
    /// networks whose bridges it names, before any domain starts), re-applied when its input
    /// changes, removed when no longer wanted (`up --once`) and by `down`, and never touched
    /// when someone else holds its name.
    #[test]
    fn the_services_table_is_planned_like_the_project_tables() {
        const SVC: &str = "noexit-services.i1";
        let with_services = |hash: &str| {
            let mut d = desired();
            d.tables.insert(SVC.into(), DesiredTable { script: "services".into(), hash: hash.into() });
            d
        };
        assert_eq!(
            names(&plan(&with_services("s1"), &Actual::default()).unwrap()),
            [
                "define-net noexit-p false",
                "table noexit-p",
                format!("table {SVC}").as_str(),
                "define noexit-p-w false",
                "start noexit-p-w"
            ]
        );
        let mut a = converged();
        a.tables.insert(SVC.into(), Some("s1".into()));
        assert_eq!(plan(&with_services("s1"), &a).unwrap(), vec![]);
        // A project (bridge) more or less, or another --api-allow: the new table, one step.
        let steps = plan(&with_services("s2"), &a).unwrap();
        assert_eq!(steps, [Step::ApplyTable { name: SVC.into(), script: "services".into(), hash: "s2".into() }]);
        // Nothing to serve: removed.
        assert_eq!(names(&plan(&desired(), &a).unwrap()), [format!("delete-table {SVC}")]);
        assert_eq!(
            names(&down(ME, &a)),
            ["stop noexit-p-w", "delete-table noexit-p", format!("delete-table {SVC}").as_str(), "delete-net noexit-p"]
        );
        // Someone else's table of that name: a clash, nothing done; and never deleted.
        let mut foreign = converged();
        foreign.tables.insert(SVC.into(), None);
        assert_eq!(plan(&with_services("s1"), &foreign).unwrap_err(), vec![Clash::Table(SVC.into())]);
        assert_eq!(plan(&desired(), &foreign).unwrap(), vec![]);
        assert!(!names(&down(ME, &foreign)).contains(&format!("delete-table {SVC}")));
    }
}
