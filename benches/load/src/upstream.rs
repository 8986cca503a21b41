//! The bench's SSE upstream: a minimal HTTP/1.1 server written straight on tokio sockets, so
//! every write is exactly one chunk of `batch` events and costs as little as possible.
//!
//! - `GET /sse?size=128&rate=1&batch=1&count=0`: an endless (or `count`-long) event stream,
//!   `rate` events per second per connection (`0`: as fast as the socket takes them),
//!   `batch` events per write, each event `size` bytes; ids continue after `Last-Event-ID`.
//!   The first write goes out at once.
//! - `GET /hold`: response headers, then silence until the client goes away.
//! - `GET /health`: `200 ok`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::sse::{now_ns, write_event};

/// What a request asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// An event stream.
    Stream(StreamParams),
    /// A silent stream.
    Hold,
    /// Health probe.
    Health,
    /// Anything else (404).
    NotFound,
}

/// Parameters of `/sse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamParams {
    /// Bytes per event.
    pub size: usize,
    /// Events per second per connection; 0 = unthrottled.
    pub rate: u32,
    /// Events per write.
    pub batch: u32,
    /// Stop after this many events; 0 = never.
    pub count: u64,
    /// First id sent.
    pub first_id: u64,
}

impl Default for StreamParams {
    fn default() -> Self {
        StreamParams {
            size: 128,
            rate: 1,
            batch: 1,
            count: 0,
            first_id: 1,
        }
    }
}

/// Parses a request head (everything up to the blank line).
pub fn parse_head(head: &[u8]) -> Result<Ask, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(format!("bad request line {request_line:?}"));
    };
    if method != "GET" {
        return Ok(Ask::NotFound);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let last_id = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("last-event-id"))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok());
    Ok(match path {
        "/sse" => {
            let mut p = StreamParams::default();
            for kv in query.split('&').filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                let bad = || format!("bad value for {k}: {v:?}");
                match k {
                    "size" => p.size = v.parse().map_err(|_| bad())?,
                    "rate" => p.rate = v.parse().map_err(|_| bad())?,
                    "batch" => p.batch = v.parse::<u32>().map_err(|_| bad())?.max(1),
                    "count" => p.count = v.parse().map_err(|_| bad())?,
                    _ => return Err(format!("unknown parameter {k}")),
                }
            }
            if let Some(id) = last_id {
                p.first_id = id + 1;
            }
            Ask::Stream(p)
        }
        "/hold" => Ask::Hold,
        "/health" => Ask::Health,
        _ => Ask::NotFound,
    })
}

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

/// Accepts connections on every listener until the process ends.
pub async fn serve(listeners: Vec<TcpListener>) -> io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((sock, _)) => {
                        tokio::spawn(async move {
                            let _ = handle(sock).await;
                        });
                    }
                    Err(e) => {
                        eprintln!("upstream: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn handle(mut sock: TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 16 * 1024 || sock.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    match parse_head(&buf[..head_end]) {
        Ok(Ask::Stream(p)) => stream(sock, p).await,
        Ok(Ask::Hold) => {
            sock.write_all(SSE_HEAD).await?;
            let mut sink = [0u8; 256];
            while sock.read(&mut sink).await? > 0 {}
            Ok(())
        }
        Ok(Ask::Health) => {
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                .await
        }
        Ok(Ask::NotFound) => {
            sock.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
        }
        Err(e) => {
            let body = format!("{e}\n");
            let resp = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await
        }
    }
}

async fn stream(mut sock: TcpStream, p: StreamParams) -> io::Result<()> {
    sock.write_all(SSE_HEAD).await?;
    let mut out = Vec::with_capacity(p.size * p.batch as usize + 32);
    let mut events = Vec::with_capacity(p.size * p.batch as usize);
    let mut id = p.first_id;
    let mut sent = 0u64;
    let mut tick = (p.rate > 0).then(|| {
        let period = Duration::from_secs_f64(f64::from(p.batch) / f64::from(p.rate));
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let n = match p.count {
            0 => u64::from(p.batch),
            c => u64::from(p.batch).min(c - sent),
        };
        let ts = now_ns();
        events.clear();
        for _ in 0..n {
            write_event(&mut events, id, ts, p.size);
            id += 1;
        }
        sent += n;
        out.clear();
        out.extend_from_slice(format!("{:x}\r\n", events.len()).as_bytes());
        out.extend_from_slice(&events);
        out.extend_from_slice(b"\r\n");
        if p.count > 0 && sent >= p.count {
            out.extend_from_slice(b"0\r\n\r\n");
            sock.write_all(&out).await?;
            return sock.shutdown().await;
        }
        sock.write_all(&out).await?;
    }
}

/// Binds one listener per address.
pub async fn bind(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut out = vec![];
    for a in addrs {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        s.bind(*a)?;
        out.push(s.listen(4096)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_parameters_and_resume() {
        let ask = parse_head(
            b"GET /sse?size=64&rate=0&batch=16&count=5 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 41",
        )
        .unwrap();
        assert_eq!(
            ask,
            Ask::Stream(StreamParams {
                size: 64,
                rate: 0,
                batch: 16,
                count: 5,
                first_id: 42
            })
        );
        assert_eq!(
            parse_head(b"GET /sse HTTP/1.1\r\nHost: x").unwrap(),
            Ask::Stream(StreamParams::default())
        );
    }

    #[test]
    fn other_paths_and_bad_input() {
        assert_eq!(parse_head(b"GET /hold HTTP/1.1").unwrap(), Ask::Hold);
        assert_eq!(parse_head(b"GET /health HTTP/1.1").unwrap(), Ask::Health);
        assert_eq!(parse_head(b"GET /x HTTP/1.1").unwrap(), Ask::NotFound);
        assert_eq!(parse_head(b"POST /sse HTTP/1.1").unwrap(), Ask::NotFound);
        assert!(parse_head(b"GET /sse?rate=fast HTTP/1.1").is_err());
        assert!(parse_head(b"GET /sse?colour=red HTTP/1.1").is_err());
        assert!(parse_head(b"nonsense").is_err());
    }
}
