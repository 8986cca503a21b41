//! Route status: what [`crate::routing::compile`] found out about each route, as
//! Gateway-API-style conditions.
//!
//! Everything in this module is pure ([`writer`] does the I/O, on the leader only). A
//! [`RouteReport`] carries no timestamps; turning it into an [`SseRouteStatus`] takes the previous status and the current time, so a condition's
//! `lastTransitionTime` only moves when its status actually changes.

pub mod writer;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::SseRouteStatus;

/// Condition type: the spec is valid and this installation serves the route.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: every referenced Service and port exists.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// Condition type: every rule has at least one ready endpoint.
pub const READY: &str = "Ready";

/// One condition without its timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CondState {
    /// `Accepted`, `ResolvedRefs` or `Ready`.
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// CamelCase machine-readable reason.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
}

impl CondState {
    /// A condition that holds.
    pub fn ok(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        CondState {
            type_,
            status: true,
            reason: reason.into(),
            message: message.into(),
        }
    }
    /// A condition that does not hold.
    pub fn fail(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        CondState {
            type_,
            status: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// What compiling one route found: its conditions and ready endpoint count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteReport {
    /// Route namespace.
    pub namespace: String,
    /// Route name.
    pub name: String,
    /// `metadata.generation` of the compiled spec, if the source has one.
    pub generation: Option<i64>,
    /// Always `Accepted`, `ResolvedRefs`, `Ready`, in that order.
    pub conditions: Vec<CondState>,
    /// Ready endpoints summed over rules.
    pub ready_endpoints: u32,
    /// Problems that do not stop the route from being served (e.g. a certificate that does
    /// not cover one of its hostnames): logged, and added to the `Accepted` message.
    pub warnings: Vec<String>,
}

impl RouteReport {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The condition of the given type.
    pub fn condition(&self, type_: &str) -> Option<&CondState> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// True when every condition holds.
    pub fn all_ok(&self) -> bool {
        self.conditions.iter().all(|c| c.status)
    }

    /// One line for logs: `Accepted=True ResolvedRefs=False(BackendNotFound: ...) ...`.
    pub fn summary(&self) -> String {
        self.conditions
            .iter()
            .map(|c| {
                if c.status {
                    format!("{}=True", c.type_)
                } else {
                    format!("{}=False({}: {})", c.type_, c.reason, c.message)
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The status to write: conditions keep their previous `lastTransitionTime` unless their
    /// status changed; `now` is used otherwise.
    pub fn to_status(&self, previous: Option<&SseRouteStatus>, now: &Time) -> SseRouteStatus {
        let conditions = self
            .conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                let prev =
                    previous.and_then(|p| p.conditions.iter().find(|pc| pc.type_ == c.type_));
                let last_transition_time = match prev {
                    Some(p) if p.status == status => p.last_transition_time.clone(),
                    _ => now.clone(),
                };
                Condition {
                    type_: c.type_.to_string(),
                    status: status.to_string(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                    observed_generation: self.generation,
                    last_transition_time,
                }
            })
            .collect();
        SseRouteStatus {
            observed_generation: self.generation,
            conditions,
            ready_endpoints: Some(self.ready_endpoints),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ready: bool) -> RouteReport {
        RouteReport {
            namespace: "apps".into(),
            name: "feed".into(),
            generation: Some(3),
            conditions: vec![
                CondState::ok(ACCEPTED, "Accepted", "ok"),
                CondState::ok(RESOLVED_REFS, "ResolvedRefs", "ok"),
                if ready {
                    CondState::ok(READY, "Ready", "ok")
                } else {
                    CondState::fail(READY, "NoReadyEndpoints", "none")
                },
            ],
            warnings: Vec::new(),
            ready_endpoints: u32::from(ready),
        }
    }

    fn time(s: &str) -> Time {
        serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t1 = time("2026-01-01T00:00:00Z");
        let t2 = time("2026-01-02T00:00:00Z");
        let first = report(true).to_status(None, &t1);
        let same = report(true).to_status(Some(&first), &t2);
        assert!(same.conditions.iter().all(|c| c.last_transition_time == t1));
        let changed = report(false).to_status(Some(&first), &t2);
        let ready = changed
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .unwrap();
        assert_eq!(ready.last_transition_time, t2);
        assert_eq!(ready.status, "False");
        let accepted = changed
            .conditions
            .iter()
            .find(|c| c.type_ == ACCEPTED)
            .unwrap();
        assert_eq!(accepted.last_transition_time, t1);
        assert_eq!(changed.observed_generation, Some(3));
    }

    #[test]
    fn summary_names_failures() {
        let s = report(false).summary();
        assert!(s.contains("Accepted=True"));
        assert!(s.contains("Ready=False(NoReadyEndpoints: none)"));
    }
}
