//! Reliability over real loopback sockets: graceful drain, backpressure and the client write
//! timeout, admission limits, slowloris protection, upstream faults.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ssegate::proxy::ProxyConfig;
use ssegate::proxy::limits::ClientLimits;
use ssegate::server::{DrainConfig, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

/// One backend, one route `/events` → it, ssegate running with `proxy` settings.
async fn setup(extra: &str, proxy: ProxyConfig) -> (Backend, ConfigDir, Running) {
    let backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", extra));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let running = start_ssegate_with(&cfg, proxy).await;
    (backend, cfg, running)
}

async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let r = get(admin, "admin", path).await;
    let status = r.status.as_u16();
    (status, r.text().await)
}

/// Reads a response to its end; panics on a body error (a truncated response).
async fn read_to_clean_end(resp: &mut ClientResponse) -> String {
    let mut acc = String::new();
    loop {
        match resp.chunk_or_error().await {
            Ok(Some(b)) => acc.push_str(&String::from_utf8_lossy(&b)),
            Ok(None) => return acc,
            Err(e) => panic!("body failed instead of ending cleanly: {e}; got {acc:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_spreads_closes_over_the_window_and_every_stream_gets_a_retry_hint() {
    let (mut backend, _cfg, mut ss) = setup("", ProxyConfig::default()).await;
    const N: usize = 12;
    let mut clients = Vec::new();
    let mut upstreams = Vec::new();
    for i in 0..N {
        let mut r = get(ss.proxy_addr, "h", "/events").await;
        let s = backend.next_stream().await;
        s.send(format!("id: {i}\ndata: {i}\n\n")).await;
        r.chunk().await.unwrap();
        clients.push(r);
        upstreams.push(s);
    }
    let (proxy, admin) = (ss.proxy_addr, ss.admin_addr);
    let cfg = DrainConfig {
        delay: Duration::from_secs(1),
        window: Duration::from_secs(2),
        grace_period: Duration::from_secs(20),
    };
    let t0 = Instant::now();
    let drain = tokio::spawn(async move {
        let outcome = ss.drain(cfg).await;
        (outcome, ss)
    });
    eventually("/readyz fails once draining", || async {
        admin_get(admin, "/readyz").await == (503, "draining\n".to_string())
    })
    .await;
    // During the delay new streams are still accepted (endpoint removal is propagating).
    let mut late = get(proxy, "h", "/events").await;
    assert_eq!(late.status, 200);
    let s = backend.next_stream().await;
    s.send("id: late\ndata: late\n\n").await;
    late.chunk().await.unwrap();
    clients.push(late);
    upstreams.push(s);
    let remaining = sample(
        &admin_get(admin, "/metrics").await.1,
        "ssegate_drain_streams_remaining",
    )
    .unwrap();
    assert!(remaining >= N as f64, "{remaining}");

    let ends = futures_util::future::join_all(clients.iter_mut().map(|c| async move {
        let tail = read_to_clean_end(c).await;
        (t0.elapsed(), tail)
    }))
    .await;
    for (_, tail) in &ends {
        let hint = tail
            .strip_prefix("retry: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("stream did not end with a retry hint: {tail:?}"));
        let ms: u64 = hint.parse().unwrap();
        assert!((1000..3000).contains(&ms), "{ms}");
    }
    let mut at: Vec<Duration> = ends.iter().map(|(t, _)| *t).collect();
    at.sort();
    // Nothing closes before the delay; closes spread over the window rather than at once.
    assert!(at[0] >= cfg.delay, "closed before the drain delay: {at:?}");
    let third = cfg.window / 3;
    for k in 0..3 {
        let from = cfg.delay + third * k;
        let to = from + third;
        assert!(
            at.iter()
                .any(|t| *t >= from && *t < to + Duration::from_millis(200)),
            "no close in third {k} of the window: {at:?}"
        );
    }
    // Every upstream connection is closed with its client stream.
    for s in upstreams {
        tokio::time::timeout(PATIENCE, s.closed)
            .await
            .expect("upstream left open")
            .unwrap();
    }
    let (outcome, ss) = drain.await.unwrap();
    assert_eq!(outcome.streams_at_start, N);
    assert_eq!(outcome.streams_left, 0);
    // The listener is closed once the window opened.
    assert!(TcpStream::connect(proxy).await.is_err());
    let m = metrics(&ss).await;
    assert_eq!(sample(&m, "ssegate_drain_streams_remaining"), Some(0.0));
}

#[tokio::test]
async fn drain_with_no_streams_ends_after_the_delay() {
    let (_backend, _cfg, mut ss) = setup("", ProxyConfig::default()).await;
    let t0 = Instant::now();
    let out = ss
        .drain(DrainConfig {
            delay: Duration::from_millis(300),
            window: Duration::from_secs(30),
            grace_period: Duration::from_secs(60),
        })
        .await;
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!((out.streams_at_start, out.streams_left), (0, 0));
}

#[tokio::test]
async fn drain_gives_up_at_the_grace_period() {
    // A stream stuck mid-event never reaches the boundary where it could be closed: only the
    // grace period ends the wait.
    let backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let mut ss = start_ssegate(&cfg).await;
    let mut backend = backend;
    let mut r = get(ss.proxy_addr, "h", "/events").await;
    let s = backend.next_stream().await;
    s.send("data: an event that never ends").await;
    r.chunk().await.unwrap();
    let out = ss
        .drain(DrainConfig {
            delay: Duration::ZERO,
            window: Duration::from_millis(100),
            grace_period: Duration::from_millis(800),
        })
        .await;
    assert_eq!((out.streams_at_start, out.streams_left), (1, 1));
}

/// A raw HTTP/1.1 backend that answers one request with event-stream headers and `first`,
/// then breaks the connection: with a TCP reset (`reset`), or by closing it mid-body.
async fn breaking_backend(first: &'static str, reset: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
            first.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if reset {
            sock.set_zero_linger().unwrap();
        } else {
            // Half a chunk, then the process is gone: FIN in the middle of the body.
            sock.write_all(b"20\r\ndata: cut").await.unwrap();
        }
        drop(sock);
    });
    addr
}

#[tokio::test]
async fn backend_killed_mid_stream_ends_the_client_response_cleanly_and_is_counted() {
    for (reset, route) in [(true, "rst"), (false, "fin")] {
        let addr = breaking_backend("data: 1\n\n", reset).await;
        let cfg = ConfigDir::new();
        cfg.write("route.yaml", &route_yaml(route, "/events", "svc", ""));
        cfg.write("svc.yaml", &service_yaml("svc", &[addr], &[]));
        let ss = start_ssegate(&cfg).await;
        let mut resp = get(ss.proxy_addr, "h", "/events").await;
        assert_eq!(resp.status, 200);
        let body = read_to_clean_end(&mut resp).await;
        // Whatever complete bytes arrived are relayed; the end is clean so EventSource
        // reconnects.
        assert!(body.starts_with("data: 1\n\n"), "{body:?}");
        let m = metrics(&ss).await;
        assert_eq!(
            sample(
                &m,
                &format!(r#"ssegate_upstream_errors_total{{reason="reset",route="apps/{route}"}}"#)
            ),
            Some(1.0),
            "{route}: {m}"
        );
        // Eventually: the proxy's worker thread may still be releasing the stream when the
        // client has read the end.
        let active = format!(r#"ssegate_connections_active{{route="apps/{route}"}}"#);
        eventually("the stream leaves ssegate_connections_active", || {
            let (ss, active) = (&ss, &active);
            async move { sample(&metrics(ss).await, active) == Some(0.0) }
        })
        .await;
    }
}

#[tokio::test]
async fn a_silent_backend_is_cut_by_the_idle_timeout_cleanly_and_counted() {
    // Keepalives to the client (every 200 ms) do not count as upstream activity.
    let (mut backend, _cfg, ss) = setup(
        "      timeouts: {idle: 1s}\n      keepalive: {interval: 200ms}\n",
        ProxyConfig::default(),
    )
    .await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let upstream = backend.next_stream().await;
    upstream.send("id: 1\ndata: 1\n\n").await;
    let t0 = Instant::now();
    // The backend keeps its connection open and sends nothing more. (Bounded: keepalives
    // would keep the read going forever if the idle cut were missing.)
    let body = tokio::time::timeout(PATIENCE, read_to_clean_end(&mut resp))
        .await
        .expect("the stream was not ended by the idle timeout");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert!(body.contains("id: 1\ndata: 1\n\n"), "{body:?}");
    let keepalive = std::str::from_utf8(ssegate::sse::KEEPALIVE).unwrap();
    assert!(
        body.contains(keepalive),
        "no keepalive while idle: {body:?}"
    );
    tokio::time::timeout(PATIENCE, upstream.closed)
        .await
        .expect("the upstream connection was left open")
        .unwrap();
    let m = metrics(&ss).await;
    assert_eq!(
        sample(
            &m,
            r#"ssegate_upstream_errors_total{reason="idle_timeout",route="apps/feed"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_write_timeout_disconnects_a_stalled_client_and_is_counted() {
    let proxy_cfg = ProxyConfig {
        client_write_timeout: Some(Duration::from_millis(300)),
        ..ProxyConfig::default()
    };
    let (mut backend, _cfg, ss) = setup("", proxy_cfg).await;
    // A reading client is not affected, however long its stream idles.
    let mut reader = get(ss.proxy_addr, "h", "/events").await;
    let reading = backend.next_stream().await;
    let _client = non_reading_client(ss.proxy_addr).await;
    let stalled = backend.next_stream().await;
    let sent = flood(&stalled, 64 << 20).await;
    assert!(sent < 64 << 20);
    tokio::time::timeout(PATIENCE, stalled.closed)
        .await
        .expect("stalled client's upstream was not closed")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    reading.send("data: still here\n\n").await;
    assert_eq!(reader.chunk().await.unwrap(), "data: still here\n\n");
    let m = metrics(&ss).await;
    assert_eq!(
        sample(
            &m,
            r#"ssegate_client_disconnects_total{reason="write_timeout",route="apps/feed"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_client_write_timeout_overrides_the_flag() {
    // The flag's default (60 s) applies to route `lenient`; route `feed` sets 300 ms.
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write(
        "route.yaml",
        &route_yaml(
            "feed",
            "/events",
            "svc",
            "      timeouts: {clientWriteTimeout: 300ms}\n",
        ),
    );
    cfg.write(
        "lenient.yaml",
        &route_yaml("lenient", "/lenient", "svc", ""),
    );
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let ss = start_ssegate_with(&cfg, ProxyConfig::default()).await;
    assert_eq!(
        ProxyConfig::default().client_write_timeout,
        Some(Duration::from_secs(60))
    );

    // A stalled client of the lenient route: stalled for the rest of the test (seconds).
    let _lenient_client = non_reading_client_on(ss.proxy_addr, "/lenient").await;
    let lenient = backend.next_stream().await;
    assert!(flood(&lenient, 64 << 20).await < 64 << 20);
    // A stalled client of `feed` is cut after its route's 300 ms.
    let _client = non_reading_client(ss.proxy_addr).await;
    let stalled = backend.next_stream().await;
    assert!(flood(&stalled, 64 << 20).await < 64 << 20);
    tokio::time::timeout(PATIENCE, stalled.closed)
        .await
        .expect("the feed route's stalled client was not disconnected")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        lenient.is_open(),
        "the lenient route's client was cut although only the 60 s flag applies to it"
    );
    let m = metrics(&ss).await;
    assert_eq!(
        sample(
            &m,
            r#"ssegate_client_disconnects_total{reason="write_timeout",route="apps/feed"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"ssegate_client_disconnects_total{reason="write_timeout",route="apps/lenient"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn max_connections_answers_503_with_retry_after() {
    let proxy_cfg = ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    };
    let (mut backend, _cfg, ss) = setup("", proxy_cfg).await;
    let a = get(ss.proxy_addr, "h", "/events").await;
    let _b = get(ss.proxy_addr, "h", "/events").await;
    let _s1 = backend.next_stream().await;
    let _s2 = backend.next_stream().await;
    let refused = get(ss.proxy_addr, "h", "/events").await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("connection"), Some("close"));
    let v: serde_json::Value = serde_json::from_str(&refused.text().await).unwrap();
    assert_eq!(v["error"], "max_connections");
    drop(a);
    eventually("a slot frees when a connection closes", || async {
        get(ss.proxy_addr, "h", "/events").await.status == 200
    })
    .await;
    let m = metrics(&ss).await;
    assert!(
        sample(
            &m,
            r#"ssegate_connections_rejected_total{reason="max_connections"}"#
        )
        .unwrap()
            >= 1.0
    );
}

/// `GET /events` from a client socket bound to `from`.
async fn get_from(from: &str, proxy: SocketAddr) -> ClientResponse {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(proxy).await.unwrap();
    send_on(stream, "/events").await
}

async fn send_on(stream: TcpStream, path: &str) -> ClientResponse {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "h")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let _keep = sender;
    let (parts, body) = resp.into_parts();
    ClientResponse::from_parts(parts, body)
}

#[tokio::test]
async fn per_client_stream_limit_answers_429_for_that_client_only() {
    let proxy_cfg = ProxyConfig {
        client_limits: ClientLimits {
            max_streams: 2,
            ..ClientLimits::default()
        },
        ..ProxyConfig::default()
    };
    let (mut backend, _cfg, ss) = setup("", proxy_cfg).await;
    let a = get_from("127.0.0.1", ss.proxy_addr).await;
    let _b = get_from("127.0.0.1", ss.proxy_addr).await;
    assert_eq!((a.status.as_u16(), _b.status.as_u16()), (200, 200));
    // Held: a backend that ends its response would end the stream.
    let _s1 = backend.next_stream().await;
    let _s2 = backend.next_stream().await;
    let third = get_from("127.0.0.1", ss.proxy_addr).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.header("retry-after"), Some("1"));
    // Another client is not affected.
    let other = get_from("127.0.0.2", ss.proxy_addr).await;
    assert_eq!(other.status, 200);
    drop(a);
    eventually("the client's slot frees with its stream", || async {
        get_from("127.0.0.1", ss.proxy_addr).await.status == 200
    })
    .await;
    let m = metrics(&ss).await;
    assert!(
        sample(
            &m,
            r#"ssegate_rejected_total{reason="client_streams",route="apps/feed"}"#
        )
        .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn per_client_connection_rate_answers_429_with_retry_after() {
    let proxy_cfg = ProxyConfig {
        client_limits: ClientLimits {
            connect_rate: 0.5,
            connect_burst: 2,
            ..ClientLimits::default()
        },
        ..ProxyConfig::default()
    };
    let (_backend, _cfg, ss) = setup("", proxy_cfg).await;
    assert_eq!(get_from("127.0.0.1", ss.proxy_addr).await.status, 200);
    assert_eq!(get_from("127.0.0.1", ss.proxy_addr).await.status, 200);
    let limited = get_from("127.0.0.1", ss.proxy_addr).await;
    assert_eq!(limited.status, 429);
    let after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&after), "{after}");
    assert_eq!(get_from("127.0.0.3", ss.proxy_addr).await.status, 200);
    let m = metrics(&ss).await;
    assert_eq!(
        sample(
            &m,
            r#"ssegate_connections_rejected_total{reason="client_rate"}"#
        ),
        Some(1.0)
    );
}

/// Sends raw bytes and returns everything the server answers until it closes.
async fn raw_exchange(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut sock = TcpStream::connect(proxy).await.unwrap();
    sock.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, sock.read_to_end(&mut out))
        .await
        .expect("server did not answer and close");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_or_too_many_headers_are_refused_with_431() {
    let proxy_cfg = ProxyConfig {
        max_header_bytes: 8192,
        max_headers: 10,
        ..ProxyConfig::default()
    };
    let (_backend, _cfg, ss) = setup("", proxy_cfg).await;
    let big = format!(
        "GET /events HTTP/1.1\r\nhost: h\r\nx-big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let answer = raw_exchange(ss.proxy_addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    let mut many = String::from("GET /events HTTP/1.1\r\nhost: h\r\n");
    for i in 0..20 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(ss.proxy_addr, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // Within the limits, the same request is served.
    let r = get(ss.proxy_addr, "h", "/events").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn slow_headers_are_cut_off_by_the_header_read_timeout() {
    let proxy_cfg = ProxyConfig {
        header_read_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let (_backend, _cfg, ss) = setup("", proxy_cfg).await;
    let mut sock = TcpStream::connect(ss.proxy_addr).await.unwrap();
    let t0 = Instant::now();
    // Slowloris: a header line now and then, never the end of the head.
    sock.write_all(b"GET /events HTTP/1.1\r\nhost: h\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let closed = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if sock.write_all(b"x-slow: 1\r\n").await.is_err() {
                break;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(1), sock.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("slow client was not cut off");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let answer = String::from_utf8_lossy(&out);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
}
