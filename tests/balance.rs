//! Load balancing over three real backends: sticky keys (header, cookie, query) across
//! reconnects and across two ssegate instances on the same configuration, least connections,
//! and endpoints leaving the EndpointSlice while streams are open.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use futures_util::future::select_all;
use http::Request;
use http_body_util::Full;
use ssegate::server::Running;

/// Service `svc` (port 80) with one EndpointSlice per endpoint, since the three loopback
/// backends listen on different ports; `(address, ready)`.
fn slices_yaml(eps: &[(SocketAddr, bool)]) -> String {
    let mut out = "apiVersion: v1\nkind: Service\nmetadata: {name: svc, namespace: apps}\nspec:\n  ports: [{port: 80}]\n".to_string();
    for (i, (a, ready)) in eps.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}\n  namespace: apps\n  labels: {{kubernetes.io/service-name: svc}}\naddressType: IPv4\nports: [{{port: {}}}]\nendpoints:\n  - addresses: [\"{}\"]\n    conditions: {{ready: {ready}}}\n",
            a.port(),
            a.ip()
        ));
    }
    out
}

/// Three backends, route `/events` → `svc` with the given `loadBalancing` YAML lines.
async fn setup(lb: &str) -> (Vec<Backend>, ConfigDir, Running) {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(Backend::start(Reply::Sse).await);
    }
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", lb));
    let eps: Vec<_> = backends.iter().map(|b| (b.addr, true)).collect();
    cfg.write("svc.yaml", &slices_yaml(&eps));
    let ss = start_ssegate(&cfg).await;
    (backends, cfg, ss)
}

/// The next stream to reach any of `backends`, and which backend got it.
async fn which(backends: &mut [Backend]) -> (usize, Stream) {
    let (s, i, _) = select_all(backends.iter_mut().map(|b| Box::pin(b.next_stream()))).await;
    (i, s)
}

fn req(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut r = Request::get(path).header("host", "events.example.com");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::new())).unwrap()
}

/// Opens a stream through `proxy`, proves it is live end to end, and returns which backend
/// served it plus the response.
async fn open(
    proxy: SocketAddr,
    backends: &mut [Backend],
    r: Request<Full<Bytes>>,
) -> (usize, ClientResponse, Stream) {
    let mut resp = send(proxy, r).await;
    assert_eq!(resp.status, 200);
    let (i, s) = which(backends).await;
    s.send(format!("data: from {i}\n\n")).await;
    assert_eq!(resp.read_until("\n\n").await, format!("data: from {i}\n\n"));
    (i, resp, s)
}

/// For twelve sessions: the backend of the first stream is the backend of a reconnect
/// through the same ssegate and of a stream through a second ssegate started on the same
/// configuration; and the sessions do not all land on one backend.
async fn assert_sticky(lb: &str, make: impl Fn(&str) -> Request<Full<Bytes>>) {
    let (mut backends, cfg, ss1) = setup(lb).await;
    let ss2 = start_ssegate(&cfg).await;
    let mut used = HashSet::new();
    for n in 0..12 {
        let user = format!("user-{n}");
        let (first, resp, _s) = open(ss1.proxy_addr, &mut backends, make(&user)).await;
        drop(resp);
        let (again, _r, _s2) = open(ss1.proxy_addr, &mut backends, make(&user)).await;
        assert_eq!(again, first, "{user}: reconnect moved to another backend");
        let (other, _r, _s3) = open(ss2.proxy_addr, &mut backends, make(&user)).await;
        assert_eq!(other, first, "{user}: the second ssegate disagrees");
        used.insert(first);
    }
    assert!(used.len() >= 2, "every session on backend {used:?}");
}

#[tokio::test]
async fn sticky_header_keeps_a_user_on_one_backend_everywhere() {
    assert_sticky(
        "      loadBalancing:\n        policy: Sticky\n        sticky: {header: X-User-ID}\n",
        |user| req("/events", &[("x-user-id", user)]),
    )
    .await;
}

#[tokio::test]
async fn sticky_query_keeps_a_user_on_one_backend_everywhere() {
    assert_sticky(
        "      loadBalancing:\n        policy: Sticky\n        sticky: {query: user}\n",
        |user| req(&format!("/events/sub?a=1&user={user}"), &[]),
    )
    .await;
}

#[tokio::test]
async fn sticky_cookie_is_issued_once_and_followed_everywhere() {
    let (mut backends, cfg, ss1) = setup(
        "      loadBalancing:\n        policy: Sticky\n        sticky: {cookie: sid, boundedLoad: 2}\n",
    )
    .await;
    let ss2 = start_ssegate(&cfg).await;
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.port().to_string()).collect();
    let mut used = HashSet::new();
    let mut ids = HashSet::new();
    for _ in 0..8 {
        // A browser's first EventSource request: no cookie yet.
        let (first, resp, _s) = open(ss1.proxy_addr, &mut backends, req("/events", &[])).await;
        let set = resp
            .header("set-cookie")
            .expect("a session cookie")
            .to_string();
        let (pair, attrs) = set.split_once(';').unwrap();
        let id = pair.strip_prefix("sid=").unwrap().to_string();
        assert_eq!(attrs.trim(), "Path=/events; HttpOnly; SameSite=Lax");
        assert_eq!(id.len(), 32);
        for a in &addrs {
            assert!(!set.contains(a.as_str()), "cookie {set} names an endpoint");
        }
        assert!(ids.insert(id.clone()), "session ids repeat");
        drop(resp);
        // Its reconnects carry the cookie (among others) and stay on that backend, on
        // either ssegate, without being issued a new one.
        let cookie = format!("theme=dark; sid={id}");
        for proxy in [ss1.proxy_addr, ss2.proxy_addr] {
            let (again, r, _s2) =
                open(proxy, &mut backends, req("/events", &[("cookie", &cookie)])).await;
            assert_eq!(again, first, "session {id} moved");
            assert_eq!(r.header("set-cookie"), None);
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "every session on backend {used:?}");
}

#[tokio::test]
async fn least_connections_keeps_open_streams_within_one() {
    let (mut backends, _cfg, ss) = setup("      loadBalancing: {policy: LeastConnections}\n").await;
    let mut open_streams: Vec<(usize, ClientResponse, Stream)> = Vec::new();
    let spread = |streams: &[(usize, ClientResponse, Stream)]| {
        let mut c = [0usize; 3];
        for (i, _, _) in streams {
            c[*i] += 1;
        }
        c
    };
    for _ in 0..9 {
        open_streams.push(open(ss.proxy_addr, &mut backends, req("/events", &[])).await);
        let c = spread(&open_streams);
        assert!(
            c.iter().max().unwrap() - c.iter().min().unwrap() <= 1,
            "{c:?}"
        );
    }
    assert_eq!(spread(&open_streams), [3, 3, 3]);
    let m = metrics(&ss).await;
    assert_eq!(
        sample(&m, r#"ssegate_balance_max_over_mean{route="apps/feed"}"#),
        Some(1.0),
        "{m}"
    );

    // Two clients of backend 0 leave; the next two streams fill it up again.
    let mut leaving = Vec::new();
    for _ in 0..2 {
        let k = open_streams.iter().position(|(i, _, _)| *i == 0).unwrap();
        leaving.push(open_streams.remove(k));
    }
    for (_, resp, s) in leaving {
        drop(resp);
        tokio::time::timeout(PATIENCE, s.closed)
            .await
            .expect("upstream not closed")
            .ok();
    }
    // 3 streams on the fullest endpoint over a mean of 7/3. Eventually: the proxy's worker
    // thread may still be releasing the streams' endpoint counts when the backend sees the
    // upstream close.
    eventually("the two streams leave the endpoint counts", || {
        let ss = &ss;
        async move {
            let m = metrics(ss).await;
            sample(&m, r#"ssegate_balance_max_over_mean{route="apps/feed"}"#)
                .is_some_and(|ratio| (ratio - 9.0 / 7.0).abs() < 1e-9)
        }
    })
    .await;
    for _ in 0..2 {
        let s = open(ss.proxy_addr, &mut backends, req("/events", &[])).await;
        assert_eq!(s.0, 0);
        open_streams.push(s);
    }
    for _ in 0..3 {
        open_streams.push(open(ss.proxy_addr, &mut backends, req("/events", &[])).await);
        let c = spread(&open_streams);
        assert!(
            c.iter().max().unwrap() - c.iter().min().unwrap() <= 1,
            "{c:?}"
        );
    }
}

/// Six streams, two per backend; then backend 1 leaves the EndpointSlice (`unready`: it
/// stays listed but not ready). Only its streams end, cleanly after a `retry:` hint; the
/// others keep flowing and new streams avoid it.
async fn endpoint_leaves(unready: bool) {
    let (mut backends, cfg, ss) = setup("      loadBalancing: {policy: LeastConnections}\n").await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        streams.push(open(ss.proxy_addr, &mut backends, req("/events", &[])).await);
    }
    let mut eps: Vec<_> = backends.iter().map(|b| (b.addr, true)).collect();
    if unready {
        eps[1].1 = false;
    } else {
        eps.remove(1);
    }
    cfg.write("svc.yaml", &slices_yaml(&eps));

    let mut kept = Vec::new();
    for (i, resp, s) in streams {
        if i == 1 {
            // A `retry:` hint (jittered like a drain's, 1-3 s) and then a clean end.
            let rest = resp.finish().await.expect("a clean end");
            let ms: u64 = rest
                .strip_prefix("retry: ")
                .and_then(|r| r.strip_suffix("\n\n"))
                .and_then(|ms| ms.parse().ok())
                .unwrap_or_else(|| panic!("a stream of the removed endpoint got {rest:?}"));
            assert!((1000..3000).contains(&ms), "{ms}");
            tokio::time::timeout(PATIENCE, s.closed)
                .await
                .expect("upstream of the removed endpoint still open")
                .ok();
        } else {
            kept.push((i, resp, s));
        }
    }
    assert_eq!(kept.len(), 4);
    for (i, resp, s) in &mut kept {
        assert!(s.is_open());
        s.send(format!("data: still {i}\n\n")).await;
        assert_eq!(
            resp.read_until("\n\n").await,
            format!("data: still {i}\n\n")
        );
    }
    for _ in 0..4 {
        let (i, _r, _s) = open(ss.proxy_addr, &mut backends, req("/events", &[])).await;
        assert_ne!(i, 1, "a new stream went to the removed endpoint");
    }
}

#[tokio::test]
async fn removing_an_endpoint_moves_only_its_streams() {
    endpoint_leaves(false).await;
}

#[tokio::test]
async fn an_endpoint_turning_unready_loses_only_its_streams() {
    endpoint_leaves(true).await;
}

#[tokio::test]
async fn sticky_streams_stay_put_when_an_endpoint_is_added() {
    let (mut backends, cfg, ss) = setup(
        "      loadBalancing:\n        policy: Sticky\n        sticky: {header: X-User-ID}\n",
    )
    .await;
    let mut streams = Vec::new();
    for n in 0..9 {
        let user = format!("user-{n}");
        streams.push(
            open(
                ss.proxy_addr,
                &mut backends,
                req("/events", &[("x-user-id", &user)]),
            )
            .await,
        );
    }
    // A fourth backend joins: keys may now prefer it, but open streams do not move.
    backends.push(Backend::start(Reply::Sse).await);
    let eps: Vec<_> = backends.iter().map(|b| (b.addr, true)).collect();
    cfg.write("svc.yaml", &slices_yaml(&eps));
    eventually("the fourth backend is served", || async {
        ss.table
            .load()
            .route("events.example.com", "/events")
            .is_some_and(|r| r.backend.endpoints().len() == 4)
    })
    .await;
    for (i, resp, s) in &mut streams {
        s.send(format!("data: after {i}\n\n")).await;
        assert_eq!(
            resp.read_until("\n\n").await,
            format!("data: after {i}\n\n")
        );
    }
}

#[tokio::test]
async fn sticky_source_ip_keeps_a_client_on_one_backend_everywhere() {
    // Every test client connects from 127.0.0.1: one key, so one backend, on both
    // instances, whatever the request carries.
    let (mut backends, cfg, ss1) =
        setup("      loadBalancing:\n        policy: Sticky\n        sticky: {sourceIP: true}\n")
            .await;
    let ss2 = start_ssegate(&cfg).await;
    let (first, _r, _s) = open(ss1.proxy_addr, &mut backends, req("/events", &[])).await;
    for n in 0..6 {
        let user = format!("user-{n}");
        for proxy in [ss1.proxy_addr, ss2.proxy_addr] {
            let (i, _r, _s) = open(
                proxy,
                &mut backends,
                req("/events", &[("x-user-id", &user)]),
            )
            .await;
            assert_eq!(i, first, "the same client address moved");
        }
    }
}
