//! Response body wrappers of the relay path. Each does one job:
//!
//! - [`DriveConn`] owns the upstream HTTP/1 connection and drives it from inside the body's
//!   `poll_frame`, so no task is spawned per stream, backpressure from a slow client reaches
//!   the upstream socket, and dropping the body (client gone) closes the upstream at once.
//! - [`RelayBody`] forwards upstream frames unchanged (`Bytes` pass-through, no copy), lets the
//!   SSE [`Framer`] scan them for event boundaries and counts, and runs the stream's timers:
//!   keepalive comments (only at an event boundary), upstream idle timeout and maximum
//!   duration (ended at a boundary). One timer per stream serves all three. It also ends the
//!   stream, after a `retry:` hint at an event boundary, when a drain reaches it or when the
//!   inner body reports its endpoint retired ([`Retiring`]).
//! - [`EndpointBody`] counts the stream on its endpoint (least connections, bounded loads)
//!   and wakes the stream when the endpoint disappears or turns unready, so that the relay
//!   ends it and the client reconnects to a ready one. It watches one shared flag; no lock on
//!   the event path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use super::drain::DrainWatch;
use super::io::ConnState;
use super::limits::ClientSlot;
use crate::balance::EndpointLease;
use crate::routing::Rule;
use crate::sse::{Framer, KEEPALIVE, write_retry};

/// Boxed error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A body that also polls the connection future it came from.
    pub struct DriveConn<C, B> {
        conn: Option<Pin<Box<C>>>,
        #[pin]
        body: B,
    }
}

impl<C, B> DriveConn<C, B> {
    /// Wraps `body`, driving `conn` (e.g. hyper's client `Connection`) while it is polled.
    pub fn new(conn: Pin<Box<C>>, body: B) -> Self {
        DriveConn {
            conn: Some(conn),
            body,
        }
    }

    /// Wraps `body` whose connection has already finished.
    pub fn finished(body: B) -> Self {
        DriveConn { conn: None, body }
    }
}

impl<C, E, B> Body for DriveConn<C, B>
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
    B: Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        if let Some(conn) = this.conn
            && let Poll::Ready(res) = conn.as_mut().poll(cx)
        {
            if let Err(e) = res {
                // The body sees the same failure as an error frame; this is for the log.
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            *this.conn = None;
        }
        this.body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How long a stream whose endpoint was retired mid-event waits for the event's end before it
/// is cut without a `retry:` hint (a hint inside an event would corrupt it).
pub const RETIRED_EVENT_GRACE: Duration = Duration::from_secs(5);

/// A relayed body that can ask the relay to end the stream (its endpoint is gone): the relay
/// ends it at the next event boundary after a `retry:` hint, so clients reconnect to a ready
/// endpoint, jittered like after a drain.
pub trait Retiring {
    /// True once the stream should end. Checked on every poll: one atomic load at most.
    fn retiring(&self) -> bool;
}

pin_project! {
    /// A body that holds its endpoint's stream count and, once the endpoint is retired,
    /// reports [`Retiring`] and wakes the stream (the relay ends it; the body itself keeps
    /// passing frames through so that the event in flight can finish).
    pub struct EndpointBody<B> {
        // Declared before `inner`: fields drop in declaration order, so the endpoint's
        // stream count goes down before the upstream connection (inside `inner`) is closed.
        lease: EndpointLease,
        #[pin]
        inner: B,
        retired: Pin<Box<OwnedNotified>>,
        // The waker registered with `retired`; re-registered only when the task's waker
        // changes, so an ordinary poll costs one atomic load.
        waker: Option<Waker>,
    }
}

impl<B> EndpointBody<B> {
    /// Wraps `inner`, the body of a stream counted by `lease`.
    pub fn new(inner: B, lease: EndpointLease) -> Self {
        let retired = Box::pin(lease.endpoint().retired());
        EndpointBody {
            inner,
            lease,
            retired,
            waker: None,
        }
    }
}

impl<B: Body> Body for EndpointBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        if this.waker.as_ref().is_none_or(|w| !w.will_wake(cx.waker()))
            && !this.lease.endpoint().is_retired()
        {
            if this.retired.as_mut().poll(cx).is_ready() {
                // Retired since the relay last looked: have it look again.
                cx.waker().wake_by_ref();
            }
            *this.waker = Some(cx.waker().clone());
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl<B> Retiring for EndpointBody<B> {
    fn retiring(&self) -> bool {
        self.lease.endpoint().is_retired()
    }
}

/// Accounts for one open stream on its rule: the rule's connection counter and the route's
/// `ssegate_connections_active` gauge go down when it is dropped, so does the client's
/// per-IP stream count, and a stream ended by the client write timeout is counted.
#[derive(Debug)]
pub struct StreamGuard {
    rule: Arc<Rule>,
    client: Option<ClientSlot>,
    conn: Option<Arc<ConnState>>,
}

impl StreamGuard {
    /// Admits a stream on `rule` unless its `maxConnections` is reached.
    pub fn admit(rule: &Arc<Rule>) -> Option<Self> {
        let prev = rule.active.fetch_add(1, Ordering::AcqRel);
        if rule.max_connections > 0 && prev >= rule.max_connections as usize {
            rule.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        rule.metrics.connections_active.inc();
        rule.metrics.connections_total.inc();
        Some(StreamGuard {
            rule: rule.clone(),
            client: None,
            conn: None,
        })
    }

    /// Also holds the client's per-IP stream slot.
    pub fn with_client(mut self, slot: ClientSlot) -> Self {
        self.client = Some(slot);
        self
    }

    /// Also watches the client connection (to count a write-timeout disconnect).
    pub fn with_conn(mut self, conn: Arc<ConnState>) -> Self {
        self.conn = Some(conn);
        self
    }

    /// The rule this stream runs on.
    pub fn rule(&self) -> &Arc<Rule> {
        &self.rule
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.rule.active.fetch_sub(1, Ordering::AcqRel);
        self.rule.metrics.connections_active.dec();
        if self.conn.as_ref().is_some_and(|c| c.write_timed_out()) {
            self.rule.metrics.client_disconnect("write_timeout");
        }
    }
}

/// Timer settings of a relayed stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayTimers {
    /// Inject a keepalive comment after this much client-side silence (SSE only).
    pub keepalive: Option<Duration>,
    /// End the stream after this much upstream silence.
    pub idle: Option<Duration>,
    /// End the stream (at an event boundary) after this long.
    pub max_duration: Option<Duration>,
}

pin_project! {
    /// The relayed response body; see the module docs.
    pub struct RelayBody<B> {
        // Declared first: fields drop in declaration order, so the rule's and the client's
        // stream counts go down before the inner body (endpoint count, upstream connection).
        guard: StreamGuard,
        #[pin]
        inner: B,
        framer: Framer,
        sse: bool,
        timers: RelayTimers,
        sleep: Option<Pin<Box<Sleep>>>,
        deadline: Option<Instant>,
        drain: DrainWatch,
        // This stream's close instant once a drain began and until it is reached.
        drain_at: Option<Instant>,
        drain_noticed: bool,
        last_sent: Instant,
        last_upstream: Instant,
        // End at the next event boundary (immediately for non-SSE bodies).
        ending: bool,
        // Send a `retry:` hint before ending (drain, retirement).
        retry_hint: bool,
        // The inner body asked to end (endpoint retired) and the relay noticed.
        retiring: bool,
        // Until when a retired stream waits for the event in flight to end.
        retire_by: Option<Instant>,
        // The waker the timer and the drain registration were last polled with. While the
        // task's waker is the same and the timer's deadline has not passed, polling them
        // again would only register the same waker again: a stream going idle after an
        // event then costs no timer or `Notify` work. Cleared whenever the timer moves.
        registered: Option<Waker>,
        done: bool,
    }
}

impl<B> RelayBody<B> {
    /// Relays `inner`. With `sse`, the body is framed (events counted, keepalives injected,
    /// closed gracefully by a drain); otherwise it is passed through and only the idle and
    /// duration limits apply.
    pub fn new(
        inner: B,
        sse: bool,
        mut timers: RelayTimers,
        guard: StreamGuard,
        drain: DrainWatch,
    ) -> Self {
        if !sse {
            timers.keepalive = None;
        }
        let now = Instant::now();
        let deadline = timers.max_duration.map(|d| now + d);
        let first = [timers.keepalive, timers.idle]
            .into_iter()
            .flatten()
            .min()
            .map(|d| coarse(now + d))
            .into_iter()
            .chain(deadline)
            .min();
        RelayBody {
            inner,
            framer: Framer::new(),
            sse,
            timers,
            sleep: first.map(|at| Box::pin(tokio::time::sleep_until(at))),
            deadline,
            drain,
            drain_at: None,
            drain_noticed: false,
            last_sent: now,
            last_upstream: now,
            ending: false,
            retry_hint: false,
            retiring: false,
            retire_by: None,
            registered: None,
            done: false,
            guard,
        }
    }
}

/// Granularity of the keepalive and upstream idle timers: their deadlines are rounded up to
/// a multiple of this (on one process-wide grid), so the timers of many streams fall due
/// together and a worker wakes up once for all of them instead of once per stream (2,000
/// streams with 15 s keepalives otherwise wake the workers ~130 times a second between
/// events). Keepalives and idle timeouts are then at most this late. Drain slots, the
/// retirement grace and `maxDuration` keep exact deadlines.
pub const TIMER_GRID: Duration = Duration::from_millis(100);

/// `at` rounded up onto the [`TIMER_GRID`].
fn coarse(at: Instant) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    if at <= epoch {
        // (A clock that started before the grid's epoch: tests' paused clocks.)
        return at;
    }
    let grid = TIMER_GRID.as_nanos();
    let since = (at - epoch).as_nanos();
    let up = since.div_ceil(grid) * grid;
    epoch + Duration::from_nanos(u64::try_from(up).unwrap_or(u64::MAX))
}

/// Arms `sleep` (creating it if the stream had no timer) to fire no later than `at`.
fn arm(sleep: &mut Option<Pin<Box<Sleep>>>, at: Instant) {
    match sleep {
        Some(s) => {
            if at < s.deadline() {
                s.as_mut().reset(at);
            }
        }
        None => *sleep = Some(Box::pin(tokio::time::sleep_until(at))),
    }
}

impl<B> Body for RelayBody<B>
where
    B: Body<Data = Bytes> + Retiring,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let metrics = &this.guard.rule.metrics;
        if !*this.retiring && this.inner.retiring() {
            *this.retiring = true;
            if !*this.sse {
                *this.done = true;
                return Poll::Ready(None);
            }
            *this.ending = true;
            *this.retry_hint = true;
            if !this.framer.at_boundary() {
                let by = Instant::now() + RETIRED_EVENT_GRACE;
                *this.retire_by = Some(by);
                arm(this.sleep, by);
                *this.registered = None;
            }
        }
        if *this.ending && (!*this.sse || this.framer.at_boundary()) {
            *this.done = true;
            if std::mem::take(this.retry_hint) {
                let mut hint = BytesMut::with_capacity(32);
                write_retry(&mut hint, this.drain.retry_hint_ms());
                metrics.bytes_sent_total.inc_by(hint.len() as u64);
                return Poll::Ready(Some(Ok(Frame::data(hint.freeze()))));
            }
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if *this.sse {
                        let events = this.framer.feed(data);
                        if events > 0 {
                            metrics.events_total.inc_by(u64::from(events));
                        }
                        // A drain is noticed on busy streams too (one atomic load).
                        if !*this.drain_noticed
                            && let Some(at) = this.drain.close_at()
                        {
                            *this.drain_noticed = true;
                            *this.drain_at = Some(at);
                            arm(this.sleep, at);
                            *this.registered = None;
                        }
                    }
                    metrics.bytes_sent_total.inc_by(data.len() as u64);
                    if this.sleep.is_some() {
                        let now = Instant::now();
                        *this.last_sent = now;
                        *this.last_upstream = now;
                        // Busy streams never reach the timer below: honour their deadlines here.
                        if this.deadline.is_some_and(|d| now >= d) {
                            *this.deadline = None;
                            *this.ending = true;
                        }
                        if this.drain_at.is_some_and(|d| now >= d) {
                            *this.drain_at = None;
                            *this.ending = true;
                            *this.retry_hint = true;
                        }
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                *this.done = true;
                let e: BoxError = e.into();
                metrics.upstream_error("reset");
                tracing::debug!(route = %metrics.route, error = %e, "upstream failed mid-stream");
                // An SSE client reconnects after a clean end; anything else must see that the
                // response is truncated.
                return Poll::Ready(if *this.sse { None } else { Some(Err(e)) });
            }
            Poll::Ready(None) => {
                *this.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }

        // Registered with this task before (the common case: the next poll after an event):
        // one atomic load stands in for the drain registration, one clock read for the timer.
        let mut fresh = this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if *this.sse && !*this.drain_noticed {
            let begun = if fresh {
                this.drain.close_at()
            } else {
                match this.drain.poll_close_at(cx) {
                    Poll::Ready(at) => Some(at),
                    Poll::Pending => None,
                }
            };
            if let Some(at) = begun {
                *this.drain_noticed = true;
                *this.drain_at = Some(at);
                arm(this.sleep, at);
                fresh = false;
            }
        }
        let Some(sleep) = this.sleep.as_mut() else {
            if !fresh {
                *this.registered = Some(cx.waker().clone());
            }
            return Poll::Pending;
        };
        if fresh && Instant::now() < sleep.deadline() {
            return Poll::Pending;
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                if !fresh {
                    *this.registered = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            // A fired timer keeps no waker: whatever it is reset to must be polled again.
            *this.registered = None;
            fresh = false;
            let now = Instant::now();
            let at_boundary = this.framer.at_boundary();
            if let Some(deadline) = *this.deadline
                && now >= deadline
            {
                if !*this.sse || at_boundary {
                    *this.done = true;
                    return Poll::Ready(None);
                }
                // Finish the event in flight first; the next boundary ends the stream.
                *this.ending = true;
                *this.deadline = None;
            }
            if let Some(at) = *this.drain_at
                && now >= at
            {
                *this.drain_at = None;
                *this.ending = true;
                *this.retry_hint = true;
                if at_boundary {
                    *this.done = true;
                    *this.retry_hint = false;
                    let mut hint = BytesMut::with_capacity(32);
                    write_retry(&mut hint, this.drain.retry_hint_ms());
                    metrics.bytes_sent_total.inc_by(hint.len() as u64);
                    return Poll::Ready(Some(Ok(Frame::data(hint.freeze()))));
                }
                // Mid-event: the hint follows the event's last bytes.
            }
            if this.retire_by.is_some_and(|by| now >= by) {
                // The event in flight did not end in time: cut it (no hint possible).
                *this.done = true;
                return Poll::Ready(None);
            }
            if let Some(idle) = this.timers.idle
                && now >= *this.last_upstream + idle
            {
                *this.done = true;
                metrics.upstream_error("idle_timeout");
                return Poll::Ready(None);
            }
            // Exact deadlines, and the keepalive/idle ones (rounded onto the grid).
            let exact = (*this.deadline)
                .into_iter()
                .chain(*this.drain_at)
                .chain(*this.retire_by)
                .min();
            let mut periodic = this.timers.idle.map(|d| *this.last_upstream + d);
            if let Some(ka) = this.timers.keepalive {
                let due = *this.last_sent + ka;
                if now >= due && at_boundary && !*this.ending {
                    *this.last_sent = now;
                    metrics.keepalives_total.inc();
                    metrics.bytes_sent_total.inc_by(KEEPALIVE.len() as u64);
                    let again = coarse(periodic.map_or(now + ka, |p| p.min(now + ka)));
                    sleep.as_mut().reset(exact.map_or(again, |e| e.min(again)));
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEPALIVE)))));
                }
                // Mid-event: never inject; look again one interval later (the upstream's
                // next bytes move `last_sent` anyway).
                let ka_next = if now >= due { now + ka } else { due };
                periodic = Some(periodic.map_or(ka_next, |p| p.min(ka_next)));
            }
            let next = periodic.map(coarse).into_iter().chain(exact).min();
            match next {
                Some(at) => sleep.as_mut().reset(at),
                None => {
                    *this.sleep = None;
                    if !fresh {
                        *this.registered = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
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
    use crate::proxy::drain::Drain;
    use crate::routing::tests::{route, service, slice};
    use crate::routing::{CompileOptions, StateStore, compile};
    use crate::source::Snapshot;
    use futures_util::future::poll_fn;
    use http_body_util::StreamBody;
    use std::convert::Infallible;
    use tokio::sync::mpsc;
    use tokio_stream_shim::ReceiverStream;

    /// Minimal `Stream` over an mpsc receiver (avoids a dependency for tests).
    mod tokio_stream_shim {
        use super::*;
        pub struct ReceiverStream(pub mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);
        impl futures_util::Stream for ReceiverStream {
            type Item = Result<Frame<Bytes>, Infallible>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                self.0.poll_recv(cx)
            }
        }
    }

    type Upstream = EndpointBody<StreamBody<ReceiverStream>>;

    fn endpoint() -> Arc<crate::balance::Endpoint> {
        crate::balance::Endpoint::new("10.0.0.1:80".parse().unwrap())
    }

    fn rule_and_metrics() -> (Arc<Rule>, Metrics) {
        let metrics = Metrics::new();
        let snap = Snapshot {
            routes: vec![route("apps", "feed").rule("/", "svc", 80).build()],
            services: vec![service("apps", "svc", &[(None, 80)])],
            endpoint_slices: vec![slice("apps", "svc", 9000, &[("10.0.0.1", true)])],
            ..Default::default()
        };
        let (table, _) = compile(
            &snap,
            &CompileOptions::default(),
            &StateStore::new(metrics.clone()),
        );
        (table.route("h", "/").unwrap().clone(), metrics)
    }

    type Tx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

    fn relay(timers: RelayTimers) -> (Tx, Pin<Box<RelayBody<Upstream>>>, Arc<Rule>) {
        relay_draining(timers, &Drain::new())
    }

    fn relay_draining(
        timers: RelayTimers,
        drain: &Drain,
    ) -> (Tx, Pin<Box<RelayBody<Upstream>>>, Arc<Rule>) {
        let (tx, body, rule) = relay_on(&endpoint(), true, timers, drain);
        (tx, body, rule)
    }

    /// A relayed stream (SSE or not) on `ep`.
    fn relay_on(
        ep: &Arc<crate::balance::Endpoint>,
        sse: bool,
        timers: RelayTimers,
        drain: &Drain,
    ) -> (Tx, Pin<Box<RelayBody<Upstream>>>, Arc<Rule>) {
        let (rule, _m) = rule_and_metrics();
        let (tx, rx) = mpsc::channel(16);
        let guard = StreamGuard::admit(&rule).unwrap();
        (
            tx,
            Box::pin(RelayBody::new(
                EndpointBody::new(
                    StreamBody::new(ReceiverStream(rx)),
                    EndpointLease::new(ep.clone()),
                ),
                sse,
                timers,
                guard,
                drain.watch(),
            )),
            rule,
        )
    }

    async fn send(tx: &Tx, s: &'static str) {
        tx.send(Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
            .await
            .unwrap();
    }

    /// The next frame's data, or None at the end of the body.
    async fn next(body: &mut Pin<Box<RelayBody<Upstream>>>) -> Option<Bytes> {
        poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .map(|f| f.unwrap().into_data().unwrap())
    }

    fn ka(secs: u64) -> RelayTimers {
        RelayTimers {
            keepalive: Some(Duration::from_secs(secs)),
            ..Default::default()
        }
    }

    /// Asserts that a keepalive or idle timer fired `elapsed` after its start: not before
    /// `want`, late by the timer grid at most (plus the timer wheel's millisecond).
    #[track_caller]
    fn on_grid_after(elapsed: Duration, want: Duration) {
        let most = want + TIMER_GRID + Duration::from_millis(1);
        assert!(
            elapsed >= want && elapsed <= most,
            "{elapsed:?}, want {want:?} to {most:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_timers_of_streams_started_apart_fall_due_together() {
        // Three streams opened 30 ms apart (within one grid step): their keepalives go out at
        // the same instant (one wake-up of the worker), none earlier than its interval.
        let ka15 = Duration::from_secs(15);
        let grid_point = coarse(Instant::now() + ka15) - ka15;
        tokio::time::sleep_until(grid_point + Duration::from_millis(10)).await;
        let mut streams = Vec::new();
        for _ in 0..3 {
            let (tx, mut body, _rule) = relay(ka(15));
            send(&tx, "data: a\n\n").await;
            next(&mut body).await.unwrap();
            streams.push((tx, body, Instant::now()));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let mut fired = Vec::new();
        for (_tx, body, start) in &mut streams {
            assert_eq!(next(body).await.unwrap(), KEEPALIVE);
            on_grid_after(start.elapsed(), ka15);
            fired.push(Instant::now());
        }
        assert!(fired.iter().all(|&t| t == fired[0]), "{fired:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_after_idle_interval_at_boundary() {
        let (tx, mut body, rule) = relay(ka(15));
        send(&tx, "data: a\n\n").await;
        assert_eq!(next(&mut body).await.unwrap(), "data: a\n\n");
        let t0 = Instant::now();
        assert_eq!(next(&mut body).await.unwrap(), KEEPALIVE);
        let first = t0.elapsed();
        on_grid_after(first, Duration::from_secs(15));
        assert_eq!(next(&mut body).await.unwrap(), KEEPALIVE);
        on_grid_after(t0.elapsed() - first, Duration::from_secs(15));
        assert_eq!(rule.metrics.keepalives_total.get(), 2);
        assert_eq!(rule.metrics.events_total.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_never_inside_an_event() {
        let (tx, mut body, rule) = relay(ka(15));
        send(&tx, "data: first half").await;
        assert_eq!(next(&mut body).await.unwrap(), "data: first half");
        // The upstream stalls mid-event for a minute: nothing may be injected.
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            send(&tx2, " second half\n\n").await;
        });
        let t0 = Instant::now();
        assert_eq!(next(&mut body).await.unwrap(), " second half\n\n");
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
        assert_eq!(rule.metrics.keepalives_total.get(), 0);
        // Now at a boundary: the keepalive comes one interval after the last bytes.
        assert_eq!(next(&mut body).await.unwrap(), KEEPALIVE);
        on_grid_after(t0.elapsed(), Duration::from_secs(75));
    }

    #[tokio::test(start_paused = true)]
    async fn lone_cr_is_not_a_boundary_for_keepalive() {
        let (tx, mut body, rule) = relay(ka(1));
        send(&tx, "data: x\r\r").await;
        next(&mut body).await.unwrap();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            send(&tx2, "\n").await;
        });
        assert_eq!(next(&mut body).await.unwrap(), "\n");
        assert_eq!(rule.metrics.keepalives_total.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn events_reset_the_keepalive_clock() {
        let (tx, mut body, rule) = relay(ka(10));
        let tx2 = tx.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                send(&tx2, "data: tick\n\n").await;
            }
        });
        for _ in 0..5 {
            assert_eq!(next(&mut body).await.unwrap(), "data: tick\n\n");
        }
        assert_eq!(rule.metrics.keepalives_total.get(), 0);
        assert_eq!(rule.metrics.events_total.get(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_the_stream_and_is_counted() {
        let timers = RelayTimers {
            idle: Some(Duration::from_secs(30)),
            keepalive: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let (tx, mut body, rule) = relay(timers);
        send(&tx, "data: a\n\n").await;
        next(&mut body).await.unwrap();
        let t0 = Instant::now();
        // Keepalives do not count as upstream activity.
        assert_eq!(next(&mut body).await.unwrap(), KEEPALIVE);
        assert_eq!(next(&mut body).await.unwrap(), KEEPALIVE);
        assert_eq!(next(&mut body).await, None);
        on_grid_after(t0.elapsed(), Duration::from_secs(30));
        assert!(body.is_end_stream());
        let _ = rule;
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn max_duration_waits_for_the_event_boundary() {
        let timers = RelayTimers {
            max_duration: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let (tx, mut body, _rule) = relay(timers);
        send(&tx, "data: part").await;
        next(&mut body).await.unwrap();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            send(&tx2, "ial\n\n").await;
            send(&tx2, "data: never\n\n").await;
        });
        assert_eq!(next(&mut body).await.unwrap(), "ial\n\n");
        assert_eq!(next(&mut body).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn endpoint_body_counts_the_stream_and_retirement_ends_it_with_a_retry_hint() {
        let ep = endpoint();
        let (tx, mut body, _rule) = relay_on(&ep, true, ka(15), &Drain::new());
        assert_eq!(ep.active(), 1);
        send(&tx, "data: a\n\n").await;
        assert_eq!(next(&mut body).await.unwrap(), "data: a\n\n");
        // Idle stream (between events): only the retirement can wake it.
        let ep2 = ep.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            ep2.retire();
        });
        let t0 = Instant::now();
        assert_eq!(next(&mut body).await.unwrap(), KEEPALIVE);
        // (Bounded, so a lost wake-up fails the test instead of hanging it.)
        let hint = tokio::time::timeout(Duration::from_secs(3600), next(&mut body))
            .await
            .expect("the retirement did not wake the idle stream");
        assert_eq!(t0.elapsed(), Duration::from_secs(20));
        let hint = hint.unwrap();
        assert_eq!(
            hint,
            retry_frame(body.drain.retry_hint_ms()),
            "a retry: hint, then the end"
        );
        assert_eq!(next(&mut body).await, None, "a clean end, not an error");
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(ep.active(), 0);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn retirement_mid_event_sends_the_hint_after_the_event() {
        let ep = endpoint();
        let (tx, mut body, _rule) = relay_on(&ep, true, ka(1), &Drain::new());
        send(&tx, "data: first half").await;
        next(&mut body).await.unwrap();
        ep.retire();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            send(&tx2, " second half\n\n").await;
            send(&tx2, "data: never sent\n\n").await;
        });
        // No keepalive inside the event, and the event is finished before the hint.
        assert_eq!(next(&mut body).await.unwrap(), " second half\n\n");
        let hint = next(&mut body).await.unwrap();
        assert!(
            hint.starts_with(b"retry: ") && hint.ends_with(b"\n\n"),
            "{hint:?}"
        );
        assert_eq!(next(&mut body).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn retirement_mid_event_cuts_an_event_that_does_not_end() {
        let ep = endpoint();
        let (tx, mut body, _rule) = relay_on(&ep, true, RelayTimers::default(), &Drain::new());
        send(&tx, "data: never finished").await;
        next(&mut body).await.unwrap();
        ep.retire();
        let t0 = Instant::now();
        // No hint inside the event: after the grace the stream just ends.
        assert_eq!(next(&mut body).await, None);
        assert_eq!(t0.elapsed(), RETIRED_EVENT_GRACE);
        drop(tx);
    }

    #[tokio::test]
    async fn a_stream_on_an_already_retired_endpoint_ends_at_once() {
        let ep = endpoint();
        ep.retire();
        let (_tx, mut body, _rule) = relay_on(&ep, true, RelayTimers::default(), &Drain::new());
        assert!(next(&mut body).await.unwrap().starts_with(b"retry: "));
        assert_eq!(next(&mut body).await, None);
        // Not an event stream: no boundary, no hint; it ends at once.
        let (_tx, mut body, _rule) = relay_on(&ep, false, RelayTimers::default(), &Drain::new());
        assert_eq!(next(&mut body).await, None);
    }

    fn retry_frame(ms: u64) -> Bytes {
        let mut b = BytesMut::new();
        write_retry(&mut b, ms);
        b.freeze()
    }

    #[tokio::test(start_paused = true)]
    async fn drain_sends_a_retry_hint_then_ends_at_the_streams_slot() {
        let drain = Drain::new();
        let (tx, mut body, rule) = relay_draining(ka(15), &drain);
        send(&tx, "data: a\n\n").await;
        assert_eq!(next(&mut body).await.unwrap(), "data: a\n\n");
        let t0 = Instant::now();
        let d2 = drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            d2.begin(Duration::from_secs(5), Duration::from_secs(60));
        });
        // Keepalives continue until the stream's slot.
        let mut frames = Vec::new();
        while let Some(f) = next(&mut body).await {
            frames.push((f, t0.elapsed()));
        }
        let plan = *drain.plan().unwrap();
        let close = plan.close_at(0) - t0;
        let (last, at) = frames.pop().unwrap();
        assert_eq!(last, retry_frame(super::super::drain::retry_hint_ms(0)));
        // Timers have millisecond resolution.
        assert!(
            at.abs_diff(close) <= Duration::from_millis(1),
            "{at:?} {close:?}"
        );
        assert!(frames.iter().all(|(f, _)| f == KEEPALIVE));
        assert_eq!(frames.len() as u128, close.as_millis() / 15_000);
        assert!(body.is_end_stream());
        let _ = (tx, rule);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_the_event_in_flight() {
        let drain = Drain::new();
        let (tx, mut body, _rule) = relay_draining(RelayTimers::default(), &drain);
        send(&tx, "data: first half").await;
        next(&mut body).await.unwrap();
        drain.begin(Duration::ZERO, Duration::from_millis(1));
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            send(&tx2, " second half\n").await;
            send(&tx2, "\n").await;
            send(&tx2, "data: never sent\n\n").await;
        });
        assert_eq!(next(&mut body).await.unwrap(), " second half\n");
        assert_eq!(next(&mut body).await.unwrap(), "\n");
        let hint = next(&mut body).await.unwrap();
        assert!(hint.starts_with(b"retry: "), "{hint:?}");
        assert_eq!(next(&mut body).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_reaches_busy_streams() {
        let drain = Drain::new();
        let (tx, mut body, _rule) = relay_draining(RelayTimers::default(), &drain);
        drain.begin(Duration::from_secs(1), Duration::from_millis(1));
        // An upstream that always has the next event ready: the timer path is never taken.
        let tx2 = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if tx2
                    .send(Ok(Frame::data(Bytes::from_static(b"data: x\n\n"))))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let t0 = Instant::now();
        let mut last = Bytes::new();
        while let Some(f) = next(&mut body).await {
            last = f;
        }
        assert!(last.starts_with(b"retry: "));
        assert!(
            t0.elapsed() <= Duration::from_millis(1200),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn non_sse_bodies_are_not_cut_by_a_drain() {
        let drain = Drain::new();
        let (tx, mut body, _rule) = relay_on(&endpoint(), false, RelayTimers::default(), &drain);
        drain.begin(Duration::ZERO, Duration::from_millis(1));
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            send(&tx2, "{\"rest\":1}").await;
        });
        assert_eq!(next(&mut body).await.unwrap(), "{\"rest\":1}");
    }

    #[tokio::test]
    async fn guard_tracks_active_streams_and_enforces_the_limit() {
        let (rule, metrics) = rule_and_metrics();
        let mut limited = Arc::try_unwrap(rule).unwrap_or_else(|r| panic!("shared rule {r:?}"));
        limited.max_connections = 2;
        let rule = Arc::new(limited);
        let a = StreamGuard::admit(&rule).unwrap();
        let b = StreamGuard::admit(&rule).unwrap();
        assert!(StreamGuard::admit(&rule).is_none());
        assert_eq!(rule.metrics.connections_active.get(), 2);
        drop(a);
        assert!(StreamGuard::admit(&rule).is_some());
        drop(b);
        assert_eq!(rule.active.load(Ordering::Relaxed), 0);
        assert!(
            metrics
                .render()
                .contains(r#"ssegate_connections_total{route="apps/feed"} 3"#)
        );
    }

    /// Stands in for the upstream connection inside the relay: records, when it is dropped
    /// (the upstream closes), the endpoint's and the rule's stream counts at that moment.
    struct CloseProbe {
        ep: Arc<crate::balance::Endpoint>,
        rule: Arc<Rule>,
        seen: Arc<std::sync::Mutex<Option<(usize, usize)>>>,
    }

    impl Drop for CloseProbe {
        fn drop(&mut self) {
            let counts = (self.ep.active(), self.rule.active.load(Ordering::Relaxed));
            *self.seen.lock().unwrap() = Some(counts);
        }
    }

    impl Body for CloseProbe {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn dropping_the_relay_releases_the_counts_before_the_upstream_closes() {
        let ep = endpoint();
        let (rule, _m) = rule_and_metrics();
        let seen = Arc::new(std::sync::Mutex::new(None));
        let probe = CloseProbe {
            ep: ep.clone(),
            rule: rule.clone(),
            seen: seen.clone(),
        };
        let body = RelayBody::new(
            EndpointBody::new(probe, EndpointLease::new(ep.clone())),
            true,
            RelayTimers::default(),
            StreamGuard::admit(&rule).unwrap(),
            Drain::new().watch(),
        );
        assert_eq!((ep.active(), rule.active.load(Ordering::Relaxed)), (1, 1));
        drop(body);
        assert_eq!(
            *seen.lock().unwrap(),
            Some((0, 0)),
            "endpoint and rule counts already released when the upstream closed"
        );
    }
}
