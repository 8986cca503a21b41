//! The four scenarios, each run against every target in turn on a freshly started process:
//!
//! - (a) bulk: few streams, upstream as fast as it can → events per proxy CPU-second;
//! - (b) latency: many streams × 1 event/s → proxy CPU µs per event, added latency;
//! - (c) scale: idle (`/hold`) streams up to the fd limit → RSS per stream, time to establish;
//! - (d) reload: (b) while the configuration changes 100 times → streams dropped, latency.
//!
//! CPU and RSS are the target process tree's own (see [`crate::procfs`]), never wall
//! throughput, because the machine is shared.
//!
//! (a) and (b) can run in several rounds ([`Plan::rounds`]): every target once per round, in
//! turn, so a burst of noise from a shared host lands on one round of one target instead of
//! deciding a comparison. Each target's row is then its median round (see [`median_round`]).

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
    /// (a) and (b): how many times each target runs, interleaved with the others.
    pub rounds: u32,
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
    /// (a) every round's rows (round, then target order); `bulk` holds their medians.
    pub bulk_rounds: Vec<Vec<Row>>,
    /// (b) every round's rows; `latency` holds their medians.
    pub latency_rounds: Vec<Vec<Row>>,
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
        let rounds = if matches!(sc, 'a' | 'b') {
            plan.rounds.max(1)
        } else {
            1
        };
        let mut all: Vec<Vec<Row>> = Vec::new();
        for round in 1..=rounds {
            let mut rows = Vec::new();
            for &kind in &plan.targets {
                if sc == 'd' && !matches!(kind, Kind::Ssegate | Kind::Nginx) {
                    continue;
                }
                let of = if rounds > 1 {
                    format!(" (round {round} of {rounds})")
                } else {
                    String::new()
                };
                eprintln!("[{sc}] {}{of} ...", kind.name());
                let row = run_one(sc, kind, plan, env).await;
                eprintln!("[{sc}] {}{of} done: {:?}", kind.name(), summary(&row));
                rows.push(row);
            }
            all.push(rows);
        }
        let key: fn(&Row) -> Option<f64> = match sc {
            'a' => Row::events_per_cpu_s,
            _ => Row::cpu_us_per_event,
        };
        let merged: Vec<Row> = (0..all.first().map_or(0, Vec::len))
            .map(|i| median_round(&all.iter().map(|r| r[i].clone()).collect::<Vec<_>>(), key))
            .collect();
        match sc {
            'a' => {
                res.bulk = merged;
                res.bulk_rounds = all;
            }
            'b' => {
                res.latency = merged;
                res.latency_rounds = all;
            }
            'c' => res.scale = merged,
            _ => res.reload = merged,
        }
    }
    res
}

/// One scenario on a freshly started target.
async fn run_one(sc: char, kind: Kind, plan: &Plan, env: &Env) -> Row {
    match targets::start(kind, env).await {
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
    }
}

/// One target's rounds as one row: the median round by `key` (its counters, CPU and wall
/// time, so the row's own figures stay consistent), with the latency and time-to-first-event
/// percentiles replaced by their medians over the rounds, and every round's problems kept:
/// failed, dropped, missing and repeated counts are summed and errors collected, so a
/// problem in any round shows. A round that could not run is an error of the row; a target
/// no round ran stays skipped.
pub fn median_round(rows: &[Row], key: fn(&Row) -> Option<f64>) -> Row {
    let ran: Vec<&Row> = rows.iter().filter(|r| r.skipped.is_none()).collect();
    let Some(&first) = ran.first() else {
        return rows.first().cloned().unwrap_or_default();
    };
    if rows.len() == 1 {
        return first.clone();
    }
    let mut by_key = ran.clone();
    // Rounds without the figure (no events, no CPU reading) sort last.
    by_key.sort_by(|a, b| match (key(a), key(b)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let mut row = by_key[(by_key.len() - 1) / 2].clone();
    row.latency = median_each(ran.iter().filter_map(|r| r.latency));
    row.first_event = median_each(ran.iter().filter_map(|r| r.first_event));
    let c = &mut row.counters;
    c.failed = ran.iter().map(|r| r.counters.failed).sum();
    c.dropped = ran.iter().map(|r| r.counters.dropped).sum();
    c.gaps = ran.iter().map(|r| r.counters.gaps).sum();
    c.dups = ran.iter().map(|r| r.counters.dups).sum();
    row.errors.clear();
    for (i, r) in rows.iter().enumerate() {
        if let Some(why) = &r.skipped {
            row.errors.push(format!("round {} not run: {why}", i + 1));
        }
        for e in &r.errors {
            if !row.errors.contains(e) {
                row.errors.push(e.clone());
            }
        }
    }
    row
}

/// Element-wise (lower) median of equally long arrays; None for none.
fn median_each<const N: usize>(values: impl Iterator<Item = [u64; N]>) -> Option<[u64; N]> {
    let values: Vec<[u64; N]> = values.collect();
    if values.is_empty() {
        return None;
    }
    Some(std::array::from_fn(|k| {
        let mut col: Vec<u64> = values.iter().map(|v| v[k]).collect();
        col.sort_unstable();
        col[(col.len() - 1) / 2]
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn round(cpu: f64, events: u64, p99: u64, dropped: u64) -> Row {
        Row {
            target: "ssegate".into(),
            counters: Counters {
                events,
                dropped,
                ..Counters::default()
            },
            cpu_s: Some(cpu),
            latency: Some([1, p99, 100]),
            first_event: Some([5, p99 * 2]),
            ..Row::default()
        }
    }

    #[test]
    fn the_median_round_keeps_its_own_figures_and_every_rounds_problems() {
        let rows = [
            round(3.0, 1000, 30, 0),
            round(1.0, 1000, 10, 2),
            round(2.0, 1000, 50, 0),
        ];
        let m = median_round(&rows, Row::cpu_us_per_event);
        // The 2 ms/1000-event round is the median by CPU per event.
        assert_eq!(m.cpu_s, Some(2.0));
        assert_eq!(m.cpu_us_per_event(), Some(2000.0));
        // Percentiles: medians over the rounds, each on its own.
        assert_eq!(m.latency, Some([1, 30, 100]));
        assert_eq!(m.first_event, Some([5, 60]));
        // The drops of round 2 are not hidden by picking round 3.
        assert_eq!(m.counters.dropped, 2);
    }

    #[test]
    fn a_round_that_did_not_run_is_an_error_and_no_run_at_all_stays_skipped() {
        let skipped = Row::skipped(Kind::Nginx, "not installed".into());
        let mut ran = round(1.0, 10, 1, 0);
        ran.target = "nginx".into();
        let m = median_round(&[skipped.clone(), ran], Row::cpu_us_per_event);
        assert!(m.skipped.is_none());
        assert_eq!(m.errors, vec!["round 1 not run: not installed".to_string()]);
        let m = median_round(&[skipped.clone(), skipped], Row::cpu_us_per_event);
        assert_eq!(m.skipped.as_deref(), Some("not installed"));
    }

    #[test]
    fn one_round_is_passed_through() {
        let r = round(1.0, 10, 7, 1);
        let m = median_round(std::slice::from_ref(&r), Row::cpu_us_per_event);
        assert_eq!(m.latency, r.latency);
        assert_eq!(m.counters.dropped, 1);
    }
}
