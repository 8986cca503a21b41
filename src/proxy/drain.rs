//! Graceful drain: on shutdown, open streams are closed spread evenly over a window instead of
//! all at once, so their clients reconnect to other replicas gradually.
//!
//! There is no per-stream task and no registry of streams. Every relayed stream holds a
//! [`DrainWatch`]: a numeric stream id and a handle on one shared [`Drain`]. When the drain
//! begins, the [`Plan`] is published once (a `OnceLock`, read lock-free) and every waiting
//! stream is woken through one `Notify`; each stream then derives its own close instant from
//! its id ([`close_offset`]) and arms the one timer it already has. At that instant the relay
//! sends a `retry:` hint at the next event boundary and ends the response cleanly.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Instant;

/// The lowest `retry:` hint (milliseconds) sent to a drained stream.
pub const RETRY_HINT_MIN_MS: u64 = 1000;
/// Width of the `retry:` hint's jitter: hints are in `[RETRY_HINT_MIN_MS, + this)`.
pub const RETRY_HINT_SPREAD_MS: u64 = 2000;

/// When and how fast streams are closed once a drain begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// When the first streams may close (drain start + `--drain-delay`).
    pub start: Instant,
    /// Closes are spread over `[start, start + window)`.
    pub window: Duration,
    /// Streams open when the drain began; scales the per-stream jitter.
    pub streams: usize,
}

impl Plan {
    /// When the stream with `id` is to be closed.
    pub fn close_at(&self, id: u64) -> Instant {
        self.start + close_offset(id, self.streams, self.window)
    }
}

/// splitmix64: a well-mixed 64-bit hash of a stream id.
fn mix(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where in the window the stream `id` closes: a golden-ratio (Weyl) sequence over the ids,
/// which spreads any run of consecutive ids evenly, plus a hash jitter of up to half a slot
/// (`window / streams`) either way, so closes do not land on a fixed grid. Always `< window`.
pub fn close_offset(id: u64, streams: usize, window: Duration) -> Duration {
    // Fibonacci hashing: id × 2^64/φ, wrapping, is the fractional part of id/φ in 64-bit
    // fixed point; exact for every id.
    let even = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) as f64 / 18_446_744_073_709_551_616.0;
    let jitter = (mix(id) as f64 / u64::MAX as f64 - 0.5) / streams.max(1) as f64;
    let f = (even + jitter).rem_euclid(1.0);
    let offset = window.mul_f64(f);
    // Rounding can touch the end of the window; keep the bound strict.
    if offset >= window && !window.is_zero() {
        window - Duration::from_nanos(1)
    } else {
        offset
    }
}

/// The `retry:` hint (milliseconds) sent to stream `id` before it is closed: jittered too, so
/// even clients closed at nearly the same instant do not reconnect in step.
pub fn retry_hint_ms(id: u64) -> u64 {
    RETRY_HINT_MIN_MS + (mix(id.rotate_left(17)) % RETRY_HINT_SPREAD_MS)
}

#[derive(Debug, Default)]
struct Inner {
    plan: OnceLock<Plan>,
    notify: Arc<Notify>,
    next_id: AtomicU64,
    open: AtomicUsize,
}

/// The process-wide drain state, shared by the proxy and the shutdown sequence; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Drain(Arc<Inner>);

impl Drain {
    /// A drain that has not begun.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins the drain: streams close spread over `[now + delay, now + delay + window)`.
    /// Only the first call has an effect; it returns the plan in force.
    pub fn begin(&self, delay: Duration, window: Duration) -> Plan {
        let plan = *self.0.plan.get_or_init(|| Plan {
            start: Instant::now() + delay,
            window,
            streams: self.open_streams(),
        });
        self.0.notify.notify_waiters();
        plan
    }

    /// The plan, once the drain has begun.
    pub fn plan(&self) -> Option<&Plan> {
        self.0.plan.get()
    }

    /// Relayed streams currently open (each holds a [`DrainWatch`]).
    pub fn open_streams(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    /// Resolves when the drain window opens (drain start + delay): the moment to stop
    /// accepting connections.
    pub async fn window_opened(&self) {
        loop {
            let notified = self.0.notify.notified();
            if let Some(plan) = self.plan() {
                tokio::time::sleep_until(plan.start).await;
                return;
            }
            notified.await;
        }
    }

    /// Registers one relayed stream (counted in [`Drain::open_streams`] until dropped).
    pub fn watch(&self) -> DrainWatch {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        DrainWatch {
            id: self.0.next_id.fetch_add(1, Ordering::Relaxed),
            notified: None,
            drain: self.clone(),
        }
    }
}

/// One stream's view of the [`Drain`]: its id and, lazily, one wake-up registration.
#[derive(Debug)]
pub struct DrainWatch {
    drain: Drain,
    id: u64,
    notified: Option<Pin<Box<OwnedNotified>>>,
}

impl DrainWatch {
    /// This stream's id (unique per process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This stream's close instant if the drain has begun (one atomic load).
    pub fn close_at(&self) -> Option<Instant> {
        self.drain.plan().map(|p| p.close_at(self.id))
    }

    /// Ready with this stream's close instant once the drain begins; until then registers
    /// `cx` to be woken when it does.
    pub fn poll_close_at(&mut self, cx: &mut Context<'_>) -> Poll<Instant> {
        if let Some(at) = self.close_at() {
            return Poll::Ready(at);
        }
        let drain = &self.drain;
        let notified = self.notified.get_or_insert_with(|| {
            let mut n = Box::pin(drain.0.notify.clone().notified_owned());
            // Enabled before the plan is checked again below, so a `begin` in between is
            // not missed.
            n.as_mut().enable();
            n
        });
        if let Some(plan) = drain.plan() {
            return Poll::Ready(plan.close_at(self.id));
        }
        match notified.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.notified = None;
                match self.close_at() {
                    Some(at) => Poll::Ready(at),
                    // Spurious: register again.
                    None => self.poll_close_at(cx),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The `retry:` hint for this stream.
    pub fn retry_hint_ms(&self) -> u64 {
        retry_hint_ms(self.id)
    }
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        self.drain.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// Drains a body whose every frame boundary is an event boundary (poll-mode streams):
    /// once the drain reaches this stream's slot, the body sends a `retry:` hint between two
    /// frames and ends (dropping the inner body, which cancels a call in flight).
    pub struct DrainBody<B> {
        #[pin]
        inner: B,
        drain: DrainWatch,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        bytes_sent: Option<prometheus::IntCounter>,
        done: bool,
    }
}

impl<B> DrainBody<B> {
    /// Wraps `inner`; the hint's bytes are added to `bytes_sent` when given.
    pub fn new(inner: B, drain: DrainWatch, bytes_sent: Option<prometheus::IntCounter>) -> Self {
        DrainBody {
            inner,
            drain,
            sleep: None,
            bytes_sent,
            done: false,
        }
    }
}

impl<B> http_body::Body for DrainBody<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if this.sleep.is_none()
            && let Poll::Ready(at) = this.drain.poll_close_at(cx)
        {
            *this.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
        }
        if let Some(sleep) = this.sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            *this.done = true;
            let mut hint = bytes::BytesMut::with_capacity(32);
            crate::sse::write_retry(&mut hint, this.drain.retry_hint_ms());
            if let Some(c) = this.bytes_sent {
                c.inc_by(hint.len() as u64);
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(hint.freeze()))));
        }
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            *this.done = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::poll_fn;

    #[test]
    fn closes_spread_evenly_over_the_window() {
        let window = Duration::from_secs(30);
        for (first, n) in [
            (0u64, 10usize),
            (0, 1000),
            (12_345, 200),
            (u64::MAX / 3, 50),
        ] {
            let mut buckets = [0usize; 10];
            for id in first..first + n as u64 {
                let off = close_offset(id, n, window);
                assert!(off < window);
                buckets[(off.as_secs_f64() / 3.0) as usize] += 1;
            }
            let expect = n / 10;
            for (i, b) in buckets.iter().enumerate() {
                // Within about one slot of jitter and the sequence's discrepancy.
                assert!(
                    b.abs_diff(expect) <= 2 + expect / 5,
                    "n={n} first={first} bucket {i}: {b} (want ~{expect}) {buckets:?}"
                );
            }
        }
    }

    #[test]
    fn offsets_are_deterministic_and_jittered() {
        let w = Duration::from_secs(10);
        assert_eq!(close_offset(7, 100, w), close_offset(7, 100, w));
        // Not a fixed grid: consecutive gaps differ.
        let offs: Vec<f64> = (0..20u64)
            .map(|i| close_offset(i, 20, w).as_secs_f64())
            .collect();
        let mut sorted = offs.clone();
        sorted.sort_by(f64::total_cmp);
        let gaps: Vec<f64> = sorted.windows(2).map(|p| p[1] - p[0]).collect();
        let min = gaps.iter().copied().fold(f64::MAX, f64::min);
        let max = gaps.iter().copied().fold(0.0, f64::max);
        assert!(max - min > 0.05, "{gaps:?}");
        assert_eq!(close_offset(3, 0, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn retry_hints_are_jittered_within_bounds() {
        let hints: Vec<u64> = (0..200).map(retry_hint_ms).collect();
        assert!(hints.iter().all(|h| (1000..3000).contains(h)));
        let distinct: std::collections::HashSet<_> = hints.iter().collect();
        assert!(distinct.len() > 100);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_streams_are_woken_with_their_close_instant() {
        let drain = Drain::new();
        let mut a = drain.watch();
        let mut b = drain.watch();
        assert_eq!(drain.open_streams(), 2);
        let d2 = drain.clone();
        let t0 = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            d2.begin(Duration::from_secs(5), Duration::from_secs(10));
        });
        let at = poll_fn(|cx| a.poll_close_at(cx)).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        let plan = *drain.plan().unwrap();
        assert_eq!(plan.streams, 2);
        assert_eq!(at, plan.close_at(a.id()));
        assert!(at >= t0 + Duration::from_secs(6) && at < t0 + Duration::from_secs(16));
        // Already begun: ready at once, and a second begin changes nothing.
        assert_eq!(
            poll_fn(|cx| b.poll_close_at(cx)).await,
            plan.close_at(b.id())
        );
        assert_eq!(drain.begin(Duration::ZERO, Duration::ZERO), plan);
        // A stream opened during the drain gets a slot too.
        let c = drain.watch();
        assert!(c.close_at().is_some());
        drop((a, b, c));
        assert_eq!(drain.open_streams(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_body_closes_between_frames_with_a_retry_hint() {
        use bytes::Bytes;
        use http_body::{Body, Frame};
        use std::convert::Infallible;
        // A poll-like body: one frame every 10 s, forever.
        let frames = futures_util::stream::unfold(0u32, |i| async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let f: Result<Frame<Bytes>, Infallible> =
                Ok(Frame::data(Bytes::from(format!("data: {i}\n\n"))));
            Some((f, i + 1))
        });
        let drain = Drain::new();
        let counter = prometheus::IntCounter::new("b", "b").unwrap();
        let mut body = Box::pin(DrainBody::new(
            http_body_util::StreamBody::new(frames),
            drain.watch(),
            Some(counter.clone()),
        ));
        let t0 = Instant::now();
        let first = poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(first, "data: 0\n\n");
        drain.begin(Duration::from_secs(1), Duration::from_secs(4));
        let close = drain.plan().unwrap().close_at(0);
        let hint = poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert!(hint.starts_with(b"retry: "), "{hint:?}");
        let now = Instant::now();
        assert!(now.max(close) - now.min(close) <= Duration::from_millis(1));
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "closed before the next frame"
        );
        assert_eq!(counter.get(), hint.len() as u64);
        assert!(poll_fn(|cx| body.as_mut().poll_frame(cx)).await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn window_opened_waits_for_begin_and_delay() {
        let drain = Drain::new();
        let d2 = drain.clone();
        let t0 = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            d2.begin(Duration::from_secs(3), Duration::from_secs(10));
        });
        drain.window_opened().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
    }
}
