//! Test fixtures: a scriptable SSE backend, a configuration directory, ssegate started
//! in-process on ephemeral ports, and a minimal HTTP/1.1 client over a real socket.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
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
use tokio::io::AsyncWriteExt;
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
    /// Sends one chunk; false if the proxy has dropped the response.
    pub async fn try_send(&self, s: impl Into<Bytes>) -> bool {
        self.tx.send(Ok(Frame::data(s.into()))).await.is_ok()
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

/// How a [`Backend`] serves connections.
#[derive(Clone, Default)]
pub struct BackendOpts {
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A request's head and its whole body (empty if it could not be read).
async fn read_request(req: Request<Incoming>) -> (http::request::Parts, Bytes) {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (parts, body)
}

/// The next item of `rx`, failing the test with `what` if none comes within [`PATIENCE`].
async fn next_within_patience<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect(what)
        .unwrap()
}

/// Accepts connections on an ephemeral 127.0.0.1 port and serves each with the service
/// `make_svc(peer)` builds for it (see [`serve_conn`]). Returns the address and the
/// accept task.
async fn serve<F, S, B>(opts: BackendOpts, make_svc: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(SocketAddr) -> S + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (sock, peer) = listener.accept().await.unwrap();
            tokio::spawn(serve_conn(sock, opts.tls.clone(), make_svc(peer)));
        }
    });
    (addr, task)
}

/// Serves one accepted connection with `svc`: HTTP/1.1 or HTTP/2 (prior knowledge or ALPN),
/// over TLS when `tls` is set (a failed handshake just ends the connection).
async fn serve_conn<S, B>(sock: TcpStream, tls: Option<Arc<rustls::ServerConfig>>, svc: S)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    match tls {
        None => {
            let _ = builder.serve_connection(TokioIo::new(sock), svc).await;
        }
        Some(cfg) => {
            let Ok(io) = tokio_rustls::TlsAcceptor::from(cfg).accept(sock).await else {
                return;
            };
            let _ = builder.serve_connection(TokioIo::new(io), svc).await;
        }
    }
}

impl Backend {
    pub async fn start(reply: Reply) -> Backend {
        Self::start_with(reply, BackendOpts::default()).await
    }

    /// A backend speaking HTTP/1.1 and HTTP/2 (prior knowledge or ALPN), with TLS if asked.
    pub async fn start_with(reply: Reply, opts: BackendOpts) -> Backend {
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (addr, task) = serve(opts, move |_peer| {
            let streams_tx = streams_tx.clone();
            let reply = reply.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let streams_tx = streams_tx.clone();
                let reply = reply.clone();
                async move {
                    let (parts, body) = read_request(req).await;
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
            })
        })
        .await;
        Backend {
            addr,
            streams,
            _task: task,
        }
    }

    /// The next request the backend received.
    pub async fn next_stream(&mut self) -> Stream {
        next_within_patience(&mut self.streams, "backend got no request").await
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

/// Proxy worker threads of in-process ssegates: more than one, as in production, so every
/// suite runs across runtimes (streams on worker threads, control plane on the test's).
pub const TEST_WORKERS: usize = 2;

/// ssegate running in-process on ephemeral loopback ports, reloading quickly.
pub async fn start_ssegate(config: &ConfigDir) -> Running {
    start_ssegate_with(config, ssegate::proxy::ProxyConfig::default()).await
}

/// [`start_ssegate`] with the given proxy settings.
pub async fn start_ssegate_with(config: &ConfigDir, proxy: ssegate::proxy::ProxyConfig) -> Running {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        reload_poll: Duration::from_millis(100),
        reload_debounce: Duration::from_millis(20),
        proxy,
        workers: TEST_WORKERS,
        ..ServerConfig::default()
    };
    start_standalone(config.path(), cfg).await.unwrap()
}

/// Like [`start_ssegate`], with `tweak` applied to the configuration first.
pub async fn start_ssegate_tweaked(
    config: &ConfigDir,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Running {
    try_start_ssegate(config, tweak).await.unwrap()
}

/// [`start_ssegate_tweaked`] returning start-up errors.
pub async fn try_start_ssegate(
    config: &ConfigDir,
    tweak: impl FnOnce(&mut ServerConfig),
) -> anyhow::Result<Running> {
    let mut cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        reload_poll: Duration::from_millis(100),
        reload_debounce: Duration::from_millis(20),
        workers: TEST_WORKERS,
        ..ServerConfig::default()
    };
    tweak(&mut cfg);
    start_standalone(config.path(), cfg).await
}

/// A response being read from a real client connection.
pub struct ClientResponse {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    body: Incoming,
    _conn: tokio::task::JoinHandle<()>,
}

impl ClientResponse {
    /// Wraps a response whose connection is driven elsewhere (e.g. a shared HTTP/2 one).
    pub fn new(resp: Response<Incoming>) -> ClientResponse {
        let (parts, body) = resp.into_parts();
        Self::from_parts(parts, body)
    }

    /// A response received on a connection the caller drives.
    pub fn from_parts(parts: http::response::Parts, body: Incoming) -> Self {
        ClientResponse {
            status: parts.status,
            headers: parts.headers,
            body,
            _conn: tokio::spawn(async {}),
        }
    }

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

    /// The next body chunk, `Ok(None)` at a clean end, `Err` when the body failed (e.g. a
    /// truncated chunked encoding). Panics if nothing comes within PATIENCE.
    pub async fn chunk_or_error(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            let frame = tokio::time::timeout(
                PATIENCE,
                poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)),
            )
            .await
            .expect("no body data in time");
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
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

/// Status, headers and body of a [`JsonBackend`] answer.
type PollReply = (u16, Vec<(String, String)>, String);

/// One call a [`JsonBackend`] received; answer it with [`PollCall::json`] or
/// [`PollCall::reply`] (dropping it answers 500).
pub struct PollCall {
    pub parts: http::request::Parts,
    pub body: Bytes,
    /// The proxy's side of the connection the call came on.
    pub peer: SocketAddr,
    reply: oneshot::Sender<PollReply>,
}

impl PollCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn path_and_query(&self) -> &str {
        self.parts.uri.path_and_query().unwrap().as_str()
    }
    /// A query parameter, percent-decoded.
    pub fn query(&self, key: &str) -> Option<String> {
        self.parts.uri.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then(|| percent_decode(v))
        })
    }
    /// The body as JSON.
    pub fn json_body(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    /// Answers `200 application/json` with `body`.
    pub fn json(self, body: &str) {
        self.reply(200, &[("content-type", "application/json")], body);
    }
    pub fn reply(self, status: u16, headers: &[(&str, &str)], body: &str) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let _ = self.reply.send((status, headers, body.to_string()));
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A real HTTP/1 JSON backend on 127.0.0.1 whose every call is answered by the test.
pub struct JsonBackend {
    pub addr: SocketAddr,
    calls: mpsc::UnboundedReceiver<PollCall>,
    _task: tokio::task::JoinHandle<()>,
}

impl JsonBackend {
    pub async fn start() -> JsonBackend {
        Self::start_with(BackendOpts::default()).await
    }

    /// A JSON backend speaking HTTP/1.1 and HTTP/2 (prior knowledge or ALPN), with TLS if
    /// asked.
    pub async fn start_with(opts: BackendOpts) -> JsonBackend {
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let (addr, task) = serve(opts, move |peer| {
            let calls_tx = calls_tx.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let calls_tx = calls_tx.clone();
                async move {
                    let (parts, body) = read_request(req).await;
                    let (tx, rx) = oneshot::channel();
                    let _ = calls_tx.send(PollCall {
                        parts,
                        body,
                        peer,
                        reply: tx,
                    });
                    let (status, headers, text) =
                        rx.await.unwrap_or((500, vec![], "no answer".to_string()));
                    let mut resp = Response::builder().status(status);
                    for (k, v) in headers {
                        resp = resp.header(k, v);
                    }
                    Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(text))).unwrap())
                }
            })
        })
        .await;
        JsonBackend {
            addr,
            calls,
            _task: task,
        }
    }

    /// The next call (bounded by PATIENCE).
    pub async fn next_call(&mut self) -> PollCall {
        next_within_patience(&mut self.calls, "backend got no call").await
    }

    /// A call arriving within `d`, if any.
    pub async fn call_within(&mut self, d: Duration) -> Option<PollCall> {
        tokio::time::timeout(d, self.calls.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Splits an event-stream text into its events (blank-line separated blocks, comments
/// dropped), each as its lines.
pub fn events(text: &str) -> Vec<Vec<String>> {
    text.split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.starts_with(':'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|b| !b.is_empty())
        .collect()
}

/// A client that sends `GET /events` (host `h`) and then never reads.
pub async fn non_reading_client(proxy: SocketAddr) -> TcpStream {
    non_reading_client_on(proxy, "/events").await
}

/// A client that sends `GET path` (host `h`) and then never reads.
pub async fn non_reading_client_on(proxy: SocketAddr, path: &str) -> TcpStream {
    let mut sock = TcpStream::connect(proxy).await.unwrap();
    sock.write_all(format!("GET {path} HTTP/1.1\r\nhost: h\r\n\r\n").as_bytes())
        .await
        .unwrap();
    sock
}

/// This process's resident set size.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Floods `stream` with 64 KiB events until a send makes no progress for 1 s or `limit`
/// bytes went out; returns the bytes the backend got rid of.
pub async fn flood(stream: &Stream, limit: usize) -> usize {
    let event = Bytes::from(format!("data: {}\n\n", "x".repeat(64 * 1024 - 8)));
    let mut sent = 0;
    while sent < limit {
        match tokio::time::timeout(Duration::from_secs(1), stream.try_send(event.clone())).await {
            Ok(true) => sent += event.len(),
            Ok(false) | Err(_) => break,
        }
    }
    sent
}
