//! Leader election on a `coordination.k8s.io/v1` Lease, so that one replica writes statuses
//! while all of them route.
//!
//! The protocol is client-go's: every `retry_period` a replica reads the Lease; the holder
//! renews it (`renewTime`), the others take it over once it has not changed for
//! `leaseDurationSeconds` *as observed on their own clock* (no comparison of timestamps written
//! by another machine, so clock skew does not matter). Every write is a `replace` carrying the
//! resourceVersion that was read, so two candidates racing for an expired Lease cannot both win:
//! the API server answers the loser `409 Conflict`. A leader that cannot renew for
//! `renew_deadline` steps down on its own, before the others may take over. On shutdown the
//! leader releases the Lease (empty holder), so a rolling update does not wait out a lease.
//!
//! [`Elector::decide`] is the pure part; [`run`] does the I/O.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Settings of leader election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (`holderIdentity`), unique among replicas.
    pub identity: String,
    /// How long a Lease that is not renewed stays valid.
    pub duration: Duration,
    /// A leader that could not renew for this long steps down (less than `duration`).
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or checked.
    pub retry_period: Duration,
}

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No Lease: create it, held by us.
    Create(Lease),
    /// Write this Lease (renewal or takeover) with the resourceVersion that was read.
    Replace(Lease),
    /// Somebody else holds a valid Lease.
    Follow {
        /// The current holder.
        holder: String,
    },
}

/// The parts of a Lease whose change proves its holder alive.
type Record = (
    Option<String>,
    Option<MicroTime>,
    Option<MicroTime>,
    Option<i32>,
    Option<i32>,
);

fn record(spec: &LeaseSpec) -> Record {
    (
        spec.holder_identity.clone(),
        spec.renew_time.clone(),
        spec.acquire_time.clone(),
        spec.lease_transitions,
        spec.lease_duration_seconds,
    )
}

/// The pure state of one candidate: when it last saw the Lease change.
#[derive(Debug)]
pub struct Elector {
    cfg: LeaseConfig,
    observed: Option<(Record, Instant)>,
}

impl Elector {
    /// A candidate that has not seen the Lease yet.
    pub fn new(cfg: LeaseConfig) -> Self {
        Elector {
            cfg,
            observed: None,
        }
    }

    /// Decides from the Lease as read (`None`: it does not exist) at local time `now`;
    /// `wall` is the timestamp written into `renewTime`/`acquireTime`.
    pub fn decide(&mut self, lease: Option<&Lease>, now: Instant, wall: &MicroTime) -> Decision {
        let secs = i32::try_from(self.cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let mine = |acquire: MicroTime, transitions: i32| LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: Some(acquire),
            renew_time: Some(wall.clone()),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(lease) = lease else {
            return Decision::Create(Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(mine(wall.clone(), 0)),
            });
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let rec = record(&spec);
        match &self.observed {
            Some((seen, _)) if *seen == rec => {}
            _ => self.observed = Some((rec, now)),
        }
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let replace = |spec: LeaseSpec| {
            Decision::Replace(Lease {
                metadata: lease.metadata.clone(),
                spec: Some(spec),
            })
        };
        match holder {
            Some(h) if h == self.cfg.identity => replace(mine(
                spec.acquire_time.clone().unwrap_or_else(|| wall.clone()),
                transitions,
            )),
            Some(h) => {
                let valid_for = Duration::from_secs(
                    u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(0),
                );
                let seen_at = self.observed.as_ref().map_or(now, |(_, t)| *t);
                if now < seen_at + valid_for {
                    Decision::Follow { holder: h }
                } else {
                    replace(mine(wall.clone(), transitions + 1))
                }
            }
            // Released or never held.
            None => replace(mine(wall.clone(), transitions + 1)),
        }
    }
}

/// Now, as a Lease timestamp.
fn wall_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One round: read, decide, write. `Ok(true)` when we hold the Lease afterwards.
async fn round(api: &Api<Lease>, elector: &mut Elector) -> Result<bool, kube::Error> {
    let lease = api.get_opt(&elector.cfg.name).await?;
    match elector.decide(lease.as_ref(), Instant::now(), &wall_now()) {
        Decision::Follow { holder } => {
            tracing::trace!(%holder, "following");
            Ok(false)
        }
        Decision::Create(l) => match api.create(&PostParams::default(), &l).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        },
        Decision::Replace(l) => match api
            .replace(&elector.cfg.name, &PostParams::default(), &l)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// Takes part in the election until `shutdown` turns true (or its sender is dropped), then
/// releases the Lease if held. `leader` reflects whether this replica may write statuses.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    leader: watch::Sender<bool>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut elector = Elector::new(cfg.clone());
    let mut last_renewed: Option<Instant> = None;
    let set = |is: bool| {
        if *leader.borrow() != is {
            if is {
                tracing::info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), identity = %cfg.identity, "became the leader: writing route statuses");
            } else {
                tracing::info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), "not the leader: not writing route statuses");
            }
            metrics.set_leader(is);
            leader.send_replace(is);
        }
    };
    loop {
        let started = Instant::now();
        match round(&api, &mut elector).await {
            Ok(true) => {
                last_renewed = Some(started);
                set(true);
            }
            Ok(false) => {
                last_renewed = None;
                set(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "lease request failed");
                if last_renewed.is_none_or(|t| started.duration_since(t) >= cfg.renew_deadline) {
                    set(false);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + cfg.retry_period) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    if *leader.borrow() {
        set(false);
        release(&api, &cfg).await;
    }
}

/// Gives the Lease up (empty holder), so another replica can take it at once.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = Some(wall_now());
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => tracing::info!(lease = %cfg.name, "lease released"),
        Err(e) => tracing::warn!(error = %e, lease = %cfg.name, "cannot release the lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str) -> LeaseConfig {
        LeaseConfig {
            name: "ssegate".into(),
            namespace: "sys".into(),
            identity: id.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn wall(s: i64) -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap())
    }

    /// What the API server would store for a decision (resourceVersion bumped).
    fn stored(d: Decision, rv: u32) -> Lease {
        let mut l = match d {
            Decision::Create(l) | Decision::Replace(l) => l,
            Decision::Follow { .. } => panic!("nothing to store"),
        };
        l.metadata.resource_version = Some(rv.to_string());
        l
    }

    fn holder(l: &Lease) -> &str {
        l.spec
            .as_ref()
            .unwrap()
            .holder_identity
            .as_deref()
            .unwrap_or("")
    }

    #[test]
    fn first_candidate_creates_the_lease() {
        let t0 = Instant::now();
        let d = Elector::new(cfg("a")).decide(None, t0, &wall(0));
        let Decision::Create(l) = d else {
            panic!("{d:?}")
        };
        assert_eq!(holder(&l), "a");
        let spec = l.spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(l.metadata.namespace.as_deref(), Some("sys"));
    }

    #[test]
    fn holder_renews_keeping_acquire_time() {
        let t0 = Instant::now();
        let mut a = Elector::new(cfg("a"));
        let lease = stored(a.decide(None, t0, &wall(0)), 1);
        let d = a.decide(Some(&lease), t0 + Duration::from_secs(2), &wall(2));
        let Decision::Replace(l) = d else {
            panic!("{d:?}")
        };
        let spec = l.spec.unwrap();
        assert_eq!(spec.renew_time, Some(wall(2)));
        assert_eq!(spec.acquire_time, Some(wall(0)));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(
            l.metadata.resource_version.as_deref(),
            Some("1"),
            "optimistic concurrency"
        );
    }

    #[test]
    fn others_follow_while_the_lease_is_renewed_and_take_over_after_it_expires() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut a = Elector::new(cfg("a"));
        let mut b = Elector::new(cfg("b"));
        let mut lease = stored(a.decide(None, t0, &wall(0)), 1);
        // b sees a renew every 2 s for a minute: always follows, even past 15 s in total.
        for i in 1..30u32 {
            let now = t0 + s(2 * u64::from(i));
            assert_eq!(
                b.decide(Some(&lease), now, &wall(0)),
                Decision::Follow { holder: "a".into() }
            );
            lease = stored(a.decide(Some(&lease), now, &wall(2 * i64::from(i))), i + 1);
        }
        // a dies. b first sees this version at t; it is valid until t + 15 s.
        let t = t0 + s(60);
        assert!(matches!(
            b.decide(Some(&lease), t, &wall(60)),
            Decision::Follow { .. }
        ));
        assert!(matches!(
            b.decide(Some(&lease), t + s(14), &wall(74)),
            Decision::Follow { .. }
        ));
        let d = b.decide(Some(&lease), t + s(15), &wall(75));
        let Decision::Replace(l) = d else {
            panic!("{d:?}")
        };
        assert_eq!(holder(&l), "b");
        assert_eq!(l.spec.as_ref().unwrap().lease_transitions, Some(1));
        assert_eq!(l.spec.as_ref().unwrap().acquire_time, Some(wall(75)));
    }

    #[test]
    fn the_remote_clock_is_never_trusted() {
        // A holder whose renewTime is far in the past (skewed clock) but who keeps renewing
        // is still followed: only changes of the record count.
        let t0 = Instant::now();
        let mut a = Elector::new(cfg("a"));
        let mut b = Elector::new(cfg("b"));
        let mut lease = stored(a.decide(None, t0, &wall(-100_000)), 1);
        for i in 1..20u32 {
            let now = t0 + Duration::from_secs(5 * u64::from(i));
            assert!(matches!(
                b.decide(Some(&lease), now, &wall(0)),
                Decision::Follow { .. }
            ));
            lease = stored(
                a.decide(Some(&lease), now, &wall(-100_000 + i64::from(i))),
                i + 1,
            );
        }
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut a = Elector::new(cfg("a"));
        let mut lease = stored(a.decide(None, t0, &wall(0)), 1);
        lease.spec.as_mut().unwrap().holder_identity = None;
        let d = Elector::new(cfg("b")).decide(Some(&lease), t0, &wall(1));
        let Decision::Replace(l) = d else {
            panic!("{d:?}")
        };
        assert_eq!(holder(&l), "b");
    }
}
