//! Soak test of ssegate: many open streams, connect/disconnect churn and a configuration
//! reload every second, for a long time. ssegate's open file descriptors and RSS at the end
//! must be within 10% of the start (measured in steady state, after `--warmup` of the same
//! churn), no stream may have missed an event id (each reconnect resumes with
//! `Last-Event-ID`), and once every client is gone the fds must be back to idle.
//!
//! ```text
//! cargo build --release --bin ssegate --example sse-backend --example soak
//! ulimit -n 65536
//! target/release/examples/soak --streams 5000 --duration 10m     # the recorded soak
//! target/release/examples/soak --streams 300 --duration 60s      # the CI version
//! ```
//!
//! It runs the release `ssegate` and `sse-backend` as child processes (their paths next to
//! this binary), measures ssegate through `/proc/<pid>`, prints a Markdown summary and exits
//! non-zero when a check fails.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Soak test of ssegate: churn, reloads, fd/RSS stability, no event id gaps")]
struct Args {
    /// Streams kept open.
    #[arg(long, default_value_t = 5000)]
    streams: usize,
    /// How long the churn runs (Go-style duration).
    #[arg(long, default_value = "10m")]
    duration: ssegate::api::Duration,
    /// Mean lifetime of one connection before the client drops and resumes it.
    #[arg(long, default_value = "30s")]
    lifetime: ssegate::api::Duration,
    /// Time between events of one stream (the backend's `interval`).
    #[arg(long, default_value = "2s")]
    interval: ssegate::api::Duration,
    /// Churn and reloads before the start measurement (steady state).
    #[arg(long, default_value = "60s")]
    warmup: ssegate::api::Duration,
    /// Skip the configuration reloads (to isolate their cost).
    #[arg(long)]
    no_reload: bool,
    /// Allowed drift of fds and RSS, in percent.
    #[arg(long, default_value_t = 10.0)]
    tolerance: f64,
    /// Directory holding `ssegate` and `examples/sse-backend` (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    events: AtomicU64,
    gaps: AtomicU64,
    failures: AtomicU64,
    open: AtomicUsize,
}

fn free_addr() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

/// Open fds and RSS (bytes) of `pid`.
fn measure(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    (fds, rss)
}

fn route_yaml(keepalive: &str) -> String {
    format!(
        "apiVersion: ssegate.io/v1alpha1\nkind: SseRoute\nmetadata: {{name: soak, namespace: soak}}\nspec:\n  rules:\n    - match: {{path: /events}}\n      backend: {{service: backend, port: 80}}\n      keepalive: {{interval: {keepalive}}}\n"
    )
}

fn service_yaml(backend: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: backend, namespace: soak}}\nspec:\n  ports: [{{port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: backend-1\n  namespace: soak\n  labels: {{kubernetes.io/service-name: backend}}\naddressType: IPv4\nports: [{{port: {}}}]\nendpoints:\n  - addresses: [\"{}\"]\n",
        backend.port(),
        backend.ip()
    )
}

fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Splits complete events off `buf` and checks their ids follow `last`.
fn take_events(buf: &mut Vec<u8>, last: &mut Option<u64>, stats: &Stats) {
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let block: Vec<u8> = buf.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&block);
        let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("id: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue; // retry:, comments, keepalives
        };
        stats.events.fetch_add(1, Ordering::Relaxed);
        if let Some(prev) = *last
            && id != prev + 1
        {
            stats.gaps.fetch_add(1, Ordering::Relaxed);
            eprintln!("gap: expected id {} got {id}", prev + 1);
        }
        *last = Some(id);
    }
}

/// One connection: GET with Last-Event-ID, read events until `until` or the body ends.
async fn connection(
    proxy: SocketAddr,
    interval: &str,
    last: &mut Option<u64>,
    churn: (&AtomicBool, &mut u64, Duration),
    stats: &Stats,
) -> Result<(), String> {
    let (churning, seed, mean) = churn;
    let mut held = !churning.load(Ordering::Relaxed);
    let mut until = if held {
        None
    } else {
        Some(Instant::now() + lifetime(seed, mean))
    };
    let sock = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let mut req = http::Request::get(format!("/events?interval={interval}")).header("host", "soak");
    if let Some(id) = *last {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = tx
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        conn.abort();
        return Err(format!("status {}", resp.status()));
    }
    stats.connects.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let result = loop {
        if held && churning.load(Ordering::Relaxed) {
            // The churn began: this held connection gets a lifetime too.
            held = false;
            until = Some(Instant::now() + lifetime(seed, mean));
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            break Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(1), body.frame()).await {
            Err(_) => continue,
            Ok(None) => break Err("stream ended".into()),
            Ok(Some(Err(e))) => break Err(e.to_string()),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                    take_events(&mut buf, last, stats);
                }
            }
        }
    };
    stats.open.fetch_sub(1, Ordering::Relaxed);
    conn.abort();
    result
}

/// A deterministic pseudo-random lifetime around `mean` (0.5x to 1.5x).
fn lifetime(seed: &mut u64, mean: Duration) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    mean.mul_f64(0.5 + (*seed % 1000) as f64 / 1000.0)
}

/// One client: while `churn` is set, drops its connection after a random lifetime and
/// resumes; otherwise holds its connection. Runs until `stop`.
async fn client(
    i: usize,
    proxy: SocketAddr,
    args: Arc<Args>,
    churn: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    let mut last = None;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
    let interval = args.interval.to_string();
    while !stop.load(Ordering::Relaxed) {
        let churning = (&*churn, &mut seed, args.lifetime.get());
        if let Err(e) = connection(proxy, &interval, &mut last, churning, &stats).await {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            if stats.failures.load(Ordering::Relaxed) < 20 {
                eprintln!("client {i}: {e}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn pct(a: f64, b: f64) -> f64 {
    if a == 0.0 { 0.0 } else { (b - a) / a * 100.0 }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Arc::new(Args::parse());
    // Every stream is a socket here too: raise the soft fd limit like ssegate does.
    if let Err(e) = ssegate::workers::raise_nofile_limit() {
        eprintln!("cannot raise the open-files limit: {e}");
    }
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        // target/release/examples/soak -> target/release
        exe.parent().and_then(Path::parent).unwrap().to_path_buf()
    });
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let backend_addr = free_addr();
    let (proxy, admin) = (free_addr(), free_addr());
    let mut backend = spawn(
        &bin_dir.join("examples/sse-backend"),
        &["--listen", &backend_addr.to_string()],
        &work.path().join("backend.log"),
    );
    write_atomic(&config, "route.yaml", &route_yaml("15s"));
    write_atomic(&config, "service.yaml", &service_yaml(backend_addr));
    let mut gate = spawn(
        &bin_dir.join("ssegate"),
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &proxy.to_string(),
            "--admin",
            &admin.to_string(),
            "--drain-delay",
            "0s",
        ],
        &work.path().join("ssegate.log"),
    );
    let pid = gate.id();
    // Ready means the first table is published; the worker threads may still be opening their
    // listeners and pollers then, so the idle measurement waits until the fds stop changing.
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http_get(admin, "/readyz")
            .await
            .is_some_and(|(s, _)| s == 200);
        if ready && TcpStream::connect(backend_addr).await.is_ok() {
            break;
        }
        if Instant::now() > ready_by {
            eprintln!("ssegate or the backend did not become ready within 30 s");
            for child in [&mut gate, &mut backend] {
                let _ = child.kill();
                let _ = child.wait();
            }
            return std::process::ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle = settled(pid).await;

    let stats = Arc::new(Stats::default());
    let churn = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut clients = Vec::with_capacity(args.streams);
    for i in 0..args.streams {
        clients.push(tokio::spawn(client(
            i,
            proxy,
            args.clone(),
            churn.clone(),
            stop.clone(),
            stats.clone(),
        )));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    while stats.open.load(Ordering::Relaxed) < args.streams {
        if started.elapsed() > Duration::from_secs(120) {
            eprintln!(
                "only {} of {} streams opened",
                stats.open.load(Ordering::Relaxed),
                args.streams
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramped = measure(pid);

    // Churn plus a reload every second. Held connections join the churn one by one.
    churn.store(true, Ordering::Relaxed);
    let reloads = {
        let config = config.clone();
        let no_reload = args.no_reload;
        tokio::spawn(async move {
            if no_reload {
                return;
            }
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                n += 1;
                write_atomic(
                    &config,
                    "route.yaml",
                    &route_yaml(if n.is_multiple_of(2) { "15s" } else { "16s" }),
                );
            }
        })
    };
    // The start measurement is taken in steady state: after the allocator and the
    // connection pools have seen churn and reloads for a while (not a leak, and not
    // what the soak is after).
    tokio::time::sleep(args.warmup.get()).await;
    let start = measure(pid);
    let start_open = stats.open.load(Ordering::Relaxed);
    let churn_started = Instant::now();
    let mut samples = VecDeque::new();
    while churn_started.elapsed() < args.duration.get() {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (fds, rss) = measure(pid);
        samples.push_back((churn_started.elapsed().as_secs(), fds, rss));
        eprintln!(
            "t={:>4}s open={} connects={} events={} gaps={} failures={} fds={fds} rss={} MiB",
            churn_started.elapsed().as_secs(),
            stats.open.load(Ordering::Relaxed),
            stats.connects.load(Ordering::Relaxed),
            stats.events.load(Ordering::Relaxed),
            stats.gaps.load(Ordering::Relaxed),
            stats.failures.load(Ordering::Relaxed),
            rss >> 20
        );
    }
    let end = measure(pid);
    let end_open = stats.open.load(Ordering::Relaxed);
    reloads.abort();
    let metrics = http_get(admin, "/metrics").await.unwrap_or_default().1;
    let reload_ok = sample(
        &metrics,
        r#"ssegate_config_reloads_total{result="success"}"#,
    );
    let reload_fail = sample(
        &metrics,
        r#"ssegate_config_reloads_total{result="failure"}"#,
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.abort();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = measure(pid);
    for child in [&mut gate, &mut backend] {
        let _ = child.kill();
        let _ = child.wait();
    }

    let gaps = stats.gaps.load(Ordering::Relaxed);
    let fd_drift = pct(start.0 as f64, end.0 as f64);
    let rss_drift = pct(start.1 as f64, end.1 as f64);
    let fds_ok = fd_drift.abs() <= args.tolerance;
    let rss_ok = rss_drift.abs() <= args.tolerance;
    let closed_ok = after.0 <= idle.0 + 2;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "## ssegate soak: {} streams, {} of churn\n",
        args.streams, args.duration
    );
    println!("| measure | value |\n| --- | --- |");
    println!(
        "| streams open at start / end | {start_open} / {end_open} |\n\
         | connections made (incl. resumes) | {} |\n\
         | events received | {} |\n\
         | event id gaps | {gaps} |\n\
         | failed connections | {} |\n\
         | config reloads (success / failure) | {} / {} |\n\
         | ssegate fds: idle / all open / start / end / after close | {} / {} / {} / {} ({fd_drift:+.1}%) / {} |\n\
         | ssegate RSS MiB: idle / all open / start / end / after close | {:.1} / {:.1} / {:.1} / {:.1} ({rss_drift:+.1}%) / {:.1} |",
        stats.connects.load(Ordering::Relaxed),
        stats.events.load(Ordering::Relaxed),
        stats.failures.load(Ordering::Relaxed),
        reload_ok.unwrap_or(0.0),
        reload_fail.unwrap_or(0.0),
        idle.0,
        ramped.0,
        start.0,
        end.0,
        after.0,
        mib(idle.1),
        mib(ramped.1),
        mib(start.1),
        mib(end.1),
        mib(after.1),
    );
    println!("\nRSS/fds samples every 10 s (t, fds, RSS MiB):");
    let line: Vec<String> = samples
        .iter()
        .map(|(t, f, r)| format!("{t}:{f}/{:.0}", mib(*r)))
        .collect();
    println!("{}", line.join(" "));
    let open_ok = start_open * 100 >= args.streams * 98 && end_open * 100 >= args.streams * 98;
    let ok = gaps == 0 && fds_ok && rss_ok && closed_ok && open_ok;
    println!(
        "\nresult: {} (fds within {}%: {fds_ok}, RSS within {}%: {rss_ok}, no gaps: {}, fds back to idle after close: {closed_ok})",
        if ok { "PASS" } else { "FAIL" },
        args.tolerance,
        args.tolerance,
        gaps == 0
    );
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Status and body of `GET path` on ssegate's admin listener.
async fn http_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let sock = TcpStream::connect(admin).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Open fds and RSS of `pid` once the fd count held still for a second (at most 10 s).
async fn settled(pid: u32) -> (usize, u64) {
    let mut last = measure(pid);
    let mut still = 0;
    let until = Instant::now() + Duration::from_secs(10);
    while still < 4 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = measure(pid);
        still = if now.0 == last.0 { still + 1 } else { 0 };
        last = now;
    }
    last
}

fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}
