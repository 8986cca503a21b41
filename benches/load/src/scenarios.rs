//! The four scenarios, each run against every target in turn on a freshly started process:
//!
//! - (a) bulk: few streams, upstream as fast as it can → events per proxy CPU-second;
//! - (b) latency: many streams × 1 event/s → proxy CPU µs per event, added latency;
//! - (c) scale: idle (`/hold`) streams up to the fd limit → RSS per stream, time to establish;
//! - (d) reload: (b) while the configuration changes 100 times → streams dropped, latency.
//!
//! CPU and RSS are the target process tree's own (see [`crate::procfs`]), never wall
//! throughput, because the machine is shared.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::{Counters, Load, LoadConfig};
use crate::procfs;
use crate::targets::{self, Env, Kind, Running};

/// Sizes and durations of one run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Systems to run, in order.
    pub targets: Vec<Kind>,
    /// Scenarios to run: any of `a`, `b`, `c`, `d`.
    pub scenarios: Vec<char>,
    /// (a) streams.
    pub bulk_streams: usize,
    /// (a) measured seconds.
    pub bulk_secs: f64,
    /// (a) and (b) event size in bytes.
    pub event_size: usize,
    /// (a) events per upstream write.
    pub bulk_batch: u32,
    /// (b)/(d) streams.
    pub latency_streams: usize,
    /// (b)/(d) events per second per stream.
    pub latency_rate: u32,
    /// (b) measured seconds.
    pub latency_secs: f64,
    /// (b)/(d) seconds between all streams open and the start of measuring.
    pub warmup_secs: f64,
    /// (c) idle streams.
    pub scale_streams: usize,
    /// (d) configuration changes.
    pub reloads: u32,
    /// (d) time between changes.
    pub reload_interval: Duration,
    /// Source addresses used by the client.
    pub source_ips: u8,
}

/// Outcome of one scenario on one target.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Target name.
    pub target: String,
    /// Set when the target could not be run; the other fields are then empty.
    pub skipped: Option<String>,
    /// Client counters over the measured window (scale: over the whole run).
    pub counters: Counters,
    /// Wall seconds of the measured window.
    pub wall_s: f64,
    /// Target CPU seconds in the window (None: direct).
    pub cpu_s: Option<f64>,
    /// Latency percentiles in the window, ns: p50, p99, max.
    pub latency: Option<[u64; 3]>,
    /// Time to first event, ns: p50, p99.
    pub first_event: Option<[u64; 2]>,
    /// RSS before opening streams and with them all open, KiB.
    pub rss_kib: Option<(u64, u64)>,
    /// (c) seconds from the first connect until every stream had its headers.
    pub establish_s: Option<f64>,
    /// (c) streams wanted.
    pub wanted: usize,
    /// (d) configuration changes made and reloads the target reported.
    pub reloads: Option<(u32, Option<u64>)>,
    /// First few client errors.
    pub errors: Vec<String>,
}

impl Row {
    fn skipped(kind: Kind, why: String) -> Row {
        Row {
            target: kind.name().into(),
            skipped: Some(why),
            ..Row::default()
        }
    }

    /// Events per target CPU-second.
    pub fn events_per_cpu_s(&self) -> Option<f64> {
        self.cpu_s
            .filter(|c| *c > 0.0)
            .map(|c| self.counters.events as f64 / c)
    }

    /// Target CPU microseconds per event.
    pub fn cpu_us_per_event(&self) -> Option<f64> {
        let c = self.cpu_s?;
        (self.counters.events > 0).then(|| c * 1e6 / self.counters.events as f64)
    }

    /// RSS growth per open stream, bytes.
    pub fn rss_per_stream(&self) -> Option<f64> {
        let (base, full) = self.rss_kib?;
        let n = self.counters.opened;
        (n > 0).then(|| (full.saturating_sub(base) as f64 * 1024.0) / n as f64)
    }
}

/// Everything a run measured.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// (a)
    pub bulk: Vec<Row>,
    /// (b)
    pub latency: Vec<Row>,
    /// (c)
    pub scale: Vec<Row>,
    /// (d)
    pub reload: Vec<Row>,
}

fn load_cfg(plan: &Plan, target: SocketAddr, path: String, streams: usize) -> LoadConfig {
    LoadConfig {
        target,
        path,
        streams,
        ramp: Duration::ZERO,
        max_opening: 256,
        source_ips: plan.source_ips,
        reconnect: false,
        header_timeout: Duration::from_secs(30),
    }
}

fn cpu(t: &Running) -> Option<f64> {
    t.pid().map(|p| procfs::sample(p).cpu_s)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Runs every scenario of `plan` against every target, printing progress to stderr.
pub async fn run(plan: &Plan, env: &Env) -> Results {
    let mut res = Results::default();
    for &sc in &plan.scenarios {
        for &kind in &plan.targets {
            if sc == 'd' && !matches!(kind, Kind::Ssegate | Kind::Nginx) {
                continue;
            }
            eprintln!("[{sc}] {} ...", kind.name());
            let row = match targets::start(kind, env).await {
                Err(e) => Row::skipped(kind, format!("{e:#}")),
                Ok(t) => {
                    let row = match sc {
                        'a' => bulk(plan, &t).await,
                        'b' => latency(plan, &t).await,
                        'c' => scale(plan, &t).await,
                        _ => reload(plan, env, &t).await,
                    };
                    t.stop();
                    row
                }
            };
            eprintln!("[{sc}] {} done: {:?}", kind.name(), summary(&row));
            match sc {
                'a' => res.bulk.push(row),
                'b' => res.latency.push(row),
                'c' => res.scale.push(row),
                _ => res.reload.push(row),
            }
        }
    }
    res
}

fn summary(r: &Row) -> String {
    if let Some(s) = &r.skipped {
        return format!("skipped: {s}");
    }
    format!(
        "{:?} cpu={:?} lat={:?} rss={:?} errors={:?}",
        r.counters, r.cpu_s, r.latency, r.rss_kib, r.errors
    )
}

/// A measurement window on a running load, from [`Window::open`] to [`Window::close`].
struct Window {
    c0: Counters,
    cpu0: Option<f64>,
    t0: Instant,
}

impl Window {
    /// Starts recording latency (from zero) and notes the counters, CPU and time.
    fn open(load: &Load, t: &Running) -> Self {
        load.stats.latency.reset();
        load.stats
            .recording
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Window {
            c0: load.stats.counters(),
            cpu0: cpu(t),
            t0: Instant::now(),
        }
    }

    /// The window's counters, CPU and wall time up to now (latency: [`latency_quantiles`]).
    fn close(self, load: &Load, t: &Running) -> Row {
        let c1 = load.stats.counters();
        let cpu1 = cpu(t);
        let wall = self.t0.elapsed().as_secs_f64();
        Row {
            target: t.kind.name().into(),
            counters: c1 - self.c0,
            wall_s: wall,
            cpu_s: self.cpu0.zip(cpu1).map(|(a, b)| b - a),
            ..Row::default()
        }
    }
}

/// p50, p99 and max of the latency recorded since the window opened.
fn latency_quantiles(load: &Load) -> Option<[u64; 3]> {
    let lat = load.stats.latency.snapshot();
    lat.quantile(0.5)
        .map(|p50| [p50, lat.quantile(0.99).unwrap_or(p50), lat.max()])
}

/// Measures a window of `len` on a running load: counters, CPU and latency.
async fn window(load: &Load, t: &Running, len: Duration) -> Row {
    let w = Window::open(load, t);
    tokio::time::sleep(len).await;
    let mut row = w.close(load, t);
    load.stats
        .recording
        .store(false, std::sync::atomic::Ordering::SeqCst);
    row.latency = latency_quantiles(load);
    row
}

async fn bulk(plan: &Plan, t: &Running) -> Row {
    let path = format!(
        "/sse?rate=0&size={}&batch={}",
        plan.event_size, plan.bulk_batch
    );
    let load = Load::start(load_cfg(plan, t.addr, path, plan.bulk_streams));
    let all = load
        .wait_opened(plan.bulk_streams as u64, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut row = window(&load, t, secs(plan.bulk_secs)).await;
    if !all {
        row.errors.push("not every stream opened".into());
    }
    row.errors.extend(load.stats.errors());
    load.stop().await;
    row
}

async fn latency_load(plan: &Plan, t: &Running, reconnect: bool) -> (Load, bool) {
    let path = format!(
        "/sse?rate={}&size={}&batch=1",
        plan.latency_rate, plan.event_size
    );
    let mut cfg = load_cfg(plan, t.addr, path, plan.latency_streams);
    // Spread the streams over one event period so their events do not all fire at once.
    cfg.ramp = Duration::from_secs_f64(1.0 / f64::from(plan.latency_rate.max(1)));
    cfg.reconnect = reconnect;
    let load = Load::start(cfg);
    let all = load
        .wait_opened(plan.latency_streams as u64, Duration::from_secs(60))
        .await;
    tokio::time::sleep(secs(plan.warmup_secs)).await;
    (load, all)
}

fn first_event(load: &Load) -> Option<[u64; 2]> {
    let h = load.stats.first_event.snapshot();
    h.quantile(0.5)
        .map(|p50| [p50, h.quantile(0.99).unwrap_or(p50)])
}

async fn latency(plan: &Plan, t: &Running) -> Row {
    let (load, all) = latency_load(plan, t, false).await;
    let mut row = window(&load, t, secs(plan.latency_secs)).await;
    row.first_event = first_event(&load);
    if !all {
        row.errors.push("not every stream opened".into());
    }
    row.errors.extend(load.stats.errors());
    load.stop().await;
    row
}

async fn scale(plan: &Plan, t: &Running) -> Row {
    let n = plan.scale_streams;
    let rss0 = t.pid().map(|p| procfs::sample(p).rss_kib);
    let mut cfg = load_cfg(plan, t.addr, "/hold".into(), n);
    cfg.header_timeout = Duration::from_secs(60);
    let t0 = Instant::now();
    let load = Load::start(cfg);
    let all = load.wait_opened(n as u64, Duration::from_secs(180)).await;
    let establish = t0.elapsed().as_secs_f64();
    // Let allocations and lazily touched pages settle before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = t.pid().map(|p| procfs::sample(p).rss_kib);
    let counters = load.stats.counters();
    let mut errors = load.stats.errors();
    if !all {
        errors.insert(0, format!("only {} of {n} streams opened", counters.opened));
    }
    load.stop().await;
    Row {
        target: t.kind.name().into(),
        counters,
        wanted: n,
        establish_s: all.then_some(establish),
        rss_kib: rss0.zip(rss1),
        first_event: None,
        errors,
        ..Row::default()
    }
}

async fn reload(plan: &Plan, env: &Env, t: &Running) -> Row {
    let (load, all) = latency_load(plan, t, true).await;
    let reloads_before = reload_count(t).await;
    let w = Window::open(&load, t);
    let mut change_errors = vec![];
    for g in 1..=plan.reloads {
        if let Err(e) = change_config(env, t, g) {
            change_errors.push(format!("change {g}: {e:#}"));
        }
        tokio::time::sleep(plan.reload_interval).await;
    }
    // The last change still has to be picked up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut row = w.close(&load, t);
    let reloads_after = reload_count(t).await;
    row.latency = latency_quantiles(&load);
    let mut errors = change_errors;
    if !all {
        errors.push("not every stream opened".into());
    }
    errors.extend(load.stats.errors());
    load.stop().await;
    row.reloads = Some((
        plan.reloads,
        reloads_before.zip(reloads_after).map(|(a, b)| b - a),
    ));
    row.errors = errors;
    row
}

/// Reloads the target reports: ssegate's `ssegate_config_reloads_total{result="success"}`.
async fn reload_count(t: &Running) -> Option<u64> {
    let admin = t.admin?;
    let text = crate::client::get_text(admin, "/metrics").await.ok()?;
    text.lines()
        .find(|l| l.starts_with("ssegate_config_reloads_total") && l.contains("result=\"success\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// One configuration change: ssegate's directory is rewritten (a rule is added whose path
/// changes every time); nginx's config gets the same extra location and a SIGHUP.
fn change_config(env: &Env, t: &Running, generation: u32) -> anyhow::Result<()> {
    match t.kind {
        Kind::Ssegate => {
            let dir = t.config_dir.as_ref().expect("ssegate has a config dir");
            targets::write_ssegate_config(dir, &env.upstreams, Some(generation))
        }
        Kind::Nginx => {
            let dir = env.work.join("nginx");
            let mut conf =
                targets::nginx_conf(&dir, t.addr, &env.upstreams, env.max_streams, env.fd_limit);
            let extra = format!(
                "    location /generation-{generation} {{ proxy_pass http://sse; proxy_buffering off; }}\n    location / {{"
            );
            conf = conf.replacen("    location / {", &extra, 1);
            std::fs::write(dir.join("nginx.conf"), conf)?;
            let pid = t.pid().expect("nginx runs");
            // SAFETY: sends SIGHUP to the nginx master we started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
            Ok(())
        }
        _ => anyhow::bail!("{} has no reload in this bench", t.kind.name()),
    }
}
