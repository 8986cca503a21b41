//! The upstream side of one proxied stream: cleartext or TLS, HTTP/1.1 or HTTP/2.
//!
//! Each stream gets its own upstream connection (as before), so an HTTP/2 backend sees one
//! stream per connection. A bodiless request to a cleartext HTTP/1.1 upstream (the SSE case)
//! goes through [`h1client`], whose response body reads the socket itself and holds no buffer
//! while idle. Everything else uses hyper's client: for HTTP/1 (TLS, or a request with a
//! body) the connection future is driven by
//! [`super::relay::DriveConn`] from inside the response body. For HTTP/2 hyper spawns the
//! connection's I/O task itself (on the [`TokioExecutor`] given to the handshake); the future
//! returned here is only the request dispatcher, which finishes once the request is sent, and
//! the spawned task ends when the response stream is done or dropped (client gone), so the
//! upstream connection still closes with the client.
//!
//! Poll routes ([`crate::poll::task`]) use the same handshake with a buffered request body
//! and keep the connection between calls, so both modes honour `backend.tls` and
//! `backend.protocol` alike.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, poll_fn};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::api::BackendProtocol;
use crate::routing::Rule;
use crate::tls::UpstreamTls;

use super::error::ProxyError;
use super::h1client;
use super::relay::{BoxError, DriveConn};

/// A request body ssegate sends upstream: the client's own ([`Incoming`]) when relaying a
/// stream, a buffered one for the calls of a poll route.
pub trait RequestBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<B> RequestBody for B where
    B: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// The upstream response body: [`h1client`]'s for bodiless requests to cleartext HTTP/1.1
/// upstreams, hyper's (driven by [`DriveConn`]) otherwise.
pub type UpstreamBody<B = super::ClientBody> =
    http_body_util::Either<h1client::ResponseBody, DriveConn<UpstreamConn<B>, Incoming>>;

/// Sends `req` (shaped by `upstream_request`) on the connected `tcp` and waits, at most
/// `timeouts.firstByte`, for the response head.
pub async fn exchange<B: RequestBody>(
    rule: &Rule,
    tcp: TcpStream,
    req: Request<B>,
) -> Result<Response<UpstreamBody<B>>, ProxyError> {
    if rule.upstream_tls.is_none()
        && rule.protocol == BackendProtocol::Http1
        && req.body().is_end_stream()
    {
        let (parts, _) = req.into_parts();
        let resp = first_byte(rule, h1client::exchange(tcp, &parts))
            .await?
            .map_err(|source| ProxyError::UpstreamH1 {
                backend: rule.backend.name.clone(),
                source,
            })?;
        return Ok(resp.map(http_body_util::Either::Left));
    }
    let req = prepare_request(rule, req)?;
    let (mut sender, conn) = handshake(rule, tcp).await?;
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let mut send = std::pin::pin!(sender.send_request(req));
    let exchange = poll_fn(|cx| {
        if !conn_done && let Poll::Ready(res) = conn.as_mut().poll(cx) {
            conn_done = true;
            if let Err(e) = res {
                tracing::debug!(error = %e, "upstream connection failed before response");
            }
        }
        send.as_mut().poll(cx)
    });
    let resp = first_byte(rule, exchange)
        .await?
        .map_err(|source| ProxyError::Upstream {
            backend: rule.backend.name.clone(),
            source,
        })?;
    drop(sender);
    Ok(resp.map(|body| {
        http_body_util::Either::Right(if conn_done {
            // The connection finished while we waited for headers (e.g. a tiny response
            // already read in full); the body needs no driving.
            DriveConn::finished(body)
        } else {
            DriveConn::new(conn, body)
        })
    }))
}

/// Runs `fut` within the rule's `timeouts.firstByte`.
async fn first_byte<F: Future>(rule: &Rule, fut: F) -> Result<F::Output, ProxyError> {
    match rule.timeouts.first_byte {
        Some(after) => {
            tokio::time::timeout(after, fut)
                .await
                .map_err(|_| ProxyError::FirstByteTimeout {
                    backend: rule.backend.name.clone(),
                    after,
                })
        }
        None => Ok(fut.await),
    }
}

/// A byte stream to a backend: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS (boxed: the TLS state is large and most upstreams are cleartext).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

pin_project! {
    /// The connection future of one upstream exchange (see the module docs).
    #[project = UpstreamConnProj]
    pub enum UpstreamConn<B = Incoming>
    where
        B: RequestBody,
    {
        /// HTTP/1.1: the whole connection.
        H1 { #[pin] conn: http1::Connection<TokioIo<UpstreamIo>, B> },
        /// HTTP/2: the request dispatcher; the I/O runs in a task hyper spawned.
        H2 { #[pin] conn: http2::Connection<TokioIo<UpstreamIo>, B, TokioExecutor> },
    }
}

impl<B: RequestBody> Future for UpstreamConn<B> {
    type Output = Result<(), hyper::Error>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            UpstreamConnProj::H1 { conn } => conn.poll(cx),
            UpstreamConnProj::H2 { conn } => conn.poll(cx),
        }
    }
}

/// Sends the request on an upstream connection.
pub enum Sender<B = Incoming> {
    /// HTTP/1.1.
    H1(http1::SendRequest<B>),
    /// HTTP/2.
    H2(http2::SendRequest<B>),
}

impl<B: RequestBody> Sender<B> {
    /// Sends `req` (already shaped by [`prepare_request`]).
    pub fn send_request(
        &mut self,
        req: Request<B>,
    ) -> impl Future<Output = hyper::Result<Response<Incoming>>> + use<B> {
        match self {
            Sender::H1(s) => Either::Left(s.send_request(req)),
            Sender::H2(s) => Either::Right(s.send_request(req)),
        }
    }

    /// Like [`Sender::send_request`], but a request that never left (the connection was
    /// already closing) comes back in the error, so it can be sent on another connection.
    pub fn try_send_request(
        &mut self,
        req: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, TrySendError<Request<B>>>> + use<B> {
        match self {
            Sender::H1(s) => Either::Left(s.try_send_request(req)),
            Sender::H2(s) => Either::Right(s.try_send_request(req)),
        }
    }

    /// Waits until the connection can take a request; an error once it is closed.
    pub async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    /// True once the connection is closed (no further request can be sent).
    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// Opens TLS (when the rule's backend has it) and the HTTP handshake on a connected socket.
pub async fn handshake<B: RequestBody>(
    rule: &Rule,
    tcp: TcpStream,
) -> Result<(Sender<B>, UpstreamConn<B>), ProxyError> {
    let backend = || rule.backend.name.clone();
    let io = match &rule.upstream_tls {
        None => UpstreamIo::Plain(tcp),
        Some(Err(reason)) => {
            return Err(ProxyError::UpstreamTls {
                backend: backend(),
                reason: reason.to_string(),
            });
        }
        Some(Ok(tls)) => UpstreamIo::Tls(Box::new(tls_connect(rule, tls, tcp).await?)),
    };
    let io = TokioIo::new(io);
    let upstream = |source| ProxyError::Upstream {
        backend: backend(),
        source,
    };
    match rule.protocol {
        BackendProtocol::Http1 => {
            let (sender, conn) = http1::handshake(io).await.map_err(upstream)?;
            Ok((Sender::H1(sender), UpstreamConn::H1 { conn }))
        }
        BackendProtocol::H2 | BackendProtocol::H2c => {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(upstream)?;
            Ok((Sender::H2(sender), UpstreamConn::H2 { conn }))
        }
    }
}

async fn tls_connect(
    rule: &Rule,
    tls: &Arc<UpstreamTls>,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, ProxyError> {
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let connect = connector.connect(tls.server_name.clone(), tcp);
    let res = match rule.timeouts.connect {
        Some(t) => tokio::time::timeout(t, connect)
            .await
            .map_err(|_| ProxyError::UpstreamTls {
                backend: rule.backend.name.clone(),
                reason: format!("TLS handshake timed out after {t:?}"),
            })?,
        None => connect.await,
    };
    let stream = res.map_err(|e| ProxyError::UpstreamTls {
        backend: rule.backend.name.clone(),
        reason: e.to_string(),
    })?;
    if rule.protocol == BackendProtocol::H2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(ProxyError::UpstreamTls {
            backend: rule.backend.name.clone(),
            reason: "backend did not negotiate h2 (ALPN); set backend.protocol: http1".into(),
        });
    }
    Ok(stream)
}

/// Shapes a request built for HTTP/1.1 for the rule's protocol: HTTP/2 needs the scheme and
/// authority in the URI (`:scheme`, `:authority`), taken from the `Host` header.
pub fn prepare_request<B>(rule: &Rule, req: Request<B>) -> Result<Request<B>, ProxyError> {
    if rule.protocol == BackendProtocol::Http1 {
        return Ok(req);
    }
    let (mut parts, body) = req.into_parts();
    let scheme = if rule.upstream_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let authority = parts
        .headers
        .remove(http::header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| "localhost".into());
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid host for HTTP/2 upstream"))?;
    parts.version = Version::HTTP_2;
    Ok(Request::from_parts(parts, body))
}
