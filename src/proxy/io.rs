//! The client connection's socket wrapper: the client write timeout.
//!
//! A client that stops reading makes the socket's send buffer fill; hyper then stops polling
//! the response body (so nothing more is read from the upstream, whose own socket then fills:
//! TCP backpressure end to end, memory bounded by the socket buffers plus hyper's write
//! buffer). What the body cannot see is *how long* the client has accepted nothing, because
//! it is not polled meanwhile. [`WriteTimeout`] sees it: when a write stays pending for the
//! whole timeout without a single byte accepted, the write fails with `TimedOut`, hyper ends
//! the connection, the response body is dropped and the upstream connection closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// State of one client connection shared with the streams it carries.
#[derive(Debug, Default)]
pub struct ConnState {
    write_timed_out: AtomicBool,
}

impl ConnState {
    /// True once the connection was ended by the client write timeout.
    pub fn write_timed_out(&self) -> bool {
        self.write_timed_out.load(Ordering::Acquire)
    }
}

pin_project! {
    /// An `AsyncRead + AsyncWrite` that fails writes pending for longer than `timeout`.
    pub struct WriteTimeout<T> {
        #[pin]
        io: T,
        timeout: Option<Duration>,
        sleep: Option<Pin<Box<Sleep>>>,
        stalled: bool,
        state: Arc<ConnState>,
    }
}

impl<T> WriteTimeout<T> {
    /// Wraps `io`; `None` disables the timeout.
    pub fn new(io: T, timeout: Option<Duration>, state: Arc<ConnState>) -> Self {
        WriteTimeout {
            io,
            timeout,
            sleep: None,
            stalled: false,
            state,
        }
    }
}

/// Called when the inner write is pending: starts or checks the stall timer.
fn stalled<R>(
    timeout: Option<Duration>,
    sleep: &mut Option<Pin<Box<Sleep>>>,
    stalled: &mut bool,
    state: &ConnState,
    cx: &mut Context<'_>,
) -> Poll<io::Result<R>> {
    let Some(timeout) = timeout else {
        return Poll::Pending;
    };
    if !*stalled {
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
            Poll::Pending => stalled(*this.timeout, this.sleep, this.stalled, this.state, cx),
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
            Poll::Pending => stalled(*this.timeout, this.sleep, this.stalled, this.state, cx),
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
            Poll::Pending => stalled(*this.timeout, this.sleep, this.stalled, this.state, cx),
            done => done,
        }
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
        let state = Arc::new(ConnState::default());
        let mut w = WriteTimeout::new(a, Some(Duration::from_secs(5)), state.clone());
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
        let state = Arc::new(ConnState::default());
        let mut w = WriteTimeout::new(a, Some(Duration::from_secs(5)), state.clone());
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

    #[tokio::test(start_paused = true)]
    async fn no_timeout_waits_forever() {
        let (a, _b) = tokio::io::duplex(8);
        let mut w = WriteTimeout::new(a, None, Arc::new(ConnState::default()));
        w.write_all(&[0; 8]).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(3600), w.write_all(&[0; 8])).await;
        assert!(r.is_err(), "write should still be pending");
    }
}
