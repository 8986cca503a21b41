//! Poll-to-stream over real loopback sockets: JSON backend → ssegate (in-process) → client.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

/// A poll route `/api/stream` → `/api/request` on `svc` (the given backends), ssegate running.
async fn setup(backends: &[&JsonBackend], poll: &str) -> (ConfigDir, ssegate::server::Running) {
    setup_with(backends, poll, "").await
}

/// `setup` with more YAML lines for the rule (indented `      key: value`).
async fn setup_with(
    backends: &[&JsonBackend],
    poll: &str,
    more: &str,
) -> (ConfigDir, ssegate::server::Running) {
    let cfg = ConfigDir::new();
    let extra =
        format!("      mode: Poll\n      poll: {poll}\n      keepalive: {{interval: 0s}}\n{more}");
    let yaml = route_yaml("orders", "/api/stream", "svc", &extra)
        .replace("port: 80}", "port: 80, rewritePath: /api/request}");
    cfg.write("route.yaml", &yaml);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    cfg.write("svc.yaml", &service_yaml_multi("svc", &addrs));
    let running = start_ssegate(&cfg).await;
    (cfg, running)
}

/// Like `service_yaml`, but endpoints may differ in port (one slice per endpoint).
fn service_yaml_multi(svc: &str, addrs: &[std::net::SocketAddr]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: apps}}\nspec:\n  ports: [{{port: 80}}]\n"
    );
    for (i, a) in addrs.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{i}\n  namespace: apps\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{port: {}}}]\nendpoints:\n  - addresses: [\"{}\"]\n",
            a.port(),
            a.ip()
        ));
    }
    out
}

#[tokio::test]
async fn batches_stream_in_order_with_previous_on_every_call() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s, eventType: order}").await;
    let req = Request::get("/api/stream/orders?x=1")
        .header("host", "shop.example")
        .header("authorization", "Bearer t0k")
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let client = tokio::spawn(async move { send(ss.proxy_addr, req).await });

    let c1 = backend.next_call().await;
    assert_eq!(c1.parts.method, "GET");
    assert_eq!(c1.path_and_query(), "/api/request/orders?x=1");
    assert_eq!(c1.header("authorization"), Some("Bearer t0k"));
    assert_eq!(c1.header("accept"), Some("application/json"));
    assert_eq!(c1.header("host"), Some("shop.example"));
    let peer1 = c1.peer;
    c1.json(r#"{"list":[{"id":1,"s":"a b"},{"id":2}],"continue":true,"wait":"50ms","next":2}"#);

    let mut resp = client.await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    let first = resp.read_until("id: 2\n").await;

    let c2 = backend.next_call().await;
    assert_eq!(c2.query("previous").as_deref(), Some("2"));
    assert_eq!(c2.query("x").as_deref(), Some("1"));
    assert_eq!(c2.header("authorization"), Some("Bearer t0k"));
    let peer2 = c2.peer;
    c2.json(r#"{"list":[],"continue":true,"wait":10,"next":"c/3 x"}"#);
    let c3 = backend.next_call().await;
    assert_eq!(c3.query("previous").as_deref(), Some("c/3 x"));
    c3.json(r#"{"list":[{"id":3}],"continue":true,"wait":10}"#);
    // No `next`: the cursor stays.
    let c4 = backend.next_call().await;
    assert_eq!(c4.query("previous").as_deref(), Some("c/3 x"));
    let peer4 = c4.peer;
    c4.json(r#"{"list":[{"id":4}],"next":"c4"}"#);

    let all = first + &resp.text().await;
    assert_eq!(
        events(&all),
        vec![
            vec!["event: order", r#"data: {"id":1,"s":"a b"}"#],
            vec!["id: 2", "event: order", r#"data: {"id":2}"#],
            vec!["event: order", r#"data: {"id":3}"#],
            vec!["id: \"c4\"", "event: order", r#"data: {"id":4}"#],
            vec!["event: end", "data: {}"],
        ]
    );
    let m = metrics(&ss).await;
    assert_eq!(
        sample(
            &m,
            r#"ssegate_poll_requests_total{outcome="success",route="apps/orders"}"#
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(&m, r#"ssegate_events_total{route="apps/orders"}"#),
        Some(4.0)
    );
    // One endpoint: the calls share one keep-alive connection.
    assert_eq!(peer1, peer2);
    assert_eq!(peer2, peer4);
}

#[tokio::test]
async fn body_methods_carry_previous_in_the_json_body() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s}").await;
    let req = Request::post("/api/stream")
        .header("host", "h")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"filter": {"state": "open"}}"#,
        )))
        .unwrap();
    let client = tokio::spawn(async move { send(ss.proxy_addr, req).await });
    let c1 = backend.next_call().await;
    assert_eq!(c1.parts.method, "POST");
    assert_eq!(
        c1.json_body(),
        serde_json::json!({"filter": {"state": "open"}})
    );
    assert_eq!(c1.header("content-type"), Some("application/json"));
    c1.json(r#"{"list":[1],"continue":true,"wait":0,"next":17}"#);
    let c2 = backend.next_call().await;
    assert_eq!(
        c2.json_body(),
        serde_json::json!({"filter": {"state": "open"}, "previous": 17})
    );
    assert_eq!(c2.query("previous"), None);
    c2.json(r#"{"list":[2],"continue":true,"wait":0,"next":"s"}"#);
    let c3 = backend.next_call().await;
    assert_eq!(c3.json_body()["previous"], "s");
    c3.json(r#"{"continue":false}"#);
    let text = client.await.unwrap().text().await;
    assert_eq!(
        text,
        "id: 17\ndata: 1\n\nid: \"s\"\ndata: 2\n\nevent: end\ndata: {}\n\n"
    );
}

#[tokio::test]
async fn last_event_id_resumes_at_the_exact_cursor() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{}").await;
    for (id, previous) in [("\"c-41\"", "c-41"), ("41", "41"), ("plain", "plain")] {
        let req = Request::get("/api/stream")
            .header("host", "h")
            .header("last-event-id", id)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let client = tokio::spawn(async move { send(ss.proxy_addr, req).await });
        let c = backend.next_call().await;
        assert_eq!(c.query("previous").as_deref(), Some(previous), "{id}");
        assert_eq!(c.header("last-event-id"), None);
        c.json(r#"{"list":[42]}"#);
        client.await.unwrap().text().await;
    }
}

#[tokio::test]
async fn a_failed_first_answer_is_returned_as_it_is() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{}").await;
    let client = tokio::spawn(async move { get(ss.proxy_addr, "h", "/api/stream").await });
    backend.next_call().await.reply(
        401,
        &[
            ("www-authenticate", "Bearer realm=\"shop\""),
            ("content-type", "application/json"),
        ],
        r#"{"error":"token expired"}"#,
    );
    let resp = client.await.unwrap();
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Bearer realm=\"shop\"")
    );
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.text().await, r#"{"error":"token expired"}"#);
    assert!(
        backend
            .call_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    let m = metrics(&ss).await;
    assert_eq!(
        sample(
            &m,
            r#"ssegate_poll_requests_total{outcome="http_error",route="apps/orders"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_invalid_first_answer_is_a_502() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{}").await;
    let client = tokio::spawn(async move { get(ss.proxy_addr, "h", "/api/stream").await });
    backend.next_call().await.json("<html>");
    let resp = client.await.unwrap();
    assert_eq!(resp.status, 502);
    assert!(resp.text().await.contains("invalid_response"));
}

#[tokio::test]
async fn a_later_failure_becomes_one_error_frame_and_the_stream_ends() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s}").await;
    let client = tokio::spawn(async move { get(ss.proxy_addr, "h", "/api/stream").await });
    backend
        .next_call()
        .await
        .json(r#"{"list":["a"],"continue":true,"wait":0,"next":1}"#);
    let mut resp = client.await.unwrap();
    assert_eq!(resp.read_until("\n\n").await, "id: 1\ndata: \"a\"\n\n");
    backend.next_call().await.reply(500, &[], "database down");
    let rest = resp.text().await;
    assert_eq!(
        rest,
        "event: error\ndata: {\"message\":\"backend answered 500 Internal Server Error\",\"status\":500}\n\n"
    );
    assert!(
        backend
            .call_within(Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn disconnect_stops_polling_within_one_wait() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s}").await;
    let addr = ss.proxy_addr;
    let mut served = 0;
    let client = tokio::spawn(async move {
        let mut resp = get(addr, "h", "/api/stream").await;
        resp.read_until("data: 3\n").await;
        drop(resp); // the client goes away mid-wait
    });
    loop {
        let Some(call) = backend.call_within(Duration::from_secs(2)).await else {
            break;
        };
        served += 1;
        call.json(&format!(
            r#"{{"list":[{served}],"continue":true,"wait":200,"next":{served}}}"#
        ));
        if served == 3 {
            client.await.unwrap();
            break;
        }
    }
    assert_eq!(served, 3);
    // At most the call already scheduled may still come (it did not); nothing after it.
    assert!(
        backend
            .call_within(Duration::from_millis(1000))
            .await
            .is_none(),
        "ssegate kept polling after the client left"
    );
    eventually("the stream is closed", || async {
        sample(
            &metrics(&ss).await,
            r#"ssegate_connections_active{route="apps/orders"}"#,
        ) == Some(0.0)
    })
    .await;
}

#[tokio::test]
async fn disconnect_during_a_long_call_cancels_it() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s}").await;
    let addr = ss.proxy_addr;
    // The client leaves only once the next call is held by the backend: leaving right after
    // `data: 1` would race the proxy sending that call (the case of the next test).
    let (leave, left) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::spawn(async move {
        let mut resp = get(addr, "h", "/api/stream").await;
        resp.read_until("data: 1\n").await;
        let _ = left.await;
        drop(resp);
    });
    backend
        .next_call()
        .await
        .json(r#"{"list":[1],"continue":true,"wait":0}"#);
    // A long-poll: the backend holds this call while the client leaves.
    let held = backend.next_call().await;
    leave.send(()).unwrap();
    client.await.unwrap();
    eventually("the stream is closed", || async {
        sample(
            &metrics(&ss).await,
            r#"ssegate_connections_active{route="apps/orders"}"#,
        ) == Some(0.0)
    })
    .await;
    held.json(r#"{"list":[2],"continue":true,"wait":0}"#);
    assert!(
        backend
            .call_within(Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn disconnect_between_calls_ends_the_stream_and_the_calls() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s}").await;
    let addr = ss.proxy_addr;
    let client = tokio::spawn(async move {
        let mut resp = get(addr, "h", "/api/stream").await;
        resp.read_until("data: 1\n").await;
        drop(resp);
    });
    backend
        .next_call()
        .await
        .json(r#"{"list":[1],"continue":true,"wait":0}"#);
    client.await.unwrap();
    // The client left while the proxy was about to make the next call: it may or may not have
    // gone out, but the stream closes either way, and at most that one call is made.
    let next = backend.call_within(Duration::from_millis(200)).await;
    eventually("the stream is closed", || async {
        sample(
            &metrics(&ss).await,
            r#"ssegate_connections_active{route="apps/orders"}"#,
        ) == Some(0.0)
    })
    .await;
    if let Some(call) = next {
        call.json(r#"{"list":[2],"continue":true,"wait":0}"#);
    }
    assert!(
        backend
            .call_within(Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_drain_ends_a_poll_stream_with_a_retry_hint_and_cancels_its_call() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, mut ss) = setup(&[&backend], "{minWait: 0s}").await;
    let addr = ss.proxy_addr;
    let client = tokio::spawn(async move {
        let mut resp = get(addr, "h", "/api/stream").await;
        resp.read_until("data: 1\n\n").await;
        // Panics on a truncated response: the stream must end cleanly.
        resp.text().await
    });
    backend
        .next_call()
        .await
        .json(r#"{"list":[1],"continue":true,"wait":0}"#);
    // A long-poll held by the backend when the drain reaches the stream.
    let held = backend.next_call().await;
    let out = ss
        .drain(ssegate::server::DrainConfig {
            delay: Duration::ZERO,
            window: Duration::from_millis(200),
            grace_period: Duration::from_secs(10),
        })
        .await;
    assert_eq!((out.streams_at_start, out.streams_left), (1, 0));
    let tail = client.await.unwrap();
    let ms: u64 = tail
        .strip_prefix("retry: ")
        .and_then(|t| t.strip_suffix("\n\n"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("the stream did not end with a retry hint: {tail:?}"));
    assert!((1000..3000).contains(&ms), "{ms}");
    // The held call was cancelled with the stream: nothing follows its answer.
    held.json(r#"{"list":[2],"continue":true,"wait":0}"#);
    assert!(
        backend
            .call_within(Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn retry_after_is_honoured_before_calling_again() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s}").await;
    let client = tokio::spawn(async move { get(ss.proxy_addr, "h", "/api/stream").await });
    backend
        .next_call()
        .await
        .json(r#"{"list":[1],"continue":true,"wait":0,"next":1}"#);
    let mut resp = client.await.unwrap();
    resp.read_until("data: 1\n").await;
    backend
        .next_call()
        .await
        .reply(429, &[("retry-after", "1")], "slow down");
    let t0 = tokio::time::Instant::now();
    let again = backend.next_call().await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(again.query("previous").as_deref(), Some("1"));
    again.json(r#"{"list":[2]}"#);
    assert_eq!(resp.text().await, "data: 2\n\nevent: end\ndata: {}\n\n");
}

#[tokio::test]
async fn wait_is_honoured_between_calls() {
    let mut backend = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&backend], "{minWait: 0s}").await;
    let client = tokio::spawn(async move { get(ss.proxy_addr, "h", "/api/stream").await });
    backend
        .next_call()
        .await
        .json(r#"{"list":[1],"continue":true,"wait":400}"#);
    let t0 = tokio::time::Instant::now();
    let c2 = backend.next_call().await;
    // A lower bound only: the wait must not be cut short.
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    c2.json(r#"{"list":[2]}"#);
    client.await.unwrap().text().await;
}

#[tokio::test]
async fn calls_spread_over_endpoints() {
    let mut a = JsonBackend::start().await;
    let mut b = JsonBackend::start().await;
    let (_cfg, ss) = setup(&[&a, &b], "{minWait: 0s}").await;
    let client = tokio::spawn(async move { get(ss.proxy_addr, "h", "/api/stream").await });
    let mut seen = (0, 0);
    for n in 1..=4 {
        let last = n == 4;
        let body = format!(
            r#"{{"list":[{n}],"continue":{},"wait":0,"next":{n}}}"#,
            !last
        );
        tokio::select! {
            c = a.next_call() => { seen.0 += 1; c.json(&body) }
            c = b.next_call() => { seen.1 += 1; c.json(&body) }
        }
    }
    assert_eq!(
        seen,
        (2, 2),
        "round robin should alternate endpoints per call"
    );
    let text = client.await.unwrap().text().await;
    assert_eq!(events(&text).len(), 5);
}

/// Answers four calls arriving at `a` or `b` (the last one ends the feed); returns how many
/// each got.
async fn serve_four(a: &mut JsonBackend, b: &mut JsonBackend) -> (u32, u32) {
    let mut seen = (0, 0);
    for n in 1..=4 {
        let body = format!(
            r#"{{"list":[{n}],"continue":{},"wait":0,"next":{n}}}"#,
            n != 4
        );
        tokio::select! {
            c = a.next_call() => { seen.0 += 1; c.json(&body) }
            c = b.next_call() => { seen.1 += 1; c.json(&body) }
        }
    }
    seen
}

#[tokio::test]
async fn sticky_rules_keep_every_call_of_a_stream_on_one_endpoint() {
    let mut a = JsonBackend::start().await;
    let mut b = JsonBackend::start().await;
    let (_cfg, ss) = setup_with(
        &[&a, &b],
        "{minWait: 0s}",
        "      loadBalancing: {policy: Sticky, sticky: {header: x-user}}\n",
    )
    .await;
    for user in ["alice", "bob", "carol"] {
        let req = Request::get("/api/stream")
            .header("host", "h")
            .header("x-user", user)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let client = tokio::spawn(async move { send(ss.proxy_addr, req).await });
        let seen = serve_four(&mut a, &mut b).await;
        assert!(seen == (4, 0) || seen == (0, 4), "{user}: {seen:?}");
        client.await.unwrap().text().await;
    }
}

#[tokio::test]
async fn least_connections_rules_poll_too() {
    let mut a = JsonBackend::start().await;
    let mut b = JsonBackend::start().await;
    let (_cfg, ss) = setup_with(
        &[&a, &b],
        "{minWait: 0s}",
        "      loadBalancing: {policy: LeastConnections}\n",
    )
    .await;
    let client = tokio::spawn(async move { get(ss.proxy_addr, "h", "/api/stream").await });
    let (x, y) = serve_four(&mut a, &mut b).await;
    assert_eq!(x + y, 4);
    let text = client.await.unwrap().text().await;
    assert_eq!(events(&text).len(), 5);
}
