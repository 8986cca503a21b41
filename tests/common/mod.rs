//! Test fixtures: a scriptable SSE backend, a configuration directory, ssegate started
//! in-process on ephemeral ports, and a minimal HTTP/1.1 client over a real socket.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::poll_fn;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ssegate::server::{Running, ServerConfig, start_standalone};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Generous bound for "eventually" in tests; never a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// One request the backend received, with the means to stream its response.
pub struct Stream {
    pub parts: http::request::Parts,
    pub body: Bytes,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    pub closed: oneshot::Receiver<()>,
}

impl Stream {
    /// Sends one chunk of the response body.
    pub async fn send(&self, s: impl Into<Bytes>) {
        self.tx
            .send(Ok(Frame::data(s.into())))
            .await
            .expect("response body dropped");
    }
    /// True while the proxy still holds the response open.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How a backend answers.
#[derive(Clone)]
pub enum Reply {
    /// `200 text/event-stream`, body streamed by the test through [`Stream`].
    Sse,
    /// A fixed response.
    Fixed {
        status: u16,
        content_type: &'static str,
        body: &'static str,
    },
}

/// A real HTTP/1 backend on 127.0.0.1 that hands every request to the test.
pub struct Backend {
    pub addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<Stream>,
    _task: tokio::task::JoinHandle<()>,
}

/// Response body that reports when it is dropped (the connection to the proxy went away).
struct Tracked {
    inner: StreamBody<ReceiverStream>,
    closed: Option<oneshot::Sender<()>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(c) = self.closed.take() {
            let _ = c.send(());
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}

struct ReceiverStream(mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

impl futures_util::Stream for ReceiverStream {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

type BackendBody = http_body_util::Either<Tracked, Full<Bytes>>;

impl Backend {
    pub async fn start(reply: Reply) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                let streams_tx = streams_tx.clone();
                let reply = reply.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let streams_tx = streams_tx.clone();
                        let reply = reply.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let resp: Response<BackendBody> = match reply {
                                Reply::Sse => {
                                    let (tx, rx) = mpsc::channel(64);
                                    let (ctx, crx) = oneshot::channel();
                                    let _ = streams_tx.send(Stream {
                                        parts,
                                        body,
                                        tx,
                                        closed: crx,
                                    });
                                    Response::builder()
                                        .header("content-type", "text/event-stream")
                                        .body(http_body_util::Either::Left(Tracked {
                                            inner: StreamBody::new(ReceiverStream(rx)),
                                            closed: Some(ctx),
                                        }))
                                        .unwrap()
                                }
                                Reply::Fixed {
                                    status,
                                    content_type,
                                    body: text,
                                } => {
                                    let (tx, _rx) = mpsc::channel(1);
                                    let (_ctx, crx) = oneshot::channel();
                                    let _ = streams_tx.send(Stream {
                                        parts,
                                        body,
                                        tx,
                                        closed: crx,
                                    });
                                    Response::builder()
                                        .status(status)
                                        .header("content-type", content_type)
                                        .body(http_body_util::Either::Right(Full::new(
                                            Bytes::from_static(text.as_bytes()),
                                        )))
                                        .unwrap()
                                }
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            streams,
            _task: task,
        }
    }

    /// The next request the backend received.
    pub async fn next_stream(&mut self) -> Stream {
        tokio::time::timeout(PATIENCE, self.streams.recv())
            .await
            .expect("backend got no request")
            .unwrap()
    }
}

/// A directory of manifests for standalone mode.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
}

impl ConfigDir {
    pub fn new() -> Self {
        ConfigDir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
    /// Writes a file atomically (write + rename), as editors and ConfigMap updates do.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }
}

/// A route `ns/name` with one Prefix rule `path` → Service `svc` port 80, plus `extra`
/// YAML lines appended to the rule (indented by the caller as `      key: value`).
pub fn route_yaml(name: &str, path: &str, svc: &str, extra: &str) -> String {
    format!(
        "apiVersion: ssegate.io/v1alpha1\nkind: SseRoute\nmetadata: {{name: {name}, namespace: apps}}\nspec:\n  rules:\n    - match: {{path: {path}}}\n      backend: {{service: {svc}, port: 80}}\n{extra}"
    )
}

/// A selector-less Service `svc` (port 80) and an EndpointSlice with the given ready
/// endpoints (and unready ones, if any).
pub fn service_yaml(svc: &str, ready: &[SocketAddr], unready: &[SocketAddr]) -> String {
    let mut eps = String::new();
    for (addrs, ok) in [(ready, true), (unready, false)] {
        for a in addrs {
            eps.push_str(&format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: {ok}}}\n",
                a.ip()
            ));
        }
    }
    // All endpoints of one slice share a port: use the first address's port.
    let port = ready.iter().chain(unready).next().map_or(9, |a| a.port());
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: apps}}\nspec:\n  ports: [{{port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: apps\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{port: {port}}}]\nendpoints:\n{}",
        if eps.is_empty() {
            "  []\n".to_string()
        } else {
            eps
        }
    )
}

/// ssegate running in-process on ephemeral loopback ports, reloading quickly.
pub async fn start_ssegate(config: &ConfigDir) -> Running {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        reload_poll: Duration::from_millis(100),
        reload_debounce: Duration::from_millis(20),
        ..ServerConfig::default()
    };
    start_standalone(config.path(), cfg).await.unwrap()
}

/// A response being read from a real client connection.
pub struct ClientResponse {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    body: Incoming,
    _conn: tokio::task::JoinHandle<()>,
}

impl ClientResponse {
    /// The next body chunk, or None at the end. Panics if nothing comes within PATIENCE.
    pub async fn chunk(&mut self) -> Option<Bytes> {
        loop {
            let frame = tokio::time::timeout(
                PATIENCE,
                poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)),
            )
            .await
            .expect("no body data in time")?;
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        return Some(data);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Reads until the accumulated body contains `needle`; returns everything read.
    pub async fn read_until(&mut self, needle: &str) -> String {
        let mut acc = String::new();
        while !acc.contains(needle) {
            match self.chunk().await {
                Some(c) => acc.push_str(&String::from_utf8_lossy(&c)),
                None => panic!("body ended before {needle:?}; got {acc:?}"),
            }
        }
        acc
    }

    /// Reads the whole body.
    pub async fn text(mut self) -> String {
        let mut acc = String::new();
        while let Some(c) = self.chunk().await {
            acc.push_str(&String::from_utf8_lossy(&c));
        }
        acc
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Reads to the end of the body: `Ok(rest)` when the body ended cleanly (an SSE client
    /// then reconnects), `Err` when it was cut off with an error.
    pub async fn finish(mut self) -> Result<String, String> {
        let mut acc = String::new();
        loop {
            let frame = tokio::time::timeout(
                PATIENCE,
                poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)),
            )
            .await
            .expect("body did not end in time");
            match frame {
                None => return Ok(acc),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        acc.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Some(Err(e)) => return Err(format!("{e} after {acc:?}")),
            }
        }
    }
}

/// Sends `req` over a fresh TCP connection to `addr`.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> ClientResponse {
    let sock = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("no response in time")
        .unwrap();
    let (parts, body) = resp.into_parts();
    ClientResponse {
        status: parts.status,
        headers: parts.headers,
        body,
        _conn: conn,
    }
}

/// `GET path` with `Host: host`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> ClientResponse {
    let req = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(addr, req).await
}

/// The admin endpoint's `/metrics` text.
pub async fn metrics(running: &Running) -> String {
    get(running.admin_addr, "admin", "/metrics")
        .await
        .text()
        .await
}

/// Value of one sample line in a metrics text, e.g. `ssegate_events_total{route="apps/a"}`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// Polls `f` every 20 ms until it returns true (bounded by PATIENCE).
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
