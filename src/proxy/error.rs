//! Errors of the request path, classified once: each knows its HTTP status, its metric
//! label and whether it is the client's, the upstream's or our own doing.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No rule matches the host and path (404).
    #[error("no route for {host}{path}")]
    NoRoute {
        /// Request host, lower-cased, without port.
        host: String,
        /// Request path.
        path: String,
    },
    /// The rule's Service has no ready endpoint (503).
    #[error("service {0} has no ready endpoints")]
    NoEndpoints(String),
    /// The rule's `maxConnections` is reached (503 + `Retry-After`).
    #[error("route {route} is at its limit of {limit} concurrent streams")]
    OverCapacity {
        /// `namespace/name`.
        route: String,
        /// The rule's `maxConnections`.
        limit: u32,
    },
    /// The client already has `--max-streams-per-client` streams open (429 + `Retry-After`).
    #[error("too many concurrent streams from this client (limit {limit})")]
    ClientStreams {
        /// The per-client limit.
        limit: u32,
    },
    /// The client opens connections faster than `--client-connect-rate` (429 + `Retry-After`).
    #[error("too many new connections from this client; retry in {retry_after_secs} s")]
    ClientRate {
        /// Whole seconds until the client may connect again (at least 1).
        retry_after_secs: u64,
    },
    /// `--max-connections` client connections are open (503 + `Retry-After`).
    #[error("ssegate is at its limit of {limit} client connections")]
    MaxConnections {
        /// The global limit.
        limit: usize,
    },
    /// Every endpoint tried refused or did not answer the TCP connect (502).
    #[error("cannot connect to {backend}: {reason}")]
    Connect {
        /// `namespace/service:port`.
        backend: String,
        /// The last attempt's failure.
        reason: String,
        /// The last attempt timed out rather than failed.
        timed_out: bool,
    },
    /// The upstream did not send response headers within `timeouts.firstByte` (504).
    #[error("upstream {backend} sent no response within {after:?}")]
    FirstByteTimeout {
        /// `namespace/service:port`.
        backend: String,
        /// The configured timeout.
        after: std::time::Duration,
    },
    /// The upstream broke the HTTP exchange before its response headers (502).
    #[error("upstream {backend} failed: {source}")]
    Upstream {
        /// `namespace/service:port`.
        backend: String,
        /// What hyper saw.
        source: hyper::Error,
    },
    /// The upstream broke the HTTP/1.1 exchange before its response headers, or sent an
    /// invalid or oversized head (502); cleartext HTTP/1.1 upstreams.
    #[error("upstream {backend} failed: {source}")]
    UpstreamH1 {
        /// `namespace/service:port`.
        backend: String,
        /// What the client saw.
        source: super::h1client::Error,
    },
    /// A poll backend's 2xx answer is not the JSON poll protocol (502).
    #[error("poll backend {backend} sent an invalid answer: {reason}")]
    InvalidPollResponse {
        /// `namespace/service:port`.
        backend: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS to the backend failed, or the rule's backend TLS is not usable (502).
    #[error("TLS to upstream {backend} failed: {reason}")]
    UpstreamTls {
        /// `namespace/service:port`.
        backend: String,
        /// The handshake error or configuration problem.
        reason: String,
    },
    /// The request cannot be forwarded as sent (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

impl ProxyError {
    /// The HTTP status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints(_)
            | ProxyError::OverCapacity { .. }
            | ProxyError::MaxConnections { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ClientStreams { .. } | ProxyError::ClientRate { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamH1 { .. }
            | ProxyError::InvalidPollResponse { .. }
            | ProxyError::UpstreamTls { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::FirstByteTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Stable label for metrics and the JSON body's `error` field.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::NoEndpoints(_) => "no_endpoints",
            ProxyError::OverCapacity { .. } => "over_capacity",
            ProxyError::ClientStreams { .. } => "client_streams",
            ProxyError::ClientRate { .. } => "client_rate",
            ProxyError::MaxConnections { .. } => "max_connections",
            ProxyError::Connect {
                timed_out: false, ..
            } => "connect_failed",
            ProxyError::Connect {
                timed_out: true, ..
            } => "connect_timeout",
            ProxyError::FirstByteTimeout { .. } => "first_byte_timeout",
            ProxyError::Upstream { .. } | ProxyError::UpstreamH1 { .. } => "protocol",
            ProxyError::InvalidPollResponse { .. } => "invalid_response",
            ProxyError::UpstreamTls { .. } => "upstream_tls",
            ProxyError::BadRequest(_) => "bad_request",
        }
    }

    /// True for failures caused by the upstream (counted in `ssegate_upstream_errors_total`).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::NoEndpoints(_)
                | ProxyError::Connect { .. }
                | ProxyError::FirstByteTimeout { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::UpstreamH1 { .. }
                | ProxyError::InvalidPollResponse { .. }
                | ProxyError::UpstreamTls { .. }
        )
    }

    /// Seconds for the `Retry-After` header: on every 503 and 429.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ProxyError::ClientRate { retry_after_secs } => Some((*retry_after_secs).max(1)),
            _ if matches!(
                self.status(),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            ) =>
            {
                Some(1)
            }
            _ => None,
        }
    }

    /// A short JSON response: `{"error":"no_route","message":"no route for ..."}`.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let body = serde_json::json!({ "error": self.metric_label(), "message": self.to_string() });
        let mut resp = Response::new(B::from(Bytes::from(body.to_string() + "\n")));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after_secs() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_labels() {
        let cases = [
            (
                ProxyError::NoRoute {
                    host: "h".into(),
                    path: "/p".into(),
                },
                404,
                "no_route",
            ),
            (
                ProxyError::NoEndpoints("a/s:80".into()),
                503,
                "no_endpoints",
            ),
            (
                ProxyError::OverCapacity {
                    route: "a/r".into(),
                    limit: 1,
                },
                503,
                "over_capacity",
            ),
            (
                ProxyError::ClientStreams { limit: 4 },
                429,
                "client_streams",
            ),
            (
                ProxyError::MaxConnections { limit: 10 },
                503,
                "max_connections",
            ),
            (
                ProxyError::Connect {
                    backend: "b".into(),
                    reason: "refused".into(),
                    timed_out: false,
                },
                502,
                "connect_failed",
            ),
            (
                ProxyError::FirstByteTimeout {
                    backend: "b".into(),
                    after: std::time::Duration::from_secs(1),
                },
                504,
                "first_byte_timeout",
            ),
            (
                ProxyError::UpstreamH1 {
                    backend: "b".into(),
                    source: super::super::h1client::Error::IncompleteBody,
                },
                502,
                "protocol",
            ),
            (
                ProxyError::InvalidPollResponse {
                    backend: "b".into(),
                    reason: "list must be an array".into(),
                },
                502,
                "invalid_response",
            ),
            (
                ProxyError::UpstreamTls {
                    backend: "b".into(),
                    reason: "unknown issuer".into(),
                },
                502,
                "upstream_tls",
            ),
        ];
        let rate: Response<Bytes> = ProxyError::ClientRate {
            retry_after_secs: 7,
        }
        .to_response();
        assert_eq!(rate.status(), 429);
        assert_eq!(rate.headers()[header::RETRY_AFTER], "7");
        for (err, status, label) in cases {
            assert_eq!(err.status().as_u16(), status);
            assert_eq!(err.metric_label(), label);
            let resp: Response<Bytes> = err.to_response();
            let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
            assert_eq!(v["error"], label);
            assert_eq!(
                resp.headers().contains_key(header::RETRY_AFTER),
                status == 503 || status == 429
            );
        }
    }
}
