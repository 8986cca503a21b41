//! `ssegate-load`: the SSE upstream, the load generator and the side-by-side benchmark of
//! ssegate against the direct upstream and nginx, haproxy and caddy. See benches/README.md.
//!
//! ```text
//! ssegate-load full  --ssegate target/release/ssegate     # all scenarios, markdown table
//! ssegate-load smoke --ssegate target/release/ssegate     # seconds; ssegate + direct only
//! ssegate-load upstream --listen 127.0.0.1:9100           # the SSE upstream alone
//! ssegate-load clients --target 127.0.0.1:8080 --path '/sse?rate=1' --streams 1000
//! ```

mod client;
mod hist;
mod procfs;
mod report;
mod scenarios;
mod sse;
mod targets;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use scenarios::{Plan, Results};
use targets::{Env, Kind};

#[derive(Parser)]
#[command(
    name = "ssegate-load",
    about = "SSE upstream, load generator and proxy benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every scenario against every available target; prints markdown tables.
    Full(FullArgs),
    /// A seconds-long run with tiny numbers against ssegate and the direct upstream; fails
    /// on any error, dropped stream or id gap (not on any timing).
    Smoke(CommonArgs),
    /// Run the SSE upstream only.
    Upstream {
        /// Address to listen on (repeatable).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Open streams against an address and print counters (and the last second's latency
    /// percentiles) every second.
    Clients {
        /// Address to connect to.
        #[arg(long)]
        target: SocketAddr,
        /// Request path, e.g. `/sse?rate=1&size=128`.
        #[arg(long, default_value = "/sse?rate=1")]
        path: String,
        /// Concurrent streams.
        #[arg(long, default_value_t = 100)]
        streams: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
}

#[derive(Args, Clone)]
struct CommonArgs {
    /// The ssegate binary to measure.
    #[arg(long, default_value = "target/release/ssegate")]
    ssegate: PathBuf,
    /// Scratch directory for generated configs and logs (default: a fresh temp dir).
    #[arg(long)]
    work: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct FullArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Targets, comma-separated (those not installed are reported as not run).
    #[arg(
        long,
        default_value = "ssegate,direct,nginx,haproxy,caddy",
        value_delimiter = ','
    )]
    targets: Vec<String>,
    /// Scenarios, comma-separated: a (bulk), b (latency), c (scale), d (reload).
    #[arg(long, default_value = "a,b,c,d", value_delimiter = ',')]
    scenarios: Vec<char>,
    /// (a) streams.
    #[arg(long, default_value_t = 50)]
    bulk_streams: usize,
    /// (a) measured seconds.
    #[arg(long, default_value_t = 10.0)]
    bulk_secs: f64,
    /// (a) events per upstream write.
    #[arg(long, default_value_t = 64)]
    bulk_batch: u32,
    /// (a)/(b) event size, bytes.
    #[arg(long, default_value_t = 128)]
    event_size: usize,
    /// (b)/(d) streams.
    #[arg(long, default_value_t = 2000)]
    latency_streams: usize,
    /// (b) measured seconds.
    #[arg(long, default_value_t = 20.0)]
    latency_secs: f64,
    /// (c) idle streams wanted; capped by what `ulimit -Hn` allows a proxy (2 fds a stream).
    #[arg(long, default_value_t = 100_000)]
    scale_streams: usize,
    /// (d) configuration changes.
    #[arg(long, default_value_t = 100)]
    reloads: u32,
    /// (d) milliseconds between changes.
    #[arg(long, default_value_t = 200)]
    reload_interval_ms: u64,
    /// (a) and (b): rounds; each target runs once per round, in turn, and its table row is
    /// its median round (a shared machine's bursts of noise then decide no comparison).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// Streams a proxy can hold under an fd limit: two sockets each, plus a reserve.
fn streams_for_fd_limit(limit: u64) -> usize {
    (limit.saturating_sub(200) / 2) as usize
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let fd_limit = client::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Upstream { listen } => rt.block_on(async {
            let ls = upstream::bind(&listen).await?;
            eprintln!("upstream listening on {listen:?} (fd limit {fd_limit})");
            upstream::serve(ls).await?;
            Ok(())
        }),
        Cmd::Clients {
            target,
            path,
            streams,
            secs,
        } => rt.block_on(clients(target, path, streams, secs)),
        Cmd::Full(a) => {
            let wanted = a.scale_streams;
            let scale = wanted.min(streams_for_fd_limit(fd_limit));
            let plan = Plan {
                targets: a
                    .targets
                    .iter()
                    .map(|t| Kind::parse(t).with_context(|| format!("unknown target {t}")))
                    .collect::<anyhow::Result<_>>()?,
                scenarios: a.scenarios.clone(),
                bulk_streams: a.bulk_streams,
                bulk_secs: a.bulk_secs,
                event_size: a.event_size,
                bulk_batch: a.bulk_batch,
                latency_streams: a.latency_streams,
                latency_rate: 1,
                latency_secs: a.latency_secs,
                warmup_secs: 2.0,
                scale_streams: scale,
                reloads: a.reloads,
                reload_interval: Duration::from_millis(a.reload_interval_ms),
                source_ips: 250,
                rounds: a.rounds,
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let (res, env) = rt.block_on(run(&plan, &a.common, fd_limit))?;
            println!("{}", header(&env, &plan, fd_limit, wanted, &command));
            println!("{}", report::tables(&res));
            let min = if scale >= 9_900 { 9_500 } else { scale };
            println!(
                "{}",
                report::verdict_table(&report::verdicts(&res, min.min(scale)))
            );
            Ok(())
        }
        Cmd::Smoke(common) => {
            let plan = Plan {
                targets: vec![Kind::Ssegate, Kind::Direct],
                scenarios: vec!['a', 'b', 'c', 'd'],
                bulk_streams: 4,
                bulk_secs: 1.0,
                event_size: 128,
                bulk_batch: 16,
                latency_streams: 50,
                latency_rate: 10,
                latency_secs: 1.0,
                warmup_secs: 0.3,
                scale_streams: 200.min(streams_for_fd_limit(fd_limit)),
                reloads: 5,
                reload_interval: Duration::from_millis(150),
                source_ips: 4,
                // Two, so that the rounds and their medians are exercised too.
                rounds: 2,
            };
            let (res, env) = rt.block_on(run(&plan, &common, fd_limit))?;
            println!(
                "{}",
                header(&env, &plan, fd_limit, plan.scale_streams, "smoke")
            );
            println!("{}", report::tables(&res));
            check_smoke(&res, &plan)
        }
    }
}

/// Fails unless every target served every scenario cleanly.
fn check_smoke(res: &Results, plan: &Plan) -> anyhow::Result<()> {
    let mut bad = vec![];
    let all = [
        ("a", &res.bulk),
        ("b", &res.latency),
        ("c", &res.scale),
        ("d", &res.reload),
    ];
    for (sc, rows) in all {
        if rows.is_empty() {
            bad.push(format!("({sc}): no rows"));
        }
        for r in rows.iter() {
            let c = r.counters;
            let who = format!("({sc}) {}", r.target);
            if let Some(s) = &r.skipped {
                bad.push(format!("{who}: not run: {s}"));
                continue;
            }
            if c.failed + c.dropped + c.gaps + c.dups > 0 || !r.errors.is_empty() {
                // (Errors include a round that could not run.)
                bad.push(format!("{who}: {c:?} {:?}", r.errors));
            }
            if sc != "c" && c.events == 0 {
                bad.push(format!("{who}: no events"));
            }
            if sc == "c" && (c.opened as usize) < plan.scale_streams {
                bad.push(format!("{who}: only {} streams opened", c.opened));
            }
            if sc != "c" && r.target == "ssegate" && r.cpu_s.is_none() {
                bad.push(format!("{who}: no CPU figure"));
            }
            if sc == "d" && r.reloads.and_then(|(_, seen)| seen).unwrap_or(0) == 0 {
                bad.push(format!("{who}: ssegate reported no reload"));
            }
        }
    }
    if bad.is_empty() {
        println!("smoke: ok");
        Ok(())
    } else {
        bail!("smoke failed:\n{}", bad.join("\n"))
    }
}

fn header(env: &Env, plan: &Plan, fd_limit: u64, wanted: usize, command: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut versions = String::new();
    for k in &plan.targets {
        versions.push_str(&format!(
            "{}: {}; ",
            k.name(),
            k.version(&env.ssegate_bin)
                .unwrap_or_else(|| "not installed".into())
        ));
    }
    format!(
        "## ssegate-load\n\n- command: `{command}`\n- machine: {cpu}, {cores} cores, fd limit (ulimit -Hn) {fd_limit}\n- versions: {versions}\n- (a) {} streams × unthrottled, {} B events, {} per write, {} s; (b) {} streams × {} ev/s, {} B events, {} s; (c) {} idle streams (asked {wanted}); (d) {} changes every {} ms during (b); (a) and (b) in {} round(s), each target's median round shown\n",
        plan.bulk_streams,
        plan.event_size,
        plan.bulk_batch,
        plan.bulk_secs,
        plan.latency_streams,
        plan.latency_rate,
        plan.event_size,
        plan.latency_secs,
        plan.scale_streams,
        plan.reloads,
        plan.reload_interval.as_millis(),
        plan.rounds.max(1)
    )
}

/// Starts the upstream process and runs the plan.
async fn run(plan: &Plan, common: &CommonArgs, fd_limit: u64) -> anyhow::Result<(Results, Env)> {
    let max_streams = plan
        .scale_streams
        .max(plan.latency_streams)
        .max(plan.bulk_streams);
    anyhow::ensure!(
        common.ssegate.is_file(),
        "{}: no such file (build it: cargo build --release --bin ssegate)",
        common.ssegate.display()
    );
    let ssegate_bin = std::fs::canonicalize(&common.ssegate)?;
    let _tmp;
    let work = match &common.work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            let dir = std::env::temp_dir().join(format!("ssegate-load-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            _tmp = RemoveOnDrop(dir.clone());
            dir
        }
    };
    // One upstream address per 20,000 streams keeps the proxies' upstream connections
    // (one source address) within one ephemeral port range per destination.
    let port = targets::free_port()?;
    let upstreams: Vec<SocketAddr> = (0..max_streams.div_ceil(20_000).max(1))
        .map(|i| {
            if i == 0 {
                SocketAddr::from(([127, 0, 0, 1], port))
            } else {
                SocketAddr::from(([127, 0, 1, i as u8 + 1], port))
            }
        })
        .collect();
    let _upstream = start_upstream(&upstreams, &work).await?;
    let env = Env {
        work,
        upstreams,
        ssegate_bin,
        max_streams,
        fd_limit,
    };
    eprintln!(
        "fd limit {fd_limit}; upstream on {:?}; work dir {}",
        env.upstreams,
        env.work.display()
    );
    let res = scenarios::run(plan, &env).await;
    Ok((res, env))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_upstream(
    addrs: &[SocketAddr],
    work: &std::path::Path,
) -> anyhow::Result<KillOnDrop> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("upstream");
    for a in addrs {
        cmd.arg("--listen").arg(a.to_string());
    }
    let log = std::fs::File::create(work.join("upstream.log"))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the upstream")?;
    let child = KillOnDrop(child);
    for _ in 0..100 {
        if client::probe(addrs[0], "/sse?count=1", Duration::from_secs(1))
            .await
            .is_ok()
        {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the upstream did not start")
}

async fn clients(
    target: SocketAddr,
    path: String,
    streams: usize,
    secs: u64,
) -> anyhow::Result<()> {
    let load = client::Load::start(client::LoadConfig {
        target,
        path,
        streams,
        ramp: Duration::from_secs(1),
        max_opening: 256,
        source_ips: 250,
        reconnect: true,
        header_timeout: Duration::from_secs(30),
    });
    load.stats
        .recording
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Percentiles of the last second only.
        let lat = load.stats.latency.snapshot();
        load.stats.latency.reset();
        println!(
            "{:?} latency p50 {:?} ns p99 {:?} ns",
            load.stats.counters(),
            lat.quantile(0.5),
            lat.quantile(0.99)
        );
    }
    for e in load.stats.errors() {
        println!("error: {e}");
    }
    load.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_to_streams() {
        assert_eq!(streams_for_fd_limit(20_000), 9_900);
        assert_eq!(streams_for_fd_limit(1_048_576), 524_188);
        assert_eq!(streams_for_fd_limit(100), 0);
    }
}
