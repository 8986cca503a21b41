//! Thread-per-core serving, like nginx's worker processes.
//!
//! `--workers N` threads each run their own single-threaded tokio runtime with their own
//! listening socket on the proxy address (and on the TLS address), all bound with
//! `SO_REUSEPORT`: the kernel spreads new connections over the sockets, and a connection's
//! task, its two sockets (client and upstream) and its timers then stay on one thread, so
//! relaying an event never wakes another thread. The control plane (configuration source,
//! admin listener, status writer, leader election) stays on the main runtime; what the two
//! halves share is atomics, `ArcSwap` and `Notify`, all of which work across runtimes (a
//! drain begun on the main runtime wakes the streams on every worker).
//!
//! The process also raises its own open-files limit at start-up ([`raise_nofile_limit`]),
//! like nginx's `worker_rlimit_nofile`: each proxied stream holds two descriptors.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, watch};

/// Backlog of the proxy listeners (the kernel caps it at `net.core.somaxconn`): thousands of
/// clients reconnecting at once (after a drain or a network blip) must not overflow the
/// accept queue, which costs each overflowing client a SYN retransmit (a second or more).
pub const LISTEN_BACKLOG: u32 = 4096;

/// The default `--workers`: one per CPU the process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Binds `addr` with the proxy's socket options (`SO_REUSEADDR`, backlog
/// [`LISTEN_BACKLOG`]), and `SO_REUSEPORT` when `shared`. Must run inside the runtime that
/// will serve the listener.
fn bind_one(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves the address the `SO_REUSEPORT` group will share, failing if anything already
/// listens there: a plain bind conflicts with any listener, including another process's
/// `SO_REUSEPORT` group, which the group's own binds would silently join. Resolves port 0 to
/// the ephemeral port picked.
fn probe(addr: SocketAddr) -> io::Result<SocketAddr> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.local_addr()
}

/// Binds the proxy listener on the current runtime (`--workers 0`: in-process use, where the
/// caller's runtime serves everything).
pub fn bind_local(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_one(addr, false)
}

/// One worker before it starts: its runtime and the listeners bound on it.
struct Worker {
    // Taken by the worker's thread; dropped without blocking if start-up fails (this may be
    // in an async context, where dropping a runtime the ordinary way panics).
    runtime: Option<Runtime>,
    listeners: Vec<TcpListener>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Worker runtimes with their listeners bound, not started yet: everything that can fail
/// (a busy port, a runtime that cannot be built) fails before any thread starts.
pub struct WorkersBuilder {
    workers: Vec<Worker>,
}

impl WorkersBuilder {
    /// `n` (at least 1) worker runtimes, nothing bound yet.
    pub fn new(n: usize) -> anyhow::Result<Self> {
        let workers = (0..n.max(1))
            .map(|i| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(format!("ssegate-worker-{i}"))
                    .build()
                    .context("cannot build a worker runtime")?;
                Ok(Worker {
                    runtime: Some(runtime),
                    listeners: Vec::new(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(WorkersBuilder { workers })
    }

    /// Binds `addr` once per worker (with `SO_REUSEPORT` when there are several); returns
    /// the bound address (port 0 resolved). Listeners are numbered in the order they are
    /// added, from 0.
    pub fn listen(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let shared = self.workers.len() > 1;
        let addr = if shared { probe(addr)? } else { addr };
        let mut bound = addr;
        for w in &mut self.workers {
            let _enter = w.runtime.as_ref().expect("not started").enter();
            let listener = bind_one(addr, shared)?;
            bound = listener.local_addr()?;
            w.listeners.push(listener);
        }
        Ok(bound)
    }

    /// Starts one thread per worker; each serves its socket of listener `i` with the future
    /// `serve(i, socket)`. Each returned receiver resolves when its worker has stopped (every
    /// serve future ended, the pool was stopped or dropped, or the worker panicked).
    pub fn start<F, Fut>(self, serve: F) -> anyhow::Result<(Workers, Vec<oneshot::Receiver<()>>)>
    where
        F: Fn(usize, TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let (stop, stop_rx) = watch::channel(false);
        let handles = self
            .workers
            .iter()
            .map(|w| w.runtime.as_ref().expect("not started").handle().clone())
            .collect();
        let mut done = Vec::with_capacity(self.workers.len());
        for (i, mut w) in self.workers.into_iter().enumerate() {
            let (done_tx, done_rx) = oneshot::channel();
            let mut stop_rx = stop_rx.clone();
            let serve = serve.clone();
            std::thread::Builder::new()
                .name(format!("ssegate-worker-{i}"))
                .spawn(move || {
                    let runtime = w.runtime.take().expect("not started");
                    let listeners = std::mem::take(&mut w.listeners);
                    runtime.block_on(async move {
                        let serving = futures_util::future::join_all(
                            listeners.into_iter().enumerate().map(|(i, l)| serve(i, l)),
                        );
                        tokio::select! {
                            _ = serving => {}
                            _ = stop_rx.wait_for(|stop| *stop) => {}
                        }
                    });
                    // Dropping the runtime drops every connection task it still holds.
                    drop(runtime);
                    let _ = done_tx.send(());
                })
                .context("cannot start a worker thread")?;
            done.push(done_rx);
        }
        Ok((Workers { stop, handles }, done))
    }
}

/// The running worker threads. Dropping this tells every worker to stop at once (its runtime
/// is dropped, closing every connection it holds); a worker also ends by itself once all its
/// serve futures have ended (after a drain).
pub struct Workers {
    stop: watch::Sender<bool>,
    handles: Vec<tokio::runtime::Handle>,
}

impl Workers {
    /// Tasks alive on each worker's runtime: one per open client connection (the accept
    /// loops are not tasks). How evenly the kernel spreads connections, for tests and
    /// debugging.
    pub fn tasks(&self) -> Vec<usize> {
        self.handles
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .collect()
    }

    /// Tells every worker to stop now (open connections are dropped).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Raises this process's soft open-files limit (`RLIMIT_NOFILE`) to its hard limit, like
/// nginx's `worker_rlimit_nofile`: each proxied stream holds two descriptors and the soft
/// limit is often 1024. Returns `(soft, hard)` after the attempt.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return Err(io::Error::last_os_error());
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                return Err(io::Error::last_os_error());
            }
            rl = want;
        }
    }
    Ok((rl.rlim_cur, rl.rlim_max))
}
