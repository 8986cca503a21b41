//! Wiring: listeners, the configuration source, compile and publish.
//!
//! [`start_standalone`] is what `ssegate run --config DIR` runs, and what the integration
//! tests start in-process on ephemeral ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::admin::{self, Readiness};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyConfig, SharedTable};
use crate::routing::{CompileOptions, RouteTable, StateStore, compile};
use crate::source::files::{self, LoadError, Loaded};

/// Settings of a running ssegate.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Proxy listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Compile settings (class).
    pub compile: CompileOptions,
    /// Proxy settings.
    pub proxy: ProxyConfig,
    /// Standalone mode: how often the directory is re-checked without a notification.
    pub reload_poll: Duration,
    /// Standalone mode: how long a burst of file events is coalesced.
    pub reload_debounce: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin: ([0, 0, 0, 0], 10254).into(),
            compile: CompileOptions::default(),
            proxy: ProxyConfig::default(),
            reload_poll: Duration::from_secs(2),
            reload_debounce: Duration::from_millis(100),
        }
    }
}

/// A running ssegate; dropping it stops every task.
pub struct Running {
    /// Bound proxy address.
    pub proxy_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// The metrics registry, for tests.
    pub metrics: Metrics,
    /// Readiness as served on `/readyz`.
    pub ready: Readiness,
    /// The table currently served.
    pub table: SharedTable,
    tasks: JoinSet<()>,
}

impl Running {
    /// Waits until a task ends (normally never).
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }
}

/// Publishes compiled tables and logs what changed in route reports.
struct Publisher {
    table: SharedTable,
    state: StateStore,
    opts: CompileOptions,
    metrics: Metrics,
    ready: Readiness,
    last_summaries: HashMap<String, String>,
}

impl Publisher {
    fn on_load(&mut self, result: Result<Loaded, Vec<LoadError>>) {
        let loaded = match result {
            Ok(l) => l,
            Err(errors) => {
                self.metrics.config_reload(false);
                for e in &errors {
                    tracing::error!(path = %e.path.display(), reason = %e.reason, "invalid configuration file; keeping the last good routing table");
                }
                return;
            }
        };
        let (table, reports) = compile(&loaded.snapshot, &self.opts, &self.state);
        let routes = table.route_count();
        self.table.store(Arc::new(table));
        self.metrics.config_reload(true);
        self.metrics.set_routes(routes);
        let mut summaries = HashMap::new();
        for r in &reports {
            let key = r.key();
            let summary = r.summary();
            if self.last_summaries.get(&key) != Some(&summary) {
                let path = loaded
                    .route_origin(&key)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                if r.all_ok() {
                    tracing::info!(route = %key, %path, ready_endpoints = r.ready_endpoints, "route ready");
                } else {
                    tracing::warn!(route = %key, %path, status = %summary, "route not fully ready");
                }
            }
            summaries.insert(key, summary);
        }
        self.last_summaries = summaries;
        tracing::info!(routes, "routing table published");
        self.ready.set(true);
    }
}

/// Starts ssegate on manifests in `dir`: binds both listeners (failing fast if it cannot),
/// loads the directory, and keeps watching it.
pub async fn start_standalone(dir: PathBuf, cfg: ServerConfig) -> anyhow::Result<Running> {
    anyhow::ensure!(dir.is_dir(), "--config {}: not a directory", dir.display());
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", cfg.admin))?;
    let proxy_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let mut publisher = Publisher {
        table: table.clone(),
        state: StateStore::new(metrics.clone()),
        opts: cfg.compile.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        last_summaries: HashMap::new(),
    };
    // The first load happens before serving, so the first request sees the configuration.
    // The fingerprint is taken first: a change racing with the load is then seen as a change.
    let fp = files::fingerprint(&dir);
    publisher.on_load(files::load_dir(&dir));

    let mut tasks = JoinSet::new();
    tasks.spawn(admin::serve(admin_listener, metrics.clone(), ready.clone()));
    tasks.spawn(Arc::new(Proxy::new(table.clone(), cfg.proxy.clone())).serve(listener));
    tasks.spawn(files::watch(
        dir,
        Some(fp),
        cfg.reload_poll,
        cfg.reload_debounce,
        move |r| publisher.on_load(r),
    ));
    tracing::info!(%proxy_addr, %admin_addr, "ssegate started");
    Ok(Running {
        proxy_addr,
        admin_addr,
        metrics,
        ready,
        table,
        tasks,
    })
}
