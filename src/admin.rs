//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process is
//! alive) and `/readyz` (the first routing table is published and the process is not
//! draining).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Whether `/readyz` answers 200: the first table is published and no drain has begun.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<(AtomicBool, AtomicBool)>);

impl Readiness {
    /// Sets readiness (ignored once draining).
    pub fn set(&self, ready: bool) {
        self.0.0.store(ready, Ordering::Release);
    }
    /// Marks the process as draining: `/readyz` fails from now on, whatever [`Readiness::set`]
    /// says later.
    pub fn set_draining(&self) {
        self.0.1.store(true, Ordering::Release);
    }
    /// True once [`Readiness::set_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.0.1.load(Ordering::Acquire)
    }
    /// Current readiness.
    pub fn get(&self) -> bool {
        self.0.0.load(Ordering::Acquire) && !self.is_draining()
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics, ready: Readiness) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = respond(&req, &metrics, &ready);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond<B>(req: &Request<B>, metrics: &Metrics, ready: &Readiness) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, ct: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, ct)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if ready.get() => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            if ready.is_draining() {
                "draining\n"
            } else {
                "not ready\n"
            }
            .into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_follows_readiness() {
        let m = Metrics::new();
        let r = Readiness::default();
        let get = |p: &str| Request::get(p).body(()).unwrap();
        assert_eq!(respond(&get("/readyz"), &m, &r).status(), 503);
        r.set(true);
        assert_eq!(respond(&get("/readyz"), &m, &r).status(), 200);
        assert_eq!(respond(&get("/healthz"), &m, &r).status(), 200);
        assert_eq!(respond(&get("/metrics"), &m, &r).status(), 200);
        assert_eq!(respond(&get("/nope"), &m, &r).status(), 404);
        r.set_draining();
        assert_eq!(respond(&get("/readyz"), &m, &r).status(), 503);
        r.set(true);
        assert!(
            !r.get(),
            "a reload must not make a draining process ready again"
        );
    }
}
