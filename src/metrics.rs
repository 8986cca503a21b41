//! Prometheus metrics. The [`Metrics`] value owns its own registry; it is built at start-up and
//! passed in (never a global), so every test can make its own and read exact values.
//!
//! Labels are bounded: `route` (`namespace/name`) and a fixed `reason` vocabulary, never a client
//! address, session key or endpoint IP. Per-route handles ([`RouteMetrics`]) are resolved once
//! when a routing table is compiled, so the relay path only does atomic adds.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every `reason` of `ssegate_upstream_errors_total`.
pub const UPSTREAM_ERROR_REASONS: [&str; 9] = [
    "connect_failed",
    "connect_timeout",
    "first_byte_timeout",
    "no_endpoints",
    "protocol",
    "reset",
    "idle_timeout",
    "invalid_response",
    "upstream_tls",
];
/// Every `outcome` of `ssegate_poll_requests_total`: `success` (2xx with a valid answer),
/// `no_content` (204: the feed is over), `retry` (429/503 with `Retry-After`, called again),
/// `http_error` (any other status), `invalid_response` (not the JSON protocol), and the
/// transport failures of [`UPSTREAM_ERROR_REASONS`].
pub const POLL_OUTCOMES: [&str; 11] = [
    "success",
    "no_content",
    "retry",
    "http_error",
    "invalid_response",
    "connect_failed",
    "connect_timeout",
    "first_byte_timeout",
    "no_endpoints",
    "protocol",
    "upstream_tls",
];
/// Every `reason` of `ssegate_rejected_total`.
pub const REJECT_REASONS: [&str; 3] = ["over_capacity", "bad_request", "client_streams"];
/// Every `reason` of `ssegate_client_disconnects_total`.
pub const CLIENT_DISCONNECT_REASONS: [&str; 1] = ["write_timeout"];
/// Every `reason` of `ssegate_connections_rejected_total`.
pub const CONNECTION_REJECT_REASONS: [&str; 2] = ["max_connections", "client_rate"];

/// All of ssegate's metric families and the registry they are registered in.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    connections_active: IntGaugeVec,
    connections_total: IntCounterVec,
    events_total: IntCounterVec,
    bytes_sent_total: IntCounterVec,
    keepalives_total: IntCounterVec,
    upstream_errors_total: IntCounterVec,
    rejected_total: IntCounterVec,
    config_reloads_total: IntCounterVec,
    poll_requests_total: IntCounterVec,
    client_disconnects_total: IntCounterVec,
    connections_rejected_total: IntCounterVec,
    drain_streams_remaining: IntGauge,
    routes: IntGauge,
    leader: IntGauge,
    status_writes_total: IntCounter,
    status_write_errors_total: IntCounter,
    balance: Arc<ArcSwap<BalanceView>>,
}

/// Something whose load spread across endpoints can be measured (a backend).
pub trait BalanceSource: Send + Sync {
    /// Most open streams on one endpoint divided by the mean; `None` without streams.
    fn max_over_mean(&self) -> Option<f64>;
}

/// Per route (`namespace/name`), the backends of its rules, as of the last compile.
pub type BalanceView = Vec<(Arc<str>, Vec<Arc<dyn BalanceSource>>)>;

/// Computes `ssegate_balance_max_over_mean{route}` at scrape time from the backends of the
/// current table: exact, and nothing to update on the request path.
struct BalanceCollector {
    view: Arc<ArcSwap<BalanceView>>,
    desc: Vec<Desc>,
}

const BALANCE_NAME: &str = "ssegate_balance_max_over_mean";
const BALANCE_HELP: &str = "Most open streams on one endpoint of a route's backend divided by the \
     mean over its ready endpoints (through this replica; the worst rule of the route); \
     0 while the route has no open streams.";

impl BalanceCollector {
    fn gauge() -> GaugeVec {
        GaugeVec::new(Opts::new(BALANCE_NAME, BALANCE_HELP), &["route"]).expect("valid metric")
    }
}

impl Collector for BalanceCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let view = self.view.load();
        if view.is_empty() {
            return Vec::new();
        }
        let gauge = Self::gauge();
        for (route, sources) in view.iter() {
            let worst = sources
                .iter()
                .filter_map(|s| s.max_over_mean())
                .fold(0.0, f64::max);
            gauge.with_label_values(&[&**route]).set(worst);
        }
        gauge.collect()
    }
}

impl Metrics {
    /// Creates every metric family in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let connections_total = counter(
            "ssegate_connections_total",
            "Streams accepted and forwarded to an upstream, per route.",
            &["route"],
        );
        let events_total = counter(
            "ssegate_events_total",
            "SSE events relayed to clients, per route; rate() of it is events per second.",
            &["route"],
        );
        let bytes_sent_total = counter(
            "ssegate_bytes_sent_total",
            "Response body bytes sent to clients (events and keepalives), per route.",
            &["route"],
        );
        let keepalives_total = counter(
            "ssegate_keepalives_total",
            "Keepalive comments injected into idle streams, per route.",
            &["route"],
        );
        let upstream_errors_total = counter(
            "ssegate_upstream_errors_total",
            "Upstream failures per route and reason (connect_failed, connect_timeout, \
             first_byte_timeout, no_endpoints, protocol, reset, idle_timeout, \
             invalid_response, upstream_tls).",
            &["route", "reason"],
        );
        let rejected_total = counter(
            "ssegate_rejected_total",
            "Requests refused before reaching an upstream, per route and reason.",
            &["route", "reason"],
        );
        let config_reloads_total = counter(
            "ssegate_config_reloads_total",
            "Configuration loads, by result (success, failure).",
            &["result"],
        );
        let poll_requests_total = counter(
            "ssegate_poll_requests_total",
            "Backend calls of poll-mode routes, per route and outcome (success, no_content, \
             retry, http_error, invalid_response, connect_failed, connect_timeout, \
             first_byte_timeout, no_endpoints, protocol, upstream_tls).",
            &["route", "outcome"],
        );
        let client_disconnects_total = counter(
            "ssegate_client_disconnects_total",
            "Streams ended by ssegate because of the client, per route and reason \
             (write_timeout: the client accepted no data for the route's clientWriteTimeout \
             or --client-write-timeout).",
            &["route", "reason"],
        );
        let connections_rejected_total = counter(
            "ssegate_connections_rejected_total",
            "Client connections refused at accept, by reason (max_connections, client_rate).",
            &["reason"],
        );
        let connections_active = IntGaugeVec::new(
            Opts::new(
                "ssegate_connections_active",
                "Streams currently open, per route.",
            ),
            &["route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections_active.clone()))
            .expect("unique metric");
        let routes = IntGauge::new(
            "ssegate_routes",
            "Routes in the routing table being served.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(routes.clone()))
            .expect("unique metric");
        let leader = IntGauge::new(
            "ssegate_leader",
            "1 while this replica holds the leader Lease and writes route statuses (cluster mode).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(leader.clone()))
            .expect("unique metric");
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let status_writes_total = plain_counter(
            "ssegate_status_writes_total",
            "SseRoute statuses written by this replica (server-side apply).",
        );
        let status_write_errors_total = plain_counter(
            "ssegate_status_write_errors_total",
            "SseRoute status writes that failed (retried with backoff).",
        );
        let balance = Arc::new(ArcSwap::from_pointee(BalanceView::new()));
        registry
            .register(Box::new(BalanceCollector {
                view: balance.clone(),
                desc: BalanceCollector::gauge()
                    .desc()
                    .into_iter()
                    .cloned()
                    .collect(),
            }))
            .expect("unique metric");
        let drain_streams_remaining = IntGauge::new(
            "ssegate_drain_streams_remaining",
            "While draining after SIGTERM: streams still open; 0 otherwise.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(drain_streams_remaining.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            client_disconnects_total,
            connections_rejected_total,
            drain_streams_remaining,
            connections_active,
            connections_total,
            events_total,
            bytes_sent_total,
            keepalives_total,
            upstream_errors_total,
            rejected_total,
            config_reloads_total,
            poll_requests_total,
            routes,
            leader,
            status_writes_total,
            status_write_errors_total,
            balance,
        }
    }

    /// Replaces the backends `ssegate_balance_max_over_mean` is computed from (called with
    /// every compiled table; routes not in `view` lose their series).
    pub fn set_balance_view(&self, view: BalanceView) {
        self.balance.store(Arc::new(view));
    }

    /// The registry, for exposition or for registering more collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Handles for one route (`namespace/name`), resolved once per table compile.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let l = &[route];
        RouteMetrics {
            route: Arc::from(route),
            connections_active: self.connections_active.with_label_values(l),
            connections_total: self.connections_total.with_label_values(l),
            events_total: self.events_total.with_label_values(l),
            bytes_sent_total: self.bytes_sent_total.with_label_values(l),
            keepalives_total: self.keepalives_total.with_label_values(l),
            upstream_errors: self.upstream_errors_total.clone(),
            rejected: self.rejected_total.clone(),
            poll_requests: self.poll_requests_total.clone(),
            client_disconnects: self.client_disconnects_total.clone(),
        }
    }

    /// Drops every series of a route that no longer exists, so `/metrics` does not grow with
    /// route churn.
    pub fn forget_route(&self, route: &str) {
        let l = &[route];
        let _ = self.connections_active.remove_label_values(l);
        let _ = self.connections_total.remove_label_values(l);
        let _ = self.events_total.remove_label_values(l);
        let _ = self.bytes_sent_total.remove_label_values(l);
        let _ = self.keepalives_total.remove_label_values(l);
        for reason in UPSTREAM_ERROR_REASONS {
            let _ = self
                .upstream_errors_total
                .remove_label_values(&[route, reason]);
        }
        for reason in REJECT_REASONS {
            let _ = self.rejected_total.remove_label_values(&[route, reason]);
        }
        for outcome in POLL_OUTCOMES {
            let _ = self
                .poll_requests_total
                .remove_label_values(&[route, outcome]);
        }
        for reason in CLIENT_DISCONNECT_REASONS {
            let _ = self
                .client_disconnects_total
                .remove_label_values(&[route, reason]);
        }
    }

    /// Counts one configuration load.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads_total.with_label_values(&[result]).inc();
    }

    /// Counts a client connection refused at accept (`max_connections`, `client_rate`).
    pub fn connection_rejected(&self, reason: &'static str) {
        self.connections_rejected_total
            .with_label_values(&[reason])
            .inc();
    }

    /// Sets `ssegate_drain_streams_remaining`.
    pub fn set_drain_streams_remaining(&self, n: usize) {
        self.drain_streams_remaining.set(n as i64);
    }

    /// Sets the number of routes being served.
    pub fn set_routes(&self, n: usize) {
        self.routes.set(n as i64);
    }

    /// Sets whether this replica is the leader.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Counts one status write.
    pub fn status_write(&self, ok: bool) {
        if ok {
            self.status_writes_total.inc();
        } else {
            self.status_write_errors_total.inc();
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Pre-resolved metric handles of one route; cloning is cheap (reference counts).
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    /// `namespace/name`, the `route` label value.
    pub route: Arc<str>,
    /// `ssegate_connections_active{route}`
    pub connections_active: IntGauge,
    /// `ssegate_connections_total{route}`
    pub connections_total: IntCounter,
    /// `ssegate_events_total{route}`
    pub events_total: IntCounter,
    /// `ssegate_bytes_sent_total{route}`
    pub bytes_sent_total: IntCounter,
    /// `ssegate_keepalives_total{route}`
    pub keepalives_total: IntCounter,
    upstream_errors: IntCounterVec,
    rejected: IntCounterVec,
    poll_requests: IntCounterVec,
    client_disconnects: IntCounterVec,
}

impl RouteMetrics {
    /// Counts an upstream failure (rare path, so the label lookup is fine here).
    pub fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors
            .with_label_values(&[&self.route, reason])
            .inc();
    }

    /// Counts one backend call of a poll route; `outcome` is one of [`POLL_OUTCOMES`]
    /// (once per call, not per event, so the label lookup is fine).
    pub fn poll_request(&self, outcome: &'static str) {
        debug_assert!(POLL_OUTCOMES.contains(&outcome), "{outcome}");
        self.poll_requests
            .with_label_values(&[&self.route, outcome])
            .inc();
    }

    /// Counts a stream ended because of the client (e.g. `write_timeout`).
    pub fn client_disconnect(&self, reason: &'static str) {
        self.client_disconnects
            .with_label_values(&[&self.route, reason])
            .inc();
    }

    /// Counts a request refused before it reached an upstream.
    pub fn rejected(&self, reason: &'static str) {
        self.rejected
            .with_label_values(&[&self.route, reason])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_handles_feed_the_labelled_series() {
        let m = Metrics::new();
        let r = m.route("apps/feed");
        r.events_total.inc_by(3);
        r.upstream_error("connect_failed");
        let text = m.render();
        assert!(
            text.contains(r#"ssegate_events_total{route="apps/feed"} 3"#),
            "{text}"
        );
        assert!(text.contains(
            r#"ssegate_upstream_errors_total{reason="connect_failed",route="apps/feed"} 1"#
        ));
        r.poll_request("success");
        assert!(
            m.render()
                .contains(r#"ssegate_poll_requests_total{outcome="success",route="apps/feed"} 1"#)
        );
        m.forget_route("apps/feed");
        assert!(!m.render().contains("apps/feed"));
    }

    struct Fixed(Option<f64>);
    impl BalanceSource for Fixed {
        fn max_over_mean(&self) -> Option<f64> {
            self.0
        }
    }

    #[test]
    fn balance_gauge_is_the_worst_rule_per_route_at_scrape_time() {
        let m = Metrics::new();
        assert!(!m.render().contains(BALANCE_NAME));
        m.set_balance_view(vec![
            (
                Arc::from("apps/a"),
                vec![Arc::new(Fixed(Some(1.5))), Arc::new(Fixed(Some(2.25)))],
            ),
            (Arc::from("apps/idle"), vec![Arc::new(Fixed(None))]),
        ]);
        let text = m.render();
        assert!(
            text.contains(r#"ssegate_balance_max_over_mean{route="apps/a"} 2.25"#),
            "{text}"
        );
        assert!(text.contains(r#"ssegate_balance_max_over_mean{route="apps/idle"} 0"#));
        m.set_balance_view(vec![]);
        assert!(!m.render().contains("apps/a"));
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.route("x/y").events_total.inc();
        assert!(!b.render().contains("x/y"));
    }
}
