//! The data plane: listeners, request handling and the upstream exchange.
//!
//! A request loads the routing table once (one atomic load), keeps only the `Arc<Rule>` it
//! matched, asks its backend for a plan (the endpoints to try, chosen by the rule's
//! load-balancing policy from the request's sticky key, if any), connects (falling over to the
//! next endpoint on a connect failure), sends the request and relays the response body through
//! [`relay`]'s wrappers. Errors are classified in [`error::ProxyError`].

pub mod drain;
pub mod error;
pub mod front;
pub mod h1client;
pub mod io;
pub mod limits;
pub mod relay;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::api::Mode;
use crate::balance::{Endpoint, EndpointLease, KeySource, hash_key};
use crate::metrics::Metrics;
use crate::poll::task::PollBody;
use crate::routing::{RouteTable, Rule};
use drain::{Drain, DrainBody};
use error::ProxyError;
use io::{ConnState, Rewind, WriteTimeout};
use limits::{ClientLimiter, ClientLimits, ClientRefusal, ConnectionLimit};
use relay::{EndpointBody, RelayBody, RelayTimers, StreamGuard};
pub use upstream::{UpstreamBody, UpstreamConn};

/// Endpoints tried per request before answering 502.
pub(crate) const CONNECT_ATTEMPTS: usize = 3;

/// Response body of the proxy: a short generated (or passed-through) body, a relayed
/// upstream body, or the event stream of a poll route.
pub type ProxyBody =
    Either<Full<Bytes>, Either<RelayBody<EndpointBody<UpstreamBody>>, DrainBody<PollBody>>>;

/// Request body handed to [`Proxy::forward`]: hyper's streamed body (connections served by
/// hyper: HTTP/2, TLS, and HTTP/1.1 requests with a body or an upgrade), or none (requests
/// read by the own HTTP/1.1 front, [`front`]).
pub type ClientBody = Either<Incoming, Empty<Bytes>>;

/// The shared, atomically swappable routing table.
pub type SharedTable = Arc<ArcSwap<RouteTable>>;

/// The TLS listener's view of the routing table: its certificate store.
#[derive(Debug)]
pub struct TableCerts(pub SharedTable);

impl crate::tls::CurrentCerts for TableCerts {
    fn resolve(&self, sni: Option<&str>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.load().certs().resolve(sni).cloned()
    }
}

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default `--h2-max-concurrent-streams`: Go's net/http2 server default, ample for a browser
/// holding one EventSource per tab on one connection.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 250;

/// Settings of the proxy listeners.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `X-Forwarded-Proto` sent upstream: `http` or `https` (the proxy serving the TLS
    /// listener is built with `https`). Only `http` proxies answer `tls.redirect`.
    pub scheme: &'static str,
    /// How long a client may take to send request headers (HTTP/1.1; slowloris; zero: no
    /// limit).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers) in bytes, at least 8192: HTTP/1.1
    /// answers `431`, HTTP/2 refuses the stream.
    pub max_header_bytes: usize,
    /// Most request headers (HTTP/1.1); more is answered `431`.
    pub max_headers: usize,
    /// Client connections open at once; more are answered `503` (0 = unlimited).
    pub max_connections: usize,
    /// End a client connection that accepts no data for this long (`None` = never); a rule's
    /// `timeouts.clientWriteTimeout` overrides it for the connections carrying its streams.
    pub client_write_timeout: Option<Duration>,
    /// Per-client-IP limits.
    pub client_limits: ClientLimits,
    /// Port written into `tls.redirect` Locations (omitted when 443): where clients reach
    /// the TLS listener from outside.
    pub https_port: u16,
    /// Streams a client may open at once on one HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// Ping an HTTP/2 client after this much connection silence (`None`: never); a client
    /// that does not answer within the same time is disconnected.
    pub h2_keepalive_interval: Option<Duration>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            scheme: "http",
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_connections: 0,
            client_write_timeout: Some(Duration::from_secs(60)),
            client_limits: ClientLimits::default(),
            https_port: 443,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_keepalive_interval: Some(Duration::from_secs(20)),
        }
    }
}

/// Handles proxied requests against the current routing table.
pub struct Proxy {
    table: SharedTable,
    config: ProxyConfig,
    metrics: Metrics,
    drain: Drain,
    clients: Arc<ClientLimiter>,
    connections: Arc<ConnectionLimit>,
}

impl Proxy {
    /// A proxy serving whatever table `table` holds at each request; its streams follow
    /// `drain`, global counters go to `metrics`.
    pub fn new(table: SharedTable, config: ProxyConfig, metrics: Metrics, drain: Drain) -> Self {
        Proxy {
            table,
            clients: ClientLimiter::new(config.client_limits),
            connections: ConnectionLimit::new(config.max_connections),
            config,
            metrics,
            drain,
        }
    }

    /// The same proxy for the TLS listener: `X-Forwarded-Proto: https`, no `tls.redirect`;
    /// table, limits (connections, per-client), metrics and drain are shared.
    pub fn for_tls(&self) -> Proxy {
        Proxy {
            table: self.table.clone(),
            config: ProxyConfig {
                scheme: "https",
                ..self.config.clone()
            },
            metrics: self.metrics.clone(),
            drain: self.drain.clone(),
            clients: self.clients.clone(),
            connections: self.connections.clone(),
        }
    }

    /// The routing table this proxy serves.
    pub fn table(&self) -> &SharedTable {
        &self.table
    }

    /// The connection builder: HTTP/1.1 and HTTP/2 (detected by the client preface, so h2c
    /// with prior knowledge works on the plain listener and ALPN `h2` on the TLS one).
    fn builder(&self) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Some(self.config.header_read_timeout).filter(|t| !t.is_zero()))
            .max_headers(self.config.max_headers)
            // The read buffer bounds the request head: beyond it hyper answers 431.
            .max_buf_size(self.config.max_header_bytes.max(8192));
        // Each h2 stream is flushed on its own (hyper writes DATA frames as the body yields
        // them); flow control is h2's: a stream whose client window is closed stops polling
        // its body, which stops reading that stream's upstream socket and nothing else.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.config.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(self.config.h2_max_concurrent_streams)
            .keep_alive_interval(self.config.h2_keepalive_interval);
        if let Some(interval) = self.config.h2_keepalive_interval {
            builder.http2().keep_alive_timeout(interval);
        }
        builder
    }

    /// Serves connections from `listener`: HTTP/1.1, and HTTP/2 with prior knowledge, on the
    /// same port. Returns once a drain's window opened (the listener is closed, open
    /// connections are asked to finish: HTTP/1.1 keep-alive is disabled, HTTP/2 gets GOAWAY)
    /// and every connection has ended.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.serve_listener(listener, None).await
    }

    /// Like [`Proxy::serve`] for the TLS listener: each connection completes a TLS handshake
    /// (within [`TLS_HANDSHAKE_TIMEOUT`]) and ALPN picks HTTP/2 or HTTP/1.1. Build this proxy
    /// with `scheme: "https"`. Connection limits, write timeouts and drains apply alike.
    pub async fn serve_tls(self: Arc<Self>, listener: TcpListener, acceptor: TlsAcceptor) {
        self.serve_listener(listener, Some(acceptor)).await
    }

    async fn serve_listener(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        let builder = Arc::new(self.builder());
        let graceful = GracefulShutdown::new();
        let stop = self.drain.clone();
        let mut stop = std::pin::pin!(stop.window_opened());
        // Serves `io` (TLS-wrapped first when this is the TLS listener) with `service` under
        // the drain's graceful shutdown; evaluates to the connection's result.
        macro_rules! serve_io {
            ($builder:expr, $tls:expr, $watcher:expr, $peer:expr, $io:expr, $service:expr) => {
                async move {
                    match $tls {
                        None => {
                            let conn = $builder.serve_connection(TokioIo::new($io), $service);
                            $watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let peer = $peer;
                            let io = match tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept($io),
                            )
                            .await
                            {
                                Ok(Ok(io)) => io,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return Ok(());
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return Ok(());
                                }
                            };
                            let conn = $builder.serve_connection(TokioIo::new(io), $service);
                            $watcher.watch(conn.into_owned()).await
                        }
                    }
                }
            };
        }
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut stop => break,
            };
            let _ = stream.set_nodelay(true);
            let refusal = match self.connections.admit() {
                None => Err(ProxyError::MaxConnections {
                    limit: self.config.max_connections,
                }),
                Some(permit) => match self
                    .clients
                    .admit_connection(peer.ip(), tokio::time::Instant::now())
                {
                    Ok(()) => Ok(permit),
                    Err(ClientRefusal::Rate(after)) => Err(ProxyError::ClientRate {
                        retry_after_secs: after.as_secs_f64().ceil() as u64,
                    }),
                    Err(ClientRefusal::Streams) => unreachable!("only streams are counted"),
                },
            };
            let state = Arc::new(ConnState::new(self.config.client_write_timeout));
            let io = WriteTimeout::new(stream, state.clone());
            let watcher = graceful.watcher();
            let builder = builder.clone();
            let tls = tls.clone();
            let permit = match refusal {
                Ok(permit) => permit,
                Err(err) => {
                    // Answered with a short error on the connection, which then closes.
                    self.metrics.connection_rejected(err.metric_label());
                    tracing::debug!(%peer, error = %err, "connection refused");
                    let err = Arc::new(err);
                    let service = hyper::service::service_fn(move |_req| {
                        let mut resp = err.to_response::<Full<Bytes>>();
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    tokio::spawn(async move {
                        let _ = serve_io!(builder, tls, watcher, peer, io, service).await;
                    });
                    continue;
                }
            };
            let proxy = self.clone();
            let service = {
                let proxy = proxy.clone();
                let state = state.clone();
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    let state = state.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            proxy.handle_conn(req.map(Either::Left), peer, state).await,
                        )
                    }
                })
            };
            tokio::spawn(async move {
                // hyper's connection futures (HTTP/1 and HTTP/2 state inline, several KiB)
                // are boxed, so a task the front serves is only as large as the front's
                // own future: the task is what each plaintext stream costs.
                let res = if tls.is_none() {
                    // Plaintext: the own HTTP/1.1 front, which leaves what it does not serve
                    // (h2c, request bodies, upgrades) to hyper with the bytes it read.
                    match front::serve(proxy, io, peer, state).await {
                        None => Ok(()),
                        Some(handoff) => {
                            let io = Rewind::new(handoff.read, handoff.io);
                            let conn = builder.serve_connection(TokioIo::new(io), service);
                            Box::pin(watcher.watch(conn.into_owned())).await
                        }
                    }
                } else {
                    Box::pin(serve_io!(builder, tls, watcher, peer, io, service)).await
                };
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                drop(permit);
            });
        }
        drop(listener);
        tracing::info!(
            connections = graceful.count(),
            "listener closed for the drain; waiting for open connections"
        );
        graceful.shutdown().await;
    }

    /// Answers one request: a relayed upstream response, a redirect or a short JSON error.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        self.handle_conn(req.map(Either::Left), peer, Arc::new(ConnState::default()))
            .await
    }

    /// [`Proxy::handle`] for a request on a client connection whose state is `conn`.
    async fn handle_conn(
        &self,
        req: Request<ClientBody>,
        peer: SocketAddr,
        conn: Arc<ConnState>,
    ) -> Response<ProxyBody> {
        match self.forward(req, peer, conn).await {
            Ok(resp) => resp,
            Err((err, rule)) => {
                if let Some(rule) = rule {
                    if err.is_upstream() {
                        rule.metrics.upstream_error(err.metric_label());
                    } else {
                        rule.metrics.rejected(err.metric_label());
                    }
                }
                tracing::debug!(%peer, error = %err, status = err.status().as_u16(), "request failed");
                err.to_response::<Full<Bytes>>().map(Either::Left)
            }
        }
    }

    async fn forward(
        &self,
        req: Request<ClientBody>,
        peer: SocketAddr,
        conn_state: Arc<ConnState>,
    ) -> Result<Response<ProxyBody>, (ProxyError, Option<Arc<Rule>>)> {
        let host = request_host(&req).ok_or((ProxyError::BadRequest("missing Host"), None))?;
        let rule = {
            let table = self.table.load();
            table.route(&host, req.uri().path()).cloned()
        };
        let Some(rule) = rule else {
            return Err((
                ProxyError::NoRoute {
                    host,
                    path: req.uri().path().to_string(),
                },
                None,
            ));
        };
        if rule.https_redirect && self.config.scheme == "http" {
            return Ok(https_redirect(&host, self.config.https_port, req.uri()));
        }
        let fail = |e: ProxyError| (e, Some(rule.clone()));
        let guard = StreamGuard::admit(&rule).ok_or_else(|| {
            fail(ProxyError::OverCapacity {
                route: rule.route().to_string(),
                limit: rule.max_connections,
            })
        })?;
        let client = self.clients.admit_stream(peer.ip()).map_err(|_| {
            fail(ProxyError::ClientStreams {
                limit: self.config.client_limits.max_streams,
            })
        })?;
        // The rule's client write timeout (or the flag's) governs the connection from now on.
        conn_state.apply_write_timeout(
            rule.timeouts
                .client_write
                .unwrap_or(self.config.client_write_timeout),
            req.version() == Version::HTTP_2,
        );
        let guard = guard.with_client(client).with_conn(conn_state);
        if rule.backend.is_empty() {
            return Err(fail(ProxyError::NoEndpoints(rule.backend.name.clone())));
        }
        let (key, set_cookie) = sticky_key(&rule, &req, peer, self.config.scheme);
        if rule.mode == Mode::Poll {
            // Every call of the stream is placed with the same session key.
            let resp = crate::poll::task::serve(req, guard, key, &host, peer, self.config.scheme)
                .await
                .map_err(fail)?;
            return Ok(resp.map(|b| match b {
                Either::Left(full) => Either::Left(full),
                Either::Right(poll) => Either::Right(Either::Right(DrainBody::new(
                    poll,
                    self.drain.watch(),
                    Some(rule.metrics.bytes_sent_total.clone()),
                ))),
            }))
            .map(|mut resp| {
                if let Some(cookie) = set_cookie {
                    resp.headers_mut().append(header::SET_COOKIE, cookie);
                }
                resp
            });
        }
        let plan = rule.backend.plan(key, CONNECT_ATTEMPTS);
        let (stream, lease) = connect(&rule, plan).await.map_err(fail)?;
        let upstream_req =
            upstream_request(req, &rule, &host, peer, self.config.scheme).map_err(fail)?;
        let upstream_resp = upstream::exchange(&rule, stream, upstream_req)
            .await
            .map_err(fail)?;
        let (mut parts, body) = upstream_resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(cookie) = set_cookie {
            parts.headers.append(header::SET_COOKIE, cookie);
        }
        let sse = is_event_stream(&parts.headers);
        if sse {
            // The framer needs the bytes as sent; a length would be wrong once keepalives
            // are injected.
            parts.headers.remove(header::CONTENT_LENGTH);
            parts
                .headers
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            parts
                .headers
                .insert("x-accel-buffering", HeaderValue::from_static("no"));
        }
        let timers = RelayTimers {
            keepalive: rule.keepalive,
            idle: rule.timeouts.idle,
            max_duration: rule.timeouts.max_duration,
        };
        let body = RelayBody::new(
            EndpointBody::new(body, lease),
            sse,
            timers,
            guard,
            self.drain.watch(),
        );
        Ok(Response::from_parts(
            parts,
            Either::Right(Either::Left(body)),
        ))
    }
}

/// `308 Permanent Redirect` to the same host, path and query over `https` (the method and
/// body are kept by clients, unlike 301).
fn https_redirect(host: &str, port: u16, uri: &Uri) -> Response<ProxyBody> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{host}{port}{pq}");
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Connects to the endpoints of `plan` in turn; the first success wins. The returned lease
/// counts the stream on its endpoint (attempts are counted while they run).
pub(crate) async fn connect(
    rule: &Rule,
    plan: Vec<Arc<Endpoint>>,
) -> Result<(TcpStream, EndpointLease), ProxyError> {
    if plan.is_empty() {
        return Err(ProxyError::NoEndpoints(rule.backend.name.clone()));
    }
    let mut last = None;
    for endpoint in plan {
        let addr = endpoint.addr();
        let lease = EndpointLease::new(endpoint);
        let attempt = TcpStream::connect(addr);
        let res = match rule.timeouts.connect {
            Some(t) => tokio::time::timeout(t, attempt).await.ok(),
            None => Some(attempt.await),
        };
        match res {
            Some(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, lease));
            }
            Some(Err(e)) => {
                tracing::warn!(route = rule.route(), endpoint = %addr, error = %e, "connect failed");
                rule.metrics.upstream_error("connect_failed");
                last = Some((e.to_string(), false));
            }
            None => {
                tracing::warn!(route = rule.route(), endpoint = %addr, "connect timed out");
                rule.metrics.upstream_error("connect_timeout");
                last = Some(("timed out".to_string(), true));
            }
        }
    }
    let (reason, timed_out) = last.unwrap_or_else(|| ("no endpoints".into(), false));
    Err(ProxyError::Connect {
        backend: rule.backend.name.clone(),
        reason,
        timed_out,
    })
}

/// The hashed sticky key of a request on a sticky rule, and the `Set-Cookie` of a session
/// ssegate issues because a `cookie:` key is missing. `(None, None)` for other policies and
/// requests without the key (round robin).
fn sticky_key<B>(
    rule: &Rule,
    req: &Request<B>,
    peer: SocketAddr,
    scheme: &str,
) -> (Option<u64>, Option<HeaderValue>) {
    let Some(source) = rule.backend.policy().key_source() else {
        return (None, None);
    };
    if let Some(key) = source.key_hash(req.headers(), req.uri().query(), peer.ip()) {
        return (Some(key), None);
    }
    let KeySource::Cookie(name) = source else {
        return (None, None);
    };
    // No session yet: issue one, and place this stream where the browser's reconnects
    // (which will carry the cookie) will go.
    match issue_cookie(name, &rule.path, scheme) {
        Some((id, cookie)) => (Some(hash_key(id.as_bytes())), Some(cookie)),
        None => (None, None),
    }
}

/// A new sticky session: a random 128-bit id and the `Set-Cookie` header that stores it under
/// `name` for the rule's `path`. The id is random, so the cookie says nothing about any
/// endpoint; the endpoint follows from hashing it. `None` if the system has no randomness
/// to give (the request is then balanced round robin).
fn issue_cookie(name: &str, path: &str, scheme: &str) -> Option<(String, HeaderValue)> {
    let mut raw = [0u8; 16];
    if let Err(e) = getrandom::fill(&mut raw) {
        tracing::warn!(error = %e, "no randomness for a session cookie");
        return None;
    }
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    // A path that cannot be a cookie attribute value (`;`, controls) widens the cookie to
    // the whole host rather than breaking the header.
    let path = if path.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
        path
    } else {
        "/"
    };
    let secure = if scheme == "https" { "; Secure" } else { "" };
    let cookie = format!("{name}={id}; Path={path}; HttpOnly; SameSite=Lax{secure}");
    let value = HeaderValue::from_str(&cookie).ok()?;
    Some((id, value))
}

/// The request's host, lower-cased and without a port: the `Host` header, or the URI's
/// authority (HTTP/2, absolute-form).
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    let host = if let Some(v6) = raw.strip_prefix('[') {
        // [::1]:8080
        v6.split(']').next().unwrap_or(v6)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                raw
            }
        })
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let identity = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"));
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("text/event-stream")
        && identity
}

/// Builds the upstream request: rewritten path, filtered headers, `X-Forwarded-*`.
pub(crate) fn upstream_request<B: Body>(
    req: Request<B>,
    rule: &Rule,
    host: &str,
    peer: SocketAddr,
    scheme: &str,
) -> Result<Request<B>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let path = rule.upstream_path(parts.uri.path());
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    parts.uri = path_and_query
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid path"))?;
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    if let Some(host_value) = &original_host {
        h.insert(header::HOST, host_value.clone());
        h.insert("x-forwarded-host", host_value.clone());
    } else if let Ok(v) = HeaderValue::from_str(host) {
        h.insert(header::HOST, v.clone());
        h.insert("x-forwarded-host", v);
    }
    let client_ip = peer.ip().to_canonical().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {client_ip}"),
        _ => client_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
    );
    if rule.mode == Mode::Stream {
        // Compressed events would hide their boundaries from the framer.
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_cookies_are_random_scoped_and_reveal_nothing() {
        let (id, v) = issue_cookie("sid", "/events", "http").unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            v.to_str().unwrap(),
            format!("sid={id}; Path=/events; HttpOnly; SameSite=Lax")
        );
        let (id2, _) = issue_cookie("sid", "/events", "http").unwrap();
        assert_ne!(id, id2);
        let (_, https) = issue_cookie("sid", "/", "https").unwrap();
        assert!(
            https
                .to_str()
                .unwrap()
                .ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure")
        );
        let (_, odd) = issue_cookie("sid", "/a;b", "http").unwrap();
        assert!(odd.to_str().unwrap().contains("; Path=/; "));
    }

    #[test]
    fn host_parsing() {
        let req = |h: &str| {
            Request::builder()
                .uri("/")
                .header("host", h)
                .body(())
                .unwrap()
        };
        assert_eq!(
            request_host(&req("Events.Example.com:8080")).unwrap(),
            "events.example.com"
        );
        assert_eq!(request_host(&req("example.com.")).unwrap(), "example.com");
        assert_eq!(request_host(&req("[::1]:80")).unwrap(), "::1");
        let h2 = Request::builder()
            .uri("https://a.example/x")
            .body(())
            .unwrap();
        assert_eq!(request_host(&h2).unwrap(), "a.example");
    }

    #[test]
    fn redirect_keeps_host_path_and_query() {
        let uri: Uri = "/events/a?x=1&y=2".parse().unwrap();
        let r = https_redirect("a.example", 443, &uri);
        assert_eq!(r.status(), 308);
        assert_eq!(
            r.headers()["location"],
            "https://a.example/events/a?x=1&y=2"
        );
        let r = https_redirect("::1", 8443, &"/".parse().unwrap());
        assert_eq!(r.headers()["location"], "https://[::1]:8443/");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        h.insert("last-event-id", HeaderValue::from_static("7"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(h.contains_key("authorization") && h.contains_key("last-event-id"));
    }

    #[test]
    fn event_stream_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("Text/Event-Stream; charset=utf-8"),
        );
        assert!(is_event_stream(&h));
        h.insert("content-encoding", HeaderValue::from_static("gzip"));
        assert!(!is_event_stream(&h));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.remove("content-encoding");
        assert!(!is_event_stream(&h));
    }

    /// Property tests: arbitrary header values and names never panic host parsing,
    /// hop-by-hop stripping or the upstream request, and the invariants hold.
    mod proptests {
        use super::*;
        use crate::metrics::Metrics;
        use crate::routing::tests::{route, service, slice};
        use crate::routing::{CompileOptions, StateStore, compile};
        use crate::source::Snapshot;
        use http_body_util::Empty;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const NAMES: &[&str] = &[
            "host",
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "x-forwarded-for",
            "x-forwarded-host",
            "authorization",
            "cookie",
            "last-event-id",
            "accept-encoding",
            "x-custom",
        ];

        fn value() -> impl Strategy<Value = HeaderValue> {
            prop_oneof![
                vec(any::<u8>(), 0..64),
                vec(
                    prop::sample::select(b"ab:[]., 1\t\x80\xFFKeep-Alive".to_vec()),
                    0..40
                ),
                prop::sample::select(NAMES).prop_map(|n| n.as_bytes().to_vec()),
            ]
            .prop_filter_map("valid header value", |b| HeaderValue::from_bytes(&b).ok())
        }

        fn name() -> impl Strategy<Value = HeaderName> {
            prop_oneof![
                prop::sample::select(NAMES).prop_map(|n| n.as_bytes().to_vec()),
                vec(any::<u8>(), 1..20),
            ]
            .prop_filter_map("valid header name", |b| HeaderName::from_bytes(&b).ok())
        }

        fn headers() -> impl Strategy<Value = HeaderMap> {
            vec((name(), value()), 0..12).prop_map(|kv| {
                let mut h = HeaderMap::new();
                for (k, v) in kv {
                    h.append(k, v);
                }
                h
            })
        }

        fn path() -> impl Strategy<Value = String> {
            vec(
                prop::sample::select(&["/", "a", "%2F", "..", "?", "&", "=", "#", "é", "x"][..]),
                0..12,
            )
            .prop_map(|p| format!("/{}", p.concat()))
        }

        fn rule() -> Arc<Rule> {
            let snap = Snapshot {
                routes: vec![route("apps", "feed").rule("/", "svc", 80).build()],
                services: vec![service("apps", "svc", &[(None, 80)])],
                endpoint_slices: vec![slice("apps", "svc", 9000, &[("10.0.0.1", true)])],
                ..Default::default()
            };
            let (table, _) = compile(
                &snap,
                &CompileOptions::default(),
                &StateStore::new(Metrics::new()),
            );
            table.route("h", "/").unwrap().clone()
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 1024,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn request_host_never_panics_and_normalises(host in value()) {
                let req = Request::get("/").header(header::HOST, host).body(()).unwrap();
                if let Some(h) = request_host(&req) {
                    prop_assert!(!h.bytes().any(|b| b.is_ascii_uppercase()), "{}", h);
                    prop_assert!(!h.ends_with('.'), "{}", h);
                }
            }

            #[test]
            fn stripping_leaves_no_hop_by_hop_header(mut h in headers()) {
                let named: Vec<String> = h
                    .get_all(header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|n| n.trim().to_ascii_lowercase())
                    .collect();
                strip_hop_by_hop(&mut h);
                for n in HOP_BY_HOP.iter() {
                    prop_assert!(!h.contains_key(n), "{}", n);
                }
                prop_assert!(!h.contains_key(header::UPGRADE));
                for n in named {
                    prop_assert!(!h.contains_key(n.as_str()), "{}", n);
                }
            }

            #[test]
            fn upstream_request_never_panics_and_keeps_its_invariants(
                h in headers(),
                path in path(),
            ) {
                let Ok(uri) = path.parse::<http::Uri>() else { return Ok(()) };
                let mut req = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
                let auth = h.get(header::AUTHORIZATION).cloned();
                *req.headers_mut() = h;
                let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
                let host = request_host(&req).unwrap_or_else(|| "h".into());
                match upstream_request(req, &rule(), &host, peer, "http") {
                    Err(e) => prop_assert_eq!(e.status(), http::StatusCode::BAD_REQUEST),
                    Ok(up) => {
                        let h = up.headers();
                        for n in HOP_BY_HOP.iter() {
                            prop_assert!(!h.contains_key(n), "{}", n);
                        }
                        let xff = h.get("x-forwarded-for").unwrap().to_str().unwrap();
                        prop_assert!(xff.ends_with("192.0.2.7"), "{}", xff);
                        prop_assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
                        prop_assert_eq!(h.get(header::ACCEPT_ENCODING).unwrap(), "identity");
                        prop_assert!(h.contains_key(header::HOST));
                        // Credentials are the upstream's business: passed through untouched,
                        // unless the client itself named them hop-by-hop.
                        if let (Some(a), Some(b)) = (&auth, h.get(header::AUTHORIZATION)) {
                            prop_assert_eq!(a, b);
                        }
                        prop_assert_eq!(up.version(), Version::HTTP_11);
                    }
                }
            }
        }
    }
}
