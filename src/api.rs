//! The `SseRoute` custom resource (`ssegate.io/v1alpha1`): spec, status and defaults.
//!
//! The same types are read from YAML files in standalone mode and from the API server in a
//! cluster, so a manifest that works on a laptop can be `kubectl apply`-ed unchanged.
//! Everything here is plain data; validation that needs more than one object (does the
//! Service exist?) lives in [`crate::routing::compile`].

use std::fmt;
use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// API group of ssegate's resources.
pub const GROUP: &str = "ssegate.io";
/// `apiVersion` of [`SseRoute`].
pub const API_VERSION: &str = "ssegate.io/v1alpha1";

/// Schema pattern of `spec.hostnames[]`: a lower-case DNS name, optionally `*.`-prefixed
/// (the same rule [`crate::routing::compile`] enforces).
pub const HOSTNAME_PATTERN: &str =
    r"^(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$";
/// Schema pattern of `match.path`: absolute, no whitespace, query or fragment.
pub const PATH_PATTERN: &str = r"^/[^\s?#]*$";
/// Schema pattern of `backend.rewritePath`.
pub const REWRITE_PATTERN: &str = r"^/";
/// Schema pattern of `backend.service`: a Service name (DNS-1035 label).
pub const SERVICE_NAME_PATTERN: &str = r"^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// Schema pattern of a Secret name (a DNS subdomain).
pub const SECRET_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
/// CEL rule of `backend.port` (an int-or-string): a port number in range, or a non-empty name.
pub const PORT_RULE: &str =
    "type(self) == int ? (self >= 1 && self <= 65535) : (size(self) > 0 && size(self) <= 15)";

/// Desired routing of Server-Sent Events streams for a set of hostnames.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ssegate.io",
    version = "v1alpha1",
    kind = "SseRoute",
    plural = "sseroutes",
    shortname = "ssr",
    namespaced,
    doc = "Routes Server-Sent Events streams for a set of hostnames to Services.",
    derive = "PartialEq",
    status = "SseRouteStatus",
    printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".spec.hostnames"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.readyEndpoints"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SseRouteSpec {
    /// Hostnames this route serves. Empty means any host. `*.example.com` matches any
    /// subdomain of `example.com` (not `example.com` itself); exact names beat wildcards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(max = 253), regex(pattern = HOSTNAME_PATTERN)))]
    pub hostnames: Vec<String>,
    /// Which ssegate installation serves this route (`--class`). Unset: the default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Path rules; the most specific match wins (Exact beats the longest Prefix).
    #[schemars(length(min = 1))]
    pub rules: Vec<RouteRule>,
    /// TLS termination for this route's hostnames on the TLS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RouteTls>,
}

/// TLS termination of a route (`spec.tls`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTls {
    /// A `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`) in the route's namespace; its
    /// certificate is served, by SNI, for the route's `hostnames` (a route without hostnames
    /// provides the certificate for names no other route covers).
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_NAME_PATTERN))]
    pub secret_name: String,
    /// Answer plain-HTTP requests for this route with `308 Permanent Redirect` to `https://`
    /// (same host, path and query) instead of proxying them.
    #[serde(default)]
    pub redirect: bool,
}

/// One path match and where its streams go.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// Which request paths this rule takes.
    #[serde(rename = "match")]
    pub path_match: PathMatch,
    /// The Service the streams are proxied to.
    pub backend: BackendRef,
    /// `Stream` relays an SSE upstream; `Poll` turns a JSON backend into a stream.
    #[serde(default)]
    pub mode: Mode,
    /// Settings of `mode: Poll` (defaults apply when unset); refused with `mode: Stream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<PollSettings>,
    /// Comment lines sent to the client while the stream is idle.
    #[serde(default)]
    pub keepalive: Keepalive,
    /// Upstream timeouts and the client write timeout; `0s` disables one.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Concurrent streams this rule accepts through one ssegate replica (0 = unlimited);
    /// beyond it clients get `503` with `Retry-After`.
    #[serde(default)]
    pub max_connections: u32,
    /// How a new stream picks an endpoint of the backend (default round robin).
    #[serde(default, skip_serializing_if = "LoadBalancing::is_default")]
    pub load_balancing: LoadBalancing,
}

/// Endpoint selection for new streams of a rule. Open streams never move: they stay on
/// their endpoint until it disappears or turns unready.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.sticky) == (has(self.policy) && self.policy == 'Sticky')",
    "message": "sticky is required with policy Sticky and only allowed with it",
}]))]
pub struct LoadBalancing {
    /// `RoundRobin` (default), `LeastConnections` or `Sticky`.
    #[serde(default)]
    pub policy: BalancePolicy,
    /// The session key of `policy: Sticky`; exactly one key source must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickySpec>,
}

impl LoadBalancing {
    fn is_default(&self) -> bool {
        *self == LoadBalancing::default()
    }
}

/// The load-balancing policy of a rule.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BalancePolicy {
    /// Each new stream goes to the next ready endpoint in turn.
    #[default]
    RoundRobin,
    /// Each new stream goes to the ready endpoint with the fewest open streams through this
    /// ssegate replica.
    LeastConnections,
    /// Streams with the same session key go to the same endpoint, on every replica
    /// (consistent hashing); streams without the key are balanced round robin.
    Sticky,
}

/// Where the session key of a sticky rule comes from (exactly one of `header`, `cookie`,
/// `query`, `sourceIP`), and an optional load bound.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.header) ? 1 : 0) + (has(self.cookie) ? 1 : 0) + (has(self.query) ? 1 : 0) + ((has(self.sourceIP) && self.sourceIP) ? 1 : 0) == 1",
    "message": "exactly one key source is required: header, cookie, query or sourceIP: true",
}]))]
pub struct StickySpec {
    /// A request header, e.g. `X-User-ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A cookie name, e.g. `sid`. When the request has no such cookie ssegate issues one
    /// (a random session id; `HttpOnly`, `SameSite=Lax`, `Path` = the rule's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// A query parameter name, e.g. `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `true`: the client's IP address (the TCP peer of ssegate).
    #[serde(default, rename = "sourceIP", skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
    /// No endpoint takes more than this factor times the mean number of open streams
    /// (per replica); a key whose endpoint is full goes to the next endpoint in its hash
    /// order. At least `1.0`; unset means unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub bounded_load: Option<f64>,
}

/// Request path matching.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// An absolute path, starting with `/`.
    #[schemars(length(max = 1024), regex(pattern = PATH_PATTERN))]
    pub path: String,
    /// `Prefix` (default) matches whole path segments: `/a` matches `/a` and `/a/b`, not `/ab`.
    #[serde(default)]
    pub path_type: PathType,
}

/// How [`PathMatch::path`] is compared with the request path.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum PathType {
    /// Segment-wise prefix match.
    #[default]
    Prefix,
    /// The whole path must be equal.
    Exact,
}

/// Where a rule's requests go: a port of a Service in the route's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// Name of a Service in the route's namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = SERVICE_NAME_PATTERN))]
    pub service: String,
    /// The Service port, by number (1-65535) or by name.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": PORT_RULE,
        "message": "port must be a number in 1-65535 or a port name",
    }]))]
    pub port: PortRef,
    /// Replaces the matched path prefix (or the whole path for `Exact`) before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = REWRITE_PATTERN))]
    pub rewrite_path: Option<String>,
    /// HTTP version spoken to the backend: `http1` (default), `h2c` (HTTP/2 over cleartext,
    /// prior knowledge) or `h2` (HTTP/2 over TLS; needs `tls.enabled`).
    #[serde(default)]
    pub protocol: BackendProtocol,
    /// TLS to the backend (HTTPS upstreams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTls>,
}

/// HTTP version spoken to a backend.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BackendProtocol {
    /// HTTP/1.1 (over TLS when `tls.enabled`).
    #[default]
    #[serde(rename = "http1")]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    #[serde(rename = "h2c")]
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`); requires `tls.enabled: true`.
    #[serde(rename = "h2")]
    H2,
}

/// TLS from ssegate to a backend (`backend.tls`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendTls {
    /// Connect to the backend with TLS and verify its certificate.
    #[serde(default)]
    pub enabled: bool,
    /// A Secret in the route's namespace whose `ca.crt` holds the CA certificate(s) that sign
    /// the backend's certificate. Unset: the public web roots bundled with ssegate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_NAME_PATTERN))]
    pub ca_secret_name: Option<String>,
    /// The name the backend's certificate must carry (and the SNI sent). Unset:
    /// `<service>.<namespace>.svc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
    /// A `kubernetes.io/tls` Secret in the route's namespace presented as client certificate
    /// (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_NAME_PATTERN))]
    pub client_cert_secret_name: Option<String>,
}

/// A Service port given by number or name (`x-kubernetes-int-or-string`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// `port: 8080`
    Number(i32),
    /// `port: http`
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(s) => f.write_str(s),
        }
    }
}

impl Serialize for PortRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortRef::Number(n) => s.serialize_i32(*n),
            PortRef::Name(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for PortRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("port must be a port number or a port name"))?
        {
            Raw::Int(n) => i32::try_from(n)
                .map(PortRef::Number)
                .map_err(|_| serde::de::Error::custom(format!("port {n} is out of range"))),
            // A quoted number ("8080") is a number, as in Kubernetes' IntOrString handling
            // of Service ports.
            Raw::Str(s) => Ok(s
                .parse::<i32>()
                .map(PortRef::Number)
                .unwrap_or(PortRef::Name(s))),
        }
    }
}

impl JsonSchema for PortRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRef".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

/// What a rule does with a request.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// Relay an upstream `text/event-stream` response.
    #[default]
    Stream,
    /// Poll a JSON backend and stream each `list` entry as an event.
    Poll,
}

/// How a `mode: Poll` rule calls its JSON backend and turns the answers into events.
///
/// The backend answers each call with `{"list": [...], "continue": true, "wait": 250,
/// "next": <cursor>}`; every `list` entry becomes one event, `wait` (milliseconds, or a
/// duration string such as `"2s"`) is clamped to `[minWait, maxWait]`, and `next` comes back
/// as `previous` on the following call.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollSettings {
    /// Wait between calls when the backend's answer has no `wait` (default `1s`).
    #[serde(default = "PollSettings::default_default_wait")]
    pub default_wait: Duration,
    /// Shortest wait between calls, whatever the backend asks (default `100ms`), so a
    /// misbehaving backend cannot make ssegate call it in a tight loop.
    #[serde(default = "PollSettings::default_min_wait")]
    pub min_wait: Duration,
    /// Longest wait between calls (default `60s`); also caps a `Retry-After`.
    #[serde(default = "PollSettings::default_max_wait")]
    pub max_wait: Duration,
    /// SSE `event:` type of the events made from `list` entries; empty (the default) sends
    /// plain `message` events. `error` and `end` are reserved for ssegate's own frames.
    #[serde(default)]
    pub event_type: String,
    /// Send an `event: end` frame when the backend stops continuing (default `true`), so a
    /// client can tell a finished feed from a dropped connection and close its EventSource.
    #[serde(default = "PollSettings::default_end_event")]
    pub end_event: bool,
}

impl PollSettings {
    fn default_default_wait() -> Duration {
        Duration::from_secs(1)
    }
    fn default_min_wait() -> Duration {
        Duration::from_millis(100)
    }
    fn default_max_wait() -> Duration {
        Duration::from_secs(60)
    }
    fn default_end_event() -> bool {
        true
    }
}

impl Default for PollSettings {
    fn default() -> Self {
        PollSettings {
            default_wait: Self::default_default_wait(),
            min_wait: Self::default_min_wait(),
            max_wait: Self::default_max_wait(),
            event_type: String::new(),
            end_event: Self::default_end_event(),
        }
    }
}

/// Keepalive comments sent while a stream is idle.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Keepalive {
    /// Idle time after which a `: keepalive` comment is sent, only ever between events.
    /// `0s` disables keepalives. Default `15s`, well under the 60 s idle cut of common
    /// load balancers.
    #[serde(default = "Keepalive::default_interval")]
    pub interval: Duration,
}

impl Keepalive {
    fn default_interval() -> Duration {
        Duration::from_secs(15)
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Self::default_interval(),
        }
    }
}

/// Timeouts of a rule's streams: upstream ones and the client write timeout. `0s` disables a
/// timeout.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// TCP connect to an endpoint (default `5s`); on expiry the next endpoint is tried,
    /// then `502`.
    #[serde(default = "Timeouts::default_connect")]
    pub connect: Duration,
    /// From request sent to upstream response headers (default `30s`); on expiry `504`.
    #[serde(default = "Timeouts::default_first_byte")]
    pub first_byte: Duration,
    /// Longest silence from the upstream before the stream is ended (default `0s`: none).
    /// Keepalive comments sent by ssegate do not count as upstream activity.
    #[serde(default)]
    pub idle: Duration,
    /// Longest stream lifetime (default `0s`: none); the stream ends at an event boundary.
    #[serde(default)]
    pub max_duration: Duration,
    /// How long a client may accept no data at all before it is disconnected (counted as
    /// `write_timeout`); overrides `--client-write-timeout` for this rule's streams (unset:
    /// the flag; `0s`: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_write_timeout: Option<Duration>,
}

impl Timeouts {
    fn default_connect() -> Duration {
        Duration::from_secs(5)
    }
    fn default_first_byte() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Self::default_connect(),
            first_byte: Self::default_first_byte(),
            idle: Duration::ZERO,
            max_duration: Duration::ZERO,
            client_write_timeout: None,
        }
    }
}

/// Observed state of an [`SseRoute`], written by the elected ssegate replica.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SseRouteStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Ready endpoints summed over the route's rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_endpoints: Option<u32>,
}

/// The CustomResourceDefinition of [`SseRoute`] as the YAML committed in
/// `crds/sseroutes.ssegate.io.yaml` (what `ssegate crdgen` prints).
///
/// The schema is derived from the Rust types, then made friendlier to the API server in one
/// generic pass: unsigned integer formats (`uint32`, which Kubernetes does not know) become
/// integer `minimum`/`maximum` bounds, so new fields get the same treatment without code here.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(SseRoute::crd()).expect("the CRD serializes");
    kubernetes_friendly_schema(&mut crd);
    let body = serde_yaml::to_string(&crd).expect("the CRD serializes as YAML");
    format!(
        "# Generated from src/api.rs by `ssegate crdgen`; do not edit (CI checks it is fresh).\n{body}"
    )
}

/// Rewrites schemars output the API server would ignore or print oddly: `format: uintN`
/// becomes integer bounds, float bounds on integers become integers.
fn kubernetes_friendly_schema(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let max = match map.get("format").and_then(Value::as_str) {
                Some("uint8") => Some(Some(u64::from(u8::MAX))),
                Some("uint16") => Some(Some(u64::from(u16::MAX))),
                Some("uint32") => Some(Some(u64::from(u32::MAX))),
                Some("uint64" | "uint") => Some(None),
                _ => None,
            };
            if let Some(max) = max {
                map.remove("format");
                map.insert("minimum".into(), 0.into());
                if let Some(max) = max {
                    map.insert("maximum".into(), max.into());
                }
            }
            if map.get("type").and_then(Value::as_str) == Some("integer") {
                for bound in ["minimum", "maximum"] {
                    if let Some(f) = map.get(bound).and_then(Value::as_f64)
                        && f.fract() == 0.0
                        && map.get(bound).is_some_and(|b| !b.is_i64() && !b.is_u64())
                    {
                        map.insert(bound.into(), (f as i64).into());
                    }
                }
            }
            map.values_mut().for_each(kubernetes_friendly_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes_friendly_schema),
        _ => {}
    }
}

/// A duration written the Kubernetes/Go way: `15s`, `250ms`, `1m30s`, `1.5h`, `0s`.
///
/// A hand-written parser (rather than a crate) because the accepted syntax must be exactly
/// what the CRD's schema pattern admits, which is Go's `time.ParseDuration` subset with
/// units `ms`, `s`, `m`, `h`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// No time at all; for timeouts and keepalive it means "disabled".
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);
    /// Regex the CRD schema uses for durations.
    pub const PATTERN: &'static str = r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$";

    /// A whole number of seconds.
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    /// A whole number of milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    /// The value as a std duration.
    pub fn get(self) -> std::time::Duration {
        self.0
    }
    /// `None` when zero (disabled), else the duration.
    pub fn non_zero(self) -> Option<std::time::Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: expected e.g. 15s, 250ms, 1m30s, 2h or 0s")]
pub struct DurationError(pub String);

impl FromStr for Duration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError(s.to_string());
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        if s.is_empty() {
            return Err(err());
        }
        let mut total = 0f64;
        let mut rest = s;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(err)?;
            let (num, tail) = rest.split_at(num_len);
            if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
                return Err(err());
            }
            let value: f64 = num.parse().map_err(|_| err())?;
            let (scale, unit_len) = if tail.starts_with("ms") {
                (0.001, 2)
            } else if tail.starts_with('s') {
                (1.0, 1)
            } else if tail.starts_with('m') {
                (60.0, 1)
            } else if tail.starts_with('h') {
                (3600.0, 1)
            } else {
                return Err(err());
            };
            total += value * scale;
            rest = &tail[unit_len..];
        }
        if !total.is_finite() || total > 10.0 * 365.0 * 86400.0 {
            return Err(err());
        }
        // Round to whole microseconds so "0.1s" is exactly 100ms.
        let micros = (total * 1_000_000.0).round() as u64;
        Ok(Duration(std::time::Duration::from_micros(micros)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            f.write_str("0s")
        } else if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.as_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}s", d.as_secs_f64())
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": Duration::PATTERN })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> std::time::Duration {
        s.parse::<Duration>().unwrap().0
    }

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(d("15s"), std::time::Duration::from_secs(15));
        assert_eq!(d("250ms"), std::time::Duration::from_millis(250));
        assert_eq!(d("1m30s"), std::time::Duration::from_secs(90));
        assert_eq!(d("1.5h"), std::time::Duration::from_secs(5400));
        assert_eq!(d("0.1s"), std::time::Duration::from_millis(100));
        assert_eq!(d("0s"), std::time::Duration::ZERO);
        assert_eq!(d("0"), std::time::Duration::ZERO);
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in ["", "15", "s", "1x", "-1s", "1.s", ".5s", "1 s", "15sec"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn durations_round_trip_through_display() {
        for s in ["0s", "15s", "250ms", "90s"] {
            assert_eq!(d(s).as_nanos(), d(&Duration(d(s)).to_string()).as_nanos());
        }
    }

    #[test]
    fn spec_defaults_match_the_documented_shape() {
        let spec: SseRouteSpec = serde_yaml::from_str(
            "rules:\n- match: {path: /n}\n  backend: {service: s, port: 8080}\n",
        )
        .unwrap();
        let rule = &spec.rules[0];
        assert!(spec.hostnames.is_empty());
        assert_eq!(rule.path_match.path_type, PathType::Prefix);
        assert_eq!(rule.mode, Mode::Stream);
        assert_eq!(rule.keepalive.interval, Duration::from_secs(15));
        assert_eq!(rule.timeouts.connect, Duration::from_secs(5));
        assert_eq!(rule.timeouts.first_byte, Duration::from_secs(30));
        assert_eq!(rule.timeouts.idle, Duration::ZERO);
        assert_eq!(rule.timeouts.client_write_timeout, None);
        assert_eq!(rule.max_connections, 0);
        assert_eq!(rule.backend.port, PortRef::Number(8080));
        assert_eq!(rule.backend.protocol, BackendProtocol::Http1);
        assert!(rule.backend.tls.is_none() && spec.tls.is_none());
        assert_eq!(rule.load_balancing, LoadBalancing::default());
        assert_eq!(rule.load_balancing.policy, BalancePolicy::RoundRobin);
    }

    #[test]
    fn client_write_timeout_is_a_per_rule_timeout() {
        let t: Timeouts = serde_yaml::from_str("clientWriteTimeout: 5s").unwrap();
        assert_eq!(t.client_write_timeout, Some(Duration::from_secs(5)));
        assert_eq!(t.connect, Duration::from_secs(5));
        let off: Timeouts = serde_yaml::from_str("clientWriteTimeout: 0s").unwrap();
        assert_eq!(off.client_write_timeout, Some(Duration::ZERO));
        // Unset stays unset on the way out (the flag applies).
        let text = serde_yaml::to_string(&Timeouts::default()).unwrap();
        assert!(!text.contains("clientWriteTimeout"), "{text}");
        assert!(
            serde_yaml::to_string(&t)
                .unwrap()
                .contains("clientWriteTimeout: 5s")
        );
    }

    #[test]
    fn load_balancing_parses_the_documented_shape() {
        let spec: SseRouteSpec = serde_yaml::from_str(
            "rules:\n- match: {path: /n}\n  backend: {service: s, port: 8080}\n  loadBalancing:\n    policy: Sticky\n    sticky:\n      header: X-User-ID\n      boundedLoad: 1.25\n",
        )
        .unwrap();
        let lb = &spec.rules[0].load_balancing;
        assert_eq!(lb.policy, BalancePolicy::Sticky);
        let sticky = lb.sticky.as_ref().unwrap();
        assert_eq!(sticky.header.as_deref(), Some("X-User-ID"));
        assert_eq!(sticky.bounded_load, Some(1.25));
        let ip: StickySpec = serde_yaml::from_str("sourceIP: true").unwrap();
        assert_eq!(ip.source_ip, Some(true));
        // Round trip keeps the field names of the product interface.
        let text = serde_yaml::to_string(&ip).unwrap();
        assert_eq!(text.trim(), "sourceIP: true");
        let lc: LoadBalancing = serde_yaml::from_str("policy: LeastConnections").unwrap();
        assert_eq!(lc.policy, BalancePolicy::LeastConnections);
        let err = serde_yaml::from_str::<LoadBalancing>("policy: Random").unwrap_err();
        assert!(err.to_string().contains("Random"), "{err}");
    }

    #[test]
    fn poll_settings_default_to_the_documented_values() {
        let spec: SseRouteSpec = serde_yaml::from_str(
            "rules:\n- match: {path: /n}\n  backend: {service: s, port: 8080}\n  mode: Poll\n  poll: {}\n",
        )
        .unwrap();
        let rule = &spec.rules[0];
        assert_eq!(rule.mode, Mode::Poll);
        let poll = rule.poll.clone().unwrap();
        assert_eq!(poll, PollSettings::default());
        assert_eq!(poll.default_wait, Duration::from_secs(1));
        assert_eq!(poll.min_wait, Duration::from_millis(100));
        assert_eq!(poll.max_wait, Duration::from_secs(60));
        assert_eq!(poll.event_type, "");
        assert!(poll.end_event);
        let partial: PollSettings =
            serde_yaml::from_str("{minWait: 0s, eventType: order, endEvent: false}").unwrap();
        assert_eq!(partial.min_wait, Duration::ZERO);
        assert_eq!(partial.default_wait, Duration::from_secs(1));
        assert_eq!(partial.event_type, "order");
        assert!(!partial.end_event);
    }

    #[test]
    fn tls_fields_parse() {
        let spec: SseRouteSpec = serde_yaml::from_str(
            "tls: {secretName: cert, redirect: true}\nrules:\n- match: {path: /n}\n  backend:\n    service: s\n    port: 443\n    protocol: h2\n    tls: {enabled: true, caSecretName: ca, serverName: b.internal, clientCertSecretName: me}\n",
        )
        .unwrap();
        let tls = spec.tls.unwrap();
        assert_eq!((tls.secret_name.as_str(), tls.redirect), ("cert", true));
        let b = &spec.rules[0].backend;
        assert_eq!(b.protocol, BackendProtocol::H2);
        let bt = b.tls.as_ref().unwrap();
        assert!(bt.enabled);
        assert_eq!(bt.ca_secret_name.as_deref(), Some("ca"));
        assert_eq!(bt.server_name.as_deref(), Some("b.internal"));
        assert_eq!(bt.client_cert_secret_name.as_deref(), Some("me"));
        assert!(
            serde_yaml::from_str::<BackendProtocol>("http2")
                .unwrap_err()
                .to_string()
                .contains("http2")
        );
    }

    #[test]
    fn port_accepts_number_name_and_quoted_number() {
        let p = |y: &str| serde_yaml::from_str::<PortRef>(y);
        assert_eq!(p("8080").unwrap(), PortRef::Number(8080));
        assert_eq!(p("http").unwrap(), PortRef::Name("http".into()));
        assert_eq!(p("'8080'").unwrap(), PortRef::Number(8080));
        assert!(p("[1]").is_err());
    }

    /// The committed CRD is what the types generate (regenerate with
    /// `cargo run -- crdgen > crds/sseroutes.ssegate.io.yaml`).
    #[test]
    fn committed_crd_is_fresh() {
        let committed = include_str!("../crds/sseroutes.ssegate.io.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/sseroutes.ssegate.io.yaml is stale: run `cargo run -- crdgen > crds/sseroutes.ssegate.io.yaml`"
        );
    }

    fn schema() -> serde_json::Value {
        let crd: serde_json::Value = serde_yaml::from_str(&crd_yaml()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    /// Every `x-kubernetes-validations` rule in the schema, with its subschema.
    fn cel_rules(v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        if let Some(rules) = v.get("x-kubernetes-validations").and_then(|r| r.as_array()) {
            for r in rules {
                out.push((r["rule"].as_str().unwrap().to_string(), v.clone()));
            }
        }
        match v {
            serde_json::Value::Object(m) => m.values().for_each(|c| cel_rules(c, out)),
            serde_json::Value::Array(a) => a.iter().for_each(|c| cel_rules(c, out)),
            _ => {}
        }
    }

    #[test]
    fn crd_cel_rules_compile_within_the_cost_budget() {
        let mut rules = Vec::new();
        cel_rules(&schema(), &mut rules);
        assert!(!rules.is_empty());
        for (rule, sub) in rules {
            let compiled = kube_cel::compile_schema(&sub);
            assert!(
                !compiled.has_errors(),
                "{rule}: {:?}",
                compiled.compilation_errors()
            );
            let warnings = kube_cel::estimate_rule_cost(&rule, &compiled);
            assert!(warnings.is_empty(), "{rule}: {warnings:?}");
        }
    }

    /// The port rule's two branches, evaluated with CEL. (kube-cel has no `type()`, so the
    /// guard is replaced by its value for each sample; the API server evaluates it as is.)
    #[test]
    fn crd_port_rule_admits_numbers_in_range_and_names() {
        use kube_cel::cel::{Context, Program, Value};
        let guard = "type(self) == int";
        assert!(PORT_RULE.starts_with(guard), "{PORT_RULE}");
        let check = |port: Value| {
            let is_int = matches!(port, Value::Int(_));
            let rule = PORT_RULE.replacen(guard, if is_int { "true" } else { "false" }, 1);
            let mut ctx = Context::default();
            ctx.add_variable_from_value("self", port);
            Program::compile(&rule).unwrap().execute(&ctx).unwrap() == Value::Bool(true)
        };
        let s = |v: &str| Value::String(std::sync::Arc::new(v.to_string()));
        for good in [
            Value::Int(8080),
            Value::Int(1),
            Value::Int(65535),
            s("http"),
            s("8080"),
        ] {
            assert!(check(good.clone()), "{good:?}");
        }
        for bad in [
            Value::Int(0),
            Value::Int(65536),
            Value::Int(-1),
            s(""),
            s("a-very-long-port-name"),
        ] {
            assert!(!check(bad.clone()), "{bad:?}");
        }
    }

    /// The load-balancing rules agree with what `compile` accepts (Accepted=True).
    #[test]
    fn crd_sticky_rules_agree_with_compile() {
        let schema = schema();
        for (lb, ok) in [
            ("{}", true),
            ("{policy: LeastConnections}", true),
            ("{policy: Sticky, sticky: {header: x-user}}", true),
            (
                "{policy: Sticky, sticky: {sourceIP: true, boundedLoad: 1.5}}",
                true,
            ),
            ("{policy: Sticky}", false),
            ("{policy: Sticky, sticky: {}}", false),
            ("{policy: Sticky, sticky: {sourceIP: false}}", false),
            (
                "{policy: Sticky, sticky: {header: x-a, cookie: sid}}",
                false,
            ),
            ("{policy: RoundRobin, sticky: {header: x-a}}", false),
            ("{sticky: {header: x-a}}", false),
        ] {
            let lb: serde_json::Value = serde_yaml::from_str(lb).unwrap();
            let obj = serde_json::json!({
                "apiVersion": API_VERSION, "kind": "SseRoute",
                "metadata": {"name": "r", "namespace": "n"},
                "spec": {"rules": [{"match": {"path": "/a"}, "backend": {"service": "s", "port": 80},
                                    "loadBalancing": lb}]},
            });
            // The port rule is tested on its own (kube-cel cannot evaluate its `type()`).
            let errors: Vec<_> = match kube_cel::validate(&schema, &obj, None) {
                Ok(()) => vec![],
                Err(e) => e
                    .into_vec()
                    .into_iter()
                    .filter(|e| e.rule != PORT_RULE)
                    .collect(),
            };
            assert_eq!(errors.is_empty(), ok, "{lb}: {errors:?}");
            let route: SseRoute = serde_json::from_value(obj).unwrap();
            let (_, reports) = crate::routing::compile(
                &crate::source::Snapshot {
                    routes: vec![route],
                    ..Default::default()
                },
                &crate::routing::CompileOptions::default(),
                &crate::routing::StateStore::new(crate::metrics::Metrics::new()),
            );
            let accepted = reports[0]
                .condition(crate::status::ACCEPTED)
                .unwrap()
                .status;
            assert_eq!(accepted, ok, "{lb}: compile disagrees");
        }
    }

    /// The schema's patterns admit exactly what the parsers and `compile` admit, on samples.
    #[test]
    fn crd_patterns_agree_with_the_code() {
        let re = |p: &str| regex::Regex::new(p).unwrap();
        let duration = re(Duration::PATTERN);
        for s in [
            "0", "0s", "15s", "250ms", "1m30s", "1.5h", "", "15", "1x", "-1s", ".5s", "1 s",
        ] {
            assert_eq!(
                duration.is_match(s),
                s.parse::<Duration>().is_ok(),
                "duration {s:?}"
            );
        }
        let host = re(HOSTNAME_PATTERN);
        for h in [
            "a.example",
            "*.example.com",
            "x-1.y",
            "",
            "*",
            "a..b",
            "-a.b",
            "a-.b",
            "A.b",
            "*.*.b",
            "a_b.c",
            "a.b:80",
        ] {
            let route = crate::routing::tests::route("n", "r")
                .host(h)
                .rule("/", "s", 80)
                .build();
            let (_, reports) = crate::routing::compile(
                &crate::source::Snapshot {
                    routes: vec![route],
                    ..Default::default()
                },
                &crate::routing::CompileOptions::default(),
                &crate::routing::StateStore::new(crate::metrics::Metrics::new()),
            );
            let accepted = reports[0]
                .condition(crate::status::ACCEPTED)
                .unwrap()
                .status;
            assert_eq!(host.is_match(h), accepted, "hostname {h:?}");
        }
        let path = re(PATH_PATTERN);
        for (p, ok) in [
            ("/", true),
            ("/a/b", true),
            ("a", false),
            ("/a b", false),
            ("/a?x", false),
            ("/a#f", false),
        ] {
            assert_eq!(path.is_match(p), ok, "path {p:?}");
        }
    }

    #[test]
    fn unknown_mode_is_a_clear_error() {
        let err = serde_yaml::from_str::<SseRouteSpec>(
            "rules:\n- match: {path: /n}\n  backend: {service: s, port: 1}\n  mode: Push\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("Push"), "{err}");
    }
}
