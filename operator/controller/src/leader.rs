//! Leader election with a `coordination.k8s.io/v1` Lease: only the holder runs controllers.
//! `decide` is the pure rule; `LeaderElector` does the reads and optimistic-concurrency writes
//! (a replace carries the resourceVersion it read, so two candidates cannot both win).

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::error::is_conflict;

/// What a candidate should do after reading the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it over.
    Acquire,
    /// Someone else holds a live Lease.
    Follow { holder: String },
}

fn micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn chrono_of(t: &MicroTime) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(t.0.as_microsecond()).unwrap_or_default()
}

/// The rule, as client-go applies it: a Lease is live until `renewTime + leaseDurationSeconds`.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: DateTime<Utc>) -> Decision {
    let Some(spec) = lease else { return Decision::Create };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = chrono::Duration::seconds(spec.lease_duration_seconds.unwrap_or(0).max(0).into());
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(renewed) if chrono_of(renewed) + duration > now => Decision::Follow { holder },
        _ => Decision::Acquire,
    }
}

/// The Lease spec `identity` writes when it acquires or renews.
fn lease_spec(identity: &str, duration: Duration, previous: Option<&LeaseSpec>, now: DateTime<Utc>) -> LeaseSpec {
    let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(identity);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)),
        acquire_time: if ours { previous.and_then(|p| p.acquire_time.clone()) } else { Some(micro(now)) },
        renew_time: Some(micro(now)),
        lease_transitions: Some(if ours || previous.is_none() { transitions } else { transitions + 1 }),
        ..LeaseSpec::default()
    }
}

/// One candidate for the Lease `name`.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    retry: Duration,
}

impl LeaderElector {
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        lease_duration: Duration,
    ) -> Self {
        let retry = (lease_duration / 5).max(Duration::from_millis(50));
        Self { api, name: name.into(), identity: identity.into(), lease_duration, retry }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: read the Lease and act on `decide`. `Ok(true)` when we hold it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Utc::now();
        let live = self.api.get_opt(&self.name).await?;
        let decision = decide(live.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now);
        let result = match (&decision, live) {
            (Decision::Follow { .. }, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(lease_spec(&self.identity, self.lease_duration, None, now)),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            (_, Some(mut lease)) => {
                lease.spec = Some(lease_spec(&self.identity, self.lease_duration, lease.spec.as_ref(), now));
                // The resourceVersion read above makes this a compare-and-swap.
                self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(()) => {
                if decision != Decision::Renew {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                Ok(true)
            }
            // Another candidate wrote first: they lead.
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up so a successor does not wait for it to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro(Utc::now()));
        self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())?;
        tracing::info!(lease = %self.name, identity = %self.identity, "released the lease");
        Ok(())
    }

    /// Keep trying to acquire, then keep renewing, publishing whether we lead on `leading`,
    /// until `stop` turns true; then release the Lease if we hold it. Leadership is given up
    /// (`false`) when the Lease could not be renewed for two thirds of its duration.
    pub async fn run(self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        while !*stop.borrow() {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_renewal = Some(tokio::time::Instant::now());
                    leading.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Ok(false) => {
                    last_renewal = None;
                    leading.send_if_modified(|l| std::mem::replace(l, false));
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot read or renew the lease");
                    // Give up before the Lease can expire, so two leaders never overlap.
                    if last_renewal.is_some_and(|t| t.elapsed() >= self.lease_duration * 2 / 3) {
                        last_renewal = None;
                        leading.send_if_modified(|l| std::mem::replace(l, false));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.retry) => {}
                _ = stop.changed() => {}
            }
        }
        if *leading.borrow() {
            if let Err(e) = self.release().await {
                tracing::warn!(lease = %self.name, error = %e, "cannot release the lease");
            }
            leading.send_replace(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    fn held_by(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(micro(t(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let now = t("2026-01-01T00:00:20Z");
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(decide(Some(&held_by("a", "2026-01-01T00:00:00Z")), "a", now), Decision::Renew);
        assert_eq!(
            decide(Some(&held_by("b", "2026-01-01T00:00:10Z")), "a", now),
            Decision::Follow { holder: "b".into() }
        );
        // b last renewed 20 s ago with a 15 s lease: expired.
        assert_eq!(decide(Some(&held_by("b", "2026-01-01T00:00:00Z")), "a", now), Decision::Acquire);
        // Exactly at expiry the lease is gone.
        assert_eq!(decide(Some(&held_by("b", "2026-01-01T00:00:05Z")), "a", now), Decision::Acquire);
        let released = LeaseSpec { holder_identity: None, ..held_by("b", "2026-01-01T00:00:19Z") };
        assert_eq!(decide(Some(&released), "a", now), Decision::Acquire);
        let never_renewed = LeaseSpec { renew_time: None, ..held_by("b", "2026-01-01T00:00:19Z") };
        assert_eq!(decide(Some(&never_renewed), "a", now), Decision::Acquire);
    }

    #[test]
    fn takeover_counts_a_transition_and_renewal_keeps_acquire_time() {
        let d = Duration::from_secs(15);
        let now = t("2026-01-01T00:00:20Z");
        let theirs = LeaseSpec { lease_transitions: Some(3), ..held_by("b", "2026-01-01T00:00:00Z") };
        let taken = lease_spec("a", d, Some(&theirs), now);
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        let renewed = lease_spec("a", d, Some(&taken), t("2026-01-01T00:00:25Z"));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(decide(Some(&renewed), "b", t("2026-01-01T00:00:30Z")), Decision::Follow { holder: "a".into() });
    }
}
