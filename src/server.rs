//! Wiring: listeners, the configuration source, compile and publish.
//!
//! [`start_standalone`] is what `ssegate run --config DIR` runs, and what the integration
//! tests start in-process on ephemeral ports; [`start_cluster`] is `ssegate run` against an
//! API server. Both end in the same [`Publisher`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, Readiness};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::proxy::drain::Drain;
use crate::proxy::{Proxy, ProxyConfig, SharedTable, TableCerts};
use crate::publish::Publisher;
use crate::routing::{CompileOptions, RouteTable};
use crate::source::files::{self, LoadError, Loaded};
use crate::source::kube::{self as kube_source, KubeSourceConfig};
use crate::status::writer;
use crate::tls;
use crate::workers::{self, Workers, WorkersBuilder};
use tokio_rustls::TlsAcceptor;

/// Settings of a running ssegate.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Proxy listener address.
    pub listen: SocketAddr,
    /// TLS listener address (`None`: no TLS listener). The CLI default is `0.0.0.0:8443`;
    /// this struct's default has none so in-process tests do not collide on a fixed port.
    pub listen_tls: Option<SocketAddr>,
    /// `--default-cert`/`--default-key`: PEM files served when no Secret covers a name.
    pub default_cert: Option<(PathBuf, PathBuf)>,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Compile settings (class).
    pub compile: CompileOptions,
    /// Proxy settings.
    pub proxy: ProxyConfig,
    /// How often the standalone directory (without a notification) and the `--default-cert`
    /// files are re-checked.
    pub reload_poll: Duration,
    /// Standalone mode: how long a burst of file events is coalesced.
    pub reload_debounce: Duration,
    /// Proxy worker threads (`--workers`), each with its own single-threaded runtime and its
    /// own `SO_REUSEPORT` sockets on the proxy addresses (see [`crate::workers`]). `0`
    /// serves the proxy on the runtime that called `start_*` instead (this struct's
    /// default, for in-process use).
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([0, 0, 0, 0], 8080).into(),
            listen_tls: None,
            default_cert: None,
            admin: ([0, 0, 0, 0], 10254).into(),
            compile: CompileOptions::default(),
            proxy: ProxyConfig::default(),
            reload_poll: Duration::from_secs(2),
            reload_debounce: Duration::from_millis(100),
            workers: 0,
        }
    }
}

/// A running ssegate; dropping it stops every task.
pub struct Running {
    /// Bound proxy address.
    pub proxy_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Bound TLS listener address, if there is one.
    pub tls_addr: Option<SocketAddr>,
    /// The metrics registry, for tests.
    pub metrics: Metrics,
    /// Readiness as served on `/readyz`.
    pub ready: Readiness,
    /// The table currently served.
    pub table: SharedTable,
    /// The drain state shared with the proxy.
    pub drain: Drain,
    tasks: JoinSet<()>,
    /// The proxy's worker threads (none with `workers: 0`); dropping them stops them.
    workers: Option<Workers>,
    /// Cluster mode: tells the leader-election task to release the Lease and stop.
    shutdown: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

/// How a drain proceeds (`--drain-delay`, `--drain-window`, `--grace-period`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainConfig {
    /// From the signal until streams start closing; new streams are still accepted.
    pub delay: Duration,
    /// Closes are spread over this long.
    pub window: Duration,
    /// The process exits at the latest this long after the signal.
    pub grace_period: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            delay: Duration::from_secs(5),
            window: Duration::from_secs(30),
            grace_period: Duration::from_secs(45),
        }
    }
}

impl DrainConfig {
    /// The window actually used: shortened to 90% of what is left of the grace period after
    /// the delay, so the last streams close (and their `retry:` hints reach clients) before
    /// the process has to exit.
    pub fn effective_window(&self) -> Duration {
        let room = self.grace_period.saturating_sub(self.delay).mul_f64(0.9);
        self.window.min(room)
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Streams open when the drain began.
    pub streams_at_start: usize,
    /// Streams still open at exit (non-zero only when the grace period ran out).
    pub streams_left: usize,
}

impl Running {
    /// Tasks alive on each proxy worker (one per open client connection); empty when the
    /// proxy runs on the caller's runtime (`workers: 0`).
    pub fn worker_tasks(&self) -> Vec<usize> {
        self.workers.as_ref().map_or_else(Vec::new, Workers::tasks)
    }

    /// Waits until a task ends: normally never, except that each proxy worker ends once a
    /// drain has closed its listeners and its connections.
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }

    /// Drains: `/readyz` fails at once; streams are still accepted for `delay`; then the
    /// listener closes and open streams are closed spread over the window, each after a
    /// `retry:` hint at an event boundary. Returns when every stream has ended or at the
    /// grace period, whichever is first; `ssegate_drain_streams_remaining` follows progress.
    pub async fn drain(&mut self, cfg: DrainConfig) -> DrainOutcome {
        let started = tokio::time::Instant::now();
        self.ready.set_draining();
        let window = cfg.effective_window();
        let plan = self.drain.begin(cfg.delay, window);
        self.metrics.set_drain_streams_remaining(plan.streams);
        tracing::info!(
            streams = plan.streams,
            delay = ?cfg.delay,
            window = ?window,
            grace_period = ?cfg.grace_period,
            "draining: /readyz fails; streams will be closed over the drain window"
        );
        let deadline = started + cfg.grace_period;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let left = loop {
            tick.tick().await;
            let open = self.drain.open_streams();
            self.metrics.set_drain_streams_remaining(open);
            let now = tokio::time::Instant::now();
            if (now >= plan.start && open == 0) || now >= deadline {
                break open;
            }
        };
        if left > 0 {
            tracing::warn!(
                streams = left,
                "grace period over; exiting with streams open"
            );
        } else {
            tracing::info!(streams = plan.streams, "drained");
        }
        DrainOutcome {
            streams_at_start: plan.streams,
            streams_left: left,
        }
    }

    /// Stops gracefully: in cluster mode the leader releases its Lease (bounded wait), so
    /// another replica takes over without waiting out the lease duration.
    pub async fn shutdown(mut self) {
        if let Some((tx, task)) = self.shutdown.take() {
            tx.send_replace(true);
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        if let Some(w) = &self.workers {
            w.stop();
        }
        self.tasks.abort_all();
    }
}

/// Settings of cluster mode (`ssegate run` without `--config`).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Watch one namespace; `None` watches all.
    pub namespace: Option<String>,
    /// Leader election.
    pub lease: LeaseConfig,
}

/// Reads the `--default-cert` pair, if given.
fn default_cert(cfg: &ServerConfig) -> anyhow::Result<Option<Arc<rustls::sign::CertifiedKey>>> {
    let Some((cert, key)) = &cfg.default_cert else {
        return Ok(None);
    };
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let pair = tls::parse_key_pair(&read(cert)?, &read(key)?).with_context(|| {
        format!(
            "--default-cert {} / --default-key {}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Some(Arc::new(pair)))
}

/// The proxy's listening sockets.
enum ProxySockets {
    /// `workers: 0`: served by tasks on the caller's runtime.
    Local {
        plain: TcpListener,
        tls: Option<TcpListener>,
    },
    /// One socket per address on each worker; listener 0 is the plain one, 1 the TLS one.
    Workers(WorkersBuilder),
}

/// Starts serving the plain listener and, if bound, the TLS listener (same table, limits
/// and drain; `X-Forwarded-Proto: https`; certificates from the table's store). Returns the
/// worker threads, if any; each worker's end is also a task in `tasks`.
fn spawn_proxies(
    tasks: &mut JoinSet<()>,
    proxy: Proxy,
    sockets: ProxySockets,
    fallback: Option<Arc<rustls::sign::CertifiedKey>>,
    with_tls: bool,
) -> anyhow::Result<Option<Workers>> {
    let tls = with_tls.then(|| {
        let resolver = tls::SniResolver::new(TableCerts(proxy.table().clone()), fallback);
        let acceptor = TlsAcceptor::from(tls::server_config(Arc::new(resolver)));
        (Arc::new(proxy.for_tls()), acceptor)
    });
    let proxy = Arc::new(proxy);
    match sockets {
        ProxySockets::Local { plain, tls: socket } => {
            if let (Some(socket), Some((tls_proxy, acceptor))) = (socket, tls) {
                tasks.spawn(tls_proxy.serve_tls(socket, acceptor));
            }
            tasks.spawn(proxy.serve(plain));
            Ok(None)
        }
        ProxySockets::Workers(builder) => {
            let (workers, done) = builder.start(move |i, socket| {
                let proxy = proxy.clone();
                let tls = tls.clone();
                async move {
                    match (i, tls) {
                        (0, _) => proxy.serve(socket).await,
                        (_, Some((tls_proxy, acceptor))) => {
                            tls_proxy.serve_tls(socket, acceptor).await
                        }
                        (_, None) => unreachable!("listener 1 is the TLS one"),
                    }
                }
            })?;
            for worker in done {
                tasks.spawn(async move {
                    let _ = worker.await;
                });
            }
            Ok(Some(workers))
        }
    }
}

/// The standalone source's callback: publish a good load, keep the last table on a bad one.
fn on_load(publisher: &mut Publisher, result: Result<Loaded, Vec<LoadError>>) {
    match result {
        Ok(loaded) => {
            publisher.publish(&loaded.snapshot, |key| {
                loaded.route_origin(key).map(|p| p.display().to_string())
            });
        }
        Err(errors) => {
            publisher.reject();
            for e in &errors {
                tracing::error!(path = %e.path.display(), reason = %e.reason, "invalid configuration file; keeping the last good routing table");
            }
        }
    }
}

/// The listeners, bound before anything else starts so a busy port fails at once.
struct Listeners {
    proxy: ProxySockets,
    admin_listener: TcpListener,
    fallback: Option<Arc<rustls::sign::CertifiedKey>>,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let listen_err = || format!("cannot listen on {}", cfg.listen);
        let tls_err = |a: &SocketAddr| format!("cannot listen on {a} (TLS)");
        let (proxy, proxy_addr, tls_addr) = if cfg.workers == 0 {
            let plain = workers::bind_local(cfg.listen).with_context(listen_err)?;
            let tls = match cfg.listen_tls {
                Some(a) => Some(workers::bind_local(a).with_context(|| tls_err(&a))?),
                None => None,
            };
            let addrs = (
                plain.local_addr()?,
                tls.as_ref().map(|t| t.local_addr()).transpose()?,
            );
            (ProxySockets::Local { plain, tls }, addrs.0, addrs.1)
        } else {
            let mut builder = WorkersBuilder::new(cfg.workers)?;
            let proxy_addr = builder.listen(cfg.listen).with_context(listen_err)?;
            let tls_addr = match cfg.listen_tls {
                Some(a) => Some(builder.listen(a).with_context(|| tls_err(&a))?),
                None => None,
            };
            (ProxySockets::Workers(builder), proxy_addr, tls_addr)
        };
        let admin_listener = TcpListener::bind(cfg.admin)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", cfg.admin))?;
        Ok(Listeners {
            proxy,
            admin_addr: admin_listener.local_addr()?,
            admin_listener,
            fallback: default_cert(cfg)?,
            proxy_addr,
            tls_addr,
        })
    }
}

/// What both modes start with: metrics, readiness, the shared routing table, the drain
/// signal and the listeners (bound first, so a busy port fails at once).
struct Core {
    metrics: Metrics,
    ready: Readiness,
    table: SharedTable,
    drain: Drain,
    listeners: Listeners,
}

impl Core {
    async fn new(cfg: &ServerConfig) -> anyhow::Result<Self> {
        Ok(Core {
            metrics: Metrics::new(),
            ready: Readiness::default(),
            table: Arc::new(ArcSwap::from_pointee(RouteTable::empty())),
            drain: Drain::new(),
            listeners: Listeners::bind(cfg).await?,
        })
    }

    /// A publisher into this core's table, with `compile` settings.
    fn publisher(&self, compile: CompileOptions) -> Publisher {
        Publisher::new(
            self.table.clone(),
            compile,
            self.metrics.clone(),
            self.ready.clone(),
        )
    }

    /// With a TLS listener, `--default-cert` and no `--default-cert-secret`: the files to
    /// serve as the Secret [`files::DEFAULT_CERT_SECRET`], which `compile` is pointed at (so
    /// an edited pair is reloaded like any Secret, and a bad edit keeps the last good one),
    /// instead of the pair read once at bind time.
    fn default_cert_as_secret(
        &mut self,
        cfg: &ServerConfig,
        compile: &mut CompileOptions,
    ) -> Option<files::DefaultCertFiles> {
        let files = cfg.default_cert.clone().filter(|_| {
            self.listeners.tls_addr.is_some() && compile.default_cert_secret.is_none()
        })?;
        let (ns, name) = files::DEFAULT_CERT_SECRET;
        compile.default_cert_secret = Some(format!("{ns}/{name}"));
        self.listeners.fallback = None;
        Some(files)
    }

    /// Starts the admin server and the proxies (TLS with `listeners.fallback` as the
    /// certificate of last resort). Returns the running handle; the caller adds its
    /// source's tasks to it.
    fn serve(self, cfg: &ServerConfig) -> anyhow::Result<Running> {
        let Core {
            metrics,
            ready,
            table,
            drain,
            listeners,
        } = self;
        let mut tasks = JoinSet::new();
        tasks.spawn(admin::serve(
            listeners.admin_listener,
            metrics.clone(),
            ready.clone(),
        ));
        let workers = spawn_proxies(
            &mut tasks,
            Proxy::new(
                table.clone(),
                cfg.proxy.clone(),
                metrics.clone(),
                drain.clone(),
            ),
            listeners.proxy,
            listeners.fallback,
            listeners.tls_addr.is_some(),
        )?;
        Ok(Running {
            proxy_addr: listeners.proxy_addr,
            admin_addr: listeners.admin_addr,
            tls_addr: listeners.tls_addr,
            metrics,
            ready,
            table,
            drain,
            tasks,
            workers,
            shutdown: None,
        })
    }
}

/// Starts ssegate on manifests in `dir`: binds both listeners (failing fast if it cannot),
/// loads the directory, and keeps watching it.
pub async fn start_standalone(dir: PathBuf, cfg: ServerConfig) -> anyhow::Result<Running> {
    anyhow::ensure!(dir.is_dir(), "--config {}: not a directory", dir.display());
    let mut core = Core::new(&cfg).await?;

    // The --default-cert pair (checked at bind time) is re-read with every load.
    let mut compile = cfg.compile.clone();
    let default_cert = core.default_cert_as_secret(&cfg, &mut compile);
    let mut publisher = core.publisher(compile);
    // The first load happens before serving, so the first request sees the configuration.
    let (fp, first) = files::load_dir_fingerprinted(&dir, default_cert.as_ref());
    on_load(&mut publisher, first);

    let mut running = core.serve(&cfg)?;
    running.tasks.spawn(files::watch(
        dir,
        default_cert,
        Some(fp),
        cfg.reload_poll,
        cfg.reload_debounce,
        move |r| on_load(&mut publisher, r),
    ));
    tracing::info!(proxy_addr = %running.proxy_addr, tls_addr = ?running.tls_addr, admin_addr = %running.admin_addr, workers = cfg.workers, "ssegate started");
    Ok(running)
}

/// Starts ssegate against an API server: binds both listeners, then watches the cluster.
/// Returns at once; `/readyz` turns ready when every watch has listed and the first table is
/// published. All replicas route; the one holding the Lease writes route statuses.
pub async fn start_cluster(
    client: kube::Client,
    cluster: ClusterConfig,
    cfg: ServerConfig,
) -> anyhow::Result<Running> {
    let mut core = Core::new(&cfg).await?;
    // The --default-cert pair (checked at bind time) is re-read whenever the files change.
    let mut compile = cfg.compile.clone();
    let default_cert = match core.default_cert_as_secret(&cfg, &mut compile) {
        Some(files) => {
            let mut cert_watch = files::DefaultCertWatch::new(files);
            let first = cert_watch.read().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (tx, rx) = watch::channel(vec![first]);
            Some(((cert_watch, tx), rx))
        }
        None => None,
    };
    let (default_cert_watch, extra_secrets) = default_cert.unzip();
    let publisher = core.publisher(compile);
    let (status_tx, status_rx) = watch::channel(Arc::new(Vec::new()));
    let (leader_tx, leader_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut running = core.serve(&cfg)?;
    let metrics = running.metrics.clone();
    running.tasks.spawn(kube_source::run(
        client.clone(),
        KubeSourceConfig {
            namespace: cluster.namespace.clone(),
            debounce: cfg.reload_debounce,
            max_delay: Duration::from_secs(1),
            class: cfg.compile.class.clone(),
            extra_secrets,
        },
        publisher,
        status_tx,
    ));
    if let Some((cert_watch, tx)) = default_cert_watch {
        running.tasks.spawn(files::watch_default_cert(
            cert_watch,
            cfg.reload_poll,
            tx,
            metrics.clone(),
        ));
    }
    running.tasks.spawn(writer::run(
        client.clone(),
        status_rx,
        leader_rx,
        metrics.clone(),
    ));
    let lease = cluster.lease.clone();
    let leader_task = tokio::spawn(leader::run(
        client,
        cluster.lease,
        leader_tx,
        metrics,
        shutdown_rx,
    ));
    running.shutdown = Some((shutdown_tx, leader_task));
    tracing::info!(proxy_addr = %running.proxy_addr, tls_addr = ?running.tls_addr, admin_addr = %running.admin_addr, workers = cfg.workers, lease = %format!("{}/{}", lease.namespace, lease.name), identity = %lease.identity, "ssegate started (cluster mode)");
    Ok(running)
}
