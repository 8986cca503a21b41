//! Poll-to-stream: a `mode: Poll` rule calls a JSON backend in a loop and streams the answers.
//!
//! The protocol (backend side): each call is answered with a JSON object
//!
//! ```json
//! {"list": [{"id": 7}, {"id": 8}], "continue": true, "wait": 250, "next": "c-8"}
//! ```
//!
//! - `list` (optional array): every entry becomes one SSE event whose `data` is the entry as
//!   compact JSON on one line;
//! - `continue` (optional bool): only `true` makes ssegate call again;
//! - `wait` (optional): milliseconds (a number) or a duration string (`"250ms"`, `"2s"`) to
//!   wait before the next call; missing → the rule's `defaultWait`; clamped to
//!   `[minWait, maxWait]`;
//! - `next` (optional string or number): the cursor carried back as `previous` on the
//!   following calls, as a query parameter for methods without a body (`GET`, `HEAD`,
//!   `DELETE`, `OPTIONS`) and as a top-level field of the JSON body otherwise. Like an
//!   EventSource's last event id, the cursor stays when an answer has no `next`.
//!
//! The last event of each batch carries `id: <cursor>`, written as the cursor's JSON text
//! (`"c-8"` with quotes for a string, `8` for a number) so that a string and a number stay
//! distinguishable when a reconnecting client sends it back as `Last-Event-ID`; that header
//! starts the loop with `previous` set to the same cursor, exactly.
//!
//! This module is the pure half: configuration, response parsing, wait clamping, cursor
//! placement and frame encoding. [`task`] is the I/O half (the response body that runs the
//! loop).

pub mod task;

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Method;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::api::PollSettings;
use crate::sse::write_event;

/// The field that carries the cursor back to the backend.
pub const PREVIOUS: &str = "previous";
/// Event type of the frame sent when a call fails after the stream started.
pub const ERROR_EVENT: &str = "error";
/// Event type of the frame sent when the backend stops continuing (with `endEvent`).
pub const END_EVENT: &str = "end";

/// The compiled poll settings of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollConfig {
    /// Wait when an answer has no `wait`.
    pub default_wait: Duration,
    /// Lower bound of every wait.
    pub min_wait: Duration,
    /// Upper bound of every wait (and of a `Retry-After`).
    pub max_wait: Duration,
    /// `event:` of list events; `None` sends `message` events.
    pub event_type: Option<Box<str>>,
    /// Send `event: end` when the backend stops continuing.
    pub end_event: bool,
}

impl PollConfig {
    /// Checks `settings` and compiles them; the error is the `Accepted=False` message.
    pub fn from_settings(s: &PollSettings) -> Result<Self, String> {
        if s.min_wait > s.max_wait {
            return Err(format!(
                "poll.minWait {} must not exceed poll.maxWait {}",
                s.min_wait, s.max_wait
            ));
        }
        if s.default_wait < s.min_wait || s.default_wait > s.max_wait {
            return Err(format!(
                "poll.defaultWait {} must be within poll.minWait {} and poll.maxWait {}",
                s.default_wait, s.min_wait, s.max_wait
            ));
        }
        let et = s.event_type.as_str();
        if et.contains(['\r', '\n', '\0']) {
            return Err("poll.eventType must not contain CR, LF or NUL".into());
        }
        if et == ERROR_EVENT || et == END_EVENT {
            return Err(format!(
                "poll.eventType {et:?} is reserved for ssegate's own frames"
            ));
        }
        Ok(PollConfig {
            default_wait: s.default_wait.get(),
            min_wait: s.min_wait.get(),
            max_wait: s.max_wait.get(),
            event_type: (!et.is_empty()).then(|| et.into()),
            end_event: s.end_event,
        })
    }

    /// The wait before the next call: the backend's `wait` or `defaultWait`, clamped to
    /// `[minWait, maxWait]`.
    pub fn wait(&self, requested: Option<Duration>) -> Duration {
        requested
            .unwrap_or(self.default_wait)
            .clamp(self.min_wait, self.max_wait)
    }
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig::from_settings(&PollSettings::default()).expect("defaults are valid")
    }
}

/// A backend cursor: the JSON text of a string or a number, kept exactly as written (so
/// large or fractional numbers survive untouched).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Cursor(Box<str>);

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cursor({})", self.0)
    }
}

impl Cursor {
    /// A cursor from a JSON value's text: strings and numbers are cursors, `null` is none,
    /// anything else is an error.
    fn from_json(raw: &RawValue) -> Result<Option<Cursor>, String> {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"') => {
                // Re-encode so the id is in serde_json's canonical escaping.
                let s: String = serde_json::from_str(text).map_err(|e| e.to_string())?;
                Ok(Some(Cursor::string(&s)))
            }
            Some(b'-' | b'0'..=b'9') => Ok(Some(Cursor(text.into()))),
            Some(b'n') => Ok(None),
            _ => Err(format!("next must be a string or a number, got {text}")),
        }
    }

    /// A string cursor.
    pub fn string(s: &str) -> Cursor {
        Cursor(
            serde_json::to_string(s)
                .expect("strings always serialize")
                .into(),
        )
    }

    /// The cursor a reconnecting client asks for with `Last-Event-ID`: the JSON text of a
    /// string or number (as ssegate writes ids); any other non-empty value is taken as a
    /// plain string, so hand-written ids work too. Empty means no cursor.
    pub fn from_last_event_id(id: &[u8]) -> Option<Cursor> {
        let text = String::from_utf8_lossy(id);
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        if let Ok(raw) = serde_json::from_str::<&RawValue>(text)
            && let Ok(Some(c)) = Cursor::from_json(raw)
        {
            return Some(c);
        }
        Some(Cursor::string(text))
    }

    /// The cursor as JSON text: the SSE `id` and the value of the body field.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// True for a string cursor.
    pub fn is_string(&self) -> bool {
        self.0.starts_with('"')
    }

    /// The value of the query parameter: the string itself, or the number's text.
    pub fn query_value(&self) -> Cow<'_, str> {
        if self.is_string() {
            Cow::Owned(serde_json::from_str(&self.0).expect("a cursor is valid JSON"))
        } else {
            Cow::Borrowed(&self.0)
        }
    }
}

/// Why a backend answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid poll response: {0}")]
pub struct ResponseError(pub String);

/// One parsed backend answer, borrowing the response body.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The entries, as the backend wrote them.
    pub list: Vec<&'a RawValue>,
    /// `continue: true`.
    pub cont: bool,
    /// The requested wait, unclamped.
    pub wait: Option<Duration>,
    /// The new cursor; `None` keeps the current one.
    pub next: Option<Cursor>,
}

#[derive(Deserialize)]
struct RawAnswer<'a> {
    #[serde(borrow, default)]
    list: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "continue")]
    cont: Option<&'a RawValue>,
    #[serde(borrow, default)]
    wait: Option<&'a RawValue>,
    #[serde(borrow, default)]
    next: Option<&'a RawValue>,
}

/// Parses a backend answer (see the module docs). A missing or `null` field means its
/// default; a field of the wrong type is an error.
pub fn parse_response(body: &[u8]) -> Result<Batch<'_>, ResponseError> {
    let err = |m: String| ResponseError(m);
    let trimmed = body.trim_ascii_start();
    if !trimmed.starts_with(b"{") {
        return Err(err("the body is not a JSON object".into()));
    }
    let raw: RawAnswer<'_> = serde_json::from_slice(body).map_err(|e| err(e.to_string()))?;
    // serde maps `null` to `None` for these optional fields.
    let list = match raw.list {
        None => Vec::new(),
        Some(l) => serde_json::from_str::<Vec<&RawValue>>(l.get())
            .map_err(|_| err("list must be an array".into()))?,
    };
    let cont = match raw.cont {
        None => false,
        Some(c) => serde_json::from_str::<bool>(c.get())
            .map_err(|_| err("continue must be true or false".into()))?,
    };
    let wait = match raw.wait {
        None => None,
        Some(w) => Some(parse_wait(w.get()).map_err(err)?),
    };
    let next = match raw.next {
        Some(n) => Cursor::from_json(n).map_err(err)?,
        None => None,
    };
    Ok(Batch {
        list,
        cont,
        wait,
        next,
    })
}

/// `wait`: a number of milliseconds (fractions rounded, negatives are zero) or a duration
/// string such as `"250ms"` or `"2s"`.
fn parse_wait(text: &str) -> Result<Duration, String> {
    let bad = || format!("wait must be milliseconds or a duration such as \"2s\", got {text}");
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).map_err(|_| bad())?;
        return s
            .parse::<crate::api::Duration>()
            .map(|d| d.get())
            .map_err(|_| bad());
    }
    let ms: f64 = serde_json::from_str(text).map_err(|_| bad())?;
    // Anything beyond a day is clamped to maxWait anyway.
    Ok(Duration::from_secs_f64(
        ms.clamp(0.0, 86_400_000.0) / 1000.0,
    ))
}

/// Parses a `Retry-After` header given in seconds; HTTP dates are not supported (`None`).
pub fn parse_retry_after(value: &[u8]) -> Option<Duration> {
    std::str::from_utf8(value)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Appends one event per `list` entry to `out`; the last carries `id: <next>` when the batch
/// has a cursor. `scratch` is reused between calls for the compacted entry. Returns the
/// number of events written.
pub fn encode_batch(
    out: &mut BytesMut,
    scratch: &mut String,
    batch: &Batch<'_>,
    event_type: Option<&str>,
) -> u64 {
    let last = batch.list.len().saturating_sub(1);
    for (i, entry) in batch.list.iter().enumerate() {
        scratch.clear();
        compact_json(entry.get(), scratch);
        let id = if i == last {
            batch.next.as_ref().map(Cursor::as_json)
        } else {
            None
        };
        // Ids are JSON text (no raw CR, LF or NUL) and the event type is checked when the
        // rule is compiled, so this cannot fail.
        write_event(out, id, event_type, scratch).expect("valid SSE fields");
    }
    batch.list.len() as u64
}

/// Appends the `event: error` frame: `{"status":502,"message":"..."}`.
pub fn encode_error(out: &mut BytesMut, status: u16, message: &str) {
    let data = serde_json::json!({ "status": status, "message": message }).to_string();
    write_event(out, None, Some(ERROR_EVENT), &data).expect("valid SSE fields");
}

/// Appends the `event: end` frame (data `{}`).
pub fn encode_end(out: &mut BytesMut) {
    write_event(out, None, Some(END_EVENT), "{}").expect("valid SSE fields");
}

/// Copies valid JSON text without the whitespace between tokens (one line, exactly the same
/// values: numbers and string escapes are left as written).
fn compact_json(json: &str, out: &mut String) {
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    let bytes = json.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push_str(&json[start..i]);
            start = i + 1;
        }
    }
    out.push_str(&json[start..]);
}

/// True for methods whose calls carry `previous` in the query rather than in a body.
pub fn is_bodyless(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    )
}

/// Why a client request cannot be turned into poll calls (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The request body is not a JSON object, so `previous` cannot be added to it.
    #[error("the request body must be a JSON object")]
    BodyNotObject,
}

/// How each call of one stream is built from the client's request: where `previous` goes.
#[derive(Debug, Clone)]
pub enum CallTemplate {
    /// `previous` is a query parameter; the body (usually empty) is sent unchanged.
    Query {
        /// The upstream path, without query.
        path: String,
        /// The client's query without `previous` parameters ("" when none).
        base: String,
        /// The client's own `previous=...` pair, used while ssegate has no cursor.
        client_previous: Option<String>,
        /// The client's body.
        body: Bytes,
    },
    /// `previous` is a top-level field of the JSON body.
    Body {
        /// The upstream path and query.
        path_and_query: String,
        /// `{"a":1,"b":2` — the client's fields except `previous`, without the closing brace.
        prefix: String,
        /// `prefix` holds at least one field.
        has_fields: bool,
        /// The client's own `previous` value (JSON text), used while ssegate has no cursor.
        client_previous: Option<String>,
    },
}

impl CallTemplate {
    /// Analyses the client's request once per stream.
    pub fn new(
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: Bytes,
    ) -> Result<Self, TemplateError> {
        if is_bodyless(method) {
            let mut base = String::new();
            let mut client_previous = None;
            for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                if key == PREVIOUS {
                    client_previous = Some(pair.to_string());
                    continue;
                }
                if !base.is_empty() {
                    base.push('&');
                }
                base.push_str(pair);
            }
            return Ok(CallTemplate::Query {
                path: path.to_string(),
                base,
                client_previous,
                body,
            });
        }
        let path_and_query = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let fields: Fields<'_> = if body.trim_ascii().is_empty() {
            Fields(Vec::new())
        } else {
            serde_json::from_slice(&body).map_err(|_| TemplateError::BodyNotObject)?
        };
        let mut prefix = String::from("{");
        let mut client_previous = None;
        let mut has_fields = false;
        for (key, value) in fields.0 {
            if key == PREVIOUS {
                client_previous = Some(value.get().to_string());
                continue;
            }
            if has_fields {
                prefix.push(',');
            }
            prefix.push_str(&serde_json::to_string(&*key).expect("strings always serialize"));
            prefix.push(':');
            compact_json(value.get(), &mut prefix);
            has_fields = true;
        }
        Ok(CallTemplate::Body {
            path_and_query,
            prefix,
            has_fields,
            client_previous,
        })
    }

    /// The upstream path and query of a call carrying `cursor`.
    pub fn path_and_query(&self, cursor: Option<&Cursor>) -> String {
        match self {
            CallTemplate::Body { path_and_query, .. } => path_and_query.clone(),
            CallTemplate::Query {
                path,
                base,
                client_previous,
                ..
            } => {
                let mut out = String::with_capacity(path.len() + base.len() + 32);
                out.push_str(path);
                let mut sep = '?';
                if !base.is_empty() {
                    out.push('?');
                    out.push_str(base);
                    sep = '&';
                }
                match (cursor, client_previous) {
                    (Some(c), _) => {
                        out.push(sep);
                        out.push_str(PREVIOUS);
                        out.push('=');
                        percent_encode(&c.query_value(), &mut out);
                    }
                    (None, Some(pair)) => {
                        out.push(sep);
                        out.push_str(pair);
                    }
                    (None, None) => {}
                }
                out
            }
        }
    }

    /// The body of a call carrying `cursor`.
    pub fn body(&self, cursor: Option<&Cursor>) -> Bytes {
        match self {
            CallTemplate::Query { body, .. } => body.clone(),
            CallTemplate::Body {
                prefix,
                has_fields,
                client_previous,
                ..
            } => {
                let value = cursor.map(Cursor::as_json).or(client_previous.as_deref());
                let mut out = String::with_capacity(prefix.len() + 32);
                out.push_str(prefix);
                if let Some(v) = value {
                    if *has_fields {
                        out.push(',');
                    }
                    out.push_str("\"previous\":");
                    out.push_str(v);
                }
                out.push('}');
                Bytes::from(out)
            }
        }
    }

    /// True when calls carry a JSON body made by ssegate.
    pub fn is_json_body(&self) -> bool {
        matches!(self, CallTemplate::Body { .. })
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str, out: &mut String) {
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(
                char::from_digit(u32::from(b >> 4), 16)
                    .unwrap()
                    .to_ascii_uppercase(),
            );
            out.push(
                char::from_digit(u32::from(b & 0xf), 16)
                    .unwrap()
                    .to_ascii_uppercase(),
            );
        }
    }
}

/// A JSON object's members in order, values kept as written.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(body: &str) -> Batch<'_> {
        parse_response(body.as_bytes()).unwrap()
    }

    fn bad(body: &str) -> String {
        parse_response(body.as_bytes()).unwrap_err().0
    }

    #[test]
    fn parses_every_field() {
        let b = batch(r#"{"list":[{"a":1},"x",3,null],"continue":true,"wait":250,"next":"c-8"}"#);
        let list: Vec<&str> = b.list.iter().map(|r| r.get()).collect();
        assert_eq!(list, [r#"{"a":1}"#, r#""x""#, "3", "null"]);
        assert!(b.cont);
        assert_eq!(b.wait, Some(Duration::from_millis(250)));
        assert_eq!(b.next, Some(Cursor::string("c-8")));
    }

    #[test]
    fn missing_and_null_fields_take_their_defaults() {
        for body in [
            "{}",
            r#"{"list":null,"continue":null,"wait":null,"next":null}"#,
            " \n{ \"other\": [1,2] }",
        ] {
            let b = batch(body);
            assert!(b.list.is_empty(), "{body}");
            assert!(!b.cont);
            assert_eq!(b.wait, None);
            assert_eq!(b.next, None);
        }
        assert!(!batch(r#"{"continue":false}"#).cont);
    }

    #[test]
    fn wait_is_milliseconds_or_a_duration_string() {
        let w = |v: &str| {
            parse_response(format!(r#"{{"wait":{v}}}"#).as_bytes())
                .unwrap()
                .wait
                .unwrap()
        };
        assert_eq!(w("0"), Duration::ZERO);
        assert_eq!(w("1500"), Duration::from_millis(1500));
        assert_eq!(w("2.5"), Duration::from_micros(2500));
        assert_eq!(w("-5"), Duration::ZERO);
        assert_eq!(w("1e12"), Duration::from_secs(86_400));
        assert_eq!(w(r#""250ms""#), Duration::from_millis(250));
        assert_eq!(w(r#""2s""#), Duration::from_secs(2));
        assert_eq!(w(r#""1m30s""#), Duration::from_secs(90));
        assert!(bad(r#"{"wait":"soon"}"#).contains("wait"));
        assert!(bad(r#"{"wait":true}"#).contains("wait"));
    }

    #[test]
    fn wrong_types_are_clear_errors() {
        assert_eq!(bad(r#"{"list":{"a":1}}"#), "list must be an array");
        assert_eq!(bad(r#"{"list":"[1]"}"#), "list must be an array");
        assert_eq!(
            bad(r#"{"continue":"yes"}"#),
            "continue must be true or false"
        );
        assert!(bad(r#"{"next":[1]}"#).contains("next must be a string or a number"));
        assert!(bad(r#"{"next":true}"#).contains("next must be"));
        assert!(bad("[1,2]").contains("not a JSON object"));
        assert!(bad("").contains("not a JSON object"));
        assert!(bad("{\"list\":[1,").contains("EOF"));
        assert!(bad("<html>").contains("not a JSON object"));
    }

    #[test]
    fn cursors_round_trip_exactly_through_ids() {
        for next in [
            r#""abc""#,
            r#""12""#,
            "12",
            "-3",
            "0.50",
            "1e400",
            "123456789012345678901234567890",
            r#""with \"quotes\" and \\ and \n newline""#,
            r#""üñí €""#,
            r#""""#,
        ] {
            let body = format!(r#"{{"list":[1],"next":{next}}}"#);
            let b = batch(&body);
            let cursor = b.next.clone().unwrap();
            let mut out = BytesMut::new();
            encode_batch(&mut out, &mut String::new(), &b, None);
            let text = std::str::from_utf8(&out).unwrap();
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .unwrap_or_else(|| panic!("no id in {text:?}"));
            // What a browser sends back as Last-Event-ID is exactly that line's value.
            assert_eq!(
                Cursor::from_last_event_id(id.as_bytes()),
                Some(cursor.clone())
            );
            // A string and a number with the same digits stay different.
            assert_eq!(cursor.is_string(), next.starts_with('"'), "{next}");
        }
        assert_ne!(
            Cursor::from_last_event_id(b"\"12\""),
            Cursor::from_last_event_id(b"12")
        );
    }

    #[test]
    fn numbers_keep_their_exact_text() {
        let c = batch(r#"{"next":123456789012345678901234567890}"#)
            .next
            .unwrap();
        assert_eq!(c.as_json(), "123456789012345678901234567890");
        assert_eq!(c.query_value(), "123456789012345678901234567890");
    }

    #[test]
    fn hand_written_last_event_ids_are_strings() {
        assert_eq!(
            Cursor::from_last_event_id(b"abc"),
            Some(Cursor::string("abc"))
        );
        assert_eq!(
            Cursor::from_last_event_id(b"{\"x\":1}"),
            Some(Cursor::string("{\"x\":1}"))
        );
        assert_eq!(Cursor::from_last_event_id(b""), None);
        assert_eq!(Cursor::from_last_event_id(b"  "), None);
        assert_eq!(
            Cursor::from_last_event_id(b"null"),
            Some(Cursor::string("null"))
        );
    }

    #[test]
    fn wait_is_clamped_to_the_rule_bounds() {
        let cfg = PollConfig::default();
        assert_eq!(cfg.wait(None), Duration::from_secs(1));
        assert_eq!(cfg.wait(Some(Duration::ZERO)), Duration::from_millis(100));
        assert_eq!(
            cfg.wait(Some(Duration::from_millis(250))),
            Duration::from_millis(250)
        );
        assert_eq!(
            cfg.wait(Some(Duration::from_secs(3600))),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn settings_are_validated() {
        let ok = |s: &str| PollConfig::from_settings(&serde_yaml::from_str(s).unwrap());
        assert!(ok("{}").is_ok());
        assert!(ok("{minWait: 0s, defaultWait: 0s, maxWait: 0s}").is_ok());
        let e = ok("{minWait: 2s, maxWait: 1s, defaultWait: 1s}").unwrap_err();
        assert!(
            e.contains("minWait 2s must not exceed poll.maxWait 1s"),
            "{e}"
        );
        let e = ok("{defaultWait: 50ms}").unwrap_err();
        assert!(e.contains("defaultWait 50ms must be within"), "{e}");
        assert!(ok("{defaultWait: 2m}").unwrap_err().contains("defaultWait"));
        assert!(ok("{eventType: \"a\\nb\"}").unwrap_err().contains("CR, LF"));
        assert!(ok("{eventType: error}").unwrap_err().contains("reserved"));
        assert!(ok("{eventType: end}").unwrap_err().contains("reserved"));
        let cfg = ok("{eventType: order, endEvent: false}").unwrap();
        assert_eq!(cfg.event_type.as_deref(), Some("order"));
        assert!(!cfg.end_event);
        assert_eq!(ok("{}").unwrap().event_type, None);
    }

    #[test]
    fn each_entry_is_one_event_as_compact_json_and_the_last_carries_the_cursor() {
        let b = batch(
            "{\"list\": [ {\"a\": [1, 2],\n  \"s\": \"x y\\n\\\"z\\\"\"}, \"two\" , 3.10 ],\n \"next\": 42}",
        );
        let mut out = BytesMut::new();
        let n = encode_batch(&mut out, &mut String::new(), &b, Some("order"));
        assert_eq!(n, 3);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "event: order\ndata: {\"a\":[1,2],\"s\":\"x y\\n\\\"z\\\"\"}\n\n\
             event: order\ndata: \"two\"\n\n\
             id: 42\nevent: order\ndata: 3.10\n\n"
        );
    }

    #[test]
    fn batch_without_cursor_has_no_id_and_empty_batch_writes_nothing() {
        let mut out = BytesMut::new();
        encode_batch(
            &mut out,
            &mut String::new(),
            &batch(r#"{"list":[1,2]}"#),
            None,
        );
        assert_eq!(&out[..], b"data: 1\n\ndata: 2\n\n");
        let mut out = BytesMut::new();
        let n = encode_batch(
            &mut out,
            &mut String::new(),
            &batch(r#"{"list":[],"next":1}"#),
            None,
        );
        assert_eq!((n, out.len()), (0, 0));
    }

    #[test]
    fn error_and_end_frames() {
        let mut out = BytesMut::new();
        encode_error(&mut out, 502, "bad \"gateway\"\nnow");
        encode_end(&mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "event: error\ndata: {\"message\":\"bad \\\"gateway\\\"\\nnow\",\"status\":502}\n\n\
             event: end\ndata: {}\n\n"
        );
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after(b"3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(b" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(b"-1"), None);
    }

    fn get_template(query: Option<&str>) -> CallTemplate {
        CallTemplate::new(&Method::GET, "/api/request/orders", query, Bytes::new()).unwrap()
    }

    #[test]
    fn bodyless_methods_carry_previous_in_the_query() {
        let t = get_template(Some("x=1&y=a%20b"));
        assert_eq!(t.path_and_query(None), "/api/request/orders?x=1&y=a%20b");
        assert_eq!(
            t.path_and_query(Some(&Cursor::string("c 8&x=/é"))),
            "/api/request/orders?x=1&y=a%20b&previous=c%208%26x%3D%2F%C3%A9"
        );
        assert_eq!(
            t.path_and_query(Some(&Cursor::from_last_event_id(b"1e+5").unwrap())),
            "/api/request/orders?x=1&y=a%20b&previous=1e%2B5"
        );
        let bare = get_template(None);
        assert_eq!(bare.path_and_query(None), "/api/request/orders");
        assert_eq!(
            bare.path_and_query(Some(&Cursor::from_last_event_id(b"7").unwrap())),
            "/api/request/orders?previous=7"
        );
        for m in [Method::HEAD, Method::DELETE, Method::OPTIONS] {
            assert!(is_bodyless(&m));
        }
    }

    #[test]
    fn the_clients_previous_is_replaced_once_ssegate_has_a_cursor() {
        let t = get_template(Some("previous=start&x=1"));
        assert_eq!(
            t.path_and_query(None),
            "/api/request/orders?x=1&previous=start"
        );
        assert_eq!(
            t.path_and_query(Some(&Cursor::string("c2"))),
            "/api/request/orders?x=1&previous=c2"
        );
    }

    fn post_template(body: &str) -> CallTemplate {
        CallTemplate::new(
            &Method::POST,
            "/api/q",
            Some("v=2"),
            Bytes::from(body.to_string()),
        )
        .unwrap()
    }

    #[test]
    fn body_methods_carry_previous_as_a_top_level_json_field() {
        let t = post_template(
            "{\"filter\": {\"state\": \"open\"},\n \"big\": 123456789012345678901234}",
        );
        assert!(t.is_json_body());
        assert_eq!(t.path_and_query(Some(&Cursor::string("x"))), "/api/q?v=2");
        assert_eq!(
            t.body(None),
            r#"{"filter":{"state":"open"},"big":123456789012345678901234}"#
        );
        assert_eq!(
            t.body(Some(&Cursor::string("c-1"))),
            r#"{"filter":{"state":"open"},"big":123456789012345678901234,"previous":"c-1"}"#
        );
        let n = Cursor::from_last_event_id(b"17").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&t.body(Some(&n))).unwrap();
        assert_eq!(v["previous"], 17);
        // An empty body becomes an object.
        let e = post_template("");
        assert_eq!(e.body(None), "{}");
        assert_eq!(e.body(Some(&Cursor::string("a"))), r#"{"previous":"a"}"#);
    }

    #[test]
    fn body_previous_from_the_client_is_kept_until_replaced() {
        let t = post_template(r#"{"previous": 5, "a": "\u00e9"}"#);
        assert_eq!(t.body(None), r#"{"a":"\u00e9","previous":5}"#);
        assert_eq!(
            t.body(Some(&Cursor::string("z"))),
            r#"{"a":"\u00e9","previous":"z"}"#
        );
    }

    #[test]
    fn non_object_bodies_are_refused() {
        for body in ["[1]", "\"x\"", "not json", "{\"a\":"] {
            assert_eq!(
                CallTemplate::new(&Method::POST, "/", None, Bytes::from(body)).unwrap_err(),
                TemplateError::BodyNotObject,
                "{body}"
            );
        }
    }

    /// Property tests: any backend answer never panics the parser, and every answer it
    /// accepts encodes to exactly its entries as SSE events, with the cursor as the last id.
    mod proptests {
        use super::*;
        use crate::sse::Framer;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use serde_json::Value as Json;

        fn json() -> impl Strategy<Value = Json> {
            let leaf = prop_oneof![
                Just(Json::Null),
                any::<bool>().prop_map(Json::from),
                any::<i64>().prop_map(Json::from),
                any::<f64>().prop_map(Json::from),
                vec(any::<char>(), 0..12)
                    .prop_map(|c| Json::from(c.into_iter().collect::<String>())),
                prop::sample::select(&["\r\n", "\0", "data: x\n\n", "\u{2028}", "é"][..])
                    .prop_map(Json::from),
            ];
            leaf.prop_recursive(3, 32, 5, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..4).prop_map(Json::Array),
                    vec(
                        (prop::sample::select(&["a", "list", "id", "\n"][..]), inner),
                        0..4
                    )
                    .prop_map(|kv| Json::Object(
                        kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                    )),
                ]
            })
        }

        /// An answer object: each field absent, well-typed or anything.
        fn answer() -> impl Strategy<Value = String> {
            let field = |good: BoxedStrategy<Json>| prop_oneof![2 => Just(None), 4 => good.prop_map(Some), 1 => json().prop_map(Some)];
            (
                field(vec(json(), 0..5).prop_map(Json::Array).boxed()),
                field(any::<bool>().prop_map(Json::from).boxed()),
                field(
                    prop_oneof![
                        (0u32..100_000).prop_map(Json::from),
                        prop::sample::select(&["250ms", "2s", "-1s", "x"][..]).prop_map(Json::from),
                    ]
                    .boxed(),
                ),
                field(
                    prop_oneof![
                        any::<u64>().prop_map(Json::from),
                        vec(any::<char>(), 0..10)
                            .prop_map(|c| Json::from(c.into_iter().collect::<String>())),
                    ]
                    .boxed(),
                ),
            )
                .prop_map(|(list, cont, wait, next)| {
                    let mut m = serde_json::Map::new();
                    for (k, v) in [
                        ("list", list),
                        ("continue", cont),
                        ("wait", wait),
                        ("next", next),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.into(), v);
                        }
                    }
                    Json::Object(m).to_string()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 1024,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn any_bytes_never_panic(body in vec(any::<u8>(), 0..200), value in vec(any::<u8>(), 0..20)) {
                let _ = parse_response(&body);
                let _ = parse_retry_after(&value);
                if let Some(c) = Cursor::from_last_event_id(&value) {
                    let _ = c.query_value();
                    prop_assert_eq!(Cursor::from_last_event_id(c.as_json().as_bytes()), Some(c));
                }
            }

            #[test]
            fn accepted_answers_encode_to_exactly_their_entries(text in answer()) {
                let Ok(batch) = parse_response(text.as_bytes()) else { return Ok(()) };
                let mut out = BytesMut::new();
                let mut scratch = String::new();
                let n = encode_batch(&mut out, &mut scratch, &batch, Some("update"));
                prop_assert_eq!(n, batch.list.len() as u64);
                let mut f = Framer::new();
                prop_assert_eq!(u64::from(f.feed(&out)), n);
                prop_assert!(f.at_boundary());
                if n > 0 {
                    prop_assert_eq!(
                        f.last_event_id(),
                        batch.next.as_ref().map(|c| c.as_json().as_bytes())
                    );
                }
                // Each event's data is its entry, compacted but equal as JSON.
                let text = std::str::from_utf8(&out).unwrap();
                let datas: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                prop_assert_eq!(datas.len(), batch.list.len());
                for (d, entry) in datas.iter().zip(&batch.list) {
                    let a: Json = serde_json::from_str(d).unwrap();
                    let b: Json = serde_json::from_str(entry.get()).unwrap();
                    prop_assert_eq!(a, b);
                }
                if let Some(c) = &batch.next {
                    let again = Cursor::from_last_event_id(c.as_json().as_bytes());
                    prop_assert_eq!(again.as_ref(), Some(c));
                }
            }
        }
    }
}
