//! The load generator: N concurrent SSE connections over HTTP/1.1, spread over
//! `127.0.0.x` source addresses (each address has its own ephemeral port range, so 100k
//! connections do not run out of ports), parsing every event.
//!
//! Per stream it records time to response headers, time to first event, end-to-end latency
//! of every event (receive time minus the upstream's timestamp), and ids that were skipped
//! (gaps) or seen again (duplicates). A stream that ends while the run still wants it is
//! counted as dropped and, with `reconnect`, reopened with `Last-Event-ID`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::hist::AtomicHist;
use crate::sse::{Parser, now_ns};

/// What to open.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Proxy (or upstream) address.
    pub target: SocketAddr,
    /// Request path with query, e.g. `/sse?rate=1`.
    pub path: String,
    /// Concurrent streams.
    pub streams: usize,
    /// Time over which the streams are opened (zero: as fast as allowed).
    pub ramp: Duration,
    /// At most this many connections being opened at once.
    pub max_opening: usize,
    /// Source addresses `127.0.0.1 ..= 127.0.0.{source_ips}`.
    pub source_ips: u8,
    /// Reopen dropped streams with `Last-Event-ID`.
    pub reconnect: bool,
    /// Give up on a response that has no headers after this long.
    pub header_timeout: Duration,
}

/// Counters at one moment; differences of two give a window's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Responses with status 200 (first opens and reopens).
    pub opened: u64,
    /// Failed opens: connect errors, timeouts, non-200 statuses.
    pub failed: u64,
    /// Open streams that ended while the run wanted them.
    pub dropped: u64,
    /// Events received.
    pub events: u64,
    /// Ids skipped.
    pub gaps: u64,
    /// Ids received again or out of order.
    pub dups: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            opened: self.opened - o.opened,
            failed: self.failed - o.failed,
            dropped: self.dropped - o.dropped,
            events: self.events - o.events,
            gaps: self.gaps - o.gaps,
            dups: self.dups - o.dups,
        }
    }
}

/// Shared live statistics of a load.
#[derive(Default)]
pub struct Stats {
    opened: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    events: AtomicU64,
    gaps: AtomicU64,
    dups: AtomicU64,
    /// Event latency is recorded only while this is set.
    pub recording: AtomicBool,
    stopping: AtomicBool,
    /// End-to-end event latency, ns.
    pub latency: AtomicHist,
    /// Request start to first event, ns.
    pub first_event: AtomicHist,
    /// Request start to response headers, ns.
    pub headers: AtomicHist,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    /// The counters now.
    pub fn counters(&self) -> Counters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            opened: l(&self.opened),
            failed: l(&self.failed),
            dropped: l(&self.dropped),
            events: l(&self.events),
            gaps: l(&self.gaps),
            dups: l(&self.dups),
        }
    }

    /// The first few distinct error messages.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    fn error(&self, e: String) {
        let mut errs = self.errors.lock().unwrap();
        if errs.len() < 5 && !errs.contains(&e) {
            errs.push(e);
        }
    }
}

/// A running load; [`Load::stop`] ends every stream.
pub struct Load {
    /// Live statistics.
    pub stats: Arc<Stats>,
    ramp: JoinHandle<()>,
}

impl Load {
    /// Starts opening `cfg.streams` streams.
    pub fn start(cfg: LoadConfig) -> Load {
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let ramp = tokio::spawn(async move {
            let cfg = Arc::new(cfg);
            let opening = Arc::new(Semaphore::new(cfg.max_opening.max(1)));
            let mut set = tokio::task::JoinSet::new();
            let gap = cfg.ramp.checked_div(cfg.streams.max(1) as u32);
            let started = tokio::time::Instant::now();
            for i in 0..cfg.streams {
                if let Some(gap) = gap.filter(|g| !g.is_zero()) {
                    tokio::time::sleep_until(started + gap * i as u32).await;
                }
                let permit = opening.clone().acquire_owned().await.expect("semaphore");
                set.spawn(run_stream(i, cfg.clone(), st.clone(), permit));
            }
            // Keep the tasks (and so the streams) alive until the load is stopped.
            while set.join_next().await.is_some() {}
            std::future::pending::<()>().await;
        });
        Load { stats, ramp }
    }

    /// Waits until `n` streams have opened (true) or `timeout` passed (false).
    pub async fn wait_opened(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.stats.counters().opened >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Closes every stream; ends seen from now on are not drops.
    pub async fn stop(self) {
        self.stats.stopping.store(true, Ordering::SeqCst);
        self.ramp.abort();
        let _ = self.ramp.await;
        // Let aborted connections close before the next measurement.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run_stream(
    idx: usize,
    cfg: Arc<LoadConfig>,
    stats: Arc<Stats>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let src = Ipv4Addr::new(127, 0, 0, 1 + (idx % cfg.source_ips.max(1) as usize) as u8);
    let mut permit = Some(permit);
    let mut last_id: Option<u64> = None;
    loop {
        let t0 = now_ns();
        let res = tokio::time::timeout(cfg.header_timeout, open(src, &cfg, last_id)).await;
        drop(permit.take());
        let mut body = match res {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.error(e);
                if !cfg.reconnect || stats.stopping.load(Ordering::Relaxed) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.error("no response headers in time".into());
                if !cfg.reconnect {
                    return;
                }
                continue;
            }
        };
        stats.headers.record(now_ns().saturating_sub(t0));
        stats.opened.fetch_add(1, Ordering::Relaxed);
        let mut parser = Parser::default();
        let mut first = true;
        let ended = loop {
            let frame = match body.frame().await {
                Some(Ok(f)) => f,
                Some(Err(e)) => break format!("body error: {e}"),
                None => break "stream ended".to_string(),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = now_ns();
            let recording = stats.recording.load(Ordering::Relaxed);
            let (mut events, mut gaps, mut dups) = (0u64, 0u64, 0u64);
            let mut lat_sum: Option<(u64, u64)> = None; // (latency, count) run for one frame
            parser.feed(&data, |ev| {
                events += 1;
                if let Some(id) = ev.id {
                    match last_id {
                        Some(prev) if id <= prev => dups += 1,
                        Some(prev) if id > prev + 1 => gaps += id - prev - 1,
                        _ => {}
                    }
                    last_id = Some(last_id.map_or(id, |p| p.max(id)));
                }
                if recording && let Some(ts) = ev.ts {
                    let lat = now.saturating_sub(ts);
                    match &mut lat_sum {
                        Some((l, n)) if *l == lat => *n += 1,
                        Some((l, n)) => {
                            stats.latency.record_n(*l, *n);
                            (*l, *n) = (lat, 1);
                        }
                        None => lat_sum = Some((lat, 1)),
                    }
                }
            });
            if let Some((l, n)) = lat_sum {
                stats.latency.record_n(l, n);
            }
            if events > 0 {
                stats.events.fetch_add(events, Ordering::Relaxed);
                if first {
                    first = false;
                    stats.first_event.record(now.saturating_sub(t0));
                }
            }
            if gaps > 0 {
                stats.gaps.fetch_add(gaps, Ordering::Relaxed);
            }
            if dups > 0 {
                stats.dups.fetch_add(dups, Ordering::Relaxed);
            }
        };
        if stats.stopping.load(Ordering::Relaxed) {
            return;
        }
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        stats.error(ended);
        if !cfg.reconnect {
            return;
        }
    }
}

/// Connects from `src`, sends the request and returns the body of a 200 response.
async fn open(
    src: Ipv4Addr,
    cfg: &LoadConfig,
    last_id: Option<u64>,
) -> Result<hyper::body::Incoming, String> {
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::from((src, 0)))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let stream = sock
        .connect(cfg.target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::get(cfg.path.as_str())
        .header("host", "bench.local")
        .header("accept", "text/event-stream");
    if let Some(id) = last_id {
        req = req.header("last-event-id", id.to_string());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    Ok(resp.into_body())
}

/// Raises this process's soft open-files limit to its hard limit; returns the new limit.
pub fn raise_fd_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
    }
    rl.rlim_cur
}

/// Opens one stream on `path` and waits for its first event (or its clean end).
pub async fn probe(target: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let cfg = LoadConfig {
        target,
        path: path.to_string(),
        streams: 1,
        ramp: Duration::ZERO,
        max_opening: 1,
        source_ips: 1,
        reconnect: false,
        header_timeout: timeout,
    };
    let work = async {
        let mut body = open(Ipv4Addr::LOCALHOST, &cfg, None).await?;
        let mut parser = Parser::default();
        let mut got = false;
        while !got {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        parser.feed(&d, |_| got = true);
                    }
                }
                Some(Err(e)) => return Err(format!("body error: {e}")),
                None => return Err("ended before the first event".into()),
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "probe timed out".to_string())?
}

/// `GET path` on `addr`; the whole body as text (for ssegate's `/metrics`).
pub async fn get_text(addr: SocketAddr, path: &str) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}
