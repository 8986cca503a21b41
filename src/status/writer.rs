//! The status writer: server-side apply of each route's status, by the leader only, and only
//! when the status would change.
//!
//! [`plan`] is pure: from each route's report and the status observed on the object it
//! computes the status to apply, and drops the ones equal to what is there. It also remembers
//! what this replica already wrote at which resourceVersion, so a recompile that happens before
//! the watch echoes our own write does not write again; a status somebody else changed (a new
//! resourceVersion) is corrected.
//!
//! [`run`] applies the plan with `Patch::Apply` on the `status` subresource under the fixed
//! field manager [`FIELD_MANAGER`] (forced: ssegate owns the status), while
//! [`crate::leader`] says this replica leads. Failures are logged and retried with backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use tokio::sync::watch;

use crate::api::{API_VERSION, SseRoute, SseRouteStatus};
use crate::metrics::Metrics;
use crate::source::index::StatusInput;

/// The server-side apply field manager of route statuses.
pub const FIELD_MANAGER: &str = "ssegate";

/// One status to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusPatch {
    /// Route namespace.
    pub namespace: String,
    /// Route name.
    pub name: String,
    /// The status.
    pub status: SseRouteStatus,
    /// The resourceVersion the decision was based on.
    pub based_on: Option<String>,
}

/// What this replica wrote last, per `namespace/name`: the resourceVersion it was based on
/// and the status.
pub type Written = HashMap<(String, String), (Option<String>, SseRouteStatus)>;

/// The statuses that differ from what is observed, at time `now` (whole seconds, as the API
/// server stores them).
pub fn plan(inputs: &[StatusInput], written: &Written, now: &Time) -> Vec<StatusPatch> {
    inputs
        .iter()
        .filter_map(|input| {
            let desired = input.report.to_status(input.observed.as_ref(), now);
            if input.observed.as_ref() == Some(&desired) {
                return None;
            }
            let key = (input.report.namespace.clone(), input.report.name.clone());
            // Our own write of this very status, not yet echoed by the watch.
            if let Some((rv, status)) = written.get(&key)
                && *rv == input.resource_version
                && same_conditions(status, &desired)
            {
                return None;
            }
            Some(StatusPatch {
                namespace: key.0,
                name: key.1,
                status: desired,
                based_on: input.resource_version.clone(),
            })
        })
        .collect()
}

/// Equal up to `lastTransitionTime` (a re-plan at a later `now` stamps new conditions with
/// a later time).
fn same_conditions(a: &SseRouteStatus, b: &SseRouteStatus) -> bool {
    let strip = |s: &SseRouteStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// The current time in whole seconds.
pub fn now() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Writes statuses while `leader` is true, whenever `inputs` changes; returns when `inputs`'
/// sender is gone.
pub async fn run(
    client: Client,
    mut inputs: watch::Receiver<Arc<Vec<StatusInput>>>,
    mut leader: watch::Receiver<bool>,
    metrics: Metrics,
) {
    let ar = ApiResource::erase::<SseRoute>(&());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut written = Written::new();
    let mut retry: Option<Duration> = None;
    loop {
        // Wait for something to do: new inputs, a leadership change, or a retry.
        let wait_retry = async {
            match retry {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = inputs.changed() => if r.is_err() { return },
            r = leader.changed() => {
                if r.is_err() { return }
                // A new term starts from what the API server shows.
                written.clear();
            }
            _ = wait_retry => {}
        }
        if !*leader.borrow_and_update() {
            retry = None;
            continue;
        }
        let current = inputs.borrow_and_update().clone();
        let mut failed = false;
        for p in plan(&current, &written, &now()) {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &p.namespace, &ar);
            let body = serde_json::json!({
                "apiVersion": API_VERSION,
                "kind": "SseRoute",
                "metadata": {"name": p.name, "namespace": p.namespace},
                "status": p.status,
            });
            match api
                .patch_status(&p.name, &params, &Patch::Apply(&body))
                .await
            {
                Ok(_) => {
                    metrics.status_write(true);
                    tracing::debug!(route = %format!("{}/{}", p.namespace, p.name), "status written");
                    written.insert((p.namespace, p.name), (p.based_on, p.status));
                }
                // Deleted meanwhile: the next inputs will not mention it.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    metrics.status_write(false);
                    failed = true;
                    tracing::warn!(route = %format!("{}/{}", p.namespace, p.name), error = %e, "cannot write status; will retry");
                }
            }
        }
        retry = failed.then(|| {
            retry
                .map(|d| (d * 2).min(Duration::from_secs(60)))
                .unwrap_or(Duration::from_secs(1))
        });
        // Forget routes that are gone, so the map does not grow with churn.
        written.retain(|k, _| {
            current
                .iter()
                .any(|i| i.report.namespace == k.0 && i.report.name == k.1)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ACCEPTED, CondState, READY, RESOLVED_REFS, RouteReport};

    fn report(ready: bool, generation: i64) -> RouteReport {
        RouteReport {
            namespace: "apps".into(),
            name: "feed".into(),
            generation: Some(generation),
            conditions: vec![
                CondState::ok(ACCEPTED, "Accepted", "ok"),
                CondState::ok(RESOLVED_REFS, "ResolvedRefs", "ok"),
                if ready {
                    CondState::ok(READY, "Ready", "1 ready endpoints")
                } else {
                    CondState::fail(READY, "NoReadyEndpoints", "none")
                },
            ],
            ready_endpoints: u32::from(ready),
            warnings: Vec::new(),
        }
    }

    fn time(s: &str) -> Time {
        serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
    }

    fn input(report: RouteReport, observed: Option<SseRouteStatus>, rv: &str) -> StatusInput {
        StatusInput {
            report,
            observed,
            resource_version: Some(rv.into()),
        }
    }

    #[test]
    fn writes_only_what_changed() {
        let t1 = time("2026-11-23T10:00:00Z");
        let t2 = time("2026-11-23T10:05:00Z");
        let none = Written::new();
        // Nothing observed yet: write.
        let first = plan(&[input(report(true, 1), None, "1")], &none, &t1);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].status.observed_generation, Some(1));
        assert_eq!(first[0].status.ready_endpoints, Some(1));
        // Observed equals desired (even at a later time): nothing to write.
        let observed = Some(first[0].status.clone());
        assert!(plan(&[input(report(true, 1), observed.clone(), "2")], &none, &t2).is_empty());
        // A new generation: write, transition times kept.
        let next = plan(&[input(report(true, 2), observed.clone(), "3")], &none, &t2);
        assert_eq!(next[0].status.observed_generation, Some(2));
        assert!(
            next[0]
                .status
                .conditions
                .iter()
                .all(|c| c.last_transition_time == t1)
        );
        // Ready flips: only Ready's transition time moves.
        let flip = plan(&[input(report(false, 1), observed, "3")], &none, &t2);
        let ready = flip[0]
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), &ready.last_transition_time),
            ("False", &t2)
        );
    }

    #[test]
    fn own_unechoed_write_is_not_repeated_but_foreign_changes_are_corrected() {
        let t1 = time("2026-11-23T10:00:00Z");
        let t2 = time("2026-11-23T10:00:01Z");
        let p = plan(&[input(report(true, 1), None, "5")], &Written::new(), &t1);
        let mut written = Written::new();
        written.insert(
            ("apps".into(), "feed".into()),
            (p[0].based_on.clone(), p[0].status.clone()),
        );
        // Recompiled before the watch delivered our write: same rv, nothing new.
        assert!(plan(&[input(report(true, 1), None, "5")], &written, &t2).is_empty());
        // The object changed since (somebody cleared the status): write again.
        assert_eq!(
            plan(&[input(report(true, 1), None, "6")], &written, &t2).len(),
            1
        );
        // The report changed: write, whatever we wrote before.
        assert_eq!(
            plan(&[input(report(false, 1), None, "5")], &written, &t2).len(),
            1
        );
    }

    #[test]
    fn now_has_whole_seconds() {
        assert_eq!(now().0.subsec_nanosecond(), 0);
    }
}
