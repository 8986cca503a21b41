//! Secrets never reach logs: every log line (all crates, TRACE level) written while requests
//! carrying credentials go through ssegate over HTTP/1.1 and HTTP/2, fail in every way, and a
//! Secret manifest with broken key material is loaded, is captured and searched.
//! Alone in its test binary: it installs the process-wide tracing subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

const SECRETS: [&str; 5] = [
    "BEARER-SECRET-TOKEN-1",
    "COOKIE-SECRET-2",
    "PROXY-SECRET-3",
    "KEY-MATERIAL-4",
    "RESPONSE-BODY-SECRET-5",
];

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn with_credentials(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "h")
        .header("authorization", format!("Bearer {}", SECRETS[0]))
        .header("cookie", format!("sid={}; theme=dark", SECRETS[1]))
        .header("proxy-authorization", format!("Basic {}", SECRETS[2]))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_cookies_and_key_material_never_reach_the_logs() {
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let mut backend = Backend::start(Reply::Sse).await;
    let fixed = Backend::start(Reply::Fixed {
        status: 401,
        content_type: "application/json",
        body: "{\"error\":\"RESPONSE-BODY-SECRET-5\"}",
    })
    .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = ConfigDir::new();
    cfg.write(
        "routes.yaml",
        &[
            route_yaml("feed", "/events", "svc", ""),
            route_yaml("dead", "/dead", "dead", ""),
            route_yaml("fixed", "/fixed", "fixed", ""),
        ]
        .join("---\n"),
    );
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    cfg.write("dead.yaml", &service_yaml("dead", &[dead], &[]));
    cfg.write("fixed.yaml", &service_yaml("fixed", &[fixed.addr], &[]));
    let ss = start_ssegate(&cfg).await;

    // HTTP/1.1: a relayed stream, a 404, a 502 and a passed-through 401.
    let mut resp = send(ss.proxy_addr, with_credentials("/events?token=q")).await;
    let s = backend.next_stream().await;
    assert_eq!(
        s.header("authorization"),
        Some(&*format!("Bearer {}", SECRETS[0]))
    );
    s.send("data: hello\n\n").await;
    resp.chunk().await.unwrap();
    drop(s);
    assert_eq!(
        send(ss.proxy_addr, with_credentials("/nothing"))
            .await
            .status,
        404
    );
    assert_eq!(
        send(ss.proxy_addr, with_credentials("/dead")).await.status,
        502
    );
    assert_eq!(
        send(ss.proxy_addr, with_credentials("/fixed")).await.status,
        401
    );

    // HTTP/2 (prior knowledge): the same headers through HPACK.
    let sock = tokio::net::TcpStream::connect(ss.proxy_addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(sock))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = with_credentials("http://h/events");
    req.headers_mut().remove("host");
    req.headers_mut().remove("proxy-authorization");
    let resp2 = h2.send_request(req).await.unwrap();
    assert_eq!(resp2.status(), 200);
    let s2 = backend.next_stream().await;
    s2.send("data: over h2\n\n").await;
    drop(s2);
    let _ = tokio::time::timeout(PATIENCE, resp2.into_body().collect()).await;

    // A broken Secret manifest: the load fails and is logged, the key material is not.
    cfg.write(
        "tls.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: tls, namespace: apps}}\ntype: kubernetes.io/tls\ndata: \"-----BEGIN PRIVATE KEY----- {}\"\n",
            SECRETS[3]
        ),
    );
    eventually("the failed reload is counted", || async {
        sample(
            &metrics(&ss).await,
            r#"ssegate_config_reloads_total{result="failure"}"#,
        )
        .is_some_and(|v| v >= 1.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    // The capture works and saw the interesting paths.
    for expected in [
        "request failed",
        "connect failed",
        "invalid configuration file",
        "invalid Secret",
    ] {
        assert!(
            logs.contains(expected),
            "no {expected:?} in the logs:\n{logs}"
        );
    }
    for secret in SECRETS {
        assert!(
            !logs.contains(secret),
            "{secret} leaked into the logs:\n{}",
            logs.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
