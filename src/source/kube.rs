//! Cluster mode: watch the API server and publish routing tables.
//!
//! One watch per kind (SseRoute, Service, EndpointSlice, and two for Secrets by field
//! selector: type `kubernetes.io/tls`, and type `Opaque`, the usual type of a CA bundle for
//! `backend.tls.caSecretName`), all namespaces or one (`--namespace`). The index keeps only
//! what TLS reads of a Secret, and drops Opaque Secrets without `ca.crt`/`tls.crt`/`tls.key`. Each is a
//! kube-runtime [`watcher`] with the default exponential backoff, so a failed watch is logged
//! and retried (and relists when its resourceVersion expired). Objects are watched untyped
//! ([`DynamicObject`]) and typed by the [`ClusterIndex`]: one object that does not
//! deserialize is logged and skipped instead of failing the whole watch, which is what a typed
//! watcher would do with it.
//!
//! Events are debounced ([`Debounce`]) and compiled by the shared [`Publisher`]; nothing is
//! published before every watch has finished its initial list, which is what makes `/readyz`
//! mean "serving the cluster's routes". After each publish the route reports, paired with the
//! statuses observed on the objects, go to the status writer.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{BoxStream, select_all};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;

use super::index::{ClusterIndex, Kind, StatusInput};
use crate::api::SseRoute;
use crate::publish::Publisher;

/// Field selector of the TLS Secret watch.
pub const TLS_SECRETS: &str = "type=kubernetes.io/tls";
/// Field selector of the Opaque Secret watch (CA bundles; no other Secret type is read).
pub const OPAQUE_SECRETS: &str = "type=Opaque";

/// Settings of the cluster source.
#[derive(Clone, Debug)]
pub struct KubeSourceConfig {
    /// Watch one namespace; `None` watches all.
    pub namespace: Option<String>,
    /// Quiet time after the last event before compiling.
    pub debounce: Duration,
    /// Longest an event waits for a compile under constant churn.
    pub max_delay: Duration,
    /// The class served (bad routes of other classes are not reported).
    pub class: String,
    /// Secrets added to every snapshot besides the watched ones (the `--default-cert` pair
    /// as [`crate::source::files::DEFAULT_CERT_SECRET`]); a change recompiles.
    pub extra_secrets: Option<watch::Receiver<Vec<Secret>>>,
}

/// Coalesces bursts of events: fires `quiet` after the last poke, but never later than
/// `max_delay` after the first poke of a burst.
#[derive(Clone, Debug)]
pub struct Debounce {
    quiet: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debounce {
    /// A debouncer with nothing pending.
    pub fn new(quiet: Duration, max_delay: Duration) -> Self {
        Debounce {
            quiet,
            max_delay,
            first: None,
            last: None,
        }
    }

    /// Records an event at `now`.
    pub fn poke(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When to fire, if anything is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max_delay))
    }

    /// Clears the pending burst (call when firing).
    pub fn reset(&mut self) {
        self.first = None;
        self.last = None;
    }
}

fn api_for(client: &Client, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

type KindEvent = (Kind, Result<Event<DynamicObject>, watcher::Error>);

fn watch_kind(
    client: &Client,
    kind: Kind,
    namespace: Option<&str>,
) -> BoxStream<'static, KindEvent> {
    let (ar, config) = match kind {
        Kind::Route => (
            ApiResource::erase::<SseRoute>(&()),
            watcher::Config::default(),
        ),
        Kind::Service => (
            ApiResource::erase::<Service>(&()),
            watcher::Config::default(),
        ),
        Kind::EndpointSlice => (
            ApiResource::erase::<EndpointSlice>(&()),
            watcher::Config::default(),
        ),
        Kind::Secret => (
            ApiResource::erase::<Secret>(&()),
            watcher::Config::default().fields(TLS_SECRETS),
        ),
        Kind::OpaqueSecret => (
            ApiResource::erase::<Secret>(&()),
            watcher::Config::default().fields(OPAQUE_SECRETS),
        ),
    };
    watcher::watcher(api_for(client, &ar, namespace), config)
        .default_backoff()
        .map(move |ev| (kind, ev))
        .boxed()
}

/// Runs the cluster source until the task is dropped: watches, indexes, publishes, and sends
/// status inputs to `status_tx` after every compile (and when only observed statuses changed).
pub async fn run(
    client: Client,
    cfg: KubeSourceConfig,
    mut publisher: Publisher,
    status_tx: watch::Sender<Arc<Vec<StatusInput>>>,
) {
    let streams = Kind::ALL
        .into_iter()
        .map(|k| watch_kind(&client, k, cfg.namespace.as_deref()));
    let mut events = select_all(streams);
    let mut index = ClusterIndex::default();
    let mut debounce = Debounce::new(cfg.debounce, cfg.max_delay);
    let mut routing_dirty = false;
    let mut reports = Vec::new();
    let mut published = false;
    let mut extra_secrets = cfg.extra_secrets;
    let scope = cfg.namespace.as_deref().unwrap_or("all namespaces");
    tracing::info!(
        namespaces = scope,
        "watching SseRoutes, Services, EndpointSlices and TLS and Opaque Secrets"
    );

    loop {
        let deadline = debounce.deadline();
        tokio::select! {
            ev = events.next() => {
                let Some((kind, ev)) = ev else {
                    tracing::error!("every watch stream ended");
                    return;
                };
                let change = match ev {
                    Ok(Event::Apply(o)) => index.apply(kind, &o),
                    Ok(Event::Delete(o)) => index.delete(kind, &o),
                    Ok(Event::Init) => {
                        index.init(kind);
                        Default::default()
                    }
                    Ok(Event::InitApply(o)) => {
                        index.init_apply(kind, &o);
                        Default::default()
                    }
                    Ok(Event::InitDone) => {
                        tracing::debug!(kind = kind.name(), "list complete");
                        index.init_done(kind)
                    }
                    Err(e) => {
                        tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying with backoff");
                        Default::default()
                    }
                };
                if change.any() {
                    routing_dirty |= change.routing;
                    debounce.poke(Instant::now());
                }
            }
            Some(Ok(())) = async {
                match &mut extra_secrets {
                    Some(rx) => Some(rx.changed().await),
                    None => std::future::pending().await,
                }
            } => {
                routing_dirty = true;
                debounce.poke(Instant::now());
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                debounce.reset();
                if !index.synced() {
                    tracing::debug!(waiting_for = ?index.unsynced(), "initial lists incomplete; not publishing yet");
                    continue;
                }
                if routing_dirty || !published {
                    let mut snapshot = index.snapshot();
                    if let Some(rx) = &extra_secrets {
                        snapshot.secrets.extend(rx.borrow().iter().cloned());
                    }
                    reports = publisher.publish(&snapshot, |_| None);
                    reports.extend(index.bad_route_reports(&cfg.class));
                    routing_dirty = false;
                    published = true;
                }
                status_tx.send_replace(Arc::new(index.status_inputs(reports.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debounce_waits_for_quiet_but_not_forever() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Debounce::new(ms(100), ms(1000));
        assert_eq!(d.deadline(), None);
        d.poke(t0);
        assert_eq!(d.deadline(), Some(t0 + ms(100)));
        d.poke(t0 + ms(50));
        assert_eq!(d.deadline(), Some(t0 + ms(150)));
        // Constant churn: capped at max_delay after the first event.
        d.poke(t0 + ms(980));
        assert_eq!(d.deadline(), Some(t0 + ms(1000)));
        d.reset();
        assert_eq!(d.deadline(), None);
    }
}
