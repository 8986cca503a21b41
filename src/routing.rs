//! The routing table and the pure `compile` step that builds it.
//!
//! `compile(&Snapshot)` turns SseRoutes, Services and EndpointSlices into an immutable
//! [`RouteTable`] plus one [`RouteReport`] per route. It does no I/O and reads no clock: all
//! precedence, validation and endpoint resolution is decided here and unit-tested with plain
//! values. The only state it touches is the [`StateStore`], an interner that hands back the
//! same per-route metric handles, per-rule connection counters and per-endpoint state
//! ([`crate::balance::Endpoint`]) across compiles, so `maxConnections`,
//! `ssegate_connections_active` and least-connections stay exact while tables are swapped.
//! Endpoints a compile finds gone or unready are retired in the store, which ends the
//! streams still open on them.
//!
//! Matching follows the Gateway API: the most specific host wins (exact, then the longest
//! wildcard suffix, then routes without hostnames); within a host an `Exact` path beats any
//! `Prefix`, and the longest `Prefix` (matched segment-wise) wins. When two routes claim the
//! same host and path, the older one (creation time, then `namespace/name`) keeps it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::api::{
    BackendProtocol, BalancePolicy, LoadBalancing, Mode, PathType, PortRef, RouteRule, SseRoute,
};
use crate::balance::{Backend, EndpointStore, KeySource, Policy};
use crate::metrics::{BalanceSource, BalanceView, Metrics, RouteMetrics};
use crate::poll::PollConfig;
use crate::source::Snapshot;
use crate::status::{ACCEPTED, CondState, READY, RESOLVED_REFS, RouteReport};
use crate::tls::{
    CertStore, CertStoreBuilder, Purpose, SecretIndex, SecretLookup, SecretProblem, TlsState,
    UpstreamTls,
};

/// The label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The class served when `--class` is not given.
pub const DEFAULT_CLASS: &str = "ssegate";

/// Settings of the compile step.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Routes whose `spec.className` names another class are ignored; routes without one
    /// are served.
    pub class: String,
    /// `namespace/name` of a `kubernetes.io/tls` Secret served to TLS clients whose SNI name
    /// no route covers (`--default-cert-secret`).
    pub default_cert_secret: Option<String>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            class: DEFAULT_CLASS.to_string(),
            default_cert_secret: None,
        }
    }
}

/// Timeouts of a rule; `None` means disabled (except `client_write`, see there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleTimeouts {
    /// TCP connect, per endpoint attempt.
    pub connect: Option<Duration>,
    /// Request sent → response headers.
    pub first_byte: Option<Duration>,
    /// Longest upstream silence.
    pub idle: Option<Duration>,
    /// Longest stream lifetime.
    pub max_duration: Option<Duration>,
    /// `timeouts.clientWriteTimeout`: `None` = the `--client-write-timeout` flag applies;
    /// `Some(None)` = no client write timeout for this rule's streams.
    pub client_write: Option<Option<Duration>>,
}

/// One compiled rule: everything a request needs, reachable from a single `Arc`.
#[derive(Debug)]
pub struct Rule {
    /// Metric handles of the owning route; `metrics.route` is `namespace/name`.
    pub metrics: RouteMetrics,
    /// Index of the rule in the route's spec.
    pub index: usize,
    /// The matched path (normalised: no trailing `/` on a prefix other than `/`).
    pub path: Box<str>,
    /// How `path` matched.
    pub path_type: PathType,
    /// Replacement for the matched part of the path.
    pub rewrite: Option<Box<str>>,
    /// Stream or poll.
    pub mode: Mode,
    /// Poll settings; `Some` exactly when `mode` is `Poll`.
    pub poll: Option<PollConfig>,
    /// Keepalive interval; `None` disables keepalives.
    pub keepalive: Option<Duration>,
    /// Upstream timeouts.
    pub timeouts: RuleTimeouts,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Streams open through this rule, shared across table versions.
    pub active: Arc<AtomicUsize>,
    /// Ready endpoints of the backend Service port.
    pub backend: Arc<Backend>,
    /// `spec.tls.redirect`: plain-HTTP requests get a 308 to `https://` instead.
    pub https_redirect: bool,
    /// HTTP version spoken to the backend.
    pub protocol: BackendProtocol,
    /// TLS to the backend: `None` = cleartext; `Err` = configured but unusable (why), every
    /// request answers 502.
    pub upstream_tls: Option<Result<Arc<UpstreamTls>, Arc<str>>>,
}

impl Rule {
    /// `namespace/name` of the route this rule belongs to.
    pub fn route(&self) -> &str {
        &self.metrics.route
    }

    /// The upstream path for a request `path` this rule matched.
    pub fn upstream_path(&self, path: &str) -> String {
        let Some(rewrite) = &self.rewrite else {
            return path.to_string();
        };
        let rest = match self.path_type {
            PathType::Exact => "",
            PathType::Prefix if &*self.path == "/" => path,
            PathType::Prefix => &path[self.path.len().min(path.len())..],
        };
        let mut out = String::with_capacity(rewrite.len() + rest.len());
        out.push_str(if rest.starts_with('/') {
            rewrite.trim_end_matches('/')
        } else {
            rewrite
        });
        out.push_str(rest);
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

/// Rules of one host (or of the any-host group), indexed for matching.
#[derive(Debug, Default)]
struct PathRules {
    exact: HashMap<Box<str>, Arc<Rule>>,
    /// Sorted longest first.
    prefixes: Vec<(Box<str>, Arc<Rule>)>,
}

impl PathRules {
    fn find(&self, path: &str) -> Option<&Arc<Rule>> {
        if let Some(rule) = self.exact.get(path) {
            return Some(rule);
        }
        self.prefixes
            .iter()
            .find(|(p, _)| prefix_matches(p, path))
            .map(|(_, r)| r)
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// Segment-wise prefix match: `/a` matches `/a`, `/a/` and `/a/b`, not `/ab`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

/// The immutable routing table the proxy loads once per request.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact_hosts: HashMap<Box<str>, PathRules>,
    /// `(".example.com", rules)` for `*.example.com`, longest suffix first.
    wildcard_hosts: Vec<(Box<str>, PathRules)>,
    any_host: PathRules,
    routes: usize,
    certs: CertStore,
}

impl RouteTable {
    /// A table that matches nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Number of routes with at least one served rule.
    pub fn route_count(&self) -> usize {
        self.routes
    }

    /// Server certificates by SNI name, for the TLS listener.
    pub fn certs(&self) -> &CertStore {
        &self.certs
    }

    /// Finds the rule for a request. `host` must be lower-case without a port.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Rule>> {
        if let Some(rule) = self.exact_hosts.get(host).and_then(|r| r.find(path)) {
            return Some(rule);
        }
        for (suffix, rules) in &self.wildcard_hosts {
            if host.len() > suffix.len()
                && host.ends_with(&**suffix)
                && let Some(rule) = rules.find(path)
            {
                return Some(rule);
            }
        }
        self.any_host.find(path)
    }
}

/// Identity of a rule across compiles: route, path type and path.
type RuleId = (String, PathType, String);

/// Per-route metric handles and per-rule counters that outlive any one table.
pub struct StateStore {
    metrics: Metrics,
    routes: Mutex<HashMap<String, RouteMetrics>>,
    rules: Mutex<HashMap<RuleId, Arc<AtomicUsize>>>,
    endpoints: EndpointStore,
    tls: TlsState,
}

impl StateStore {
    /// A store that creates route handles in `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        StateStore {
            metrics,
            routes: Mutex::default(),
            rules: Mutex::default(),
            endpoints: EndpointStore::default(),
            tls: TlsState::default(),
        }
    }

    fn route_metrics(&self, route: &str) -> RouteMetrics {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes
            .entry(route.to_string())
            .or_insert_with(|| self.metrics.route(route))
            .clone()
    }

    fn rule_counter(&self, id: RuleId) -> Arc<AtomicUsize> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.entry(id).or_default().clone()
    }

    /// Forgets routes and rules that are not in `live` and have no open stream, and drops
    /// their metric series.
    fn prune(&self, live_routes: &[String], live_rules: &[RuleId]) {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.retain(|id, c| live_rules.contains(id) || c.load(Ordering::Relaxed) > 0);
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|name, m| {
            let keep = live_routes.contains(name) || m.connections_active.get() > 0;
            if !keep {
                self.metrics.forget_route(name);
            }
            keep
        });
    }
}

/// Builds the routing table and route reports from a snapshot. Pure apart from interning
/// shared counters in `state`.
pub fn compile(
    snapshot: &Snapshot,
    opts: &CompileOptions,
    state: &StateStore,
) -> (RouteTable, Vec<RouteReport>) {
    let index = Index::new(snapshot);
    let mut routes: Vec<&SseRoute> = snapshot
        .routes
        .iter()
        .filter(|r| match &r.spec.class_name {
            None => true,
            Some(c) => c == &opts.class,
        })
        .collect();
    // Older routes win conflicts; the name breaks ties deterministically.
    routes.sort_by(|a, b| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then_with(|| route_key(a).cmp(&route_key(b)))
    });

    let mut builder = TableBuilder::default();
    let mut certs = CertStoreBuilder::default();
    let mut secrets = SecretUse {
        state: &state.tls,
        index: &index.secrets,
        used: HashSet::new(),
    };
    let mut reports = Vec::with_capacity(routes.len());
    let mut live_routes = Vec::new();
    let mut live_rules = Vec::new();
    // Backends whose ready endpoints this compile knows, and the endpoints in the table.
    let mut resolved_backends = HashSet::new();
    let mut live_endpoints = HashSet::new();
    let mut balance_view: BalanceView = Vec::new();

    for route in routes {
        let key = route_key(route);
        let ns = route.namespace().unwrap_or_else(|| "default".into());
        let mut conds = Vec::with_capacity(3);

        let invalid = validate(route);
        let resolved: Vec<Result<Vec<SocketAddr>, (String, String)>> = route
            .spec
            .rules
            .iter()
            .map(|r| index.resolve(&ns, r))
            .collect();
        let ready_endpoints: usize = resolved
            .iter()
            .map(|r| r.as_ref().map_or(0, Vec::len))
            .sum();

        let mut served_rules = 0;
        let mut conflicts = Vec::new();
        let mut secret_problems: Vec<SecretProblem> = Vec::new();
        let route_cert = match (&route.spec.tls, &invalid) {
            (Some(t), None) => {
                let l = secrets.key_pair(&ns, &t.secret_name);
                secret_problems.extend(l.problem);
                l.value
            }
            _ => None,
        };
        let mut warnings = Vec::new();
        if let (Some(cert), Some(t)) = (&route_cert, &route.spec.tls)
            && let Some(leaf) = cert.cert.first()
        {
            let sans = crate::tls::dns_names(leaf);
            let missing = crate::tls::uncovered_hostnames(&sans, &route.spec.hostnames);
            if !missing.is_empty() {
                warnings.push(format!(
                    "the certificate of Secret {ns}/{} does not cover {} (it is for: {}); \
                     clients will reject it for those names",
                    t.secret_name,
                    missing.join(", "),
                    if sans.is_empty() {
                        "no DNS names".to_string()
                    } else {
                        sans.join(", ")
                    }
                ));
            }
        }
        if invalid.is_none() {
            let metrics = state.route_metrics(&key);
            let mut backends: Vec<Arc<dyn BalanceSource>> = Vec::new();
            for (i, (rule, endpoints)) in route.spec.rules.iter().zip(&resolved).enumerate() {
                let path = normalize_path(&rule.path_match.path, rule.path_match.path_type);
                let id: RuleId = (key.clone(), rule.path_match.path_type, path.clone());
                let name = format!("{ns}/{}:{}", rule.backend.service, rule.backend.port);
                let endpoints = match endpoints {
                    Ok(addrs) => {
                        resolved_backends.insert(name.clone());
                        addrs
                            .iter()
                            .map(|&addr| {
                                live_endpoints.insert((name.clone(), addr));
                                state.endpoints.endpoint(&name, addr)
                            })
                            .collect()
                    }
                    Err(_) => Vec::new(),
                };
                // `validate` accepted the route, so the policy is valid.
                let policy = balance_policy(&rule.load_balancing).unwrap_or(Policy::RoundRobin);
                let backend = Arc::new(Backend::new(name, policy, endpoints));
                let compiled = Arc::new(Rule {
                    metrics: metrics.clone(),
                    index: i,
                    path: path.clone().into(),
                    path_type: rule.path_match.path_type,
                    rewrite: rule.backend.rewrite_path.clone().map(Into::into),
                    mode: rule.mode,
                    poll: poll_config(rule),
                    keepalive: rule.keepalive.interval.non_zero(),
                    timeouts: RuleTimeouts {
                        connect: rule.timeouts.connect.non_zero(),
                        first_byte: rule.timeouts.first_byte.non_zero(),
                        idle: rule.timeouts.idle.non_zero(),
                        max_duration: rule.timeouts.max_duration.non_zero(),
                        client_write: rule.timeouts.client_write_timeout.map(|d| d.non_zero()),
                    },
                    max_connections: rule.max_connections,
                    active: state.rule_counter(id.clone()),
                    backend: backend.clone(),
                    https_redirect: route.spec.tls.as_ref().is_some_and(|t| t.redirect),
                    protocol: rule.backend.protocol,
                    upstream_tls: upstream_tls(&mut secrets, &ns, rule, &mut secret_problems),
                });
                match builder.insert(&route.spec.hostnames, &key, compiled) {
                    Ok(()) => {
                        served_rules += 1;
                        live_rules.push(id);
                        backends.push(backend);
                    }
                    Err(owner) => conflicts.push(format!(
                        "rule {i} ({} {path}) is already served by route {owner}",
                        path_type_name(rule.path_match.path_type)
                    )),
                }
            }
            if !backends.is_empty() {
                balance_view.push((metrics.route.clone(), backends));
            }
        }

        secret_problems.dedup();
        let bad_certs: Vec<&str> = secret_problems
            .iter()
            .filter(|p| matches!(p, SecretProblem::Invalid(_)))
            .map(SecretProblem::message)
            .collect();
        conds.push(match (&invalid, served_rules, conflicts.is_empty()) {
            (Some((reason, msg)), _, _) => CondState::fail(ACCEPTED, reason, msg.clone()),
            (None, _, _) if !bad_certs.is_empty() => {
                CondState::fail(ACCEPTED, "InvalidCertificate", bad_certs.join("; "))
            }
            (None, 0, false) => CondState::fail(ACCEPTED, "Conflicted", conflicts.join("; ")),
            (None, _, true) => CondState::ok(ACCEPTED, "Accepted", "route is valid and served"),
            (None, _, false) => CondState::ok(
                ACCEPTED,
                "PartiallyConflicted",
                format!("served except: {}", conflicts.join("; ")),
            ),
        });
        if let Some(accepted) = conds.last_mut()
            && accepted.status
            && !warnings.is_empty()
        {
            accepted.message = format!("{}; {}", accepted.message, warnings.join("; "));
        }

        let failures: Vec<(String, String)> = resolved
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .chain(secret_problems.iter().filter_map(|p| match p {
                SecretProblem::NotFound(m) => Some(("SecretNotFound".to_string(), m.clone())),
                SecretProblem::Invalid(_) => None,
            }))
            .collect();
        conds.push(match failures.first() {
            None => CondState::ok(RESOLVED_REFS, "ResolvedRefs", "all backends resolved"),
            Some((reason, _)) => CondState::fail(
                RESOLVED_REFS,
                reason,
                failures
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        });

        let empty_rules: Vec<String> = route
            .spec
            .rules
            .iter()
            .zip(&resolved)
            .enumerate()
            .filter(|(_, (_, r))| r.as_ref().map_or(true, Vec::is_empty))
            .map(|(i, (rule, _))| format!("rule {i} ({})", rule.path_match.path))
            .collect();
        conds.push(if invalid.is_some() || served_rules == 0 {
            CondState::fail(READY, "NotAccepted", "the route is not served")
        } else if empty_rules.is_empty() {
            CondState::ok(READY, "Ready", format!("{ready_endpoints} ready endpoints"))
        } else {
            CondState::fail(
                READY,
                "NoReadyEndpoints",
                format!("no ready endpoints for {}", empty_rules.join(", ")),
            )
        });

        if served_rules > 0 {
            live_routes.push(key.clone());
            if let Some(cert) = &route_cert {
                certs.insert(&route.spec.hostnames, cert);
            }
        }
        reports.push(RouteReport {
            namespace: ns,
            name: route.name_any(),
            generation: route.metadata.generation,
            conditions: conds,
            ready_endpoints: u32::try_from(ready_endpoints).unwrap_or(u32::MAX),
            warnings,
        });
    }

    if let Some(reference) = &opts.default_cert_secret {
        let (ns, name) = reference.split_once('/').unwrap_or(("default", reference));
        let l = secrets.key_pair(ns, name);
        certs.default_cert(l.value, l.problem.map(|p| p.message().to_string()));
    }
    state.prune(&live_routes, &live_rules);
    state.endpoints.sweep(&resolved_backends, &live_endpoints);
    state.metrics.set_balance_view(balance_view);
    state.tls.retain(&secrets.used);
    let mut table = builder.finish();
    table.routes = live_routes.len();
    table.certs = certs.finish();
    (table, reports)
}

/// Secret lookups of one compile, remembering which Secrets were referenced.
struct SecretUse<'a> {
    state: &'a TlsState,
    index: &'a SecretIndex<'a>,
    used: HashSet<(String, String, Purpose)>,
}

impl SecretUse<'_> {
    fn key_pair(&mut self, ns: &str, name: &str) -> SecretLookup<Arc<rustls::sign::CertifiedKey>> {
        self.used
            .insert((ns.to_string(), name.to_string(), Purpose::KeyPair));
        self.state.key_pair(self.index, ns, name)
    }

    fn ca(&mut self, ns: &str, name: &str) -> SecretLookup<Arc<rustls::RootCertStore>> {
        self.used
            .insert((ns.to_string(), name.to_string(), Purpose::Ca));
        self.state.ca(self.index, ns, name)
    }
}

/// The client-side TLS of a rule's backend, if `backend.tls.enabled`.
fn upstream_tls(
    secrets: &mut SecretUse<'_>,
    ns: &str,
    rule: &RouteRule,
    problems: &mut Vec<SecretProblem>,
) -> Option<Result<Arc<UpstreamTls>, Arc<str>>> {
    let t = rule.backend.tls.as_ref().filter(|t| t.enabled)?;
    let roots = match &t.ca_secret_name {
        None => Some(crate::tls::web_roots()),
        Some(name) => {
            let l = secrets.ca(ns, name);
            problems.extend(l.problem);
            l.value
        }
    };
    let client = match &t.client_cert_secret_name {
        None => Some(None),
        Some(name) => {
            let l = secrets.key_pair(ns, name);
            problems.extend(l.problem);
            l.value.map(Some)
        }
    };
    let name = backend_server_name(ns, rule);
    let server_name = rustls::pki_types::ServerName::try_from(name.clone());
    Some(match (roots, client, server_name) {
        (Some(roots), Some(client), Ok(server_name)) => Ok(Arc::new(UpstreamTls::new(
            roots,
            client,
            rule.backend.protocol,
            server_name,
        ))),
        (_, _, Err(_)) => Err(format!("backend TLS server name {name:?} is not valid").into()),
        _ => Err("backend TLS is not usable: a referenced Secret is missing or invalid".into()),
    })
}

/// The name a backend's certificate is verified against: `backend.tls.serverName`, else
/// `<service>.<namespace>.svc`.
fn backend_server_name(ns: &str, rule: &RouteRule) -> String {
    rule.backend
        .tls
        .as_ref()
        .and_then(|t| t.server_name.clone())
        .unwrap_or_else(|| format!("{}.{ns}.svc", rule.backend.service))
}

/// `namespace/name` of a route (namespace `default` when unset).
pub fn route_key(route: &SseRoute) -> String {
    format!(
        "{}/{}",
        route.metadata.namespace.as_deref().unwrap_or("default"),
        route.metadata.name.as_deref().unwrap_or("")
    )
}

fn path_type_name(t: PathType) -> &'static str {
    match t {
        PathType::Prefix => "Prefix",
        PathType::Exact => "Exact",
    }
}

/// Prefixes lose a trailing `/` (`/a/` matches like `/a`); `/` itself stays.
fn normalize_path(path: &str, t: PathType) -> String {
    match t {
        PathType::Prefix if path.len() > 1 => path.trim_end_matches('/').to_string(),
        _ => path.to_string(),
    }
}

/// Checks one route on its own; returns the `Accepted=False` reason and message.
fn validate(route: &SseRoute) -> Option<(&'static str, String)> {
    let spec = &route.spec;
    for h in &spec.hostnames {
        if let Err(msg) = validate_hostname(h) {
            return Some(("InvalidHostname", msg));
        }
    }
    if spec.rules.is_empty() {
        return Some(("InvalidRule", "spec.rules must not be empty".into()));
    }
    if spec.tls.as_ref().is_some_and(|t| t.secret_name.is_empty()) {
        return Some(("InvalidTls", "spec.tls.secretName must not be empty".into()));
    }
    let mut seen = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        if let Err(msg) = validate_rule(rule) {
            return Some(("InvalidRule", format!("rule {i}: {msg}")));
        }
        let id = (
            rule.path_match.path_type,
            normalize_path(&rule.path_match.path, rule.path_match.path_type),
        );
        if seen.contains(&id) {
            return Some((
                "InvalidRule",
                format!("rule {i}: path {} is matched by an earlier rule", id.1),
            ));
        }
        seen.push(id);
    }
    None
}

fn validate_rule(rule: &RouteRule) -> Result<(), String> {
    let path = &rule.path_match.path;
    if !path.starts_with('/') {
        return Err(format!("match.path {path:?} must start with '/'"));
    }
    if path.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
        return Err(format!(
            "match.path {path:?} must not contain whitespace, '?' or '#'"
        ));
    }
    if let Some(rw) = &rule.backend.rewrite_path
        && !rw.starts_with('/')
    {
        return Err(format!("backend.rewritePath {rw:?} must start with '/'"));
    }
    if rule.backend.service.is_empty() {
        return Err("backend.service must not be empty".into());
    }
    if let PortRef::Number(n) = rule.backend.port
        && !(1..=65535).contains(&n)
    {
        return Err(format!("backend.port {n} is not in 1-65535"));
    }
    match (rule.mode, &rule.poll) {
        (Mode::Poll, Some(settings)) => {
            PollConfig::from_settings(settings)?;
        }
        (Mode::Stream, Some(_)) => {
            return Err("poll settings are only used with mode: Poll".into());
        }
        _ => {}
    }
    let tls = rule.backend.tls.as_ref().filter(|t| t.enabled);
    if rule.backend.protocol == BackendProtocol::H2 && tls.is_none() {
        return Err(
            "backend.protocol h2 needs backend.tls.enabled: true (h2c is HTTP/2 without TLS)"
                .into(),
        );
    }
    if let Some(name) = tls.and_then(|t| t.server_name.as_deref())
        && rustls::pki_types::ServerName::try_from(name).is_err()
    {
        return Err(format!(
            "backend.tls.serverName {name:?} is not a DNS name or IP address"
        ));
    }
    balance_policy(&rule.load_balancing).map(drop)
}

/// The endpoint selection policy of a rule, or why its `loadBalancing` is invalid.
fn balance_policy(lb: &LoadBalancing) -> Result<Policy, String> {
    let sticky = match (lb.policy, &lb.sticky) {
        (BalancePolicy::RoundRobin, None) => return Ok(Policy::RoundRobin),
        (BalancePolicy::LeastConnections, None) => return Ok(Policy::LeastConnections),
        (BalancePolicy::Sticky, Some(sticky)) => sticky,
        (BalancePolicy::Sticky, None) => {
            return Err(
                "loadBalancing.policy Sticky needs loadBalancing.sticky with one of \
                        header, cookie, query or sourceIP"
                    .into(),
            );
        }
        (policy, Some(_)) => {
            return Err(format!(
                "loadBalancing.sticky is only used with policy Sticky, not {policy:?}"
            ));
        }
    };
    let mut sources = Vec::new();
    if let Some(h) = &sticky.header {
        let name = http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| format!("loadBalancing.sticky.header {h:?} is not a valid header name"))?;
        sources.push(("header", KeySource::Header(name)));
    }
    if let Some(c) = &sticky.cookie {
        let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
        if c.is_empty() || !c.bytes().all(token) {
            return Err(format!(
                "loadBalancing.sticky.cookie {c:?} is not a valid cookie name"
            ));
        }
        sources.push(("cookie", KeySource::Cookie(c.as_str().into())));
    }
    if let Some(q) = &sticky.query {
        if q.is_empty() || q.contains(|c: char| c.is_whitespace() || "&=#".contains(c)) {
            return Err(format!(
                "loadBalancing.sticky.query {q:?} is not a valid query parameter name"
            ));
        }
        sources.push(("query", KeySource::Query(q.as_str().into())));
    }
    if sticky.source_ip == Some(true) {
        sources.push(("sourceIP", KeySource::SourceIp));
    }
    if let Some(c) = sticky.bounded_load
        && !(c.is_finite() && c >= 1.0)
    {
        return Err(format!(
            "loadBalancing.sticky.boundedLoad {c} must be a number of at least 1.0"
        ));
    }
    match sources.len() {
        1 => Ok(Policy::Sticky {
            key: sources.remove(0).1,
            bounded_load: sticky.bounded_load,
        }),
        0 => Err(
            "loadBalancing.sticky needs exactly one key source: header, cookie, query \
                  or sourceIP: true"
                .into(),
        ),
        _ => Err(format!(
            "loadBalancing.sticky sets {}; exactly one key source is allowed",
            sources
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" and ")
        )),
    }
}

/// The poll settings of a validated rule (defaults when unset); `None` for stream rules.
fn poll_config(rule: &RouteRule) -> Option<PollConfig> {
    match rule.mode {
        Mode::Stream => None,
        Mode::Poll => Some(rule.poll.as_ref().map_or_else(PollConfig::default, |s| {
            PollConfig::from_settings(s).unwrap_or_default()
        })),
    }
}

fn validate_hostname(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "hostname {h:?} must be a lower-case DNS name, optionally prefixed by '*.' (no port)"
        ))
    }
}

/// Services and EndpointSlices indexed for resolution.
struct Index<'a> {
    services: HashMap<(&'a str, &'a str), &'a Service>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    secrets: SecretIndex<'a>,
}

impl<'a> Index<'a> {
    fn new(snapshot: &'a Snapshot) -> Self {
        let mut services = HashMap::new();
        for svc in &snapshot.services {
            let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
            if let Some(name) = svc.metadata.name.as_deref() {
                services.insert((ns, name), svc);
            }
        }
        let mut slices: HashMap<_, Vec<_>> = HashMap::new();
        for slice in &snapshot.endpoint_slices {
            let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
            let svc = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let Some(svc) = svc {
                slices.entry((ns, svc.as_str())).or_default().push(slice);
            }
        }
        let mut secrets = SecretIndex::new();
        for secret in &snapshot.secrets {
            let ns = secret.metadata.namespace.as_deref().unwrap_or("default");
            if let Some(name) = secret.metadata.name.as_deref() {
                secrets.insert((ns, name), secret);
            }
        }
        Index {
            services,
            slices,
            secrets,
        }
    }

    /// Ready endpoint addresses of a rule's backend, or `(reason, message)` when the
    /// Service or port does not exist.
    fn resolve(&self, ns: &str, rule: &RouteRule) -> Result<Vec<SocketAddr>, (String, String)> {
        let name = rule.backend.service.as_str();
        let svc = self.services.get(&(ns, name)).ok_or_else(|| {
            (
                "BackendNotFound".to_string(),
                format!("Service {ns}/{name} not found"),
            )
        })?;
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return Err((
                "UnsupportedBackend".into(),
                format!("Service {ns}/{name} is of type ExternalName"),
            ));
        }
        let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| match &rule.backend.port {
                PortRef::Number(n) => p.port == *n,
                PortRef::Name(n) => p.name.as_deref() == Some(n.as_str()),
            })
            .ok_or_else(|| {
                (
                    "PortNotFound".to_string(),
                    format!("Service {ns}/{name} has no port {}", rule.backend.port),
                )
            })?;
        let port_name = port.name.as_deref().unwrap_or("");
        let mut out = Vec::new();
        for slice in self.slices.get(&(ns, name)).into_iter().flatten() {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let target = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
            });
            let Some(target) = target
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let cond = ep.conditions.as_ref();
                // Kubernetes: a missing `ready` means ready; terminating endpoints take no
                // new streams.
                let ready = cond.and_then(|c| c.ready).unwrap_or(true)
                    && !cond.and_then(|c| c.terminating).unwrap_or(false);
                if !ready {
                    continue;
                }
                for addr in &ep.addresses {
                    if let Ok(ip) = addr.parse::<IpAddr>() {
                        out.push(SocketAddr::new(ip, target));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Rules of one host while the table is built, keyed by path type and path.
type HostRules = BTreeMap<(PathType, Box<str>), Arc<Rule>>;

/// Accumulates rules per host; first insert of a (host, type, path) wins.
#[derive(Default)]
struct TableBuilder {
    hosts: BTreeMap<String, HostRules>,
}

impl TableBuilder {
    /// Inserts `rule` for every hostname (or the any-host group, keyed ""), all or nothing;
    /// on conflict returns the route that owns the slot.
    fn insert(&mut self, hostnames: &[String], route: &str, rule: Arc<Rule>) -> Result<(), String> {
        let any = [String::new()];
        let hosts = if hostnames.is_empty() {
            &any[..]
        } else {
            hostnames
        };
        let key = (rule.path_type, rule.path.clone());
        for h in hosts {
            if let Some(owner) = self.hosts.get(h).and_then(|m| m.get(&key))
                && owner.route() != route
            {
                return Err(owner.route().to_string());
            }
        }
        for h in hosts {
            self.hosts
                .entry(h.clone())
                .or_default()
                .insert(key.clone(), rule.clone());
        }
        Ok(())
    }

    fn finish(self) -> RouteTable {
        let mut table = RouteTable::default();
        for (host, rules) in self.hosts {
            let mut pr = PathRules::default();
            for ((t, path), rule) in rules {
                match t {
                    PathType::Exact => {
                        pr.exact.insert(path, rule);
                    }
                    PathType::Prefix => pr.prefixes.push((path, rule)),
                }
            }
            pr.prefixes
                .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
            if pr.is_empty() {
                continue;
            }
            if host.is_empty() {
                table.any_host = pr;
            } else if let Some(suffix) = host.strip_prefix('*') {
                table.wildcard_hosts.push((suffix.into(), pr));
            } else {
                table.exact_hosts.insert(host.into(), pr);
            }
        }
        table
            .wildcard_hosts
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        table
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{BackendRef, Keepalive, PathMatch, SseRouteSpec, StickySpec, Timeouts};
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// Fixture builder: `route("apps", "feed").host("a.example").rule("/p", "svc", 8080)`.
    pub(crate) struct RouteFx(SseRoute);

    pub(crate) trait Tap: Sized {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
    impl Tap for SseRoute {}

    pub(crate) fn route(ns: &str, name: &str) -> RouteFx {
        let mut r = SseRoute::new(
            name,
            SseRouteSpec {
                hostnames: vec![],
                class_name: None,
                rules: vec![],
                tls: None,
            },
        );
        r.metadata.namespace = Some(ns.into());
        RouteFx(r)
    }

    impl RouteFx {
        pub(crate) fn host(mut self, h: &str) -> Self {
            self.0.spec.hostnames.push(h.into());
            self
        }
        pub(crate) fn rule(self, path: &str, svc: &str, port: i32) -> Self {
            self.rule_typed(path, PathType::Prefix, svc, port)
        }
        pub(crate) fn exact(self, path: &str, svc: &str, port: i32) -> Self {
            self.rule_typed(path, PathType::Exact, svc, port)
        }
        pub(crate) fn rule_typed(mut self, path: &str, t: PathType, svc: &str, port: i32) -> Self {
            self.0.spec.rules.push(RouteRule {
                path_match: PathMatch {
                    path: path.into(),
                    path_type: t,
                },
                backend: BackendRef {
                    service: svc.into(),
                    port: PortRef::Number(port),
                    rewrite_path: None,
                    protocol: Default::default(),
                    tls: None,
                },
                mode: Mode::Stream,
                poll: None,
                keepalive: Keepalive::default(),
                timeouts: Timeouts::default(),
                max_connections: 0,
                load_balancing: LoadBalancing::default(),
            });
            self
        }
        /// Sets the last rule's `loadBalancing`.
        pub(crate) fn balance(mut self, lb: LoadBalancing) -> Self {
            self.0.spec.rules.last_mut().unwrap().load_balancing = lb;
            self
        }
        pub(crate) fn least_connections(self) -> Self {
            self.balance(LoadBalancing {
                policy: BalancePolicy::LeastConnections,
                sticky: None,
            })
        }
        pub(crate) fn sticky_header(self, header: &str) -> Self {
            self.balance(LoadBalancing {
                policy: BalancePolicy::Sticky,
                sticky: Some(StickySpec {
                    header: Some(header.into()),
                    ..Default::default()
                }),
            })
        }
        pub(crate) fn rewrite(mut self, to: &str) -> Self {
            self.0.spec.rules.last_mut().unwrap().backend.rewrite_path = Some(to.into());
            self
        }
        /// Makes the last rule a poll rule with `settings` (YAML flow map, e.g. `{}`).
        pub(crate) fn poll(mut self, settings: &str) -> Self {
            let rule = self.0.spec.rules.last_mut().unwrap();
            rule.mode = Mode::Poll;
            rule.poll = Some(serde_yaml::from_str(settings).unwrap());
            self
        }
        pub(crate) fn tls(mut self, secret: &str, redirect: bool) -> Self {
            self.0.spec.tls = Some(crate::api::RouteTls {
                secret_name: secret.into(),
                redirect,
            });
            self
        }
        pub(crate) fn backend_tls(mut self, ca: Option<&str>, protocol: BackendProtocol) -> Self {
            let b = &mut self.0.spec.rules.last_mut().unwrap().backend;
            b.protocol = protocol;
            b.tls = Some(crate::api::BackendTls {
                enabled: true,
                ca_secret_name: ca.map(Into::into),
                ..Default::default()
            });
            self
        }
        pub(crate) fn class(mut self, c: &str) -> Self {
            self.0.spec.class_name = Some(c.into());
            self
        }
        pub(crate) fn build(self) -> SseRoute {
            self.0
        }
    }

    pub(crate) fn service(ns: &str, name: &str, ports: &[(Option<&str>, i32)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p)| ServicePort {
                            name: n.map(Into::into),
                            port: *p,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// An EndpointSlice for `svc` with unnamed port `port` and `(ip, ready)` endpoints.
    pub(crate) fn slice(ns: &str, svc: &str, port: i32, eps: &[(&str, bool)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("{svc}-abc")),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                port: Some(port),
                ..Default::default()
            }]),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, ready)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn compile_all(snapshot: &Snapshot) -> (RouteTable, Vec<RouteReport>) {
        compile(
            snapshot,
            &CompileOptions::default(),
            &StateStore::new(Metrics::new()),
        )
    }

    fn snap(routes: Vec<SseRoute>) -> Snapshot {
        Snapshot {
            routes,
            services: vec![
                service("apps", "svc", &[(None, 80)]),
                service("apps", "other", &[(Some("http"), 80)]),
            ],
            endpoint_slices: vec![slice(
                "apps",
                "svc",
                9000,
                &[("10.0.0.1", true), ("10.0.0.2", false)],
            )],
            ..Default::default()
        }
    }

    fn routed<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<(&'a str, &'a str)> {
        t.route(host, path).map(|r| (r.route(), &*r.path))
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any() {
        let (t, _) = compile_all(&snap(vec![
            route("apps", "any").rule("/", "svc", 80).build(),
            route("apps", "wild")
                .host("*.example.com")
                .rule("/", "svc", 80)
                .build(),
            route("apps", "deep")
                .host("*.a.example.com")
                .rule("/", "svc", 80)
                .build(),
            route("apps", "exact")
                .host("x.example.com")
                .rule("/", "svc", 80)
                .build(),
        ]));
        assert_eq!(routed(&t, "x.example.com", "/e").unwrap().0, "apps/exact");
        assert_eq!(routed(&t, "y.example.com", "/e").unwrap().0, "apps/wild");
        assert_eq!(routed(&t, "b.a.example.com", "/e").unwrap().0, "apps/deep");
        assert_eq!(routed(&t, "example.com", "/e").unwrap().0, "apps/any");
        assert_eq!(routed(&t, "other.org", "/e").unwrap().0, "apps/any");
    }

    #[test]
    fn host_without_matching_path_falls_back_to_less_specific_host() {
        let (t, _) = compile_all(&snap(vec![
            route("apps", "any").rule("/feed", "svc", 80).build(),
            route("apps", "exact")
                .host("x.example.com")
                .rule("/other", "svc", 80)
                .build(),
        ]));
        assert_eq!(routed(&t, "x.example.com", "/feed").unwrap().0, "apps/any");
        assert!(routed(&t, "x.example.com", "/nothing").is_none());
    }

    #[test]
    fn exact_beats_longest_prefix_segment_wise() {
        let (t, _) = compile_all(&snap(vec![
            route("apps", "r")
                .rule("/a", "svc", 80)
                .rule("/a/b/", "svc", 80)
                .exact("/a/b/c", "svc", 80)
                .build(),
        ]));
        assert_eq!(routed(&t, "h", "/a/b/c").unwrap().1, "/a/b/c");
        assert_eq!(routed(&t, "h", "/a/b/c/d").unwrap().1, "/a/b");
        assert_eq!(routed(&t, "h", "/a/b").unwrap().1, "/a/b");
        assert_eq!(routed(&t, "h", "/a/bc").unwrap().1, "/a");
        assert_eq!(routed(&t, "h", "/a").unwrap().1, "/a");
        assert!(routed(&t, "h", "/ab").is_none());
        assert!(routed(&t, "h", "/").is_none());
    }

    #[test]
    fn rewrite_replaces_matched_prefix() {
        let (t, _) = compile_all(&snap(vec![
            route("apps", "r")
                .rule("/n", "svc", 80)
                .rewrite("/events")
                .build(),
            route("apps", "root")
                .host("h")
                .rule("/", "svc", 80)
                .rewrite("/api/")
                .build(),
            route("apps", "strip")
                .host("s")
                .rule("/x", "svc", 80)
                .rewrite("/")
                .build(),
        ]));
        let up = |host: &str, p: &str| t.route(host, p).unwrap().upstream_path(p);
        assert_eq!(up("any", "/n"), "/events");
        assert_eq!(up("any", "/n/1"), "/events/1");
        assert_eq!(up("h", "/q/1"), "/api/q/1");
        assert_eq!(up("s", "/x/y"), "/y");
        assert_eq!(up("s", "/x"), "/");
    }

    #[test]
    fn endpoints_resolve_through_service_port_to_ready_slice_addresses() {
        let (t, reports) =
            compile_all(&snap(vec![route("apps", "r").rule("/", "svc", 80).build()]));
        let rule = t.route("h", "/").unwrap();
        assert_eq!(
            rule.backend.addrs(),
            vec!["10.0.0.1:9000".parse::<SocketAddr>().unwrap()]
        );
        assert!(reports[0].all_ok(), "{}", reports[0].summary());
        assert_eq!(reports[0].ready_endpoints, 1);
    }

    #[test]
    fn terminating_endpoints_are_not_ready() {
        let mut s = snap(vec![route("apps", "r").rule("/", "svc", 80).build()]);
        s.endpoint_slices[0].endpoints.as_mut().unwrap()[0]
            .conditions
            .as_mut()
            .unwrap()
            .terminating = Some(true);
        let (t, reports) = compile_all(&s);
        assert!(t.route("h", "/").unwrap().backend.is_empty());
        assert_eq!(
            reports[0].condition(READY).unwrap().reason,
            "NoReadyEndpoints"
        );
    }

    #[test]
    fn missing_service_and_port_are_reported_but_route_still_matches() {
        let (t, reports) = compile_all(&snap(vec![
            route("apps", "nosvc").rule("/a", "missing", 80).build(),
            route("apps", "noport").rule("/b", "svc", 81).build(),
            route("apps", "named").rule("/c", "other", 0).build(),
        ]));
        let by = |n: &str| reports.iter().find(|r| r.name == n).unwrap();
        let rr = by("nosvc").condition(RESOLVED_REFS).unwrap();
        assert_eq!((rr.status, rr.reason.as_str()), (false, "BackendNotFound"));
        assert!(rr.message.contains("apps/missing"));
        assert_eq!(
            by("noport").condition(RESOLVED_REFS).unwrap().reason,
            "PortNotFound"
        );
        assert!(by("nosvc").condition(ACCEPTED).unwrap().status);
        assert!(t.route("h", "/a").unwrap().backend.is_empty());
        assert!(t.route("h", "/b").is_some());
    }

    #[test]
    fn named_service_port_matches_named_slice_port() {
        let mut s = snap(vec![{
            let mut r = route("apps", "r").rule("/", "other", 0).build();
            r.spec.rules[0].backend.port = PortRef::Name("http".into());
            r
        }]);
        let mut sl = slice("apps", "other", 7000, &[("10.0.0.9", true)]);
        sl.ports.as_mut().unwrap()[0].name = Some("http".into());
        s.endpoint_slices.push(sl);
        let (t, _) = compile_all(&s);
        assert_eq!(
            t.route("h", "/").unwrap().backend.addrs(),
            vec!["10.0.0.9:7000".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn invalid_route_is_rejected_without_affecting_others() {
        let (t, reports) = compile_all(&snap(vec![
            route("apps", "bad").rule("nopath", "svc", 80).build(),
            route("apps", "badhost")
                .host("Upper.Example")
                .rule("/x", "svc", 80)
                .build(),
            route("apps", "good").rule("/g", "svc", 80).build(),
        ]));
        let by = |n: &str| reports.iter().find(|r| r.name == n).unwrap();
        let acc = by("bad").condition(ACCEPTED).unwrap();
        assert_eq!((acc.status, acc.reason.as_str()), (false, "InvalidRule"));
        assert!(acc.message.contains("must start with '/'"));
        assert_eq!(
            by("badhost").condition(ACCEPTED).unwrap().reason,
            "InvalidHostname"
        );
        assert!(t.route("h", "/g").is_some());
        assert!(t.route("h", "/x").is_none());
        assert_eq!(t.route_count(), 1);
    }

    #[test]
    fn older_route_wins_a_conflict() {
        let (t, reports) = compile_all(&snap(vec![
            route("apps", "b")
                .rule("/c", "svc", 80)
                .rule("/only-b", "svc", 80)
                .build(),
            route("apps", "a").rule("/c", "svc", 80).build(),
        ]));
        assert_eq!(t.route("h", "/c").unwrap().route(), "apps/a");
        let b = reports.iter().find(|r| r.name == "b").unwrap();
        let acc = b.condition(ACCEPTED).unwrap();
        assert_eq!(acc.reason, "PartiallyConflicted");
        assert!(acc.message.contains("apps/a"));
        assert!(t.route("h", "/only-b").is_some());
    }

    #[test]
    fn other_classes_are_ignored() {
        let (t, reports) = compile_all(&snap(vec![
            route("apps", "mine")
                .class("ssegate")
                .rule("/m", "svc", 80)
                .build(),
            route("apps", "theirs")
                .class("other")
                .rule("/t", "svc", 80)
                .build(),
        ]));
        assert!(t.route("h", "/m").is_some());
        assert!(t.route("h", "/t").is_none());
        assert_eq!(reports.len(), 1);
    }

    #[test]
    fn counters_survive_recompile_and_are_pruned_when_unused() {
        let state = StateStore::new(Metrics::new());
        let s = snap(vec![route("apps", "r").rule("/", "svc", 80).build()]);
        let (t1, _) = compile(&s, &CompileOptions::default(), &state);
        t1.route("h", "/")
            .unwrap()
            .active
            .fetch_add(1, Ordering::Relaxed);
        let (t2, _) = compile(&s, &CompileOptions::default(), &state);
        assert_eq!(
            t2.route("h", "/").unwrap().active.load(Ordering::Relaxed),
            1
        );
        // Route removed while a stream is open: the counter is kept for that stream.
        compile(&snap(vec![]), &CompileOptions::default(), &state);
        assert_eq!(state.rules.lock().unwrap().len(), 1);
        t1.route("h", "/")
            .unwrap()
            .active
            .fetch_sub(1, Ordering::Relaxed);
        compile(&snap(vec![]), &CompileOptions::default(), &state);
        assert!(state.rules.lock().unwrap().is_empty());
    }

    fn lb(yaml: &str) -> LoadBalancing {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn load_balancing_compiles_into_the_backend_policy() {
        let (t, reports) = compile_all(&snap(vec![
            route("apps", "rr").rule("/rr", "svc", 80).build(),
            route("apps", "lc")
                .rule("/lc", "svc", 80)
                .least_connections()
                .build(),
            route("apps", "st")
                .rule("/st", "svc", 80)
                .sticky_header("X-User-ID")
                .build(),
            route("apps", "ck")
                .rule("/ck", "svc", 80)
                .balance(lb(
                    "{policy: Sticky, sticky: {cookie: sid, boundedLoad: 1.25}}",
                ))
                .build(),
        ]));
        assert!(reports.iter().all(|r| r.all_ok()));
        let policy = |p: &str| t.route("h", p).unwrap().backend.policy().clone();
        assert_eq!(policy("/rr"), Policy::RoundRobin);
        assert_eq!(policy("/lc"), Policy::LeastConnections);
        assert_eq!(
            policy("/st"),
            Policy::Sticky {
                key: KeySource::Header(http::HeaderName::from_static("x-user-id")),
                bounded_load: None
            }
        );
        assert_eq!(
            policy("/ck"),
            Policy::Sticky {
                key: KeySource::Cookie("sid".into()),
                bounded_load: Some(1.25)
            }
        );
    }

    #[test]
    fn invalid_load_balancing_is_not_accepted_and_says_why() {
        let cases = [
            ("{policy: Sticky}", "needs loadBalancing.sticky"),
            ("{policy: Sticky, sticky: {}}", "exactly one key source"),
            (
                "{policy: Sticky, sticky: {sourceIP: false}}",
                "exactly one key source",
            ),
            (
                "{policy: Sticky, sticky: {header: x-a, cookie: sid}}",
                "sets header and cookie",
            ),
            (
                "{policy: LeastConnections, sticky: {header: x-a}}",
                "only used with policy Sticky",
            ),
            ("{sticky: {header: x-a}}", "only used with policy Sticky"),
            (
                "{policy: Sticky, sticky: {header: 'bad header'}}",
                "not a valid header name",
            ),
            (
                "{policy: Sticky, sticky: {cookie: 'a;b'}}",
                "not a valid cookie name",
            ),
            (
                "{policy: Sticky, sticky: {cookie: ''}}",
                "not a valid cookie name",
            ),
            (
                "{policy: Sticky, sticky: {query: 'a&b'}}",
                "not a valid query parameter",
            ),
            (
                "{policy: Sticky, sticky: {sourceIP: true, boundedLoad: 0.5}}",
                "boundedLoad 0.5 must be",
            ),
            (
                "{policy: Sticky, sticky: {sourceIP: true, boundedLoad: .nan}}",
                "boundedLoad NaN must be",
            ),
        ];
        for (yaml, want) in cases {
            let (t, reports) = compile_all(&snap(vec![
                route("apps", "bad")
                    .rule("/b", "svc", 80)
                    .balance(lb(yaml))
                    .build(),
                route("apps", "good").rule("/g", "svc", 80).build(),
            ]));
            let bad = reports.iter().find(|r| r.name == "bad").unwrap();
            let acc = bad.condition(ACCEPTED).unwrap();
            assert!(!acc.status, "{yaml} was accepted");
            assert_eq!(acc.reason, "InvalidRule");
            assert!(acc.message.contains(want), "{yaml}: {}", acc.message);
            assert!(t.route("h", "/b").is_none());
            assert!(
                t.route("h", "/g").is_some(),
                "{yaml} took another route down"
            );
        }
        for ok in [
            "{policy: Sticky, sticky: {sourceIP: true, boundedLoad: 1}}",
            "{policy: Sticky, sticky: {query: user, sourceIP: false}}",
            "{policy: RoundRobin}",
        ] {
            let (_, reports) = compile_all(&snap(vec![
                route("apps", "r")
                    .rule("/", "svc", 80)
                    .balance(lb(ok))
                    .build(),
            ]));
            assert!(reports[0].all_ok(), "{ok}: {}", reports[0].summary());
        }
    }

    fn two_endpoints(ready2: bool) -> Snapshot {
        let mut s = snap(vec![
            route("apps", "r")
                .rule("/", "svc", 80)
                .least_connections()
                .build(),
        ]);
        s.endpoint_slices = vec![slice(
            "apps",
            "svc",
            9000,
            &[("10.0.0.1", true), ("10.0.0.2", ready2)],
        )];
        s
    }

    #[test]
    fn endpoint_state_survives_recompiles_and_retires_when_unready() {
        use crate::balance::EndpointLease;
        let state = StateStore::new(Metrics::new());
        let opts = CompileOptions::default();
        let (t1, _) = compile(&two_endpoints(true), &opts, &state);
        let eps1 = t1.route("h", "/").unwrap().backend.endpoints().to_vec();
        let lease = EndpointLease::new(eps1[1].clone());
        // Same endpoints: same shared state, so the open stream is still counted.
        let (t2, _) = compile(&two_endpoints(true), &opts, &state);
        let eps2 = t2.route("h", "/").unwrap().backend.endpoints();
        assert!(Arc::ptr_eq(&eps1[0], &eps2[0]) && Arc::ptr_eq(&eps1[1], &eps2[1]));
        assert_eq!(eps2[1].active(), 1);
        assert_eq!(
            t2.route("h", "/").unwrap().backend.plan(None, 1)[0].addr(),
            eps1[0].addr(),
            "least connections sees the stream opened under the old table"
        );
        // Endpoint 2 turns unready: it is retired, endpoint 1 is untouched.
        let (t3, _) = compile(&two_endpoints(false), &opts, &state);
        assert!(eps1[1].is_retired());
        assert!(!eps1[0].is_retired());
        assert_eq!(t3.route("h", "/").unwrap().backend.endpoints().len(), 1);
        drop(lease);
        // The route goes away: its endpoints are not retired (nothing says they are gone).
        compile(&snap(vec![]), &opts, &state);
        assert!(!eps1[0].is_retired());
        assert!(state.endpoints.is_empty());
    }

    #[test]
    fn balance_metric_covers_served_routes() {
        let metrics = Metrics::new();
        let state = StateStore::new(metrics.clone());
        let (t, _) = compile(&two_endpoints(true), &CompileOptions::default(), &state);
        let backend = &t.route("h", "/").unwrap().backend;
        let _a = crate::balance::EndpointLease::new(backend.endpoints()[0].clone());
        let _b = crate::balance::EndpointLease::new(backend.endpoints()[0].clone());
        let text = metrics.render();
        assert!(
            text.contains(r#"ssegate_balance_max_over_mean{route="apps/r"} 2"#),
            "{text}"
        );
        compile(&snap(vec![]), &CompileOptions::default(), &state);
        assert!(!metrics.render().contains("ssegate_balance_max_over_mean{"));
    }

    fn same_cert(
        a: Option<&Arc<rustls::sign::CertifiedKey>>,
        b: &rustls::sign::CertifiedKey,
    ) -> bool {
        a.is_some_and(|a| a.cert == b.cert)
    }

    fn key_pair(secret: &k8s_openapi::api::core::v1::Secret) -> rustls::sign::CertifiedKey {
        crate::tls::key_pair_from_secret(secret).unwrap()
    }

    #[test]
    fn a_certificate_that_misses_a_hostname_is_reported_but_served() {
        use crate::tls::tests::{self_signed, tls_secret};
        let (crt, key) = self_signed(&["a.example"]);
        let mut s = snap(vec![
            route("apps", "r")
                .host("a.example")
                .host("b.example")
                .tls("cert", false)
                .rule("/a", "svc", 80)
                .build(),
        ]);
        s.secrets = vec![tls_secret("apps", "cert", &crt, &key)];
        let (t, reports) = compile_all(&s);
        let acc = reports[0].condition(ACCEPTED).unwrap();
        assert!(acc.status, "still accepted and served");
        assert_eq!(acc.reason, "Accepted");
        assert!(
            acc.message
                .contains("does not cover b.example (it is for: a.example)"),
            "{}",
            acc.message
        );
        assert_eq!(reports[0].warnings.len(), 1);
        assert!(t.certs().resolve(Some("b.example")).is_some());
        // A certificate for both names: no warning.
        let (crt, key) = self_signed(&["a.example", "b.example"]);
        s.secrets = vec![tls_secret("apps", "cert", &crt, &key)];
        let (_, reports) = compile_all(&s);
        assert!(reports[0].warnings.is_empty());
        assert_eq!(
            reports[0].condition(ACCEPTED).unwrap().message,
            "route is valid and served"
        );
    }

    #[test]
    fn tls_routes_publish_their_certificates_by_hostname() {
        use crate::tls::tests::{self_signed, tls_secret};
        let (c1, k1) = self_signed(&["a.example"]);
        let (c2, k2) = self_signed(&["*.b.example"]);
        let (c3, k3) = self_signed(&["fallback"]);
        let mut s = snap(vec![
            route("apps", "a")
                .host("a.example")
                .tls("a-cert", true)
                .rule("/a", "svc", 80)
                .build(),
            route("apps", "b")
                .host("*.b.example")
                .tls("b-cert", false)
                .rule("/b", "svc", 80)
                .build(),
        ]);
        s.secrets = vec![
            tls_secret("apps", "a-cert", &c1, &k1),
            tls_secret("apps", "b-cert", &c2, &k2),
            tls_secret("infra", "fallback", &c3, &k3),
        ];
        let opts = CompileOptions {
            default_cert_secret: Some("infra/fallback".into()),
            ..CompileOptions::default()
        };
        let (t, reports) = compile(&s, &opts, &StateStore::new(Metrics::new()));
        assert!(reports.iter().all(RouteReport::all_ok), "{reports:?}");
        let certs = t.certs();
        assert!(same_cert(
            certs.resolve(Some("a.example")),
            &key_pair(&s.secrets[0])
        ));
        assert!(same_cert(
            certs.resolve(Some("x.b.example")),
            &key_pair(&s.secrets[1])
        ));
        assert!(same_cert(
            certs.resolve(Some("zzz")),
            &key_pair(&s.secrets[2])
        ));
        assert!(t.route("a.example", "/a").unwrap().https_redirect);
        assert!(!t.route("x.b.example", "/b").unwrap().https_redirect);
    }

    #[test]
    fn missing_or_bad_certificate_is_reported_and_last_good_kept() {
        use crate::tls::tests::{self_signed, tls_secret};
        let state = StateStore::new(Metrics::new());
        let opts = CompileOptions::default();
        let r = || {
            route("apps", "a")
                .host("a.example")
                .tls("a-cert", false)
                .rule("/a", "svc", 80)
                .build()
        };
        let mut s = snap(vec![r()]);
        let (t, reports) = compile(&s, &opts, &state);
        let rr = reports[0].condition(RESOLVED_REFS).unwrap();
        assert_eq!((rr.status, rr.reason.as_str()), (false, "SecretNotFound"));
        assert!(rr.message.contains("apps/a-cert"));
        assert!(
            t.route("a.example", "/a").is_some(),
            "plain HTTP still served"
        );
        assert!(t.certs().resolve(Some("a.example")).is_none());

        let (c1, k1) = self_signed(&["a.example"]);
        s.secrets = vec![tls_secret("apps", "a-cert", &c1, &k1)];
        let (_, reports) = compile(&s, &opts, &state);
        assert!(reports[0].all_ok(), "{}", reports[0].summary());

        let (_, other_key) = self_signed(&["x"]);
        s.secrets = vec![tls_secret("apps", "a-cert", &c1, &other_key)];
        let (t, reports) = compile(&s, &opts, &state);
        let acc = reports[0].condition(ACCEPTED).unwrap();
        assert_eq!(
            (acc.status, acc.reason.as_str()),
            (false, "InvalidCertificate")
        );
        assert!(acc.message.contains("does not match"), "{}", acc.message);
        let good = tls_secret("apps", "a-cert", &c1, &k1);
        assert!(same_cert(
            t.certs().resolve(Some("a.example")),
            &key_pair(&good)
        ));
        assert!(t.route("a.example", "/a").is_some());
    }

    #[test]
    fn backend_tls_and_protocol_are_validated_and_resolved() {
        let (t, reports) = compile_all(&snap(vec![
            route("apps", "h2plain")
                .rule("/x", "svc", 80)
                .build()
                .tap(|r| r.spec.rules[0].backend.protocol = BackendProtocol::H2),
            route("apps", "noca")
                .rule("/y", "svc", 80)
                .backend_tls(Some("missing-ca"), BackendProtocol::H2)
                .build(),
            route("apps", "web")
                .rule("/z", "svc", 80)
                .backend_tls(None, BackendProtocol::Http1)
                .build(),
        ]));
        let by = |n: &str| reports.iter().find(|r| r.name == n).unwrap();
        let acc = by("h2plain").condition(ACCEPTED).unwrap();
        assert_eq!(acc.reason, "InvalidRule");
        assert!(acc.message.contains("h2c"), "{}", acc.message);
        assert_eq!(
            by("noca").condition(RESOLVED_REFS).unwrap().reason,
            "SecretNotFound"
        );
        assert!(matches!(
            t.route("h", "/y").unwrap().upstream_tls,
            Some(Err(_))
        ));
        let web = t.route("h", "/z").unwrap();
        let Some(Ok(tls)) = &web.upstream_tls else {
            panic!("expected usable upstream TLS");
        };
        assert_eq!(tls.server_name.to_str(), "svc.apps.svc");
        assert_eq!(tls.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn poll_rules_compile_with_their_settings_and_bad_settings_are_refused() {
        let (t, reports) = compile_all(&snap(vec![
            route("apps", "p")
                .rule("/p", "svc", 80)
                .poll("{defaultWait: 2s, eventType: order}")
                .rule("/d", "svc", 80)
                .build(),
            route("apps", "bad")
                .rule("/bad", "svc", 80)
                .poll("{minWait: 5s, defaultWait: 1s}")
                .build(),
            {
                let mut r = route("apps", "stream").rule("/s", "svc", 80).build();
                r.spec.rules[0].poll = Some(Default::default());
                r
            },
        ]));
        let p = t.route("h", "/p").unwrap();
        assert_eq!(p.mode, Mode::Poll);
        let cfg = p.poll.as_ref().unwrap();
        assert_eq!(cfg.default_wait, Duration::from_secs(2));
        assert_eq!(cfg.event_type.as_deref(), Some("order"));
        assert!(t.route("h", "/d").unwrap().poll.is_none());
        let by = |n: &str| reports.iter().find(|r| r.name == n).unwrap();
        assert!(by("p").all_ok(), "{}", by("p").summary());
        let acc = by("bad").condition(ACCEPTED).unwrap();
        assert_eq!((acc.status, acc.reason.as_str()), (false, "InvalidRule"));
        assert!(
            acc.message
                .contains("rule 0: poll.defaultWait 1s must be within"),
            "{}",
            acc.message
        );
        assert!(t.route("h", "/bad").is_none());
        let acc = by("stream").condition(ACCEPTED).unwrap();
        assert!(!acc.status && acc.message.contains("only used with mode: Poll"));
        // A poll rule without settings gets the defaults.
        let (t, _) = compile_all(&snap(vec![{
            let mut r = route("apps", "q").rule("/q", "svc", 80).build();
            r.spec.rules[0].mode = Mode::Poll;
            r
        }]));
        assert_eq!(
            t.route("h", "/q").unwrap().poll,
            Some(PollConfig::default())
        );
    }

    #[test]
    fn hostname_validation() {
        assert!(validate_hostname("events.example.com").is_ok());
        assert!(validate_hostname("*.example.com").is_ok());
        for bad in ["", "*", "a..b", "-a.b", "a.b:8080", "A.b", "*.*.b", "a_b.c"] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }
}
