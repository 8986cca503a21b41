//! A minimal HTTP/1.1 client for one bodiless request per connection: the upstream side of a
//! cleartext HTTP/1.1 stream.
//!
//! [`exchange`] writes the request head, reads the response head (bounded: [`MAX_HEAD_BYTES`],
//! [`MAX_HEADERS`]; `1xx` answers are skipped) and returns a [`ResponseBody`] that decodes the
//! body (Content-Length, chunked, close-delimited, or none for `HEAD`/`204`/`304`) straight
//! from the socket inside `poll_frame`. No task, no channel, no write buffer after the head.
//!
//! Memory: reads are readiness-based (`poll_read_ready`, then `try_read_buf`), so a buffer is
//! only needed once bytes are waiting. Buffers come from a small per-thread [`pool`] and go
//! back to it whenever the stream has nothing buffered, so an idle stream holds no read buffer
//! at all; a busy one reuses the same buffer's free space read after read. Body data leaves as
//! `Bytes` slices of that buffer (chunk framing is skipped by advancing, never copied).
//!
//! Dropping the body closes the socket at once; so does the end of the body. A connection
//! closed before the body's end is [`Error::IncompleteBody`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response headers accepted (hyper's client default).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer line accepted, in bytes.
pub const MAX_LINE_BYTES: usize = 4096;

/// Why an upstream exchange or its body failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream closed the connection before a complete response head.
    #[error("connection closed before the response head")]
    ClosedBeforeHead,
    /// The response head is larger than [`MAX_HEAD_BYTES`].
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The response has more than [`MAX_HEADERS`] headers.
    #[error("more than {MAX_HEADERS} response headers")]
    TooManyHeaders,
    /// The response head is not HTTP/1.x.
    #[error("invalid response head: {0}")]
    InvalidHead(httparse::Error),
    /// A `101 Switching Protocols` answer to a request that asked for no upgrade.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedUpgrade,
    /// `Content-Length` is not a number, or several disagree.
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// A chunk-size line is not `HEX [; extensions] CRLF`, or the size overflows.
    #[error("invalid chunk size line")]
    InvalidChunkSize,
    /// Chunk data is not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    InvalidChunkEnd,
    /// A chunk-size or trailer line is longer than [`MAX_LINE_BYTES`].
    #[error("chunk line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// The connection closed before the body's end (Content-Length or last chunk).
    #[error("connection closed before the body ended")]
    IncompleteBody,
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Per-thread pool of read buffers (see the module docs).
pub(crate) mod pool {
    use std::cell::RefCell;

    use bytes::BytesMut;

    /// Capacity of a read buffer. A busy stream reads into the free rest of its buffer until
    /// less than [`MIN_READ`] is left, then reclaims it (or takes another).
    pub const READ_BUF: usize = 16 * 1024;
    /// Capacity of a hot stream's read buffer (one whose reads fill the space they are
    /// given): fewer, fuller reads, and fewer, larger writes to the client.
    pub const HOT_READ_BUF: usize = 64 * 1024;
    /// Smallest free space read into.
    pub const MIN_READ: usize = 2 * 1024;
    /// Buffers kept per thread and size.
    const KEEP: usize = 32;

    thread_local! {
        static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
        static FREE_HOT: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// Gives `buf` room for at least [`MIN_READ`] more bytes, reusing its memory, a pooled
    /// buffer's, or (when neither is free) a new one of `size` ([`READ_BUF`] or
    /// [`HOT_READ_BUF`]). Keeps `buf`'s contents.
    pub fn ready(buf: &mut BytesMut, size: usize) {
        if buf.capacity() - buf.len() >= MIN_READ {
            return;
        }
        if !buf.is_empty() {
            // A partial line or head waits for its rest: grow (copies only those bytes).
            buf.reserve(size);
            return;
        }
        // Spent: reuse it once every slice handed out from it is gone, else another one.
        if !buf.try_reclaim(size) {
            *buf = take(size);
        }
    }

    /// An empty buffer of `size` with at least [`MIN_READ`] free.
    fn take(size: usize) -> BytesMut {
        let list = if size >= HOT_READ_BUF {
            &FREE_HOT
        } else {
            &FREE
        };
        list.with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| BytesMut::with_capacity(size))
    }

    /// Hands the buffer back when it holds nothing: an idle stream keeps no buffer. Pooled
    /// only if usable now (free space left, or no slice of it in flight); otherwise its
    /// memory goes when the last slice does.
    pub fn release_if_empty(buf: &mut BytesMut) {
        if !buf.is_empty() {
            return;
        }
        let mut buf = std::mem::take(buf);
        if buf.capacity() >= MIN_READ || buf.try_reclaim(READ_BUF) {
            let list = if buf.capacity() >= HOT_READ_BUF {
                &FREE_HOT
            } else {
                &FREE
            };
            list.with_borrow_mut(|free| {
                if free.len() < KEEP {
                    free.push(buf);
                }
            });
        }
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (`HEAD`, `1xx`, `204`, `304`) or an empty one.
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// Incremental decoder of a response body: takes bytes from the front of a buffer and hands
/// out body data as slices of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoder {
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Length(u64),
    Close,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

/// One decoding step's result.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body data.
    Data(Bytes),
    /// The buffer holds no complete next step; read more.
    NeedMore,
    /// The body is complete.
    Done,
}

impl Decoder {
    /// A decoder for a body framed as `framing`.
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// True once the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes still to come, when known.
    fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next step from the front of `buf`: data (split off `buf`, no copy), a
    /// request for more bytes, or the end. Chunk framing is consumed and skipped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Length(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(trim_cr(&buf[..end]))?;
                    buf.advance(end + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::ChunkEnd => match buf.first() {
                    None => return Ok(Decoded::NeedMore),
                    Some(b'\n') => {
                        buf.advance(1);
                        self.state = State::ChunkSize;
                    }
                    Some(b'\r') => match buf.get(1) {
                        None => return Ok(Decoded::NeedMore),
                        Some(b'\n') => {
                            buf.advance(2);
                            self.state = State::ChunkSize;
                        }
                        Some(_) => return Err(Error::InvalidChunkEnd),
                    },
                    Some(_) => return Err(Error::InvalidChunkEnd),
                },
                State::Trailers => {
                    // Trailers are not forwarded; each line is only bounded and skipped.
                    let Some(end) = line_end(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let empty = trim_cr(&buf[..end]).is_empty();
                    buf.advance(end + 1);
                    if empty {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    /// The connection closed: fine for a close-delimited or complete body, an error otherwise.
    pub fn eof(&mut self) -> Result<(), Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(Error::IncompleteBody),
        }
    }
}

/// Index of the `\n` ending the first line of `buf`, if complete; bounded by
/// [`MAX_LINE_BYTES`].
fn line_end(buf: &[u8]) -> Result<Option<usize>, Error> {
    let window = &buf[..buf.len().min(MAX_LINE_BYTES + 1)];
    match memchr::memchr(b'\n', window) {
        Some(i) => Ok(Some(i)),
        None if buf.len() > MAX_LINE_BYTES => Err(Error::LineTooLong),
        None => Ok(None),
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `1*HEXDIG *WSP [";" extensions]`; extensions are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::InvalidChunkSize);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0);
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or(Error::InvalidChunkSize)?;
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count()..];
    if rest.is_empty() || rest[0] == b';' {
        Ok(size)
    } else {
        Err(Error::InvalidChunkSize)
    }
}

/// A parsed response head and the framing of its body.
#[derive(Debug)]
pub struct Head {
    /// Status, version and headers (hop-by-hop ones included).
    pub response: Response<()>,
    /// How the body is delimited.
    pub framing: Framing,
}

/// Parses one response head from the front of `buf` (consuming it) once complete. `head`:
/// the request was `HEAD` (no body whatever the headers say).
pub fn parse_head(buf: &mut BytesMut, head: bool) -> Result<Option<Head>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD_BYTES {
                Err(Error::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
        Err(e) => return Err(Error::InvalidHead(e)),
    };
    if len > MAX_HEAD_BYTES {
        return Err(Error::HeadTooLarge);
    }
    let code = parsed.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| Error::InvalidHead(httparse::Error::Status))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::InvalidHead(httparse::Error::HeaderName))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Error::InvalidHead(httparse::Error::HeaderValue))?;
        map.append(name, value);
    }
    buf.advance(len);
    let framing = framing(status, head, &map)?;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = map;
    Ok(Some(Head { response, framing }))
}

/// The body framing of a response (RFC 9112 §6.3).
fn framing(status: StatusCode, head: bool, headers: &HeaderMap) -> Result<Framing, Error> {
    if head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The final coding decides; anything but chunked runs until the connection closes.
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let v = v.to_str().map_err(|_| Error::InvalidContentLength)?;
        for part in v.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::InvalidContentLength);
            }
            let n: u64 = part.parse().map_err(|_| Error::InvalidContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::InvalidContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// Serializes a request head: `METHOD path HTTP/1.1`, then the headers as given (the caller
/// sets `Host`).
pub fn encode_head(method: &Method, path_and_query: &str, headers: &HeaderMap) -> Vec<u8> {
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + method.as_str().len()
        + path_and_query.len()
        + 14;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends a bodiless request on `stream` and reads the response head; `1xx` answers are
/// skipped. The response body reads the rest from the same socket.
pub async fn exchange(
    mut stream: TcpStream,
    req: &http::request::Parts,
) -> Result<Response<ResponseBody>, Error> {
    let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let head = encode_head(&req.method, pq, &req.headers);
    stream.write_all(&head).await?;
    drop(head);
    let is_head = req.method == Method::HEAD;
    let mut buf = BytesMut::new();
    loop {
        while !buf.is_empty() {
            let Some(parsed) = parse_head(&mut buf, is_head)? else {
                break;
            };
            let status = parsed.response.status();
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::UnexpectedUpgrade);
            }
            if status.is_informational() {
                continue;
            }
            pool::release_if_empty(&mut buf);
            let mut body = ResponseBody {
                io: Some(stream),
                buf,
                decoder: Decoder::new(parsed.framing),
                hot: false,
            };
            if body.decoder.is_done() {
                body.finish();
            }
            return Ok(parsed.response.map(|()| body));
        }
        stream.readable().await?;
        pool::ready(&mut buf, pool::READ_BUF);
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Err(Error::ClosedBeforeHead),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The response body: decodes straight from the upstream socket (see the module docs).
#[derive(Debug)]
pub struct ResponseBody {
    // `None` once the body ended: the socket is closed.
    io: Option<TcpStream>,
    buf: BytesMut,
    decoder: Decoder,
    // The last reads filled the space they were given: read into a larger buffer.
    hot: bool,
}

impl ResponseBody {
    /// Closes the socket and hands the buffer back.
    fn finish(&mut self) {
        self.io = None;
        self.buf.clear();
        pool::release_if_empty(&mut self.buf);
    }

    /// Capacity of the read buffer this body holds (0 when idle).
    #[cfg(test)]
    fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            match this.decoder.decode(&mut this.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.finish();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(io) = this.io.as_mut() else {
                return Poll::Ready(None);
            };
            match io.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    this.finish();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => {
                    // Nothing in flight: an idle stream keeps no buffer.
                    pool::release_if_empty(&mut this.buf);
                    return Poll::Pending;
                }
            }
            // Bytes are waiting: only now is a buffer needed.
            let size = if this.hot {
                pool::HOT_READ_BUF
            } else {
                pool::READ_BUF
            };
            pool::ready(&mut this.buf, size);
            let room = this.buf.capacity() - this.buf.len();
            // `poll_read` (not `try_read`) so that a short read, which means the socket
            // is drained, clears the readiness: the next poll waits without a syscall.
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut this.buf) {
                Poll::Ready(Ok(0)) => {
                    let res = this.decoder.eof();
                    this.finish();
                    return Poll::Ready(res.err().map(Err));
                }
                Poll::Ready(Ok(n)) => {
                    // Adaptive, like hyper's read strategy: grow while reads fill the
                    // buffer, shrink back once they use less than half of a small one.
                    if n >= room {
                        this.hot = true;
                    } else if n <= pool::READ_BUF / 2 {
                        this.hot = false;
                    }
                }
                Poll::Pending => {
                    // Nothing in flight: an idle stream keeps no buffer.
                    pool::release_if_empty(&mut this.buf);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.finish();
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::poll_fn;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Feeds `pieces` one after another (as reads would) and collects the body.
    fn feed(framing: Framing, pieces: &[&[u8]]) -> Result<(Vec<u8>, bool), Error> {
        let mut dec = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for p in pieces {
            buf.extend_from_slice(p);
            loop {
                match dec.decode(&mut buf)? {
                    Decoded::Data(d) => {
                        assert!(!d.is_empty(), "empty data frame");
                        out.extend_from_slice(&d);
                    }
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, dec.is_done()))
    }

    /// Every way of cutting `wire` into three reads decodes to `body`, done at the end only.
    fn at_every_split(framing: Framing, wire: &[u8], body: &[u8]) {
        for i in 0..=wire.len() {
            for j in i..=wire.len() {
                let (out, done) = feed(framing, &[&wire[..i], &wire[i..j], &wire[j..]])
                    .unwrap_or_else(|e| panic!("split {i}/{j}: {e}"));
                assert_eq!(out, body, "split {i}/{j}");
                assert!(done, "split {i}/{j}");
            }
            // Cut short: never done, and the bytes so far are a prefix of the body.
            if i < wire.len() {
                let (out, done) = feed(framing, &[&wire[..i]]).unwrap();
                assert!(!done, "done after {i} of {} bytes", wire.len());
                assert!(body.starts_with(&out));
            }
        }
    }

    const CHUNKED: &[u8] = b"9;ext=\"a;b\"\r\ndata: a\n\n\r\n19 \t; x ; y=1\r\nid: 7\ndata: hello world\n\n\r\n3\r\n\n\n\n\r\n10\r\ndata: 0123456789\r\n0;last\r\nx-trailer: 1\r\nx-other: two\r\n\r\n";
    const CHUNKED_BODY: &[u8] = b"data: a\n\nid: 7\ndata: hello world\n\n\n\n\ndata: 0123456789";

    #[test]
    fn chunked_with_extensions_and_trailers_at_every_split() {
        at_every_split(Framing::Chunked, CHUNKED, CHUNKED_BODY);
    }

    #[test]
    fn chunked_with_bare_lf_line_ends() {
        at_every_split(Framing::Chunked, b"5\nhello\n0\n\n", b"hello");
    }

    #[test]
    fn content_length_at_every_split() {
        at_every_split(
            Framing::Length(24),
            b"data: one\n\ndata: two\n\n\n\n",
            b"data: one\n\ndata: two\n\n\n\n",
        );
        // Bytes beyond the length are not body.
        let (out, done) = feed(Framing::Length(3), &[b"abcdef"]).unwrap();
        assert_eq!((out.as_slice(), done), (&b"abc"[..], true));
    }

    #[test]
    fn close_delimited_runs_until_eof() {
        let wire = b"data: x\n\ndata: y\n\n";
        for i in 0..=wire.len() {
            let mut dec = Decoder::new(Framing::Close);
            let (out, done) = feed(Framing::Close, &[&wire[..i], &wire[i..]]).unwrap();
            assert_eq!(out, wire);
            assert!(!done);
            dec.eof().unwrap();
            assert!(dec.is_done());
        }
    }

    #[test]
    fn eof_before_the_end_is_an_error() {
        for (framing, wire) in [
            (Framing::Chunked, CHUNKED),
            (Framing::Length(11), &b"hello world"[..]),
        ] {
            for i in 0..wire.len() {
                let mut dec = Decoder::new(framing);
                let mut buf = BytesMut::from(&wire[..i]);
                while let Decoded::Data(_) = dec.decode(&mut buf).unwrap() {}
                assert!(
                    matches!(dec.eof(), Err(Error::IncompleteBody)),
                    "{framing:?} at {i}"
                );
            }
        }
        assert!(Decoder::new(Framing::Empty).eof().is_ok());
    }

    #[test]
    fn malformed_chunk_framing_is_refused() {
        for (wire, want) in [
            (&b"\r\n"[..], "invalid chunk size line"),
            (b"g\r\n", "invalid chunk size line"),
            (b"-1\r\n", "invalid chunk size line"),
            (b"0x5\r\n", "invalid chunk size line"),
            (b"1 2\r\n", "invalid chunk size line"),
            (b"+5\r\n", "invalid chunk size line"),
            (b"10000000000000000\r\n", "invalid chunk size line"),
            (b"3\r\nabcX\r\n", "chunk data not followed by CRLF"),
            (b"3\r\nabc\rX", "chunk data not followed by CRLF"),
        ] {
            let err = feed(Framing::Chunked, &[wire]).unwrap_err();
            assert_eq!(err.to_string(), want, "{:?}", String::from_utf8_lossy(wire));
        }
        // The largest size that fits is fine (only its header is read here).
        assert_eq!(
            feed(Framing::Chunked, &[b"ffffffffffffffff\r\n"]).unwrap(),
            (Vec::new(), false)
        );
        // An endless extension or trailer line is cut off.
        let long = [b"1;".as_slice(), &[b'x'; MAX_LINE_BYTES]].concat();
        assert!(matches!(
            feed(Framing::Chunked, &[&long]),
            Err(Error::LineTooLong)
        ));
        let trailer = [b"0\r\nx: ".as_slice(), &[b'y'; MAX_LINE_BYTES]].concat();
        assert!(matches!(
            feed(Framing::Chunked, &[&trailer]),
            Err(Error::LineTooLong)
        ));
    }

    #[test]
    fn body_data_are_slices_of_the_read_buffer() {
        let mut buf = BytesMut::with_capacity(4096);
        buf.extend_from_slice(CHUNKED);
        let (start, end) = (
            buf.as_ptr() as usize,
            buf.as_ptr() as usize + buf.capacity(),
        );
        let mut dec = Decoder::new(Framing::Chunked);
        let mut n = 0;
        while let Decoded::Data(d) = dec.decode(&mut buf).unwrap() {
            let p = d.as_ptr() as usize;
            assert!(p >= start && p + d.len() <= end, "data was copied");
            n += 1;
        }
        assert_eq!(n, 4);
        assert!(dec.is_done());
    }

    /// Property tests of what reads raw upstream bytes: arbitrary input never panics the head
    /// parser or the body decoder, and any chunked encoding of a body, cut anywhere, decodes
    /// back to it.
    mod proptests {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn bytes() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                vec(any::<u8>(), 0..300),
                vec(
                    prop::sample::select(b"HTTP/1.1 200 \r\n:;0aF\x00\xff\t x-a".to_vec()),
                    0..150
                ),
            ]
        }

        fn framing() -> impl Strategy<Value = Framing> {
            prop_oneof![
                Just(Framing::Chunked),
                Just(Framing::Close),
                (0u64..200).prop_map(Framing::Length),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 1024,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn arbitrary_heads_never_panic(raw in bytes(), is_head in any::<bool>()) {
                let mut buf = BytesMut::from(&raw[..]);
                if let Ok(Some(_)) = parse_head(&mut buf, is_head) {
                    prop_assert!(buf.len() < raw.len(), "a head consumes bytes");
                }
            }

            #[test]
            fn arbitrary_bodies_never_panic(
                raw in bytes(),
                framing in framing(),
                cut in any::<prop::sample::Index>(),
            ) {
                let at = cut.index(raw.len() + 1);
                if let Ok((out, _)) = feed(framing, &[&raw[..at], &raw[at..]]) {
                    prop_assert!(out.len() <= raw.len());
                }
            }

            #[test]
            fn any_chunked_encoding_decodes_back_at_any_cut(
                chunks in vec((vec(any::<u8>(), 1..40), any::<bool>(), any::<bool>()), 0..8),
                trailer in any::<bool>(),
                cuts in (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
            ) {
                let mut wire = Vec::new();
                let mut body = Vec::new();
                for (data, upper, ext) in &chunks {
                    let size = if *upper {
                        format!("{:X}", data.len())
                    } else {
                        format!("{:x}", data.len())
                    };
                    wire.extend_from_slice(size.as_bytes());
                    if *ext {
                        wire.extend_from_slice(b";name=\"v\"");
                    }
                    wire.extend_from_slice(b"\r\n");
                    wire.extend_from_slice(data);
                    wire.extend_from_slice(b"\r\n");
                    body.extend_from_slice(data);
                }
                wire.extend_from_slice(b"0\r\n");
                if trailer {
                    wire.extend_from_slice(b"x-t: 1\r\n");
                }
                wire.extend_from_slice(b"\r\n");
                let mut at = [cuts.0.index(wire.len() + 1), cuts.1.index(wire.len() + 1)];
                at.sort_unstable();
                let pieces = [&wire[..at[0]], &wire[at[0]..at[1]], &wire[at[1]..]];
                let (out, done) = feed(Framing::Chunked, &pieces).unwrap();
                prop_assert_eq!(out, body);
                prop_assert!(done);
            }
        }
    }

    fn head(wire: &[u8], is_head: bool) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(wire), is_head)
    }

    fn framing_of(wire: &str) -> Framing {
        head(wire.as_bytes(), false).unwrap().unwrap().framing
    }

    #[test]
    fn response_heads_and_their_framing() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-A: 1\r\nx-a: 2\r\nTransfer-Encoding: chunked\r\n\r\nbody";
        for i in 0..wire.len() - 4 {
            assert!(
                head(&wire[..i], false).unwrap().is_none(),
                "complete at {i}"
            );
        }
        let mut buf = BytesMut::from(&wire[..]);
        let h = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(&buf[..], b"body", "the head is consumed, the body is not");
        assert_eq!(h.framing, Framing::Chunked);
        assert_eq!(h.response.status(), 200);
        assert_eq!(h.response.version(), Version::HTTP_11);
        assert_eq!(h.response.headers()["content-type"], "text/event-stream");
        assert_eq!(h.response.headers().get_all("x-a").iter().count(), 2);

        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            Framing::Length(0)
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n"
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
            Framing::Close
        );
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\n\r\n"), Framing::Close);
        assert_eq!(framing_of("HTTP/1.0 200 OK\r\n\r\n"), Framing::Close);
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(
            framing_of("HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(
            framing_of("HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"),
            Framing::Empty
        );
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty, "HEAD has no body");
        assert_eq!(h.response.headers()["content-length"], "5");
    }

    #[test]
    fn malformed_or_oversized_heads_are_refused() {
        for (wire, want) in [
            (
                "HTTP/1.1 abc OK\r\n\r\n",
                "invalid response head: invalid response status",
            ),
            (
                "HTTP/2 200 OK\r\n\r\n",
                "invalid response head: invalid HTTP version",
            ),
            (
                "SSH-2.0-OpenSSH\r\n\r\n",
                "invalid response head: invalid HTTP version",
            ),
            (
                "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                "invalid response head: invalid header name",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                "invalid Content-Length",
            ),
        ] {
            let err = head(wire.as_bytes(), false).unwrap_err();
            assert_eq!(err.to_string(), want, "{wire:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let wire = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(
            head(wire.as_bytes(), false),
            Err(Error::TooManyHeaders)
        ));
        let fits: String = (0..MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(
            head(format!("HTTP/1.1 200 OK\r\n{fits}\r\n").as_bytes(), false)
                .unwrap()
                .is_some()
        );
        // Too large, complete or not.
        let big = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert!(matches!(
            head(big.as_bytes(), false),
            Err(Error::HeadTooLarge)
        ));
        let big = format!("{big}\r\n");
        assert!(matches!(
            head(big.as_bytes(), false),
            Err(Error::HeadTooLarge)
        ));
    }

    #[test]
    fn request_heads_are_written_as_given() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.append("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        h.append("accept", HeaderValue::from_static("text/event-stream"));
        let out = encode_head(&Method::GET, "/events?a=1", &h);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /events?a=1 HTTP/1.1\r\nhost: a.example\r\nx-forwarded-for: 192.0.2.1\r\naccept: text/event-stream\r\n\r\n"
        );
    }

    // ---- over real loopback sockets

    /// A backend that reads one request head, sends it to the test, then writes each piece
    /// of `script` when the test says so (via `go`), then closes (or holds, with `hold`).
    struct Script {
        addr: std::net::SocketAddr,
        head: tokio::sync::oneshot::Receiver<String>,
        go: tokio::sync::mpsc::Sender<&'static [u8]>,
        closed: tokio::sync::oneshot::Receiver<()>,
    }

    async fn backend() -> Script {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (head_tx, head) = tokio::sync::oneshot::channel();
        let (go, mut pieces) = tokio::sync::mpsc::channel::<&'static [u8]>(16);
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut b).await.unwrap();
                assert!(n > 0);
                req.extend_from_slice(&b[..n]);
            }
            let _ = head_tx.send(String::from_utf8(req).unwrap());
            let (mut rd, mut wr) = sock.into_split();
            let watch = tokio::spawn(async move {
                // Returns once the client closed its side.
                let mut b = [0u8; 64];
                while rd.read(&mut b).await.is_ok_and(|n| n > 0) {}
                let _ = closed_tx.send(());
            });
            while let Some(p) = pieces.recv().await {
                if p.is_empty() {
                    break; // close now
                }
                if wr.write_all(p).await.is_err() {
                    break;
                }
            }
            drop(wr);
            let _ = watch.await;
        });
        Script {
            addr,
            head,
            go,
            closed,
        }
    }

    fn get(path: &str) -> http::request::Parts {
        let (mut parts, ()) = http::Request::get(path).body(()).unwrap().into_parts();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("a.example"));
        parts
    }

    async fn frame(body: &mut ResponseBody) -> Option<Result<Bytes, Error>> {
        poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await
            .map(|r| r.map(|f| f.into_data().unwrap()))
    }

    /// Polls once without waiting.
    fn poll_now(body: &mut ResponseBody) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(body).poll_frame(&mut cx)
    }

    #[tokio::test]
    async fn skips_1xx_then_streams_a_chunked_body_holding_no_buffer_while_idle() {
        let s = backend().await;
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        s.go.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
            .await
            .unwrap();
        s.go.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n")
            .await
            .unwrap();
        let resp = exchange(tcp, &get("/events?x=1")).await.unwrap();
        let head = s.head.await.unwrap();
        assert!(
            head.starts_with("GET /events?x=1 HTTP/1.1\r\nhost: a.example\r\n"),
            "{head}"
        );
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut body = resp.into_body();
        let first = frame(&mut body).await.unwrap().unwrap();
        assert_eq!(first, "data: a\n\n");
        let at = first.as_ptr() as usize + first.len();
        drop(first);
        // Nothing more has arrived: the stream waits holding no read buffer.
        assert!(poll_now(&mut body).is_pending());
        assert_eq!(body.buffer_capacity(), 0);
        s.go.send(b"9\r\ndata: b\n\n\r\n").await.unwrap();
        let second = frame(&mut body).await.unwrap().unwrap();
        assert_eq!(second, "data: b\n\n");
        // The next read went into the same buffer's free space: no allocation per event.
        assert_eq!(second.as_ptr() as usize, at + 5, "after `\\r\\n9\\r\\n`");
        s.go.send(b"0\r\nx-t: 1\r\n\r\n").await.unwrap();
        assert!(frame(&mut body).await.is_none());
        assert!(body.is_end_stream());
        // The socket is closed at the end of the body, without waiting for the backend.
        tokio::time::timeout(std::time::Duration::from_secs(5), s.closed)
            .await
            .expect("the upstream socket stayed open")
            .unwrap();
    }

    #[tokio::test]
    async fn a_stream_whose_reads_fill_the_buffer_reads_into_a_larger_one_and_idles_without() {
        let s = backend().await;
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        s.go.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let mut body = exchange(tcp, &get("/")).await.unwrap().into_body();
        // One 48 KiB chunk, written at once: the first reads fill the 16 KiB buffer.
        let big: &'static [u8] = Box::leak(
            [&b"c000\r\n"[..], &[b'x'; 0xc000], b"\r\n"]
                .concat()
                .into_boxed_slice(),
        );
        s.go.send(big).await.unwrap();
        let (mut got, mut largest) = (0, 0);
        while got < 0xc000 {
            let data = frame(&mut body).await.unwrap().unwrap();
            got += data.len();
            largest = largest.max(body.buffer_capacity() + data.len());
        }
        assert_eq!(got, 0xc000);
        assert!(body.hot, "reads filled their buffer");
        assert!(
            largest > pool::READ_BUF,
            "a hot stream reads into a larger buffer ({largest} B)"
        );
        // Drained: the stream waits holding no buffer, hot or not.
        assert!(poll_now(&mut body).is_pending());
        assert_eq!(body.buffer_capacity(), 0);
    }

    #[tokio::test]
    async fn dropping_the_body_closes_the_upstream_socket() {
        let s = backend().await;
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        s.go.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let resp = exchange(tcp, &get("/")).await.unwrap();
        let mut body = resp.into_body();
        assert!(poll_now(&mut body).is_pending());
        drop(body);
        tokio::time::timeout(std::time::Duration::from_secs(5), s.closed)
            .await
            .expect("the upstream socket stayed open")
            .unwrap();
    }

    #[tokio::test]
    async fn a_backend_closing_mid_body_is_an_error_and_close_delimited_bodies_end_cleanly() {
        for (wire, rest, ok) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"[..],
                &b"data: cut"[..],
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                b"20\r\ndata: cut",
                false,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", b"data: all\n\n", true),
        ] {
            let s = backend().await;
            let tcp = TcpStream::connect(s.addr).await.unwrap();
            let wire: &'static [u8] = Box::leak(wire.to_vec().into_boxed_slice());
            let rest: &'static [u8] = Box::leak(rest.to_vec().into_boxed_slice());
            s.go.send(wire).await.unwrap();
            let mut body = exchange(tcp, &get("/")).await.unwrap().into_body();
            s.go.send(rest).await.unwrap();
            s.go.send(b"").await.unwrap();
            let mut got = Vec::new();
            let end = loop {
                match frame(&mut body).await {
                    Some(Ok(d)) => got.extend_from_slice(&d),
                    Some(Err(e)) => break Some(e),
                    None => break None,
                }
            };
            match (ok, end) {
                (true, None) => assert_eq!(got, b"data: all\n\n"),
                (false, Some(Error::IncompleteBody)) => assert_eq!(got, b"data: cut"),
                (_, other) => panic!("{:?}: {other:?}", String::from_utf8_lossy(wire)),
            }
        }
    }

    #[tokio::test]
    async fn head_and_no_content_answers_have_no_body() {
        let s = backend().await;
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        s.go.send(b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n")
            .await
            .unwrap();
        let mut parts = get("/");
        parts.method = Method::HEAD;
        let resp = exchange(tcp, &parts).await.unwrap();
        assert_eq!(resp.headers()["content-length"], "42");
        let mut body = resp.into_body();
        assert!(body.is_end_stream());
        assert!(frame(&mut body).await.is_none());
        tokio::time::timeout(std::time::Duration::from_secs(5), s.closed)
            .await
            .expect("the upstream socket stayed open")
            .unwrap();
    }

    #[tokio::test]
    async fn a_backend_closing_before_the_head_or_sending_garbage_fails_the_exchange() {
        for (wire, want) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-le"[..],
                "connection closed before the response head",
            ),
            (b"", "connection closed before the response head"),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
                "unexpected 101 Switching Protocols",
            ),
            (
                b"hello\r\n\r\n",
                "invalid response head: invalid HTTP version",
            ),
        ] {
            let s = backend().await;
            let tcp = TcpStream::connect(s.addr).await.unwrap();
            if !wire.is_empty() {
                let wire: &'static [u8] = Box::leak(wire.to_vec().into_boxed_slice());
                s.go.send(wire).await.unwrap();
            }
            s.go.send(b"").await.unwrap();
            let err = exchange(tcp, &get("/")).await.unwrap_err();
            assert_eq!(err.to_string(), want);
        }
    }

    #[tokio::test]
    async fn an_oversized_head_fails_the_exchange() {
        let s = backend().await;
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let line: &'static [u8] = Box::leak(
            format!("x-pad: {}\r\n", "p".repeat(1000))
                .into_bytes()
                .into_boxed_slice(),
        );
        let go = s.go.clone();
        tokio::spawn(async move {
            go.send(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            for _ in 0..(MAX_HEAD_BYTES / 1000 + 2) {
                if go.send(line).await.is_err() {
                    break;
                }
            }
        });
        let err = exchange(tcp, &get("/")).await.unwrap_err();
        assert!(matches!(err, Error::HeadTooLarge), "{err}");
    }
}
