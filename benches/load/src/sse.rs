//! The bench's event format, and an incremental SSE parser for the load generator.
//!
//! Each event the upstream sends is `id: N\ndata: T PADDING\n\n` where `T` is the sending
//! time in nanoseconds of `CLOCK_MONOTONIC` (one clock for every process on the machine), so
//! the client measures end-to-end latency by subtracting it from its own receive time.

/// Nanoseconds of `CLOCK_MONOTONIC`, comparable across processes on one machine.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass and has no other effect.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Appends the decimal digits of `v`.
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

const PAD: [u8; 256] = [b'x'; 256];

/// Appends one event with id `id` and timestamp `ts`, padded with `x` to `size` bytes in
/// total (or longer, when `size` is below the unpadded length).
pub fn write_event(out: &mut Vec<u8>, id: u64, ts: u64, size: usize) {
    let start = out.len();
    out.extend_from_slice(b"id: ");
    push_u64(out, id);
    out.extend_from_slice(b"\ndata: ");
    push_u64(out, ts);
    out.push(b' ');
    let mut pad = size.saturating_sub(out.len() - start + 2);
    while pad > 0 {
        let n = pad.min(PAD.len());
        out.extend_from_slice(&PAD[..n]);
        pad -= n;
    }
    out.extend_from_slice(b"\n\n");
}

/// One parsed event: its id and the timestamp at the start of its data, when present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `id:` field, if numeric.
    pub id: Option<u64>,
    /// The leading number of the `data:` field.
    pub ts: Option<u64>,
}

/// Incremental parser: feed it chunks split anywhere; it calls back once per event.
#[derive(Default)]
pub struct Parser {
    partial: Vec<u8>,
    cur: Event,
    has_data: bool,
}

fn leading_u64(s: &[u8]) -> Option<u64> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    Some(
        s[..n]
            .iter()
            .fold(0u64, |acc, &b| acc * 10 + u64::from(b - b'0')),
    )
}

impl Parser {
    /// Parses `chunk`, calling `on_event` for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(Event)) {
        let mut rest = chunk;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let (line, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.line(line, &mut on_event);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole, &mut on_event);
                whole.clear();
                self.partial = whole;
            }
        }
        self.partial.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data {
                on_event(self.cur);
            }
            self.cur = Event::default();
            self.has_data = false;
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return, // comment (keepalive)
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"id" => self.cur.id = leading_u64(value).filter(|_| value.len() < 20),
            b"data" => {
                if !self.has_data {
                    self.cur.ts = leading_u64(value);
                }
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::default();
        let mut out = vec![];
        for c in chunks {
            p.feed(c, |e| out.push(e));
        }
        out
    }

    #[test]
    fn written_events_have_the_requested_size_and_parse_back() {
        let mut buf = vec![];
        write_event(&mut buf, 7, 123_456_789, 128);
        assert_eq!(buf.len(), 128);
        write_event(&mut buf, 8, 5, 10); // too small: unpadded
        assert_eq!(&buf[128..], b"id: 8\ndata: 5 \n\n");
        let events = parse_all(&[&buf]);
        assert_eq!(
            events,
            vec![
                Event {
                    id: Some(7),
                    ts: Some(123_456_789)
                },
                Event {
                    id: Some(8),
                    ts: Some(5)
                }
            ]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let mut buf = b": keepalive\n\nretry: 100\n\n".to_vec();
        write_event(&mut buf, 1, 10, 64);
        buf.extend_from_slice(b"id: 2\r\nevent: x\r\ndata: 20\r\ndata: more\r\n\r\n");
        write_event(&mut buf, 3, 30, 40);
        let whole = parse_all(&[&buf]);
        assert_eq!(whole.len(), 3);
        assert_eq!(
            whole[1],
            Event {
                id: Some(2),
                ts: Some(20)
            }
        );
        for i in 0..buf.len() {
            for j in i..buf.len() {
                assert_eq!(
                    parse_all(&[&buf[..i], &buf[i..j], &buf[j..]]),
                    whole,
                    "split {i}/{j}"
                );
            }
        }
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_bad_ids_are_none() {
        let ev = parse_all(&[b"id: 5\n\nid: x\ndata: y\n\n"]);
        assert_eq!(ev, vec![Event { id: None, ts: None }]);
    }
}
