//! Dataset: validate → status (`Valid`, `Ready`, which projects attach it). It has no children:
//! the read-only volumes belong to the Projects it is granted to.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use kube::api::ListParams;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use noexit_crds::common::condition;
use noexit_crds::{Dataset, DatasetStatus, Project};

use super::validate;
use crate::conditions::{Desired, merge, transitions};
use crate::context::{Context, Outcome, RESYNC, key_of};
use crate::error::Error;
use crate::invalid::Invalid;

pub const KIND: &str = "Dataset";

pub async fn reconcile(guard: Arc<DeserializeGuard<Dataset>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let dataset = match &guard.0 {
        Ok(d) => d,
        Err(bad) => return Ok(ctx.malformed::<Dataset>(KIND, bad).await),
    };
    let key = format!("{KIND} {}", key_of(dataset));
    ctx.instrumented(KIND, &key, reconcile_dataset(dataset, &ctx)).await
}

pub fn error_policy(guard: Arc<DeserializeGuard<Dataset>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_failure(&format!("{KIND} {}", key_of(guard.as_ref())), error)
}

/// Projects that list the dataset and are granted it (both keys), sorted.
pub fn attached(d: &Dataset, projects: &[Project]) -> Vec<String> {
    let name = d.name_any();
    let mut out: Vec<String> = projects
        .iter()
        .filter(|p| p.spec.datasets.contains(&name) && d.spec.granted_to.contains(&p.name_any()))
        .map(|p| p.name_any())
        .collect();
    out.sort();
    out
}

/// The status for a validation result and the attaching projects.
pub fn compute(d: &Dataset, problem: Option<&Invalid>, projects: Vec<String>, now: DateTime<Utc>) -> DatasetStatus {
    let desired = match problem {
        Some(p) => vec![
            Desired::new(condition::VALID, false, p.reason.as_str(), p.to_string()),
            Desired::new(
                condition::READY,
                false,
                p.reason.as_str(),
                "no project can attach this dataset until it is fixed",
            ),
        ],
        None => vec![
            Desired::new(condition::VALID, true, "Valid", ""),
            Desired::new(condition::READY, true, "Valid", format!("attached by {} project(s)", projects.len())),
        ],
    };
    let live = d.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    DatasetStatus {
        observed_generation: d.metadata.generation,
        conditions: merge(&live, &desired, d.metadata.generation, now),
        attached_projects: if problem.is_some() { Vec::new() } else { projects },
    }
}

async fn reconcile_dataset(d: &Dataset, ctx: &Context) -> Result<Outcome, Error> {
    let api: Api<Dataset> = Api::all(ctx.client.clone());
    let result = async {
        let problem = validate(d).err();
        let projects = Api::<Project>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube("list", "projects", e))?
            .items;
        let new = compute(d, problem.as_ref(), attached(d, &projects), ctx.now());
        let old = d.status.clone().unwrap_or_default();
        if new != old {
            let value = serde_json::to_value(&new).map_err(|e| Error::Internal(e.to_string()))?;
            ctx.apply_status(&api, d, value).await?;
            for c in transitions(&old.conditions, &new.conditions).into_iter().filter(|c| c.type_ == condition::VALID) {
                ctx.event(&d.object_ref(&()), c.status != "True", &c.reason, c.message.clone()).await;
            }
        }
        Ok(if problem.is_some() { Outcome::invalid() } else { Outcome::requeue(RESYNC) })
    }
    .await;
    if let Err(e) = &result {
        let live = d.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        ctx.report_failure(&api, d, &live, e).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    #[test]
    fn attached_needs_both_keys() {
        let d = testdata::datasets().remove(0);
        let p = testdata::project();
        assert_eq!(attached(&d, std::slice::from_ref(&p)), [p.name_any()]);
        let mut not_listed = p.clone();
        not_listed.spec.datasets.clear();
        assert!(attached(&d, &[not_listed]).is_empty());
        let now = "2026-11-22T10:00:00Z".parse().expect("t");
        let s = compute(&d, None, vec!["ward-7".into()], now);
        assert!(crate::conditions::is_true(&s.conditions, "Valid"));
    }
}
