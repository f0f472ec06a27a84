//! Standard conditions: the controller says what each condition should be now, and `merge`
//! keeps `lastTransitionTime` of every condition whose status did not change.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use noexit_crds::Condition;

/// What the controller wants a condition to say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(type_: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status, reason: reason.into(), message: message.into() }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

fn to_time(t: DateTime<Utc>) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH))
}

/// The new condition list: every desired condition (in the given order), then the live
/// conditions of other types (written by other actors, e.g. an admin's `Approved`) unchanged.
pub fn merge(live: &[Condition], desired: &[Desired], generation: Option<i64>, now: DateTime<Utc>) -> Vec<Condition> {
    let mut out: Vec<Condition> = desired
        .iter()
        .map(|d| {
            let status = status_str(d.status);
            let previous = live.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => to_time(now),
            };
            Condition {
                type_: d.type_.to_owned(),
                status: status.to_owned(),
                reason: d.reason.clone(),
                message: d.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect();
    out.extend(live.iter().filter(|c| !desired.iter().any(|d| d.type_ == c.type_)).cloned());
    out
}

/// Conditions whose status (or reason) changed from `old` to `new`: the transitions a person
/// should see as Events.
pub fn transitions<'a>(old: &[Condition], new: &'a [Condition]) -> Vec<&'a Condition> {
    new.iter()
        .filter(|c| match old.iter().find(|o| o.type_ == c.type_) {
            Some(o) => o.status != c.status || o.reason != c.reason,
            None => true,
        })
        .collect()
}

/// Status of condition `type_`, if present.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    #[test]
    fn unchanged_status_keeps_its_transition_time_and_others_are_kept() {
        let first = merge(&[], &[Desired::new("Ready", false, "Provisioning", "")], Some(1), t("2026-01-01T00:00:00Z"));
        let mut live = first.clone();
        live.push(Condition { type_: "Approved".into(), ..first[0].clone() });
        let second = merge(&live, &[Desired::new("Ready", false, "Waiting", "m")], Some(2), t("2026-01-02T00:00:00Z"));
        assert_eq!(second[0].last_transition_time, first[0].last_transition_time);
        assert_eq!(second[0].observed_generation, Some(2));
        assert_eq!(second[1].type_, "Approved");
        let third = merge(&second, &[Desired::new("Ready", true, "Running", "")], Some(2), t("2026-01-03T00:00:00Z"));
        assert_ne!(third[0].last_transition_time, first[0].last_transition_time);
        assert_eq!(transitions(&second, &third).len(), 1);
        assert!(transitions(&third, &third).is_empty());
        assert!(is_true(&third, "Ready"));
    }
}
