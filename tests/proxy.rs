//! The relay over real loopback sockets: SSE backend → ssegate (in-process) → HTTP client.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

/// One backend, one route `/events` → it, ssegate running.
async fn setup(extra: &str) -> (Backend, ConfigDir, ssegate::server::Running) {
    let backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", extra));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let running = start_ssegate(&cfg).await;
    (backend, cfg, running)
}

#[tokio::test]
async fn first_event_is_relayed_before_anything_else_is_sent() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut resp = get(ss.proxy_addr, "example.com", "/events").await;
    let stream = backend.next_stream().await;
    stream.send("data: first\n\n").await;
    // The backend sends nothing more; a buffering proxy would hold this back.
    assert_eq!(resp.chunk().await.unwrap(), "data: first\n\n");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    assert_eq!(resp.header("x-accel-buffering"), Some("no"));
    assert!(stream.is_open());
}

#[tokio::test]
async fn every_sse_field_passes_through_unchanged() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let stream = backend.next_stream().await;
    let chunks = [
        "retry: 2500\n\n",
        ": a comment\n",
        "id: 41\nevent: update\ndata: {\"a\":1}\n\n",
        "data: line one\ndata: line two\n\n",
        "id: 42\r\nevent: crlf\r\ndata: x\r\n\r\n",
        "data: cr only\r\r",
        "data: split ",
        "across chunks\n\n",
        "id:\ndata:\n\n",
    ];
    let expected: String = chunks.concat();
    for c in chunks {
        stream.send(c).await;
    }
    let got = resp.read_until("id:\ndata:\n\n").await;
    assert_eq!(got, expected);
}

#[tokio::test]
async fn request_is_forwarded_with_method_body_credentials_and_forwarding_headers() {
    let (mut backend, _cfg, ss) = setup("").await;
    let req = Request::post("/events/sub?x=1&y=two")
        .header("host", "events.example.com:8080")
        .header("authorization", "Bearer secret-token")
        .header("cookie", "sid=abc")
        .header("last-event-id", "41")
        .header("accept-encoding", "gzip, br")
        .header("connection", "x-hop")
        .header("x-hop", "must not pass")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::new(Bytes::from_static(b"{\"q\":1}")))
        .unwrap();
    let _resp = send(ss.proxy_addr, req).await;
    let s = backend.next_stream().await;
    assert_eq!(s.parts.method, "POST");
    assert_eq!(
        s.parts.uri.path_and_query().unwrap().as_str(),
        "/events/sub?x=1&y=two"
    );
    assert_eq!(s.body, "{\"q\":1}");
    assert_eq!(s.header("authorization"), Some("Bearer secret-token"));
    assert_eq!(s.header("cookie"), Some("sid=abc"));
    assert_eq!(s.header("last-event-id"), Some("41"));
    assert_eq!(s.header("accept-encoding"), Some("identity"));
    assert_eq!(s.header("x-hop"), None);
    assert_eq!(s.header("host"), Some("events.example.com:8080"));
    assert_eq!(
        s.header("x-forwarded-host"),
        Some("events.example.com:8080")
    );
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.header("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
}

#[tokio::test]
async fn rewrite_path_replaces_the_matched_prefix() {
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write(
        "route.yaml",
        &route_yaml("feed", "/notifications", "svc", "")
            .replace("port: 80}", "port: 80, rewritePath: /internal/events}"),
    );
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let ss = start_ssegate(&cfg).await;
    let _r = get(ss.proxy_addr, "h", "/notifications/user/7?since=3").await;
    let s = backend.next_stream().await;
    assert_eq!(s.parts.uri.to_string(), "/internal/events/user/7?since=3");
}

#[tokio::test]
async fn non_sse_responses_pass_through_with_status_and_body() {
    let backend = Backend::start(Reply::Fixed {
        status: 401,
        content_type: "application/json",
        body: "{\"error\":\"unauthorized\"}",
    })
    .await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let ss = start_ssegate(&cfg).await;
    let resp = get(ss.proxy_addr, "h", "/events").await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-accel-buffering"), None);
    assert_eq!(resp.text().await, "{\"error\":\"unauthorized\"}");
}

#[tokio::test]
async fn keepalive_comments_flow_while_idle_and_only_between_events() {
    let (mut backend, _cfg, ss) = setup("      keepalive: {interval: 100ms}\n").await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let stream = backend.next_stream().await;
    stream.send("data: one\n\n").await;
    let got = resp.read_until(": keepalive\n\n").await;
    assert!(got.starts_with("data: one\n\n: keepalive\n\n"), "{got:?}");
    // Half an event, then silence for several intervals: nothing may be injected inside it.
    stream.send("data: half").await;
    let mut got = resp.read_until("data: half").await;
    let mut waited = 0;
    while waited < 5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    stream.send(" done\n\n").await;
    got.push_str(&resp.read_until(" done\n\n").await);
    let event = &got[got.find("data: half").unwrap()..];
    assert_eq!(
        event, "data: half done\n\n",
        "keepalive landed inside an event"
    );
    let m = metrics(&ss).await;
    assert!(sample(&m, r#"ssegate_keepalives_total{route="apps/feed"}"#).unwrap() >= 1.0);
}

#[tokio::test]
async fn client_disconnect_closes_the_upstream_at_once() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let stream = backend.next_stream().await;
    stream.send("data: x\n\n").await;
    resp.chunk().await.unwrap();
    drop(resp);
    tokio::time::timeout(Duration::from_secs(1), stream.closed)
        .await
        .expect("upstream did not see the client disconnect within 1 s")
        .unwrap();
    let m = metrics(&ss).await;
    eventually("active connections back to 0", || {
        let ss = &ss;
        async move {
            sample(
                &metrics(ss).await,
                r#"ssegate_connections_active{route="apps/feed"}"#,
            ) == Some(0.0)
        }
    })
    .await;
    let _ = m;
}

#[tokio::test]
async fn error_responses_are_short_json_with_the_right_status() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connecting is refused
    let live = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write(
        "routes.yaml",
        &[
            route_yaml("noeps", "/noeps", "unready", ""),
            route_yaml("dead", "/dead", "dead", ""),
            route_yaml("nosvc", "/nosvc", "missing", ""),
        ]
        .join("---\n"),
    );
    cfg.write("unready.yaml", &service_yaml("unready", &[], &[live.addr]));
    cfg.write("dead.yaml", &service_yaml("dead", &[dead], &[]));
    let ss = start_ssegate(&cfg).await;

    let check = |status: u16, label: &'static str| {
        move |resp: ClientResponse| async move {
            assert_eq!(resp.status, status);
            assert_eq!(resp.header("content-type"), Some("application/json"));
            let retry = resp.header("retry-after").map(str::to_string);
            let v: serde_json::Value = serde_json::from_str(&resp.text().await).unwrap();
            assert_eq!(v["error"], label, "{v}");
            assert!(v["message"].as_str().unwrap().len() > 5);
            retry
        }
    };
    check(404, "no_route")(get(ss.proxy_addr, "h", "/nothing").await).await;
    let retry = check(503, "no_endpoints")(get(ss.proxy_addr, "h", "/noeps").await).await;
    assert_eq!(retry.as_deref(), Some("1"));
    check(503, "no_endpoints")(get(ss.proxy_addr, "h", "/nosvc").await).await;
    check(502, "connect_failed")(get(ss.proxy_addr, "h", "/dead").await).await;
    let m = metrics(&ss).await;
    assert_eq!(
        sample(
            &m,
            r#"ssegate_upstream_errors_total{reason="no_endpoints",route="apps/noeps"}"#
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &m,
            r#"ssegate_upstream_errors_total{reason="connect_failed",route="apps/dead"}"#
        )
        .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn connect_failure_falls_over_to_another_endpoint() {
    let dead = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut live = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    // Both endpoints must share the slice port: bind the dead one on the live one's port
    // at another loopback address, where nothing listens.
    let dead = std::net::SocketAddr::new(dead.ip(), live.addr.port());
    cfg.write("svc.yaml", &service_yaml("svc", &[live.addr, dead], &[]));
    let ss = start_ssegate(&cfg).await;
    for _ in 0..4 {
        let mut resp = get(ss.proxy_addr, "h", "/events").await;
        assert_eq!(resp.status, 200);
        let s = live.next_stream().await;
        s.send("data: ok\n\n").await;
        assert_eq!(resp.chunk().await.unwrap(), "data: ok\n\n");
    }
}

#[tokio::test]
async fn max_connections_answers_503_with_retry_after() {
    let (mut backend, _cfg, ss) = setup("      maxConnections: 1\n").await;
    let mut first = get(ss.proxy_addr, "h", "/events").await;
    let s = backend.next_stream().await;
    s.send("data: 1\n\n").await;
    first.chunk().await.unwrap();
    let second = get(ss.proxy_addr, "h", "/events").await;
    assert_eq!(second.status, 503);
    assert_eq!(second.header("retry-after"), Some("1"));
    drop(first);
    eventually("slot freed", || async {
        let r = get(ss.proxy_addr, "h", "/events").await;
        r.status == 200
    })
    .await;
}

#[tokio::test]
async fn upstream_killed_mid_stream_ends_the_response_cleanly() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let s = backend.next_stream().await;
    s.send("data: 1\n\n").await;
    resp.chunk().await.unwrap();
    drop(s); // the backend ends its response: the client sees a clean end of body
    assert_eq!(resp.chunk().await, None);
}

#[tokio::test]
async fn metrics_count_connections_events_and_bytes() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let s = backend.next_stream().await;
    for i in 0..5 {
        s.send(format!("id: {i}\ndata: {i}\n\n")).await;
    }
    s.send(": comment, not an event\n").await;
    let body = resp.read_until(": comment, not an event\n").await;
    let m = metrics(&ss).await;
    let r = |name: &str| sample(&m, &format!("{name}{{route=\"apps/feed\"}}"));
    assert_eq!(r("ssegate_events_total"), Some(5.0));
    assert_eq!(r("ssegate_connections_total"), Some(1.0));
    assert_eq!(r("ssegate_connections_active"), Some(1.0));
    assert_eq!(r("ssegate_bytes_sent_total"), Some(body.len() as f64));
    assert_eq!(
        sample(&m, r#"ssegate_config_reloads_total{result="success"}"#),
        Some(1.0)
    );
}

// The own HTTP/1.1 front of the plaintext listener, on the wire.

/// One HTTP/1.1 response as read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    /// The body as sent on the wire (chunk framing included).
    wire_body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client speaking HTTP/1.1 by hand over one socket, to see exactly what the front writes.
struct RawClient {
    sock: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: std::net::SocketAddr) -> RawClient {
        RawClient {
            sock: tokio::net::TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &str) {
        use tokio::io::AsyncWriteExt;
        self.sock.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// Reads more bytes; false at EOF.
    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, self.sock.read(&mut chunk))
            .await
            .expect("nothing read in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// True if the server closes the connection (EOF) with nothing more sent.
    async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }

    /// Reads one response; `head_only` for the answer to a HEAD request.
    async fn response(&mut self, head_only: bool) -> RawResponse {
        let (status, headers, len) = loop {
            let mut h = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut h);
            if let httparse::Status::Complete(len) = r.parse(&self.buf).unwrap() {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (r.code.unwrap(), headers, len);
            }
            assert!(self.fill().await, "connection closed mid-head");
        };
        self.buf.drain(..len);
        let mut resp = RawResponse {
            status,
            headers,
            wire_body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 {
            return resp;
        }
        if let Some(n) = resp.header("content-length") {
            let n: usize = n.parse().unwrap();
            while self.buf.len() < n {
                assert!(self.fill().await, "connection closed mid-body");
            }
            resp.wire_body = self.buf.drain(..n).collect();
        } else if resp.header("transfer-encoding") == Some("chunked") {
            while !self.buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                assert!(self.fill().await, "connection closed mid-body");
            }
            let end = self.buf.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
            resp.wire_body = self.buf.drain(..end).collect();
        } else {
            while self.fill().await {}
            resp.wire_body = std::mem::take(&mut self.buf);
        }
        resp
    }
}

/// A fixed-answer backend (`200`, `hello`) behind route `/events`.
async fn fixed_setup() -> (Backend, ConfigDir, ssegate::server::Running) {
    let backend = Backend::start(Reply::Fixed {
        status: 200,
        content_type: "text/plain",
        body: "hello",
    })
    .await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let running = start_ssegate(&cfg).await;
    (backend, cfg, running)
}

#[tokio::test]
async fn front_keeps_the_connection_alive_for_a_second_request() {
    let (mut backend, _cfg, ss) = fixed_setup().await;
    let mut c = RawClient::connect(ss.proxy_addr).await;
    c.write("GET /events/a HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let first = c.response(false).await;
    assert_eq!(
        (first.status, first.wire_body.as_slice()),
        (200, &b"hello"[..])
    );
    assert_eq!(first.header("content-length"), Some("5"));
    assert!(first.header("date").is_some_and(|d| d.ends_with(" GMT")));
    assert_eq!(first.header("connection"), None);
    c.write("GET /events/b HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        .await;
    let second = c.response(false).await;
    assert_eq!(second.wire_body, b"hello");
    assert_eq!(second.header("connection"), Some("close"));
    assert!(c.closed().await, "connection: close was not honoured");
    assert_eq!(backend.next_stream().await.parts.uri.path(), "/events/a");
    assert_eq!(backend.next_stream().await.parts.uri.path(), "/events/b");
}

#[tokio::test]
async fn front_answers_pipelined_requests_in_order() {
    let (mut backend, _cfg, ss) = fixed_setup().await;
    let mut c = RawClient::connect(ss.proxy_addr).await;
    // Three requests in one write; the last one closes.
    c.write(
        "GET /events/1 HTTP/1.1\r\nhost: h\r\n\r\n\
         GET /nowhere HTTP/1.1\r\nhost: h\r\n\r\n\
         GET /events/3 HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n",
    )
    .await;
    let statuses = [
        c.response(false).await.status,
        c.response(false).await.status,
        c.response(false).await.status,
    ];
    assert_eq!(statuses, [200, 404, 200]);
    assert!(c.closed().await);
    assert_eq!(backend.next_stream().await.parts.uri.path(), "/events/1");
    assert_eq!(backend.next_stream().await.parts.uri.path(), "/events/3");
}

#[tokio::test]
async fn front_streams_chunks_and_answers_head_without_a_body() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut c = RawClient::connect(ss.proxy_addr).await;
    c.write("HEAD /events HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let head = c.response(true).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let upstream = backend.next_stream().await;
    assert_eq!(upstream.parts.method, "HEAD");
    // The same connection carries the next request: nothing of a body was sent after the
    // HEAD answer (it would be read as the start of this response).
    c.write("GET /events HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let stream = backend.next_stream().await;
    stream.send("data: one\n\n").await;
    stream.send("data: two\n\n").await;
    drop(stream);
    let resp = c.response(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    // Frames that are ready together may share a chunk: `b` + `b` or one `16`.
    let wire = String::from_utf8(resp.wire_body).unwrap();
    assert!(
        [
            "b\r\ndata: one\n\n\r\nb\r\ndata: two\n\n\r\n0\r\n\r\n",
            "16\r\ndata: one\n\ndata: two\n\n\r\n0\r\n\r\n",
        ]
        .contains(&wire.as_str()),
        "{wire:?}"
    );
}

#[tokio::test]
async fn front_serves_http_1_0_clients_close_delimited() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut c = RawClient::connect(ss.proxy_addr).await;
    c.write("GET /events HTTP/1.0\r\nhost: h\r\n\r\n").await;
    let stream = backend.next_stream().await;
    stream.send("data: old\n\n").await;
    drop(stream);
    let resp = c.response(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("transfer-encoding"), None);
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(resp.wire_body, b"data: old\n\n");
}

#[tokio::test]
async fn front_hands_a_request_with_a_body_to_hyper_mid_connection() {
    let (mut backend, _cfg, ss) = fixed_setup().await;
    let mut c = RawClient::connect(ss.proxy_addr).await;
    c.write("GET /events HTTP/1.1\r\nhost: h\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    backend.next_stream().await;
    // The head arrives in two writes, the body with the second: all of it must reach hyper.
    c.write("POST /events/sub HTTP/1.1\r\nhost: h\r\n").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.write("content-length: 7\r\n\r\n{\"q\":1}").await;
    let resp = c.response(false).await;
    assert_eq!(
        (resp.status, resp.wire_body.as_slice()),
        (200, &b"hello"[..])
    );
    let s = backend.next_stream().await;
    assert_eq!(s.parts.method, "POST");
    assert_eq!(&s.body[..], b"{\"q\":1}");
    // hyper keeps the connection alive as before.
    c.write("GET /events HTTP/1.1\r\nhost: h\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
}

#[tokio::test]
async fn front_hands_h2c_prior_knowledge_to_hyper() {
    let (mut backend, _cfg, ss) = setup("").await;
    let sock = tokio::net::TcpStream::connect(ss.proxy_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(sock),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://h/events")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut resp = ClientResponse::new(resp);
    let stream = backend.next_stream().await;
    stream.send("data: h2c\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: h2c\n\n");
}

#[tokio::test]
async fn front_closes_the_upstream_when_a_raw_client_disconnects_mid_stream() {
    let (mut backend, _cfg, ss) = setup("").await;
    let mut c = RawClient::connect(ss.proxy_addr).await;
    c.write("GET /events HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let stream = backend.next_stream().await;
    stream.send("data: x\n\n").await;
    let resp = c.response(true).await;
    assert_eq!(resp.status, 200);
    drop(c);
    // Nothing more is sent upstream: only watching the client socket can notice.
    tokio::time::timeout(Duration::from_secs(1), stream.closed)
        .await
        .expect("upstream did not see the client disconnect within 1 s")
        .unwrap();
}
