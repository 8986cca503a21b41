//! The client connection's socket wrapper: the client write timeout.
//!
//! A client that stops reading makes the socket's send buffer fill; hyper then stops polling
//! the response body (so nothing more is read from the upstream, whose own socket then fills:
//! TCP backpressure end to end, memory bounded by the socket buffers plus hyper's write
//! buffer). What the body cannot see is *how long* the client has accepted nothing, because
//! it is not polled meanwhile. [`WriteTimeout`] sees it: when a write stays pending for the
//! whole timeout without a single byte accepted, the write fails with `TimedOut`, hyper ends
//! the connection, the response body is dropped and the upstream connection closed.
//!
//! The timeout is the connection's ([`ConnState`]): it starts as `--client-write-timeout` and
//! each stream on the connection sets its rule's `timeouts.clientWriteTimeout`, if any
//! ([`ConnState::apply_write_timeout`]). A change applies from the next stall on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `write_timeout_ms` value meaning "no timeout".
const NO_TIMEOUT: u64 = u64::MAX;

/// State of one client connection shared with the streams it carries.
#[derive(Debug)]
pub struct ConnState {
    write_timed_out: AtomicBool,
    // The write timeout in force, in milliseconds; NO_TIMEOUT = none.
    write_timeout_ms: AtomicU64,
}

impl Default for ConnState {
    /// A connection without a write timeout.
    fn default() -> Self {
        ConnState::new(None)
    }
}

fn to_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(NO_TIMEOUT, |d| {
        u64::try_from(d.as_millis())
            .unwrap_or(NO_TIMEOUT - 1)
            .max(1)
    })
}

impl ConnState {
    /// A connection whose write timeout starts as `timeout` (`None`: none).
    pub fn new(timeout: Option<Duration>) -> Self {
        ConnState {
            write_timed_out: AtomicBool::new(false),
            write_timeout_ms: AtomicU64::new(to_ms(timeout)),
        }
    }

    /// True once the connection was ended by the client write timeout.
    pub fn write_timed_out(&self) -> bool {
        self.write_timed_out.load(Ordering::Acquire)
    }

    /// The write timeout in force (`None`: none).
    pub fn write_timeout(&self) -> Option<Duration> {
        match self.write_timeout_ms.load(Ordering::Relaxed) {
            NO_TIMEOUT => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// A stream starting on this connection asks for write timeout `timeout` (`None`: none).
    /// With `multiplexed` (HTTP/2) the connection keeps the longest timeout any of its
    /// streams asked for, so one route's short timeout never cuts another route's streams
    /// sooner than their own allows; otherwise (HTTP/1.1: one stream at a time) the stream's
    /// timeout replaces the previous one.
    pub fn apply_write_timeout(&self, timeout: Option<Duration>, multiplexed: bool) {
        let ms = to_ms(timeout);
        if multiplexed {
            self.write_timeout_ms.fetch_max(ms, Ordering::Relaxed);
        } else {
            self.write_timeout_ms.store(ms, Ordering::Relaxed);
        }
    }
}

pin_project! {
    /// An `AsyncRead + AsyncWrite` that fails writes pending for longer than the
    /// connection's write timeout.
    pub struct WriteTimeout<T> {
        #[pin]
        io: T,
        sleep: Option<Pin<Box<Sleep>>>,
        stalled: bool,
        state: Arc<ConnState>,
    }
}

impl<T> WriteTimeout<T> {
    /// Wraps `io`, the socket of the connection `state` describes (and whose write timeout
    /// applies).
    pub fn new(io: T, state: Arc<ConnState>) -> Self {
        WriteTimeout {
            io,
            sleep: None,
            stalled: false,
            state,
        }
    }
}

impl<T> WriteTimeout<T> {
    /// The wrapped socket.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

/// Called when the inner write is pending: starts or checks the stall timer.
fn stalled<R>(
    sleep: &mut Option<Pin<Box<Sleep>>>,
    stalled: &mut bool,
    state: &ConnState,
    cx: &mut Context<'_>,
) -> Poll<io::Result<R>> {
    if !*stalled {
        let Some(timeout) = state.write_timeout() else {
            return Poll::Pending;
        };
        *stalled = true;
        let at = Instant::now() + timeout;
        match sleep {
            Some(s) => s.as_mut().reset(at),
            None => *sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }
    let s = sleep.as_mut().expect("armed above");
    match s.as_mut().poll(cx) {
        Poll::Ready(()) => {
            state.write_timed_out.store(true, Ordering::Release);
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client accepted no data within the client write timeout",
            )))
        }
        Poll::Pending => Poll::Pending,
    }
}

impl<T: AsyncRead> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.io.poll_write(cx, buf) {
            Poll::Pending => stalled(this.sleep, this.stalled, this.state, cx),
            done => {
                *this.stalled = false;
                done
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.io.poll_write_vectored(cx, bufs) {
            Poll::Pending => stalled(this.sleep, this.stalled, this.state, cx),
            done => {
                *this.stalled = false;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        match this.io.poll_flush(cx) {
            Poll::Pending => stalled(this.sleep, this.stalled, this.state, cx),
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

pin_project! {
    /// An `AsyncRead + AsyncWrite` that first reads back bytes already read from `io` (by the
    /// HTTP/1.1 front, before it handed the connection to hyper), then reads `io` itself.
    pub struct Rewind<T> {
        pre: Bytes,
        #[pin]
        io: T,
    }
}

impl<T> Rewind<T> {
    /// Replays `pre`, then reads `io`.
    pub fn new(pre: Bytes, io: T) -> Self {
        Rewind { pre, io }
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            if this.pre.is_empty() {
                // Release the buffer it came from.
                *this.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_for_the_timeout_fails_and_is_flagged() {
        // A pipe whose reader never reads: writes block once its buffer is full.
        let (a, _b) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::new(Some(Duration::from_secs(5))));
        let mut w = WriteTimeout::new(a, state.clone());
        w.write_all(&[0; 64]).await.unwrap();
        let t0 = Instant::now();
        let err = w.write_all(&[1; 10]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        assert!(state.write_timed_out());
    }

    #[tokio::test(start_paused = true)]
    async fn progress_resets_the_stall_timer() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(16);
        let state = Arc::new(ConnState::new(Some(Duration::from_secs(5))));
        let mut w = WriteTimeout::new(a, state.clone());
        // A slow reader taking 16 bytes every 4 s: never 5 s without progress.
        tokio::spawn(async move {
            let mut buf = [0; 16];
            loop {
                tokio::time::sleep(Duration::from_secs(4)).await;
                if b.read(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        });
        w.write_all(&[0; 160]).await.unwrap();
        assert!(!state.write_timed_out());
    }

    #[tokio::test]
    async fn rewind_replays_what_was_read_then_reads_on() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), a);
        let mut first = [0u8; 3];
        r.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hel");
        let mut rest = String::new();
        r.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "lo world");
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_waits_forever() {
        let (a, _b) = tokio::io::duplex(8);
        let mut w = WriteTimeout::new(a, Arc::new(ConnState::new(None)));
        w.write_all(&[0; 8]).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(3600), w.write_all(&[0; 8])).await;
        assert!(r.is_err(), "write should still be pending");
    }

    #[test]
    fn a_stream_sets_the_connection_timeout_and_h2_keeps_the_longest() {
        let secs = |s| Some(Duration::from_secs(s));
        let h1 = ConnState::new(secs(60));
        h1.apply_write_timeout(secs(2), false);
        assert_eq!(h1.write_timeout(), secs(2));
        // The next request on a keep-alive connection brings its own rule's timeout.
        h1.apply_write_timeout(secs(60), false);
        assert_eq!(h1.write_timeout(), secs(60));
        h1.apply_write_timeout(None, false);
        assert_eq!(h1.write_timeout(), None);

        let h2 = ConnState::new(secs(60));
        h2.apply_write_timeout(secs(2), true);
        assert_eq!(h2.write_timeout(), secs(60));
        h2.apply_write_timeout(secs(90), true);
        assert_eq!(h2.write_timeout(), secs(90));
        h2.apply_write_timeout(None, true);
        assert_eq!(h2.write_timeout(), None);
        h2.apply_write_timeout(secs(1), true);
        assert_eq!(h2.write_timeout(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_set_after_the_connection_started_applies_to_the_next_stall() {
        let (a, _b) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::new(Some(Duration::from_secs(60))));
        let mut w = WriteTimeout::new(a, state.clone());
        state.apply_write_timeout(Some(Duration::from_millis(1500)), false);
        w.write_all(&[0; 64]).await.unwrap();
        let t0 = Instant::now();
        let err = w.write_all(&[1; 10]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_millis(1500));
    }
}
