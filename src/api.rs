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

/// Desired routing of Server-Sent Events streams for a set of hostnames.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ssegate.io",
    version = "v1alpha1",
    kind = "SseRoute",
    plural = "sseroutes",
    shortname = "ssr",
    namespaced,
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
    pub hostnames: Vec<String>,
    /// Which ssegate installation serves this route (`--class`). Unset: the default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Path rules; the most specific match wins (Exact beats the longest Prefix).
    pub rules: Vec<RouteRule>,
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
    /// Comment lines sent to the client while the stream is idle.
    #[serde(default)]
    pub keepalive: Keepalive,
    /// Upstream timeouts; `0s` disables one.
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
    pub service: String,
    /// The Service port, by number or by name.
    pub port: PortRef,
    /// Replaces the matched path prefix (or the whole path for `Exact`) before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_path: Option<String>,
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

/// Upstream timeouts. `0s` disables a timeout.
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
    pub conditions: Vec<Condition>,
    /// Ready endpoints summed over the route's rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_endpoints: Option<u32>,
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
        assert_eq!(rule.max_connections, 0);
        assert_eq!(rule.backend.port, PortRef::Number(8080));
        assert_eq!(rule.load_balancing, LoadBalancing::default());
        assert_eq!(rule.load_balancing.policy, BalancePolicy::RoundRobin);
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
    fn port_accepts_number_name_and_quoted_number() {
        let p = |y: &str| serde_yaml::from_str::<PortRef>(y);
        assert_eq!(p("8080").unwrap(), PortRef::Number(8080));
        assert_eq!(p("http").unwrap(), PortRef::Name("http".into()));
        assert_eq!(p("'8080'").unwrap(), PortRef::Number(8080));
        assert!(p("[1]").is_err());
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
