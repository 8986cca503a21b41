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
//! - Secrets are kept trimmed to what TLS reads (name, namespace, type, `tls.crt`, `tls.key`,
//!   `ca.crt`; see [`trim_secret`]), and Opaque Secrets only when they carry one of those keys,
//!   so watching every Opaque Secret (CA bundles are usually Opaque) costs little memory and
//!   a change to an unrelated Secret never recompiles.

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
use crate::tls::{CA_CRT, TLS_CRT, TLS_KEY};

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
    /// `v1` Secret of type `Opaque` (kept only with `ca.crt`, `tls.crt` or `tls.key`).
    OpaqueSecret,
}

impl Kind {
    /// Every kind, in the order watches are started.
    pub const ALL: [Kind; 5] = [
        Kind::Route,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Secret,
        Kind::OpaqueSecret,
    ];

    /// The kind's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Route => "SseRoute",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Secret => "Secret (kubernetes.io/tls)",
            Kind::OpaqueSecret => "Secret (Opaque)",
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
    opaque_secrets: Store<Secret>,
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

/// The Secret keys ssegate reads.
const SECRET_KEYS: [&str; 3] = [TLS_CRT, TLS_KEY, CA_CRT];

/// What the index keeps of a Secret: name, namespace, type and the keys TLS reads; no
/// annotations (`kubectl apply` copies the whole Secret into one), labels or managed fields.
/// `None` for an Opaque Secret with none of those keys: it cannot be a certificate or CA
/// bundle, so it is not kept at all. A `kubernetes.io/tls` Secret is always kept, so a route
/// naming one that lacks a key is told which key, not "not found".
pub fn trim_secret(kind: Kind, secret: Secret) -> Option<Secret> {
    fn keep<V>(map: Option<BTreeMap<String, V>>) -> Option<BTreeMap<String, V>> {
        let kept: BTreeMap<_, _> = map?
            .into_iter()
            .filter(|(k, _)| SECRET_KEYS.contains(&k.as_str()))
            .collect();
        (!kept.is_empty()).then_some(kept)
    }
    let data = keep(secret.data);
    let string_data = keep(secret.string_data);
    if kind == Kind::OpaqueSecret && data.is_none() && string_data.is_none() {
        return None;
    }
    Some(Secret {
        metadata: kube::api::ObjectMeta {
            name: secret.metadata.name,
            namespace: secret.metadata.namespace,
            ..Default::default()
        },
        type_: secret.type_,
        data,
        string_data,
        immutable: None,
    })
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
        self.routes.synced
            && self.services.synced
            && self.slices.synced
            && self.secrets.synced
            && self.opaque_secrets.synced
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
                Kind::OpaqueSecret => !self.opaque_secrets.synced,
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
                // An Opaque Secret with none of our keys (any more).
                Some(Other::Secret(None)) => self.delete_key(kind, &key),
                Some(typed) => {
                    let relevant = self.relevant(kind, &key, &typed);
                    self.insert_other(kind, key, typed);
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
            Kind::OpaqueSecret => self.opaque_secrets.relist = Some(BTreeMap::new()),
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
                        Other::Secret(Some(s)) => {
                            let store = self.secret_store(kind);
                            store.relist.get_or_insert_default().insert(key, s);
                        }
                        Other::Secret(None) => {}
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
            Kind::OpaqueSecret => swap(&mut self.opaque_secrets),
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
                Kind::OpaqueSecret => self.opaque_secrets.items.contains_key(&bk.1),
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
    /// they reference, and the (trimmed) Secrets.
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
            secrets: self
                .secrets
                .items
                .values()
                .chain(self.opaque_secrets.items.values())
                .cloned()
                .collect(),
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
            Kind::Secret | Kind::OpaqueSecret => {
                if self.secret_store(kind).items.remove(key).is_some() {
                    Change::ROUTING
                } else {
                    Change::NONE
                }
            }
        }
    }

    fn secret_store(&mut self, kind: Kind) -> &mut Store<Secret> {
        match kind {
            Kind::OpaqueSecret => &mut self.opaque_secrets,
            _ => &mut self.secrets,
        }
    }

    fn parse_other(&mut self, kind: Kind, key: &ObjKey, obj: &DynamicObject) -> Option<Other> {
        let parsed = match kind {
            Kind::Service => parse::<Service>(obj).map(Other::Service),
            Kind::EndpointSlice => parse::<EndpointSlice>(obj).map(Other::Slice),
            Kind::Secret | Kind::OpaqueSecret => {
                parse::<Secret>(obj).map(|s| Other::Secret(trim_secret(kind, s)))
            }
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

    fn insert_other(&mut self, kind: Kind, key: ObjKey, typed: Other) {
        match typed {
            Other::Service(s) => {
                self.services.items.insert(key, s);
            }
            Other::Slice(s) => {
                self.slices.items.insert(key, s);
            }
            Other::Secret(Some(s)) => {
                self.secret_store(kind).items.insert(key, s);
            }
            Other::Secret(None) => {}
        }
    }

    /// Whether applying `typed` can change the table (for slices: the old or the new version
    /// belongs to a referenced Service; for Secrets: what TLS reads of it changed).
    fn relevant(&self, kind: Kind, key: &ObjKey, typed: &Other) -> bool {
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
            Other::Secret(new) => {
                let store = match kind {
                    Kind::OpaqueSecret => &self.opaque_secrets,
                    _ => &self.secrets,
                };
                store.items.get(key) != new.as_ref()
            }
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
    /// Trimmed; `None` when it carries none of the keys TLS reads.
    Secret(Option<Secret>),
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
        warnings: Vec::new(),
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
        assert_eq!(idx.unsynced(), vec![Kind::Secret, Kind::OpaqueSecret]);
        idx.init(Kind::Secret);
        assert_eq!(idx.init_done(Kind::Secret), Change::ROUTING);
        assert!(!idx.synced(), "the Opaque Secret watch has not listed yet");
        idx.init(Kind::OpaqueSecret);
        assert_eq!(idx.init_done(Kind::OpaqueSecret), Change::ROUTING);
        assert!(idx.synced());
    }

    fn opaque(name: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("apps".into()),
                annotations: Some(
                    [(
                        "kubectl.kubernetes.io/last-applied-configuration".into(),
                        "{..}".into(),
                    )]
                    .into(),
                ),
                resource_version: Some("1".into()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            k8s_openapi::ByteString(v.as_bytes().to_vec()),
                        )
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn data_keys(s: &Secret) -> Vec<&str> {
        s.data.iter().flatten().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn opaque_secrets_are_kept_only_with_our_keys_and_trimmed() {
        let mut idx = synced();
        // A CA bundle: kept, with only ca.crt and no annotations.
        let ca = opaque("backend-ca", &[("ca.crt", "PEM"), ("password", "hunter2")]);
        assert_eq!(
            idx.apply(Kind::OpaqueSecret, &dynamic(&ca)),
            Change::ROUTING
        );
        let snap = idx.snapshot();
        assert_eq!(snap.secrets.len(), 1);
        let kept = &snap.secrets[0];
        assert_eq!(data_keys(kept), vec!["ca.crt"]);
        assert_eq!(kept.metadata.name.as_deref(), Some("backend-ca"));
        assert_eq!(kept.metadata.namespace.as_deref(), Some("apps"));
        assert_eq!(kept.type_.as_deref(), Some("Opaque"));
        assert!(kept.metadata.annotations.is_none() && kept.metadata.resource_version.is_none());
        // Metadata or unrelated keys changing does not recompile.
        let mut touched = opaque("backend-ca", &[("ca.crt", "PEM"), ("password", "new")]);
        touched.metadata.resource_version = Some("2".into());
        assert_eq!(
            idx.apply(Kind::OpaqueSecret, &dynamic(&touched)),
            Change::NONE
        );
        // The CA changing does.
        let rotated = opaque("backend-ca", &[("ca.crt", "PEM2")]);
        assert_eq!(
            idx.apply(Kind::OpaqueSecret, &dynamic(&rotated)),
            Change::ROUTING
        );
        // Any other Opaque Secret is not kept at all.
        let other = opaque("db-password", &[("password", "x")]);
        assert_eq!(
            idx.apply(Kind::OpaqueSecret, &dynamic(&other)),
            Change::NONE
        );
        assert_eq!(idx.snapshot().secrets.len(), 1);
        // A kept one that loses its keys is dropped like a deleted one.
        let emptied = opaque("backend-ca", &[("other", "x")]);
        assert_eq!(
            idx.apply(Kind::OpaqueSecret, &dynamic(&emptied)),
            Change::ROUTING
        );
        assert!(idx.snapshot().secrets.is_empty());
        // A client certificate in an Opaque Secret is kept too.
        let pair = opaque("client", &[("tls.crt", "C"), ("tls.key", "K"), ("x", "y")]);
        idx.apply(Kind::OpaqueSecret, &dynamic(&pair));
        assert_eq!(
            data_keys(&idx.snapshot().secrets[0]),
            vec!["tls.crt", "tls.key"]
        );
        assert_eq!(
            idx.delete(Kind::OpaqueSecret, &dynamic(&pair)),
            Change::ROUTING
        );
        assert!(idx.snapshot().secrets.is_empty());
    }

    #[test]
    fn a_relist_of_opaque_secrets_keeps_only_ours() {
        let mut idx = synced();
        idx.init(Kind::OpaqueSecret);
        idx.init_apply(
            Kind::OpaqueSecret,
            &dynamic(&opaque("ca", &[("ca.crt", "P")])),
        );
        idx.init_apply(
            Kind::OpaqueSecret,
            &dynamic(&opaque("x", &[("token", "t")])),
        );
        assert_eq!(idx.init_done(Kind::OpaqueSecret), Change::ROUTING);
        let names: Vec<_> = idx
            .snapshot()
            .secrets
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, vec!["ca".to_string()]);
    }

    #[test]
    fn tls_secrets_are_trimmed_but_kept_without_keys() {
        let mut idx = synced();
        let mut tls = opaque(
            "cert",
            &[("tls.crt", "C"), ("tls.key", "K"), ("extra", "E")],
        );
        tls.type_ = Some("kubernetes.io/tls".into());
        assert_eq!(idx.apply(Kind::Secret, &dynamic(&tls)), Change::ROUTING);
        let snap = idx.snapshot();
        assert_eq!(data_keys(&snap.secrets[0]), vec!["tls.crt", "tls.key"]);
        assert!(snap.secrets[0].metadata.annotations.is_none());
        // A TLS Secret without our keys stays, so the route can say which key is missing.
        let mut empty = opaque("cert", &[]);
        empty.type_ = Some("kubernetes.io/tls".into());
        assert_eq!(idx.apply(Kind::Secret, &dynamic(&empty)), Change::ROUTING);
        assert_eq!(idx.snapshot().secrets.len(), 1);
    }

    #[test]
    fn an_opaque_ca_secret_resolves_a_routes_ca_secret_name() {
        use crate::api::BackendProtocol;
        use crate::routing::{CompileOptions, StateStore, compile};
        let (ca_pem, _) = crate::tls::tests::self_signed(&["backend.internal"]);
        let mut idx = synced();
        let r = route("apps", "up")
            .rule("/x", "svc", 80)
            .backend_tls(Some("backend-ca"), BackendProtocol::Http1)
            .build();
        idx.apply(Kind::Route, &dynamic(&r));
        idx.apply(
            Kind::Service,
            &dynamic(&service("apps", "svc", &[(None, 80)])),
        );
        let sl = slice("apps", "svc", 9000, &[("10.0.0.1", true)]);
        idx.apply(Kind::EndpointSlice, &dynamic(&sl));
        // The reason ResolvedRefs gives, if it is false.
        let unresolved = |idx: &ClusterIndex| {
            let state = StateStore::new(crate::metrics::Metrics::new());
            let (_, reports) = compile(&idx.snapshot(), &CompileOptions::default(), &state);
            let c = reports[0].condition(RESOLVED_REFS).unwrap().clone();
            (!c.status).then_some(c.reason)
        };
        assert_eq!(unresolved(&idx).as_deref(), Some("SecretNotFound"));
        let ca = opaque("backend-ca", &[("ca.crt", &ca_pem)]);
        assert_eq!(
            idx.apply(Kind::OpaqueSecret, &dynamic(&ca)),
            Change::ROUTING
        );
        assert_eq!(unresolved(&idx), None, "the Opaque CA Secret is found");
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
