//! A tiny Server-Sent Events backend for demos and end-to-end tests of ssegate.
//!
//! ```text
//! cargo run --release --example sse-backend -- --listen 127.0.0.1:9090
//! curl -N 'http://127.0.0.1:9090/events?interval=250ms&count=5'
//! ```
//!
//! Routes:
//! - `GET /events` (and any path under `/events/`): an endless `text/event-stream`.
//!   It starts with `retry: 1000`, then sends events
//!   `id: N` / `event: tick` / `data: {"n":N,"time":"<unix millis>"}`,
//!   the first one immediately and then one every `interval`.
//!   N starts at 1, or at `Last-Event-ID + 1` when that header is numeric.
//!   Query parameters:
//!   - `interval=250ms` / `interval=2s` — time between events (default `1s`);
//!   - `count=K` — end the stream after event K; a reconnect whose
//!     `Last-Event-ID` is already >= K gets `204 No Content`, which tells an
//!     EventSource to stop reconnecting;
//!   - `cut=C` — close the connection after every C events of a connection,
//!     so that clients reconnect and resume with `Last-Event-ID`.
//! - `GET` or `POST /api/orders` (and any path under it): a JSON backend for ssegate's
//!   poll mode (`mode: Poll`). Each call answers
//!   `{"list":[{"n":N,"time":"<unix millis>"},...],"continue":true,"wait":<ms>,"next":N}`
//!   with the orders after the cursor `previous` (a query parameter, or a field of a
//!   JSON body for `POST`); no `previous` starts at order 1.
//!   Query parameters:
//!   - `wait=250ms` / `wait=2s` — the `wait` the answer asks for (default `1s`);
//!   - `batch=B` — orders per answer (default 1);
//!   - `count=K` — the last order; the answer that reaches it says `continue: false`,
//!     and a call whose `previous` is already >= K gets `204 No Content`, which ssegate
//!     passes on to a reconnecting client (an EventSource then stops reconnecting);
//!   - `cut=C` — an answer whose last order is a multiple of C says `continue: false`,
//!     so ssegate ends the stream and clients reconnect and resume with `Last-Event-ID`.
//! - `GET /healthz`: `200 ok`.
//! - anything else: `404`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use futures_util::{StreamExt, stream};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Parser, Debug)]
#[command(about = "Example SSE backend for ssegate demos and e2e tests")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
}

/// What one `/events` request asked for.
#[derive(Debug, Clone, Copy)]
struct StreamParams {
    interval: Duration,
    count: Option<u64>,
    cut: Option<u64>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "sse-backend: listening on http://{}",
        listener.local_addr()?
    );

    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    eprintln!("sse-backend: accept failed: {err}");
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("sse-backend: shutting down");
                return Ok(());
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, peer));
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                // Clients going away mid-stream is normal for SSE.
                if !err.is_incomplete_message() {
                    eprintln!("sse-backend: {peer}: connection error: {err}");
                }
            }
        });
    }
}

async fn handle(req: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path == "/api/orders" || path.starts_with("/api/orders/") {
        return Ok(orders(req, peer).await);
    }
    let query = req.uri().query().unwrap_or("");
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());

    let response = if req.method() != Method::GET {
        plain(StatusCode::NOT_FOUND, "not found\n")
    } else if path == "/healthz" {
        plain(StatusCode::OK, "ok")
    } else if path == "/events" || path.starts_with("/events/") {
        match parse_params(query) {
            Ok(params) => events(params, last_event_id),
            Err(msg) => plain(StatusCode::BAD_REQUEST, &format!("{msg}\n")),
        }
    } else {
        plain(StatusCode::NOT_FOUND, "not found\n")
    };

    if path != "/healthz" {
        eprintln!(
            "sse-backend: {peer} {} {} last-event-id={} -> {}",
            req.method(),
            req.uri(),
            last_event_id.map_or_else(|| "-".to_string(), |id| id.to_string()),
            response.status().as_u16(),
        );
    }
    Ok(response)
}

/// Builds the event-stream response (or a 204 when a `count` stream is already finished).
fn events(params: StreamParams, last_event_id: Option<u64>) -> Response<Body> {
    let first = last_event_id.map_or(1, |id| id.saturating_add(1));
    if params.count.is_some_and(|count| first > count) {
        return Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(empty())
            .expect("valid response");
    }

    // `retry` on its own block: it sets the client's reconnect delay without dispatching an event.
    let preamble = stream::once(async { Bytes::from_static(b"retry: 1000\n\n") });

    // State: (next id, events sent on this connection). Every event is its own chunk.
    let ticks = stream::unfold((first, 0u64), move |(n, sent)| async move {
        if params.count.is_some_and(|count| n > count) || params.cut.is_some_and(|cut| sent >= cut)
        {
            return None; // end of stream: the connection closes
        }
        if sent > 0 {
            tokio::time::sleep(params.interval).await;
        }
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let event = format!("id: {n}\nevent: tick\ndata: {{\"n\":{n},\"time\":\"{millis}\"}}\n\n");
        Some((Bytes::from(event), (n + 1, sent + 1)))
    });

    let body = StreamBody::new(
        preamble
            .chain(ticks)
            .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk))),
    );
    Response::builder()
        .header(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"))
        .header(CACHE_CONTROL, HeaderValue::from_static("no-cache"))
        .body(BodyExt::boxed(body))
        .expect("valid response")
}

/// What one `/api/orders` call asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderParams {
    wait: Duration,
    batch: u64,
    count: Option<u64>,
    cut: Option<u64>,
    previous: Option<u64>,
}

fn parse_order_params(query: &str) -> Result<OrderParams, String> {
    let mut p = OrderParams {
        wait: Duration::from_secs(1),
        batch: 1,
        count: None,
        cut: None,
        previous: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "wait" => p.wait = parse_duration(value)?,
            "batch" => p.batch = parse_positive(key, value)?,
            "count" => p.count = Some(parse_positive(key, value)?),
            "cut" => p.cut = Some(parse_positive(key, value)?),
            "previous" => p.previous = Some(parse_cursor(value)?),
            _ => {}
        }
    }
    Ok(p)
}

fn parse_cursor(value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("bad previous {value:?}: expected an order number"))
}

/// One poll answer: the orders after `previous`, or `None` when the feed is over (204).
fn orders_answer(p: &OrderParams, now_millis: u128) -> Option<String> {
    let first = p.previous.map_or(1, |n| n.saturating_add(1));
    if p.count.is_some_and(|count| first > count) {
        return None;
    }
    let mut last = first.saturating_add(p.batch - 1);
    if let Some(count) = p.count {
        last = last.min(count);
    }
    if let Some(cut) = p.cut {
        // End the batch at the next multiple of `cut`.
        last = last.min(first.div_ceil(cut) * cut);
    }
    let list: Vec<String> = (first..=last)
        .map(|n| format!(r#"{{"n":{n},"time":"{now_millis}"}}"#))
        .collect();
    let done = p.count.is_some_and(|count| last >= count);
    let cut = p.cut.is_some_and(|cut| last.is_multiple_of(cut));
    Some(format!(
        r#"{{"list":[{}],"continue":{},"wait":{},"next":{last}}}"#,
        list.join(","),
        !(done || cut),
        p.wait.as_millis()
    ))
}

/// `/api/orders`: the poll-mode JSON backend.
async fn orders(req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut params = match parse_order_params(uri.query().unwrap_or("")) {
        Ok(p) => p,
        Err(msg) => return plain(StatusCode::BAD_REQUEST, &format!("{msg}\n")),
    };
    if method == Method::POST {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let previous = body.ok().and_then(|b| {
            serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v.get("previous").cloned())
        });
        match previous {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => {
                params.previous = n.as_u64();
            }
            Some(other) => {
                let msg = format!("bad previous {other}: expected an order number\n");
                return plain(StatusCode::BAD_REQUEST, &msg);
            }
        }
    } else if method != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n");
    }
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let response = match orders_answer(&params, millis) {
        Some(json) => Response::builder()
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(json)).boxed())
            .expect("valid response"),
        None => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(empty())
            .expect("valid response"),
    };
    eprintln!(
        "sse-backend: {peer} {method} {uri} previous={} -> {}",
        params
            .previous
            .map_or_else(|| "-".to_string(), |n| n.to_string()),
        response.status().as_u16(),
    );
    response
}

fn parse_params(query: &str) -> Result<StreamParams, String> {
    let mut params = StreamParams {
        interval: Duration::from_secs(1),
        count: None,
        cut: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "interval" => params.interval = parse_duration(value)?,
            "count" => params.count = Some(parse_positive(key, value)?),
            "cut" => params.cut = Some(parse_positive(key, value)?),
            _ => {} // unknown parameters are ignored
        }
    }
    Ok(params)
}

/// Parses `250ms` or `2s` (at least 1ms).
fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("bad interval {value:?}: use e.g. 250ms or 2s");
    let duration = if let Some(ms) = value.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else if let Some(s) = value.strip_suffix('s') {
        Duration::from_secs(s.parse().map_err(|_| bad())?)
    } else {
        return Err(bad());
    };
    Ok(duration.max(Duration::from_millis(1)))
}

fn parse_positive(key: &str, value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("bad {key} {value:?}: expected a positive integer")),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )
        .body(Full::new(Bytes::from(text.to_string())).boxed())
        .expect("valid response")
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0ms"), Ok(Duration::from_millis(1)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn query() {
        let p = parse_params("interval=50ms&count=6&cut=3&x=y").unwrap();
        assert_eq!(p.interval, Duration::from_millis(50));
        assert_eq!((p.count, p.cut), (Some(6), Some(3)));
        let p = parse_params("").unwrap();
        assert_eq!(
            (p.interval, p.count, p.cut),
            (Duration::from_secs(1), None, None)
        );
        assert!(parse_params("count=0").is_err());
    }

    fn answer(query: &str) -> Option<serde_json::Value> {
        let p = parse_order_params(query).unwrap();
        orders_answer(&p, 7).map(|s| serde_json::from_str(&s).unwrap())
    }

    fn ns(v: &serde_json::Value) -> Vec<u64> {
        v["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["n"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn orders_follow_the_cursor() {
        let a = answer("wait=250ms&batch=2").unwrap();
        assert_eq!(ns(&a), [1, 2]);
        assert_eq!(
            (a["next"].as_u64(), a["continue"].as_bool()),
            (Some(2), Some(true))
        );
        assert_eq!(a["wait"], 250);
        assert_eq!(a["list"][0], serde_json::json!({"n": 1, "time": "7"}));
        assert_eq!(ns(&answer("batch=2&previous=2").unwrap()), [3, 4]);
    }

    #[test]
    fn orders_end_at_count_and_cut() {
        let last = answer("count=5&batch=2&previous=4").unwrap();
        assert_eq!(
            (ns(&last), last["continue"].as_bool()),
            (vec![5], Some(false))
        );
        assert_eq!(answer("count=5&previous=5"), None);
        let cut = answer("count=6&cut=3&batch=5").unwrap();
        assert_eq!(
            (ns(&cut), cut["continue"].as_bool()),
            (vec![1, 2, 3], Some(false))
        );
        let resumed = answer("count=6&cut=3&batch=5&previous=3").unwrap();
        assert_eq!(
            (ns(&resumed), resumed["continue"].as_bool()),
            (vec![4, 5, 6], Some(false))
        );
        assert!(parse_order_params("previous=x").is_err());
    }
}
