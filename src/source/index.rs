//! The cluster index: what the API server watches told us, as plain data.
//!
//! One [`ClusterIndex`] holds every watched object, typed. It is fed watch events
//! ([`ClusterIndex::apply`], [`ClusterIndex::delete`] and the relist protocol
//! [`ClusterIndex::init`] / [`ClusterIndex::init_apply`] / [`ClusterIndex::init_done`]) and is
//! fully synchronous, so it is unit-tested with typed objects and no API server.
//!
//! - An object that does not deserialize as its kind is logged once and skipped; for an
//!   SseRoute it is kept as a [`BadRoute`] so its status can say why it is not served.
//! - A relist (after a watch expired or failed) is buffered and replaces the kind's objects
//!   only when complete, so the routing table never sees a half-listed cluster.
//! - Services and EndpointSlices that no route references are stored but do not make the
//!   table dirty, and are left out of the [`Snapshot`]: endpoint churn elsewhere in the cluster
//!   costs a map update, not a recompile.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::core::TypeMeta;
use serde::de::DeserializeOwned;

use super::Snapshot;
use crate::api::{SseRoute, SseRouteStatus};
use crate::routing::SERVICE_NAME_LABEL;
use crate::status::{ACCEPTED, CondState, READY, RESOLVED_REFS, RouteReport};

/// The kinds ssegate watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `ssegate.io/v1alpha1` SseRoute.
    Route,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `v1` Secret of type `kubernetes.io/tls`.
    Secret,
}

impl Kind {
    /// Every kind, in the order watches are started.
    pub const ALL: [Kind; 4] = [
        Kind::Route,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Secret,
    ];

    /// The kind's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Route => "SseRoute",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Secret => "Secret",
        }
    }
}

/// `(namespace, name)` of an object.
pub type ObjKey = (String, String);

/// An SseRoute whose spec could not be read; reported, never routed.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRoute {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// `spec.className` if it could be read: a route of another class is ignored even if bad.
    pub class_name: Option<String>,
    /// The status on the object, if readable.
    pub status: Option<SseRouteStatus>,
    /// What is wrong, with the field path.
    pub error: String,
}

/// A watched SseRoute: usable or not.
// Nearly every entry is `Good`: boxing it would add an allocation per route for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum RouteEntry {
    /// Deserialized.
    Good(SseRoute),
    /// Did not deserialize.
    Bad(BadRoute),
}

/// What an event changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// The routing table must be recompiled.
    pub routing: bool,
    /// Only observed route statuses (or resource versions) changed: statuses must be
    /// re-checked, the table is unaffected.
    pub status: bool,
}

impl Change {
    const NONE: Change = Change {
        routing: false,
        status: false,
    };
    const ROUTING: Change = Change {
        routing: true,
        status: true,
    };
    const STATUS: Change = Change {
        routing: false,
        status: true,
    };

    /// Either flag.
    pub fn any(self) -> bool {
        self.routing || self.status
    }

    /// Both changes together.
    pub fn merge(self, other: Change) -> Change {
        Change {
            routing: self.routing || other.routing,
            status: self.status || other.status,
        }
    }
}

/// Objects of one kind, with the relist buffer.
#[derive(Debug)]
struct Store<T> {
    items: BTreeMap<ObjKey, T>,
    relist: Option<BTreeMap<ObjKey, T>>,
    synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// One route's observed state, as the status writer needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusInput {
    /// What compile found (or why the route could not be read).
    pub report: RouteReport,
    /// The status currently on the object.
    pub observed: Option<SseRouteStatus>,
    /// `metadata.resourceVersion` of the object the observation came from.
    pub resource_version: Option<String>,
}

/// Every watched object, typed; see the module documentation.
#[derive(Debug, Default)]
pub struct ClusterIndex {
    routes: Store<RouteEntry>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    secrets: Store<Secret>,
    /// `(namespace, service)` pairs some route's rule points at.
    referenced: HashSet<ObjKey>,
    /// Objects of other kinds that failed to deserialize, with the error last logged.
    bad: HashMap<(Kind, ObjKey), String>,
}

fn key_of(obj: &DynamicObject) -> ObjKey {
    (
        obj.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Deserializes a watched object as `K`, with the field path in the error.
pub fn parse<K>(obj: &DynamicObject) -> Result<K, String>
where
    K: DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    let mut obj = obj.clone();
    // List items of built-in kinds come without apiVersion/kind.
    obj.types = Some(TypeMeta {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
    });
    let value = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        if at == "." {
            e.inner().to_string()
        } else {
            format!("{at}: {}", e.inner())
        }
    })
}

fn route_entry(obj: &DynamicObject) -> RouteEntry {
    match parse::<SseRoute>(obj) {
        Ok(route) => RouteEntry::Good(route),
        Err(error) => {
            let (namespace, name) = key_of(obj);
            RouteEntry::Bad(BadRoute {
                namespace,
                name,
                generation: obj.metadata.generation,
                resource_version: obj.metadata.resource_version.clone(),
                class_name: obj
                    .data
                    .pointer("/spec/className")
                    .and_then(|c| c.as_str())
                    .map(Into::into),
                status: obj
                    .data
                    .get("status")
                    .and_then(|s| serde_json::from_value(s.clone()).ok()),
                error,
            })
        }
    }
}

/// The part of a route that compile reads; a change elsewhere (status, resourceVersion,
/// managed fields) does not need a recompile.
fn routing_view(e: &RouteEntry) -> impl PartialEq + '_ {
    match e {
        RouteEntry::Good(r) => (
            Some(&r.spec),
            r.metadata.generation,
            r.metadata.creation_timestamp.as_ref(),
            None,
        ),
        RouteEntry::Bad(b) => (None, b.generation, None, Some(&b.error)),
    }
}

impl ClusterIndex {
    /// True once every kind has finished its first list.
    pub fn synced(&self) -> bool {
        self.routes.synced && self.services.synced && self.slices.synced && self.secrets.synced
    }

    /// Kinds that have not finished their first list yet.
    pub fn unsynced(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| match k {
                Kind::Route => !self.routes.synced,
                Kind::Service => !self.services.synced,
                Kind::EndpointSlice => !self.slices.synced,
                Kind::Secret => !self.secrets.synced,
            })
            .collect()
    }

    /// An object was added or modified.
    pub fn apply(&mut self, kind: Kind, obj: &DynamicObject) -> Change {
        let key = key_of(obj);
        match kind {
            Kind::Route => {
                let entry = route_entry(obj);
                let change = match self.routes.items.get(&key) {
                    Some(old) if routing_view(old) == routing_view(&entry) => Change::STATUS,
                    _ => Change::ROUTING,
                };
                self.log_bad_route(&entry);
                self.routes.items.insert(key, entry);
                if change.routing {
                    self.reindex_references();
                }
                change
            }
            _ => match self.parse_other(kind, &key, obj) {
                Some(typed) => {
                    let relevant = self.relevant(&key, &typed);
                    self.insert_other(key, typed);
                    if relevant {
                        Change::ROUTING
                    } else {
                        Change::NONE
                    }
                }
                // Unreadable: whatever we had under this key is no longer true.
                None => self.delete_key(kind, &key),
            },
        }
    }

    /// An object was deleted.
    pub fn delete(&mut self, kind: Kind, obj: &DynamicObject) -> Change {
        let key = key_of(obj);
        self.bad.remove(&(kind, key.clone()));
        self.delete_key(kind, &key)
    }

    /// A relist starts: buffer what follows until [`ClusterIndex::init_done`].
    pub fn init(&mut self, kind: Kind) {
        match kind {
            Kind::Route => self.routes.relist = Some(BTreeMap::new()),
            Kind::Service => self.services.relist = Some(BTreeMap::new()),
            Kind::EndpointSlice => self.slices.relist = Some(BTreeMap::new()),
            Kind::Secret => self.secrets.relist = Some(BTreeMap::new()),
        }
    }

    /// An object of a relist.
    pub fn init_apply(&mut self, kind: Kind, obj: &DynamicObject) {
        let key = key_of(obj);
        match kind {
            Kind::Route => {
                let entry = route_entry(obj);
                self.log_bad_route(&entry);
                self.routes
                    .relist
                    .get_or_insert_default()
                    .insert(key, entry);
            }
            _ => {
                if let Some(typed) = self.parse_other(kind, &key, obj) {
                    match typed {
                        Other::Service(s) => {
                            self.services.relist.get_or_insert_default().insert(key, s);
                        }
                        Other::Slice(s) => {
                            self.slices.relist.get_or_insert_default().insert(key, s);
                        }
                        Other::Secret(s) => {
                            self.secrets.relist.get_or_insert_default().insert(key, s);
                        }
                    }
                }
            }
        }
    }

    /// The relist is complete: it replaces the kind's objects. The first one of a kind
    /// marks it synced.
    pub fn init_done(&mut self, kind: Kind) -> Change {
        fn swap<T: PartialEq>(s: &mut Store<T>) -> bool {
            let first = !s.synced;
            s.synced = true;
            let new = s.relist.take().unwrap_or_default();
            let changed = first || new != s.items;
            s.items = new;
            changed
        }
        let changed = match kind {
            Kind::Route => {
                let changed = swap(&mut self.routes);
                self.reindex_references();
                changed
            }
            Kind::Service => swap(&mut self.services),
            Kind::EndpointSlice => swap(&mut self.slices),
            Kind::Secret => swap(&mut self.secrets),
        };
        let bad_keys: Vec<_> = self
            .bad
            .keys()
            .filter(|(k, _)| *k == kind)
            .cloned()
            .collect();
        for bk in bad_keys {
            let present = match kind {
                Kind::Service => self.services.items.contains_key(&bk.1),
                Kind::EndpointSlice => self.slices.items.contains_key(&bk.1),
                Kind::Secret => self.secrets.items.contains_key(&bk.1),
                Kind::Route => true,
            };
            if present {
                self.bad.remove(&bk);
            }
        }
        if changed {
            Change::ROUTING
        } else {
            Change::NONE
        }
    }

    /// The objects compile needs: routes that deserialized, the Services and EndpointSlices
    /// they reference, and TLS Secrets.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            routes: self
                .routes
                .items
                .values()
                .filter_map(|e| match e {
                    RouteEntry::Good(r) => Some(r.clone()),
                    RouteEntry::Bad(_) => None,
                })
                .collect(),
            services: self
                .services
                .items
                .iter()
                .filter(|(k, _)| self.referenced.contains(*k))
                .map(|(_, s)| s.clone())
                .collect(),
            endpoint_slices: self
                .slices
                .iter_referenced(&self.referenced)
                .cloned()
                .collect(),
            secrets: self.secrets.items.values().cloned().collect(),
        }
    }

    /// Reports for routes that could not be read (of this `class`), in addition to the
    /// ones compile makes.
    pub fn bad_route_reports(&self, class: &str) -> Vec<RouteReport> {
        self.routes
            .items
            .values()
            .filter_map(|e| match e {
                RouteEntry::Bad(b) if b.class_name.as_deref().is_none_or(|c| c == class) => {
                    Some(bad_route_report(b))
                }
                _ => None,
            })
            .collect()
    }

    /// Pairs every report with the route's observed status and resourceVersion.
    pub fn status_inputs(&self, reports: Vec<RouteReport>) -> Vec<StatusInput> {
        reports
            .into_iter()
            .filter_map(|report| {
                let key = (report.namespace.clone(), report.name.clone());
                let (observed, resource_version) = match self.routes.items.get(&key)? {
                    RouteEntry::Good(r) => (r.status.clone(), r.metadata.resource_version.clone()),
                    RouteEntry::Bad(b) => (b.status.clone(), b.resource_version.clone()),
                };
                Some(StatusInput {
                    report,
                    observed,
                    resource_version,
                })
            })
            .collect()
    }

    fn delete_key(&mut self, kind: Kind, key: &ObjKey) -> Change {
        match kind {
            Kind::Route => {
                if self.routes.items.remove(key).is_some() {
                    self.reindex_references();
                    Change::ROUTING
                } else {
                    Change::NONE
                }
            }
            Kind::Service => {
                let had = self.services.items.remove(key).is_some();
                if had && self.referenced.contains(key) {
                    Change::ROUTING
                } else {
                    Change::NONE
                }
            }
            Kind::EndpointSlice => match self.slices.items.remove(key) {
                Some(old) if self.slice_referenced(&old) => Change::ROUTING,
                _ => Change::NONE,
            },
            Kind::Secret => {
                if self.secrets.items.remove(key).is_some() {
                    Change::ROUTING
                } else {
                    Change::NONE
                }
            }
        }
    }

    fn parse_other(&mut self, kind: Kind, key: &ObjKey, obj: &DynamicObject) -> Option<Other> {
        let parsed = match kind {
            Kind::Service => parse::<Service>(obj).map(Other::Service),
            Kind::EndpointSlice => parse::<EndpointSlice>(obj).map(Other::Slice),
            Kind::Secret => parse::<Secret>(obj).map(Other::Secret),
            Kind::Route => unreachable!("routes are parsed as RouteEntry"),
        };
        match parsed {
            Ok(t) => {
                self.bad.remove(&(kind, key.clone()));
                Some(t)
            }
            Err(error) => {
                let slot = self.bad.entry((kind, key.clone())).or_default();
                if *slot != error {
                    tracing::warn!(kind = kind.name(), namespace = %key.0, name = %key.1, %error, "skipping an object that does not deserialize");
                    *slot = error;
                }
                None
            }
        }
    }

    fn insert_other(&mut self, key: ObjKey, typed: Other) {
        match typed {
            Other::Service(s) => {
                self.services.items.insert(key, s);
            }
            Other::Slice(s) => {
                self.slices.items.insert(key, s);
            }
            Other::Secret(s) => {
                self.secrets.items.insert(key, s);
            }
        }
    }

    /// Whether applying `typed` can change the table (for slices: the old or the new version
    /// belongs to a referenced Service).
    fn relevant(&self, key: &ObjKey, typed: &Other) -> bool {
        match typed {
            Other::Service(_) => self.referenced.contains(key),
            Other::Slice(s) => {
                self.slice_referenced(s)
                    || self
                        .slices
                        .items
                        .get(key)
                        .is_some_and(|old| self.slice_referenced(old))
            }
            Other::Secret(_) => true,
        }
    }

    fn slice_referenced(&self, slice: &EndpointSlice) -> bool {
        slice_service(slice).is_some_and(|k| self.referenced.contains(&k))
    }

    fn reindex_references(&mut self) {
        self.referenced = self
            .routes
            .items
            .values()
            .filter_map(|e| match e {
                RouteEntry::Good(r) => Some(r),
                RouteEntry::Bad(_) => None,
            })
            .flat_map(|r| {
                let ns = r
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                r.spec
                    .rules
                    .iter()
                    .map(move |rule| (ns.clone(), rule.backend.service.clone()))
            })
            .collect();
    }

    fn log_bad_route(&mut self, entry: &RouteEntry) {
        if let RouteEntry::Bad(b) = entry {
            let slot = self
                .bad
                .entry((Kind::Route, (b.namespace.clone(), b.name.clone())))
                .or_default();
            if *slot != b.error {
                tracing::warn!(route = %format!("{}/{}", b.namespace, b.name), error = %b.error, "SseRoute does not deserialize; it is not served");
                slot.clone_from(&b.error);
            }
        }
    }
}

// Short-lived (one per event): size does not matter.
#[allow(clippy::large_enum_variant)]
enum Other {
    Service(Service),
    Slice(EndpointSlice),
    Secret(Secret),
}

/// `(namespace, service)` an EndpointSlice belongs to.
fn slice_service(slice: &EndpointSlice) -> Option<ObjKey> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.clone(),
    ))
}

impl Store<EndpointSlice> {
    fn iter_referenced<'a>(
        &'a self,
        referenced: &'a HashSet<ObjKey>,
    ) -> impl Iterator<Item = &'a EndpointSlice> {
        self.items
            .values()
            .filter(|s| slice_service(s).is_some_and(|k| referenced.contains(&k)))
    }
}

/// The report of a route whose spec could not be read.
pub fn bad_route_report(b: &BadRoute) -> RouteReport {
    RouteReport {
        namespace: b.namespace.clone(),
        name: b.name.clone(),
        generation: b.generation,
        conditions: vec![
            CondState::fail(
                ACCEPTED,
                "InvalidSpec",
                format!("spec cannot be read: {}", b.error),
            ),
            CondState::fail(RESOLVED_REFS, "InvalidSpec", "the spec cannot be read"),
            CondState::fail(READY, "NotAccepted", "the route is not served"),
        ],
        ready_endpoints: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::tests::{route, service, slice};
    use kube::Resource;
    use serde::Serialize;

    fn dynamic<K: Serialize + Resource<DynamicType = ()>>(obj: &K) -> DynamicObject {
        serde_json::from_value(serde_json::to_value(obj).unwrap()).unwrap()
    }

    fn synced() -> ClusterIndex {
        let mut idx = ClusterIndex::default();
        for k in Kind::ALL {
            idx.init(k);
            idx.init_done(k);
        }
        idx
    }

    fn feed() -> SseRoute {
        route("apps", "feed").rule("/feed", "svc", 80).build()
    }

    #[test]
    fn synced_only_after_every_kind_listed() {
        let mut idx = ClusterIndex::default();
        for k in [Kind::Route, Kind::Service, Kind::EndpointSlice] {
            idx.init(k);
            idx.init_done(k);
        }
        assert!(!idx.synced());
        assert_eq!(idx.unsynced(), vec![Kind::Secret]);
        idx.init(Kind::Secret);
        assert_eq!(idx.init_done(Kind::Secret), Change::ROUTING);
        assert!(idx.synced());
    }

    #[test]
    fn apply_and_delete_build_the_snapshot() {
        let mut idx = synced();
        assert_eq!(idx.apply(Kind::Route, &dynamic(&feed())), Change::ROUTING);
        let svc = service("apps", "svc", &[(None, 80)]);
        assert_eq!(idx.apply(Kind::Service, &dynamic(&svc)), Change::ROUTING);
        let sl = slice("apps", "svc", 9000, &[("10.0.0.1", true)]);
        assert_eq!(
            idx.apply(Kind::EndpointSlice, &dynamic(&sl)),
            Change::ROUTING
        );
        let snap = idx.snapshot();
        assert_eq!(
            (
                snap.routes.len(),
                snap.services.len(),
                snap.endpoint_slices.len()
            ),
            (1, 1, 1)
        );
        assert_eq!(
            idx.delete(Kind::EndpointSlice, &dynamic(&sl)),
            Change::ROUTING
        );
        assert_eq!(idx.delete(Kind::Route, &dynamic(&feed())), Change::ROUTING);
        let snap = idx.snapshot();
        assert!(snap.routes.is_empty() && snap.endpoint_slices.is_empty());
        // Nothing references the Service any more.
        assert!(snap.services.is_empty());
    }

    #[test]
    fn unreferenced_services_and_slices_do_not_dirty_the_table() {
        let mut idx = synced();
        idx.apply(Kind::Route, &dynamic(&feed()));
        let other = service("apps", "unrelated", &[(None, 80)]);
        assert_eq!(idx.apply(Kind::Service, &dynamic(&other)), Change::NONE);
        let sl = slice("apps", "unrelated", 1, &[("10.0.0.9", true)]);
        assert_eq!(idx.apply(Kind::EndpointSlice, &dynamic(&sl)), Change::NONE);
        assert!(idx.snapshot().services.is_empty());
        // A route that starts referencing it pulls it into the snapshot.
        let r = route("apps", "r2").rule("/u", "unrelated", 80).build();
        assert_eq!(idx.apply(Kind::Route, &dynamic(&r)), Change::ROUTING);
        let snap = idx.snapshot();
        assert_eq!((snap.services.len(), snap.endpoint_slices.len()), (1, 1));
    }

    #[test]
    fn a_slice_moving_away_from_a_referenced_service_dirties_the_table() {
        let mut idx = synced();
        idx.apply(Kind::Route, &dynamic(&feed()));
        let mut sl = slice("apps", "svc", 9000, &[("10.0.0.1", true)]);
        idx.apply(Kind::EndpointSlice, &dynamic(&sl));
        sl.metadata.labels = Some([(SERVICE_NAME_LABEL.into(), "elsewhere".into())].into());
        assert_eq!(
            idx.apply(Kind::EndpointSlice, &dynamic(&sl)),
            Change::ROUTING
        );
        assert!(idx.snapshot().endpoint_slices.is_empty());
    }

    #[test]
    fn status_only_route_changes_do_not_recompile() {
        let mut idx = synced();
        let mut r = feed();
        r.metadata.generation = Some(1);
        r.metadata.resource_version = Some("10".into());
        idx.apply(Kind::Route, &dynamic(&r));
        r.metadata.resource_version = Some("11".into());
        r.status = Some(SseRouteStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        assert_eq!(idx.apply(Kind::Route, &dynamic(&r)), Change::STATUS);
        r.spec.rules[0].path_match.path = "/other".into();
        r.metadata.generation = Some(2);
        assert_eq!(idx.apply(Kind::Route, &dynamic(&r)), Change::ROUTING);
    }

    #[test]
    fn relist_replaces_atomically_and_drops_what_was_not_listed() {
        let mut idx = synced();
        idx.apply(Kind::Route, &dynamic(&feed()));
        let old = route("apps", "old").rule("/old", "svc", 80).build();
        idx.apply(Kind::Route, &dynamic(&old));
        idx.init(Kind::Route);
        idx.init_apply(Kind::Route, &dynamic(&feed()));
        // Until the relist is done, the old state is what compiles.
        assert_eq!(idx.snapshot().routes.len(), 2);
        assert_eq!(idx.init_done(Kind::Route), Change::ROUTING);
        let names: Vec<_> = idx
            .snapshot()
            .routes
            .iter()
            .map(|r| r.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, vec!["feed".to_string()]);
        // An identical relist changes nothing.
        idx.init(Kind::Route);
        idx.init_apply(Kind::Route, &dynamic(&feed()));
        assert_eq!(idx.init_done(Kind::Route), Change::NONE);
    }

    #[test]
    fn a_route_that_does_not_deserialize_is_reported_not_served() {
        let mut idx = synced();
        idx.apply(Kind::Route, &dynamic(&feed()));
        let mut bad = dynamic(&route("apps", "bad").rule("/b", "svc", 80).build());
        bad.data["spec"]["rules"][0]["backend"]["port"] = serde_json::json!([1]);
        bad.metadata.generation = Some(4);
        assert_eq!(idx.apply(Kind::Route, &bad), Change::ROUTING);
        assert_eq!(
            idx.snapshot().routes.len(),
            1,
            "the good route is still served"
        );
        let reports = idx.bad_route_reports("ssegate");
        assert_eq!(reports.len(), 1);
        let acc = reports[0].condition(ACCEPTED).unwrap();
        assert_eq!((acc.status, acc.reason.as_str()), (false, "InvalidSpec"));
        assert!(
            acc.message.contains("spec.rules[0].backend.port"),
            "{}",
            acc.message
        );
        assert_eq!(reports[0].generation, Some(4));
        // Of another class: not ours to report on.
        bad.data["spec"]["className"] = serde_json::json!("other");
        idx.apply(Kind::Route, &bad);
        assert!(idx.bad_route_reports("ssegate").is_empty());
    }

    #[test]
    fn other_kinds_that_do_not_deserialize_are_skipped() {
        let mut idx = synced();
        idx.apply(Kind::Route, &dynamic(&feed()));
        let svc = service("apps", "svc", &[(None, 80)]);
        idx.apply(Kind::Service, &dynamic(&svc));
        let mut bad = dynamic(&svc);
        bad.data["spec"]["ports"] = serde_json::json!("not a list");
        // The Service as we knew it is gone: the route must say so rather than route on
        // stale data.
        assert_eq!(idx.apply(Kind::Service, &bad), Change::ROUTING);
        assert!(idx.snapshot().services.is_empty());
        assert!(
            idx.bad
                .contains_key(&(Kind::Service, ("apps".into(), "svc".into())))
        );
        idx.apply(Kind::Service, &dynamic(&svc));
        assert_eq!(idx.snapshot().services.len(), 1);
        assert!(idx.bad.is_empty());
    }

    #[test]
    fn status_inputs_carry_the_observed_status() {
        let mut idx = synced();
        let mut r = feed();
        r.metadata.resource_version = Some("7".into());
        r.status = Some(SseRouteStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        idx.apply(Kind::Route, &dynamic(&r));
        let report = bad_route_report(&BadRoute {
            namespace: "apps".into(),
            name: "feed".into(),
            generation: Some(1),
            resource_version: None,
            class_name: None,
            status: None,
            error: String::new(),
        });
        let gone = RouteReport {
            name: "gone".into(),
            ..report.clone()
        };
        let inputs = idx.status_inputs(vec![report, gone]);
        assert_eq!(
            inputs.len(),
            1,
            "reports of routes no longer watched are dropped"
        );
        assert_eq!(inputs[0].observed, r.status);
        assert_eq!(inputs[0].resource_version.as_deref(), Some("7"));
    }
}
