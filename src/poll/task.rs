//! The I/O half of poll-to-stream: the first backend call (made before the client gets any
//! response, so a `401` can be returned as-is) and [`PollBody`], the response body that runs
//! the rest of the loop.
//!
//! No task is spawned per stream: the body owns the call in flight (a boxed future) and the
//! one idle keep-alive connection, and drives both from `poll_frame`. Dropping the body (the
//! client went away) therefore cancels the call in flight and closes its connection at once;
//! no further call is made. One timer serves the wait between calls, keepalive comments and
//! `timeouts.maxDuration`.
//!
//! Every call asks the rule's [`Backend`](crate::balance::Backend) for its endpoint, so calls
//! of one stream spread like requests do; when the same endpoint comes up again its idle
//! keep-alive connection is reused.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::poll_fn;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use tokio::time::{Instant, Sleep};

use super::{
    CallTemplate, Cursor, PollConfig, encode_batch, encode_end, encode_error, parse_response,
    parse_retry_after,
};
use crate::balance::{Endpoint, EndpointLease};
use crate::proxy::error::ProxyError;
use crate::proxy::relay::StreamGuard;
use crate::proxy::upstream::{self, Sender, UpstreamConn};
use crate::proxy::{CONNECT_ATTEMPTS, connect, strip_hop_by_hop, upstream_request};
use crate::routing::Rule;
use crate::sse::KEEPALIVE;

/// Largest client request body a poll route accepts (it is replayed on every call).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest backend answer read.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Consecutive `429`/`503` + `Retry-After` answers waited out before giving up.
pub const MAX_RETRIES: u32 = 5;

/// What a poll route answers: a backend response passed through as-is (an error before the
/// stream started), or the event stream.
pub type PollResponse = Response<Either<Full<Bytes>, PollBody>>;

/// The event stream of a poll route in production: calls over HTTP.
pub type PollBody = PollStream<Arc<PollCtx>>;

type Conn = UpstreamConn<Full<Bytes>>;

/// A keep-alive connection to one endpoint, opened like a stream route's (cleartext or TLS,
/// HTTP/1.1 or HTTP/2 as `backend.tls` and `backend.protocol` say).
pub struct Upstream {
    addr: SocketAddr,
    sender: Sender<Full<Bytes>>,
    /// `None` once the connection has finished.
    conn: Option<Pin<Box<Conn>>>,
}

impl Upstream {
    fn reusable(&self) -> bool {
        self.conn.is_some() && !self.sender.is_closed()
    }

    /// Polls the idle connection so a close by the backend is noticed; false once finished.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(conn) = self.conn.as_mut()
            && conn.as_mut().poll(cx).is_ready()
        {
            self.conn = None;
        }
        self.reusable()
    }
}

/// Polls `fut` while also driving `conn` (which carries its bytes).
async fn drive<F: Future>(conn: &mut Option<Pin<Box<Conn>>>, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    poll_fn(|cx| {
        if let Some(c) = conn.as_mut()
            && let Poll::Ready(res) = c.as_mut().poll(cx)
        {
            if let Err(e) = res {
                tracing::debug!(error = %e, "poll backend connection ended with an error");
            }
            *conn = None;
        }
        fut.as_mut().poll(cx)
    })
    .await
}

/// One backend answer, read in full.
#[derive(Debug)]
pub struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// What one call yields: the answer (or why there is none) and the connection, when it can
/// be reused.
type CallOutput<I> = (Result<Answer, ProxyError>, Option<I>);

/// Makes backend calls for a [`PollBody`]: HTTP in production, a function in tests.
pub trait Caller: Send + Sync + 'static {
    /// A connection kept between calls.
    type Idle: Send + 'static;
    /// One call carrying `cursor`; `idle` is the connection the previous call left.
    fn call(
        &self,
        cursor: Option<Cursor>,
        idle: Option<Self::Idle>,
    ) -> Pin<Box<dyn Future<Output = CallOutput<Self::Idle>> + Send>>;
    /// Drives an idle connection; false once it is gone.
    fn poll_idle(idle: &mut Self::Idle, cx: &mut Context<'_>) -> bool;
}

impl Caller for Arc<PollCtx> {
    type Idle = Upstream;
    fn call(
        &self,
        cursor: Option<Cursor>,
        idle: Option<Upstream>,
    ) -> Pin<Box<dyn Future<Output = CallOutput<Upstream>> + Send>> {
        Box::pin(call(self.clone(), cursor, idle))
    }
    fn poll_idle(idle: &mut Upstream, cx: &mut Context<'_>) -> bool {
        idle.poll_idle(cx)
    }
}

/// Everything a call needs, shared by the calls of one stream.
pub struct PollCtx {
    rule: Arc<Rule>,
    /// Hashed session key of a sticky rule, the same for every call.
    key: Option<u64>,
    method: Method,
    headers: HeaderMap,
    template: CallTemplate,
}

impl PollCtx {
    fn request(&self, cursor: Option<&Cursor>) -> Result<Request<Full<Bytes>>, ProxyError> {
        let mut req = Request::new(Full::new(self.template.body(cursor)));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self
            .template
            .path_and_query(cursor)
            .parse()
            .map_err(|_| ProxyError::BadRequest("invalid path"))?;
        *req.headers_mut() = self.headers.clone();
        // HTTP/2 upstreams take the scheme and authority in the URI.
        upstream::prepare_request(&self.rule, req)
    }
}

/// Why sending on a connection failed.
enum SendError {
    /// The request never left (the connection was already closing): safe to send again.
    Unsent(Box<Request<Full<Bytes>>>, hyper::Error),
    Failed(ProxyError),
}

async fn open(
    rule: &Rule,
    plan: Vec<Arc<Endpoint>>,
) -> Result<(Upstream, EndpointLease), ProxyError> {
    let (stream, lease) = connect(rule, plan).await?;
    let addr = lease.endpoint().addr();
    let (sender, conn) = upstream::handshake(rule, stream).await?;
    let up = Upstream {
        addr,
        sender,
        conn: Some(Box::pin(conn)),
    };
    Ok((up, lease))
}

/// Sends `req` on `up` and reads the whole answer.
async fn exchange(up: &mut Upstream, req: Request<Full<Bytes>>) -> Result<Answer, SendError> {
    let Upstream { sender, conn, .. } = up;
    if let Err(e) = drive(conn, sender.ready()).await {
        return Err(SendError::Unsent(Box::new(req), e));
    }
    let resp = match drive(conn, sender.try_send_request(req)).await {
        Ok(resp) => resp,
        Err(mut e) => {
            return Err(match e.take_message() {
                Some(req) => SendError::Unsent(Box::new(req), e.into_error()),
                None => SendError::Failed(upstream_err(e.into_error())),
            });
        }
    };
    let (parts, body) = resp.into_parts();
    let body = drive(conn, Limited::new(body, MAX_ANSWER_BYTES).collect())
        .await
        .map_err(|e| {
            SendError::Failed(if e.is::<LengthLimitError>() {
                ProxyError::InvalidPollResponse {
                    backend: String::new(),
                    reason: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
                }
            } else {
                match e.downcast::<hyper::Error>() {
                    Ok(h) => upstream_err(*h),
                    Err(other) => ProxyError::InvalidPollResponse {
                        backend: String::new(),
                        reason: other.to_string(),
                    },
                }
            })
        })?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

fn upstream_err(source: hyper::Error) -> ProxyError {
    ProxyError::Upstream {
        backend: String::new(),
        source,
    }
}

/// Fills in the backend name the low-level helpers leave empty.
fn named(mut e: ProxyError, rule: &Rule) -> ProxyError {
    match &mut e {
        ProxyError::Upstream { backend, .. } | ProxyError::InvalidPollResponse { backend, .. }
            if backend.is_empty() =>
        {
            *backend = rule.backend.name.clone();
        }
        _ => {}
    }
    e
}

/// One backend call: picks an endpoint (reusing `idle` when it is the one picked), sends the
/// request carrying `cursor` and reads the answer within `timeouts.firstByte`.
async fn call(
    ctx: Arc<PollCtx>,
    cursor: Option<Cursor>,
    idle: Option<Upstream>,
) -> CallOutput<Upstream> {
    let rule = &ctx.rule;
    // A fresh plan per call: round robin and least connections spread the calls of one
    // stream, a sticky key keeps them on its endpoint.
    let plan = rule.backend.plan(ctx.key, CONNECT_ATTEMPTS);
    let Some(first) = plan.first().cloned() else {
        return (
            Err(ProxyError::NoEndpoints(rule.backend.name.clone())),
            None,
        );
    };
    let mut req = match ctx.request(cursor.as_ref()) {
        Ok(r) => r,
        Err(e) => return (Err(e), None),
    };
    // The lease counts the call on its endpoint while it is in flight.
    let (mut up, mut _lease, mut reused) =
        match idle.filter(|u| u.addr == first.addr() && u.reusable()) {
            Some(u) => (u, EndpointLease::new(first), true),
            None => match open(rule, plan.clone()).await {
                Ok((u, lease)) => (u, lease, false),
                Err(e) => return (Err(e), None),
            },
        };
    loop {
        let res = match rule.timeouts.first_byte {
            Some(after) => match tokio::time::timeout(after, exchange(&mut up, req)).await {
                Ok(r) => r,
                Err(_) => {
                    let e = ProxyError::FirstByteTimeout {
                        backend: rule.backend.name.clone(),
                        after,
                    };
                    return (Err(e), None);
                }
            },
            None => exchange(&mut up, req).await,
        };
        match res {
            Ok(answer) => {
                let keep = up.reusable().then_some(up);
                return (Ok(answer), keep);
            }
            // A reused connection the backend closed meanwhile: once more on a fresh one.
            Err(SendError::Unsent(r, _)) if reused => {
                reused = false;
                req = *r;
                (up, _lease) = match open(rule, plan.clone()).await {
                    Ok(x) => x,
                    Err(e) => return (Err(e), None),
                };
            }
            Err(SendError::Unsent(_, e)) => return (Err(named(upstream_err(e), rule)), None),
            Err(SendError::Failed(e)) => return (Err(named(e, rule)), None),
        }
    }
}

fn is_transient(answer: &Answer) -> Option<Duration> {
    if !matches!(
        answer.status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        return None;
    }
    answer
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| parse_retry_after(v.as_bytes()))
}

/// Serves a request on a poll rule: makes the first call, returns a failed first answer
/// as-is, and otherwise answers `200 text/event-stream` with a [`PollBody`] that continues
/// the loop. Errors before the stream starts are returned as [`ProxyError`]s.
pub async fn serve<B>(
    req: Request<B>,
    guard: StreamGuard,
    key: Option<u64>,
    host: &str,
    peer: SocketAddr,
    scheme: &str,
) -> Result<PollResponse, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::proxy::relay::BoxError>,
{
    let rule = guard.rule().clone();
    let config = rule.poll.clone().unwrap_or_default();
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                ProxyError::BadRequest("poll request body larger than 1 MiB")
            } else {
                ProxyError::BadRequest("could not read the request body")
            }
        })?
        .to_bytes();
    let cursor = parts
        .headers
        .get("last-event-id")
        .and_then(|v| Cursor::from_last_event_id(v.as_bytes()));
    let req = upstream_request(
        Request::from_parts(parts, Full::new(body.clone())),
        &rule,
        host,
        peer,
        scheme,
    )?;
    let (parts, _) = req.into_parts();
    let template = CallTemplate::new(&parts.method, parts.uri.path(), parts.uri.query(), body)
        .map_err(|_| ProxyError::BadRequest("poll request body must be a JSON object"))?;
    let mut headers = parts.headers;
    // Consumed here: the cursor travels as `previous`.
    headers.remove("last-event-id");
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    // The answer is parsed, so it must not be compressed.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if template.is_json_body() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let ctx = Arc::new(PollCtx {
        rule: rule.clone(),
        key,
        method: parts.method,
        headers,
        template,
    });

    let (first, idle) = ctx.call(cursor.clone(), None).await;
    let answer = match first {
        Ok(a) => a,
        Err(e) => {
            rule.metrics.poll_request(outcome_label(&e));
            return Err(e);
        }
    };
    if answer.status.is_success() && answer.status != StatusCode::NO_CONTENT {
        if let Err(e) = parse_response(&answer.body) {
            rule.metrics.poll_request("invalid_response");
            return Err(ProxyError::InvalidPollResponse {
                backend: rule.backend.name.clone(),
                reason: e.0,
            });
        }
    } else if is_transient(&answer).is_none() {
        // 204 (nothing to stream: tells an EventSource to stop reconnecting), or a failure
        // such as 401/403 the client must see as it is.
        rule.metrics
            .poll_request(if answer.status == StatusCode::NO_CONTENT {
                "no_content"
            } else {
                "http_error"
            });
        let mut headers = answer.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        let mut resp = Response::new(Either::Left(Full::new(answer.body)));
        *resp.status_mut() = answer.status;
        *resp.headers_mut() = headers;
        return Ok(resp);
    }

    let mut body = PollStream::new(ctx, config, cursor, guard);
    body.on_answer((Ok(answer), idle));
    let mut resp = Response::new(Either::Right(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

fn outcome_label(e: &ProxyError) -> &'static str {
    match e.metric_label() {
        l @ ("connect_failed" | "connect_timeout" | "first_byte_timeout" | "no_endpoints"
        | "invalid_response" | "upstream_tls") => l,
        _ => "protocol",
    }
}

enum State<I> {
    /// Next call at this instant.
    Waiting(Instant),
    /// A call in flight.
    Calling(Pin<Box<dyn Future<Output = CallOutput<I>> + Send>>),
    /// No more calls: send what is queued, then end.
    Finished,
}

/// The event stream of a poll route, generic over how calls are made; see the module docs.
pub struct PollStream<C: Caller> {
    caller: C,
    config: PollConfig,
    cursor: Option<Cursor>,
    state: State<C::Idle>,
    /// Frames waiting to be sent.
    queued: Option<Bytes>,
    buf: BytesMut,
    scratch: String,
    idle: Option<C::Idle>,
    sleep: Pin<Box<Sleep>>,
    last_sent: Instant,
    deadline: Option<Instant>,
    retries: u32,
    done: bool,
    guard: StreamGuard,
}

// No field is ever pinned in place (the timer and the call are boxed).
impl<C: Caller> Unpin for PollStream<C> {}

impl<C: Caller> PollStream<C> {
    fn new(caller: C, config: PollConfig, cursor: Option<Cursor>, guard: StreamGuard) -> Self {
        let now = Instant::now();
        let deadline = guard.rule().timeouts.max_duration.map(|d| now + d);
        PollStream {
            caller,
            config,
            cursor,
            state: State::Waiting(now),
            queued: None,
            buf: BytesMut::new(),
            scratch: String::new(),
            idle: None,
            sleep: Box::pin(tokio::time::sleep_until(now)),
            last_sent: now,
            deadline,
            retries: 0,
            done: false,
            guard,
        }
    }

    /// Turns one call's outcome into frames and the next state.
    fn on_answer(&mut self, (result, upstream): CallOutput<C::Idle>) {
        self.idle = upstream;
        let metrics = &self.guard.rule().metrics;
        let cfg = &self.config;
        let now = Instant::now();
        match result {
            Ok(a) if a.status.is_success() && a.status != StatusCode::NO_CONTENT => {
                match parse_response(&a.body) {
                    Ok(batch) => {
                        metrics.poll_request("success");
                        self.retries = 0;
                        let n = encode_batch(
                            &mut self.buf,
                            &mut self.scratch,
                            &batch,
                            cfg.event_type.as_deref(),
                        );
                        if n > 0 {
                            metrics.events_total.inc_by(n);
                        }
                        if let Some(next) = batch.next {
                            self.cursor = Some(next);
                        }
                        if batch.cont {
                            self.state = State::Waiting(now + cfg.wait(batch.wait));
                        } else {
                            self.finish(true);
                        }
                    }
                    Err(e) => {
                        metrics.poll_request("invalid_response");
                        metrics.upstream_error("invalid_response");
                        tracing::debug!(route = %metrics.route, error = %e, "poll answer refused");
                        encode_error(&mut self.buf, 502, &e.to_string());
                        self.finish(false);
                    }
                }
            }
            Ok(a) if a.status == StatusCode::NO_CONTENT => {
                metrics.poll_request("no_content");
                self.finish(true);
            }
            Ok(a) => match is_transient(&a) {
                Some(after) if self.retries < MAX_RETRIES => {
                    metrics.poll_request("retry");
                    self.retries += 1;
                    self.state = State::Waiting(now + after.min(cfg.max_wait));
                }
                _ => {
                    metrics.poll_request("http_error");
                    let msg = format!("backend answered {}", a.status);
                    encode_error(&mut self.buf, a.status.as_u16(), &msg);
                    self.finish(false);
                }
            },
            Err(e) => {
                metrics.poll_request(outcome_label(&e));
                if e.is_upstream() {
                    metrics.upstream_error(e.metric_label());
                }
                tracing::debug!(route = %metrics.route, error = %e, "poll call failed");
                encode_error(&mut self.buf, e.status().as_u16(), &e.to_string());
                self.finish(false);
            }
        }
        if !self.buf.is_empty() {
            self.queued = Some(self.buf.split().freeze());
        }
    }

    /// No more calls; `by_backend` adds the end frame when the rule asks for it.
    fn finish(&mut self, by_backend: bool) {
        if by_backend && self.config.end_event {
            encode_end(&mut self.buf);
        }
        self.state = State::Finished;
        self.idle = None;
    }
}

impl<C: Caller> Body for PollStream<C> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(frame) = this.queued.take() {
                this.last_sent = Instant::now();
                let metrics = &this.guard.rule().metrics;
                metrics.bytes_sent_total.inc_by(frame.len() as u64);
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            let now = Instant::now();
            if matches!(this.state, State::Finished) || this.deadline.is_some_and(|d| now >= d) {
                // maxDuration: every point between frames is an event boundary; a call in
                // flight is dropped (cancelled) with the body's state.
                this.done = true;
                this.state = State::Finished;
                this.idle = None;
                return Poll::Ready(None);
            }
            if let Some(up) = this.idle.as_mut()
                && !C::poll_idle(up, cx)
            {
                this.idle = None;
            }
            match &mut this.state {
                State::Calling(fut) => {
                    if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                        this.on_answer(out);
                        continue;
                    }
                }
                State::Waiting(at) if now >= *at => {
                    let fut = this.caller.call(this.cursor.clone(), this.idle.take());
                    this.state = State::Calling(fut);
                    continue;
                }
                State::Waiting(_) | State::Finished => {}
            }
            let mut next = this.deadline;
            if let State::Waiting(at) = this.state {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            if let Some(ka) = this.guard.rule().keepalive {
                let due = this.last_sent + ka;
                if now >= due {
                    this.last_sent = now;
                    let metrics = &this.guard.rule().metrics;
                    metrics.keepalives_total.inc();
                    metrics.bytes_sent_total.inc_by(KEEPALIVE.len() as u64);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEPALIVE)))));
                }
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            let Some(at) = next else {
                return Poll::Pending;
            };
            this.sleep.as_mut().reset(at);
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::routing::tests::{route, service, slice};
    use crate::routing::{CompileOptions, StateStore, compile};
    use crate::source::Snapshot;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    type CallLog = Arc<Mutex<Vec<(Duration, Option<String>)>>>;
    type Script =
        dyn Fn(usize, Option<&Cursor>) -> (Duration, Result<Answer, ProxyError>) + Send + Sync;

    /// A backend function: call `n` with its cursor → (delay, answer). Records every call.
    struct Mock {
        calls: CallLog,
        script: Arc<Script>,
        start: Instant,
        /// Set when a call in flight is dropped before it answered.
        cancelled: Arc<AtomicBool>,
    }

    struct SetOnDrop(Arc<AtomicBool>, bool);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            if !self.1 {
                self.0.store(true, Ordering::SeqCst);
            }
        }
    }

    impl Caller for Mock {
        type Idle = ();
        fn call(
            &self,
            cursor: Option<Cursor>,
            _idle: Option<()>,
        ) -> Pin<Box<dyn Future<Output = CallOutput<()>> + Send>> {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.len();
            calls.push((
                self.start.elapsed(),
                cursor.as_ref().map(|c| c.as_json().to_string()),
            ));
            let (delay, answer) = (self.script)(n, cursor.as_ref());
            let flag = SetOnDrop(self.cancelled.clone(), false);
            Box::pin(async move {
                let mut flag = flag;
                tokio::time::sleep(delay).await;
                flag.1 = true;
                (answer, None)
            })
        }
        fn poll_idle(_: &mut (), _: &mut Context<'_>) -> bool {
            true
        }
    }

    fn json(status: u16, body: &str) -> Result<Answer, ProxyError> {
        Ok(Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        })
    }

    fn retry_after(status: u16, secs: u64) -> Result<Answer, ProxyError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        Ok(Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::new(),
        })
    }

    fn rule(keepalive: Option<Duration>, max_duration: Option<Duration>) -> Arc<Rule> {
        let snap = Snapshot {
            routes: vec![
                route("apps", "orders")
                    .rule("/", "svc", 80)
                    .poll("{}")
                    .build(),
            ],
            services: vec![service("apps", "svc", &[(None, 80)])],
            endpoint_slices: vec![slice("apps", "svc", 9000, &[("10.0.0.1", true)])],
            ..Default::default()
        };
        let (table, _) = compile(
            &snap,
            &CompileOptions::default(),
            &StateStore::new(Metrics::new()),
        );
        let rule = table.route("h", "/").unwrap().clone();
        drop(table);
        let mut rule = Arc::try_unwrap(rule).unwrap_or_else(|r| panic!("shared {r:?}"));
        rule.keepalive = keepalive;
        rule.timeouts.max_duration = max_duration;
        Arc::new(rule)
    }

    struct Harness {
        body: PollStream<Mock>,
        calls: CallLog,
        cancelled: Arc<AtomicBool>,
        start: Instant,
        rule: Arc<Rule>,
    }

    fn harness(
        rule: Arc<Rule>,
        config: &str,
        cursor: Option<Cursor>,
        script: impl Fn(usize, Option<&Cursor>) -> (Duration, Result<Answer, ProxyError>)
        + Send
        + Sync
        + 'static,
    ) -> Harness {
        let config = PollConfig::from_settings(&serde_yaml::from_str(config).unwrap()).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let cancelled = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let mock = Mock {
            calls: calls.clone(),
            script: Arc::new(script),
            start,
            cancelled: cancelled.clone(),
        };
        let guard = StreamGuard::admit(&rule).unwrap();
        Harness {
            body: PollStream::new(mock, config, cursor, guard),
            calls,
            cancelled,
            start,
            rule,
        }
    }

    impl Harness {
        /// The next frame as text and when it came, or None at the end.
        async fn next(&mut self) -> Option<(String, Duration)> {
            let frame = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await?;
            let data = frame.unwrap().into_data().unwrap();
            Some((
                String::from_utf8(data.to_vec()).unwrap(),
                self.start.elapsed(),
            ))
        }
        async fn text(&mut self) -> String {
            self.next().await.unwrap().0
        }
        fn cursors(&self) -> Vec<Option<String>> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|c| c.1.clone())
                .collect()
        }
        fn call_times(&self) -> Vec<Duration> {
            self.calls.lock().unwrap().iter().map(|c| c.0).collect()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn batches_become_events_in_order_with_cursor_ids_and_waits_honoured() {
        let mut h = harness(rule(None, None), "{}", None, |n, _| {
            let body = match n {
                0 => r#"{"list":[{"o":1},{"o":2}],"continue":true,"wait":500,"next":1}"#,
                1 => r#"{"list":[{"o":3}],"continue":true,"next":"x"}"#,
                2 => r#"{"list":[],"continue":true,"wait":"2s"}"#,
                _ => r#"{"list":[{"o":4}],"next":"y"}"#,
            };
            (ms(10), json(200, body))
        });
        assert_eq!(
            h.next().await.unwrap(),
            (
                "data: {\"o\":1}\n\nid: 1\ndata: {\"o\":2}\n\n".to_string(),
                ms(10)
            )
        );
        assert_eq!(
            h.next().await.unwrap(),
            ("id: \"x\"\ndata: {\"o\":3}\n\n".to_string(), ms(520))
        );
        assert_eq!(
            h.next().await.unwrap(),
            (
                "id: \"y\"\ndata: {\"o\":4}\n\nevent: end\ndata: {}\n\n".to_string(),
                ms(3540)
            )
        );
        assert_eq!(h.next().await, None);
        // `previous` on every call; the cursor stays when an answer has no `next`.
        assert_eq!(
            h.cursors(),
            [
                None,
                Some("1".into()),
                Some("\"x\"".into()),
                Some("\"x\"".into())
            ]
        );
        // 500 ms as asked, then the default 1 s, then "2s".
        assert_eq!(h.call_times(), [ms(0), ms(510), ms(1520), ms(3530)]);
        let m = &h.rule.metrics;
        assert_eq!(m.events_total.get(), 4);
        assert!(h.body.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_clamped_to_min_and_max() {
        let mut h = harness(
            rule(None, None),
            "{minWait: 200ms, maxWait: 5s}",
            None,
            |n, _| {
                let body = match n {
                    0 => r#"{"list":[1],"continue":true,"wait":0}"#,
                    1 => r#"{"list":[2],"continue":true,"wait":3600000}"#,
                    _ => r#"{"list":[3]}"#,
                };
                (Duration::ZERO, json(200, body))
            },
        );
        for _ in 0..3 {
            h.next().await.unwrap();
        }
        assert_eq!(h.call_times(), [ms(0), ms(200), ms(5200)]);
    }

    #[tokio::test(start_paused = true)]
    async fn resumes_from_the_given_cursor_and_end_event_can_be_off() {
        let mut h = harness(
            rule(None, None),
            "{endEvent: false, eventType: order}",
            Cursor::from_last_event_id(b"\"c-7\""),
            |_, _| (Duration::ZERO, json(200, r#"{"list":[8],"next":"c-8"}"#)),
        );
        assert_eq!(h.text().await, "id: \"c-8\"\nevent: order\ndata: 8\n\n");
        assert_eq!(h.next().await, None);
        assert_eq!(h.cursors(), [Some("\"c-7\"".into())]);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_flow_during_long_waits_and_long_calls() {
        let mut h = harness(
            rule(Some(Duration::from_secs(15)), None),
            "{maxWait: 60s}",
            None,
            |n, _| match n {
                0 => (
                    Duration::ZERO,
                    json(200, r#"{"list":[1],"continue":true,"wait":40000}"#),
                ),
                // A long-polling backend holding the call for 20 s.
                _ => (Duration::from_secs(20), json(200, r#"{"list":[2]}"#)),
            },
        );
        assert_eq!(h.next().await.unwrap().1, ms(0));
        let ka = std::str::from_utf8(KEEPALIVE).unwrap().to_string();
        assert_eq!(h.next().await.unwrap(), (ka.clone(), ms(15_000)));
        assert_eq!(h.next().await.unwrap(), (ka.clone(), ms(30_000)));
        // The call starts at 40 s; keepalives continue while it is in flight.
        assert_eq!(h.next().await.unwrap(), (ka.clone(), ms(45_000)));
        let (text, at) = h.next().await.unwrap();
        assert!(text.starts_with("data: 2\n\n"), "{text}");
        assert_eq!(at, ms(60_000));
        assert_eq!(h.rule.metrics.keepalives_total.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_out_with_the_same_cursor_then_gives_up() {
        let mut h = harness(rule(None, None), "{}", None, |n, _| match n {
            0 => (
                Duration::ZERO,
                json(200, r#"{"list":[1],"continue":true,"wait":100,"next":5}"#),
            ),
            1 => (Duration::ZERO, retry_after(429, 3)),
            2 => (
                Duration::ZERO,
                json(200, r#"{"list":[2],"continue":true,"wait":100,"next":6}"#),
            ),
            // From now on: overloaded for good.
            _ => (Duration::ZERO, retry_after(503, 1)),
        });
        h.next().await.unwrap();
        let (text, at) = h.next().await.unwrap();
        assert_eq!((text.as_str(), at), ("id: 6\ndata: 2\n\n", ms(3100)));
        let (text, _) = h.next().await.unwrap();
        assert_eq!(
            text,
            "event: error\ndata: {\"message\":\"backend answered 503 Service Unavailable\",\"status\":503}\n\n"
        );
        assert_eq!(h.next().await, None);
        assert_eq!(
            h.cursors(),
            [None, Some("5".into()), Some("5".into())]
                .into_iter()
                .chain(std::iter::repeat_n(
                    Some("6".into()),
                    1 + MAX_RETRIES as usize
                ))
                .collect::<Vec<_>>()
        );
        let times = h.call_times();
        assert_eq!(times[2], ms(3100));
        assert_eq!(times[4] - times[3], Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_after_the_start_become_one_error_frame() {
        let cases: Vec<(Result<Answer, ProxyError>, &str)> = vec![
            (
                json(500, "oops"),
                "{\"message\":\"backend answered 500 Internal Server Error\",\"status\":500}",
            ),
            (
                json(200, "not json"),
                "{\"message\":\"invalid poll response: the body is not a JSON object\",\"status\":502}",
            ),
            (
                json(200, r#"{"list":{"a":1}}"#),
                "{\"message\":\"invalid poll response: list must be an array\",\"status\":502}",
            ),
            (
                Err(ProxyError::Connect {
                    backend: "apps/svc:80".into(),
                    reason: "refused".into(),
                    timed_out: false,
                }),
                "{\"message\":\"cannot connect to apps/svc:80: refused\",\"status\":502}",
            ),
        ];
        for (answer, data) in cases {
            let answer = Mutex::new(Some(answer));
            let mut h = harness(rule(None, None), "{}", None, move |n, _| match n {
                0 => (Duration::ZERO, json(200, r#"{"list":[1],"continue":true}"#)),
                _ => (Duration::ZERO, answer.lock().unwrap().take().unwrap()),
            });
            assert_eq!(h.text().await, "data: 1\n\n");
            assert_eq!(h.text().await, format!("event: error\ndata: {data}\n\n"));
            assert_eq!(h.next().await, None);
            assert_eq!(h.calls.lock().unwrap().len(), 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_content_ends_the_feed() {
        let mut h = harness(rule(None, None), "{}", None, |n, _| match n {
            0 => (Duration::ZERO, json(200, r#"{"list":[1],"continue":true}"#)),
            _ => (Duration::ZERO, json(204, "")),
        });
        assert_eq!(h.text().await, "data: 1\n\n");
        assert_eq!(h.text().await, "event: end\ndata: {}\n\n");
        assert_eq!(h.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn max_duration_ends_between_batches_without_an_end_frame() {
        let mut h = harness(
            rule(None, Some(Duration::from_secs(5))),
            "{}",
            None,
            |n, _| {
                (
                    Duration::ZERO,
                    json(
                        200,
                        &format!(r#"{{"list":[{n}],"continue":true,"wait":2000,"next":{n}}}"#),
                    ),
                )
            },
        );
        for n in 0..3 {
            assert_eq!(h.text().await, format!("id: {n}\ndata: {n}\n\n"));
        }
        assert_eq!(h.next().await.map(|f| f.1), None);
        assert_eq!(h.start.elapsed(), Duration::from_secs(5));
        assert_eq!(h.calls.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_body_cancels_the_call_in_flight_and_stops_polling() {
        let mut h = harness(rule(None, None), "{}", None, |n, _| match n {
            0 => (
                Duration::ZERO,
                json(200, r#"{"list":[1],"continue":true,"wait":100}"#),
            ),
            _ => (
                Duration::from_secs(30),
                json(200, r#"{"list":[2],"continue":true}"#),
            ),
        });
        h.next().await.unwrap();
        // Let the second call start, then the client goes away.
        let polled = tokio::time::timeout(ms(500), h.next()).await;
        assert!(polled.is_err());
        assert_eq!(h.calls.lock().unwrap().len(), 2);
        assert!(!h.cancelled.load(Ordering::SeqCst));
        let Harness {
            body,
            calls,
            cancelled,
            rule,
            ..
        } = h;
        assert_eq!(rule.metrics.connections_active.get(), 1);
        drop(body);
        assert!(
            cancelled.load(Ordering::SeqCst),
            "the call in flight was not dropped"
        );
        assert_eq!(rule.metrics.connections_active.get(), 0);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(calls.lock().unwrap().len(), 2);
    }
}
