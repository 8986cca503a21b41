//! Publishing: compile a [`Snapshot`] and swap the result in.
//!
//! Both configuration sources (files in standalone mode, API server watches in a cluster) end
//! in the same [`Publisher`]: one call to [`crate::routing::compile`], one atomic store of the
//! new table (streams already open keep the `Arc` of the rule they matched, so a swap never
//! drops them), metrics, a log line for every route whose conditions changed, and readiness.

use std::collections::HashMap;
use std::sync::Arc;

use crate::admin::Readiness;
use crate::metrics::Metrics;
use crate::proxy::SharedTable;
use crate::routing::{CompileOptions, StateStore, compile};
use crate::source::Snapshot;
use crate::status::RouteReport;

/// Compiles snapshots into the shared routing table.
pub struct Publisher {
    table: SharedTable,
    state: StateStore,
    opts: CompileOptions,
    metrics: Metrics,
    ready: Readiness,
    last_summaries: HashMap<String, String>,
    last_default_cert_problem: Option<String>,
}

impl Publisher {
    /// A publisher storing into `table`; `ready` is set by the first [`Publisher::publish`].
    pub fn new(
        table: SharedTable,
        opts: CompileOptions,
        metrics: Metrics,
        ready: Readiness,
    ) -> Self {
        Publisher {
            table,
            state: StateStore::new(metrics.clone()),
            opts,
            metrics,
            ready,
            last_summaries: HashMap::new(),
            last_default_cert_problem: None,
        }
    }

    /// Compiles `snapshot`, publishes the table and marks the process ready. `origin` names
    /// where a route (`namespace/name`) came from, for log lines (a file path, or nothing).
    /// Returns the route reports (the input of status writing).
    pub fn publish(
        &mut self,
        snapshot: &Snapshot,
        origin: impl Fn(&str) -> Option<String>,
    ) -> Vec<RouteReport> {
        let (table, reports) = compile(snapshot, &self.opts, &self.state);
        let routes = table.route_count();
        let cert_names = table.certs().names();
        let default_problem = table.certs().default_problem.clone();
        if default_problem != self.last_default_cert_problem {
            match &default_problem {
                Some(p) => tracing::error!(problem = %p, "default certificate Secret is unusable"),
                None => tracing::info!("default certificate Secret usable"),
            }
            self.last_default_cert_problem = default_problem;
        }
        self.table.store(Arc::new(table));
        self.metrics.config_reload(true);
        self.metrics.set_routes(routes);
        let mut summaries = HashMap::with_capacity(reports.len());
        for r in &reports {
            let key = r.key();
            let mut summary = r.summary();
            for w in &r.warnings {
                summary.push_str(" warning: ");
                summary.push_str(w);
            }
            if self.last_summaries.get(&key) != Some(&summary) {
                let origin = origin(&key);
                let origin = origin.as_deref();
                if r.all_ok() {
                    tracing::info!(route = %key, origin, ready_endpoints = r.ready_endpoints, "route ready");
                } else {
                    tracing::warn!(route = %key, origin, status = %r.summary(), "route not fully ready");
                }
                for w in &r.warnings {
                    tracing::warn!(route = %key, origin, warning = %w, "route served with a warning");
                }
            }
            summaries.insert(key, summary);
        }
        for gone in self
            .last_summaries
            .keys()
            .filter(|k| !summaries.contains_key(*k))
        {
            tracing::info!(route = %gone, "route removed");
        }
        self.last_summaries = summaries;
        tracing::info!(routes, cert_names, "routing table published");
        self.ready.set(true);
        reports
    }

    /// Counts a configuration that could not be used; the last good table stays.
    pub fn reject(&self) {
        self.metrics.config_reload(false);
    }
}
