//! Server-Sent Events framing for the relay hot path.
//!
//! The proxy relays `text/event-stream` bodies byte-for-byte. [`Framer`] *scans* every upstream
//! chunk (it never copies or rewrites it) and tracks just enough of the WHATWG "event stream
//! interpretation" state to answer three questions cheaply:
//!
//! * how many events were dispatched (for metrics),
//! * what the last `id` was (so an upstream reconnect can send `Last-Event-ID`),
//! * whether it is safe *right now* to inject bytes of our own, e.g. [`KEEPALIVE`], into the
//!   downstream stream ([`Framer::at_boundary`]).
//!
//! Injection is only safe between events: not inside a line, not after field lines that have not
//! yet been terminated by a blank line (a later `data:` line would join that event), and not right
//! after a lone CR — the next upstream byte may be the LF of a CRLF pair, and an injected line in
//! between would turn that LF into a blank line that dispatches the event early.
//!
//! The framer does no I/O, reads no clock and never allocates per event: it jumps between line
//! ends with `memchr`, looks at the first few bytes of each line to recognise `data`/`id`, and
//! keeps the last event id inline (spilling to one reusable heap buffer only for long ids).
//!
//! [`write_event`] and [`write_retry`] produce well-formed events for responses we generate
//! ourselves.

use bytes::BytesMut;
use memchr::{memchr, memchr2};

/// The keepalive comment injected at boundaries.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Longest `id` value (in bytes) the framer records. Longer `id` fields are ignored, exactly
/// like ids containing NUL, so a misbehaving upstream cannot make the framer buffer an unbounded
/// line.
pub const MAX_ID_LEN: usize = 1024;

/// Ids up to this many bytes (committed id plus any id still being received) are stored inline.
const ID_INLINE: usize = 64;

/// The UTF-8 byte order mark, ignored once at the very start of a stream.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
/// `Framer::bom_matched` value once BOM handling is over.
const BOM_DONE: u8 = 3;

/// Where the framer is within the current line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line (no byte of it seen yet).
    #[default]
    Start,
    /// Inside a line whose remaining bytes do not matter (comment, unknown field, field value
    /// we do not track): skip to the line end.
    Skip,
    /// Field name so far is `d`, `da`, `dat`, `data`.
    D,
    Da,
    Dat,
    Data,
    /// Field name so far is `i`, `id`.
    I,
    Id,
    /// Just after `id:`; one leading space is still to be stripped.
    IdValueStart,
    /// Inside an `id` value.
    IdValue,
}

/// Storage for the last event id plus an id value still being received (split across chunks).
///
/// Layout: the committed id is `buf[..committed]`, the pending value follows it at
/// `buf[committed..committed + pending]`, where `buf` is `inline` or, when `spilled`, the heap
/// vector (whose length then equals `committed + pending`). The heap vector is kept once
/// allocated so that long ids do not allocate per event.
#[derive(Clone)]
struct IdStore {
    // `Box<Vec<u8>>` rather than `Vec<u8>`: 8 bytes instead of 24 in every `Framer`, and the
    // heap path is rare (long ids only).
    #[allow(clippy::box_collection)]
    heap: Option<Box<Vec<u8>>>,
    inline: [u8; ID_INLINE],
    committed: u16,
    pending: u16,
    /// An id has been committed (`last_event_id()` is `Some`).
    present: bool,
    /// Bytes live in `heap` instead of `inline`.
    spilled: bool,
    /// The pending value contains NUL or is too long: the whole field will be ignored.
    poisoned: bool,
}

impl Default for IdStore {
    fn default() -> Self {
        Self {
            heap: None,
            inline: [0; ID_INLINE],
            committed: 0,
            pending: 0,
            present: false,
            spilled: false,
            poisoned: false,
        }
    }
}

impl std::fmt::Debug for IdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdStore")
            .field("last", &self.get().map(String::from_utf8_lossy))
            .field("pending_len", &self.pending)
            .field("poisoned", &self.poisoned)
            .field("spilled", &self.spilled)
            .finish()
    }
}

// Lengths are bounded by `MAX_ID_LEN`, so they fit in `u16`.
const _: () = assert!(MAX_ID_LEN <= u16::MAX as usize && ID_INLINE <= MAX_ID_LEN);

impl IdStore {
    fn get(&self) -> Option<&[u8]> {
        if !self.present {
            return None;
        }
        let c = self.committed as usize;
        match (self.spilled, self.heap.as_deref()) {
            (true, Some(heap)) => Some(&heap[..c]),
            _ => Some(&self.inline[..c]),
        }
    }

    /// Replace the committed id (no pending value may exist). `v.len() <= MAX_ID_LEN`.
    fn set(&mut self, v: &[u8]) {
        if v.len() <= ID_INLINE {
            self.inline[..v.len()].copy_from_slice(v);
            self.spilled = false;
            if let Some(heap) = self.heap.as_deref_mut() {
                heap.clear();
            }
        } else {
            let heap = self.heap.get_or_insert_with(Default::default);
            heap.clear();
            heap.extend_from_slice(v);
            self.spilled = true;
        }
        self.committed = v.len() as u16;
        self.pending = 0;
        self.present = true;
        self.poisoned = false;
    }

    /// Forget the pending value, keeping the committed id.
    fn drop_pending(&mut self) {
        if let (true, Some(heap)) = (self.spilled, self.heap.as_deref_mut()) {
            heap.truncate(self.committed as usize);
        }
        self.pending = 0;
    }

    /// Append part of an id value whose line has not ended yet.
    fn push_pending(&mut self, bytes: &[u8]) {
        if self.poisoned || bytes.is_empty() {
            return;
        }
        let (c, p) = (self.committed as usize, self.pending as usize);
        let new_p = p + bytes.len();
        if new_p > MAX_ID_LEN || memchr(0, bytes).is_some() {
            self.poisoned = true;
            self.drop_pending();
            return;
        }
        if !self.spilled && c + new_p <= ID_INLINE {
            self.inline[c + p..c + new_p].copy_from_slice(bytes);
        } else {
            let heap = self.heap.get_or_insert_with(Default::default);
            if !self.spilled {
                heap.clear();
                heap.extend_from_slice(&self.inline[..c + p]);
                self.spilled = true;
            }
            heap.extend_from_slice(bytes);
        }
        self.pending = new_p as u16;
    }

    /// The id line ended; `tail` is the part of the value in the current chunk.
    fn finish(&mut self, tail: &[u8]) {
        let p = self.pending as usize;
        if self.poisoned || p + tail.len() > MAX_ID_LEN || memchr(0, tail).is_some() {
            // WHATWG: an id containing NUL is ignored; we ignore over-long ids the same way.
            self.drop_pending();
            self.poisoned = false;
            return;
        }
        if p == 0 {
            self.set(tail);
            return;
        }
        self.push_pending(tail);
        let (c, p) = (self.committed as usize, self.pending as usize);
        match (self.spilled, self.heap.as_deref_mut()) {
            (true, Some(heap)) => {
                heap.copy_within(c..c + p, 0);
                heap.truncate(p);
                if p <= ID_INLINE {
                    self.inline[..p].copy_from_slice(heap);
                    heap.clear();
                    self.spilled = false;
                }
            }
            _ => self.inline.copy_within(c..c + p, 0),
        }
        self.committed = p as u16;
        self.pending = 0;
        self.present = true;
    }
}

/// Incremental SSE framer: tracks event boundaries across arbitrary chunk splits.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    events: u64,
    id: IdStore,
    line: Line,
    /// Number of BOM bytes matched at stream start (0..=2), or `BOM_DONE`.
    bom_matched: u8,
    /// The last byte seen was a CR ending a line; a following LF belongs to it.
    last_cr: bool,
    /// A field line (any non-comment line) was seen since the last blank line.
    in_event: bool,
    /// A `data` field was seen since the last dispatch.
    data_seen: bool,
}

impl Framer {
    /// A framer positioned at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scan one chunk; returns how many events were *completed* (dispatched) in it.
    pub fn feed(&mut self, chunk: &[u8]) -> u32 {
        let mut i = if self.bom_matched == BOM_DONE {
            0
        } else {
            self.skip_bom(chunk)
        };
        let mut dispatched = 0;
        // Fast path: while no CR is seen, every line ends at an LF, so the scan finds the
        // LFs 64 bytes at a time and looks only at the first bytes of each whole line. A line
        // split across chunks and anything from a CR on take the byte-wise scan.
        if !self.last_cr {
            if self.line != Line::Start {
                match memchr2(b'\r', b'\n', &chunk[i..]) {
                    Some(k) if chunk[i + k] == b'\n' => {
                        dispatched = self.scan(&chunk[..i + k + 1], i);
                        i += k + 1;
                    }
                    _ => return self.scan(chunk, i),
                }
            }
            let (n, at) = self.whole_lines(chunk, i);
            dispatched = dispatched.saturating_add(n);
            i = at;
        }
        dispatched.saturating_add(self.scan(chunk, i))
    }

    /// Takes the whole LF-terminated lines of `chunk` from `from` (a line start) up to the
    /// first CR or the last LF; returns the events dispatched and where it stopped (a line
    /// start).
    fn whole_lines(&mut self, chunk: &[u8], from: usize) -> (u32, usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU has AVX2 (checked just above).
            return unsafe { self.whole_lines_avx2(chunk, from) };
        }
        self.whole_lines_with(chunk, from, line_ends)
    }

    /// [`Framer::whole_lines`] compiled for AVX2, so that [`line_ends_avx2`] and the line
    /// loop inline into one function: half the compares and mask moves per 64-byte block of
    /// the SSE2 baseline.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn whole_lines_avx2(&mut self, chunk: &[u8], from: usize) -> (u32, usize) {
        self.whole_lines_with(chunk, from, |block| line_ends_avx2(block))
    }

    #[inline(always)]
    fn whole_lines_with(
        &mut self,
        chunk: &[u8],
        from: usize,
        line_ends: impl Fn(&[u8; 64]) -> (u64, u64),
    ) -> (u32, usize) {
        let mut dispatched = 0u32;
        // The last `id` value among the lines, not yet checked for NUL and length: only the
        // last one is stored, so only it is checked (see `store_last_id`).
        let mut id = None;
        let mut start = from;
        let mut base = from;
        let mut tail = [0u8; 64];
        while base < chunk.len() {
            let block: &[u8; 64] = match chunk.get(base..base + 64) {
                Some(b) => b.try_into().unwrap_or(&tail),
                None => {
                    let rest = &chunk[base..];
                    tail[..rest.len()].copy_from_slice(rest);
                    &tail
                }
            };
            let (mut lf, cr) = line_ends(block);
            if cr != 0 {
                lf &= (1u64 << cr.trailing_zeros()) - 1;
            }
            while lf != 0 {
                let end = base + lf.trailing_zeros() as usize;
                lf &= lf - 1;
                if self.whole_line(&chunk[start..end], &mut id) {
                    dispatched = dispatched.saturating_add(1);
                }
                start = end + 1;
            }
            if cr != 0 {
                break;
            }
            base += 64;
        }
        if let Some(id) = id {
            self.store_last_id(id, &chunk[from..start]);
        }
        (dispatched, start)
    }

    /// The rare case of [`Framer::store_last_id`]: the last valid `id` value of `lines`, if
    /// any.
    #[cold]
    #[inline(never)]
    fn store_last_id_slow(&mut self, lines: &[u8]) {
        let valid = lines
            .split(|&b| b == b'\n')
            .rev()
            .filter_map(id_value)
            .find(|v| valid_id(v));
        if let Some(v) = valid {
            self.id.set(v);
        }
    }

    /// Stores `last`, the value of the last `id` line of `lines` (whole LF-terminated lines),
    /// unless clients would ignore it (NUL, or longer than [`MAX_ID_LEN`]); then the last of
    /// the earlier `id` lines that is valid counts, if any.
    fn store_last_id(&mut self, last: &[u8], lines: &[u8]) {
        if valid_id(last) {
            self.id.set(last);
        } else {
            self.store_last_id_slow(lines);
        }
    }

    /// One whole line (without its LF) starting at a line start; true if it dispatched an
    /// event. Same outcome as the byte-wise [`Framer::scan`] of the line, except that an
    /// `id` value is left in `id` for the caller to check and store (a later one replaces it).
    #[inline(always)]
    fn whole_line<'a>(&mut self, line: &'a [u8], id: &mut Option<&'a [u8]>) -> bool {
        match line.first() {
            None => {
                let dispatched = self.data_seen;
                if dispatched {
                    self.events += 1;
                }
                self.data_seen = false;
                self.in_event = false;
                dispatched
            }
            Some(b':') => false,
            Some(_) => {
                self.in_event = true;
                if let Some(rest) = line.strip_prefix(b"data") {
                    if matches!(rest.first(), None | Some(b':')) {
                        self.data_seen = true;
                    }
                } else if let Some(value) = id_value(line) {
                    *id = Some(value);
                }
                false
            }
        }
    }

    /// The byte-wise scan of `chunk[i..]`, from any state; returns the events dispatched.
    fn scan(&mut self, chunk: &[u8], mut i: usize) -> u32 {
        let mut dispatched = 0u32;
        let n = chunk.len();
        while i < n {
            if self.last_cr {
                self.last_cr = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Start => {
                    let b = chunk[i];
                    i += 1;
                    match b {
                        b'\n' | b'\r' => {
                            // Blank line: dispatch iff a data field was seen.
                            if self.data_seen {
                                dispatched = dispatched.saturating_add(1);
                                self.events += 1;
                            }
                            self.data_seen = false;
                            self.in_event = false;
                            self.last_cr = b == b'\r';
                        }
                        b':' => self.line = Line::Skip,
                        b'd' => self.start_field(Line::D),
                        b'i' => self.start_field(Line::I),
                        _ => self.start_field(Line::Skip),
                    }
                }
                Line::Skip => match memchr2(b'\r', b'\n', &chunk[i..]) {
                    Some(k) => {
                        i += k;
                        self.end_line(chunk[i]);
                        i += 1;
                    }
                    None => i = n,
                },
                Line::IdValueStart => {
                    if chunk[i] == b' ' {
                        i += 1;
                    }
                    self.line = Line::IdValue;
                }
                Line::IdValue => {
                    let rest = &chunk[i..];
                    match memchr2(b'\r', b'\n', rest) {
                        Some(k) => {
                            self.id.finish(&rest[..k]);
                            self.end_line(rest[k]);
                            i += k + 1;
                        }
                        None => {
                            self.id.push_pending(rest);
                            i = n;
                        }
                    }
                }
                Line::D | Line::Da | Line::Dat | Line::Data | Line::I | Line::Id => {
                    let b = chunk[i];
                    i += 1;
                    if b == b'\r' || b == b'\n' {
                        // The whole line is the field name; the value is empty.
                        match self.line {
                            Line::Data => self.data_seen = true,
                            Line::Id => self.id.set(b""),
                            _ => {}
                        }
                        self.end_line(b);
                        continue;
                    }
                    self.line = match (self.line, b) {
                        (Line::D, b'a') => Line::Da,
                        (Line::Da, b't') => Line::Dat,
                        (Line::Dat, b'a') => Line::Data,
                        (Line::I, b'd') => Line::Id,
                        (Line::Data, b':') => {
                            self.data_seen = true;
                            Line::Skip
                        }
                        (Line::Id, b':') => Line::IdValueStart,
                        _ => Line::Skip,
                    };
                }
            }
        }
        dispatched
    }

    /// True when a byte sequence injected now (e.g. a keepalive comment) cannot land inside an event:
    /// not inside a line, no field lines since the last blank line (no event in progress),
    /// and the last byte seen was not a lone CR (the next byte may be the LF of a CRLF).
    /// True at the very start of a stream.
    ///
    /// Also false while a UTF-8 BOM at the start of the stream is only partially received.
    /// Note that bytes injected before the first upstream byte would make a BOM sent later by the
    /// upstream part of its first line for the client (the framer would still skip it).
    pub fn at_boundary(&self) -> bool {
        self.line == Line::Start
            && !self.in_event
            && !self.last_cr
            && (self.bom_matched == 0 || self.bom_matched == BOM_DONE)
    }

    /// Total events completed so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Value of the last `id` field seen (per the WHATWG rule: an `id` field whose value contains
    /// NUL is ignored), as raw bytes; None if no id field seen yet. An `id:` with an empty value
    /// sets it to Some(b"").
    ///
    /// `id` values longer than [`MAX_ID_LEN`] bytes are ignored as well.
    pub fn last_event_id(&self) -> Option<&[u8]> {
        self.id.get()
    }

    fn start_field(&mut self, line: Line) {
        self.in_event = true;
        self.line = line;
    }

    fn end_line(&mut self, eol: u8) {
        self.line = Line::Start;
        self.last_cr = eol == b'\r';
    }

    /// Consume a (possibly split) BOM at the start of the stream; returns bytes consumed.
    fn skip_bom(&mut self, chunk: &[u8]) -> usize {
        let mut i = 0;
        while self.bom_matched < BOM_DONE && i < chunk.len() {
            if chunk[i] == BOM[self.bom_matched as usize] {
                self.bom_matched += 1;
                i += 1;
            } else {
                if self.bom_matched > 0 {
                    // A partial BOM is not a BOM: its bytes start a line with an unknown field
                    // name; `chunk[i]` continues that line.
                    self.start_field(Line::Skip);
                }
                self.bom_matched = BOM_DONE;
            }
        }
        i
    }
}

/// Bit masks of the LF and the CR bytes of a 64-byte block (bit `k` is `block[k]`).
#[cfg(target_arch = "x86_64")]
fn line_ends(block: &[u8; 64]) -> (u64, u64) {
    use std::arch::x86_64::{_mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8};
    let (mut lf, mut cr) = (0u64, 0u64);
    for (k, part) in block.chunks_exact(16).enumerate() {
        // SAFETY: SSE2 is part of the x86_64 baseline; the unaligned load reads the 16 bytes
        // of `part`.
        let (l, c) = unsafe {
            let v = _mm_loadu_si128(part.as_ptr().cast());
            (
                _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8))),
                _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\r' as i8))),
            )
        };
        lf |= u64::from(l as u16) << (16 * k);
        cr |= u64::from(c as u16) << (16 * k);
    }
    (lf, cr)
}

/// The value of an `id` line (`id`, `id:VALUE` or `id: VALUE`), unchecked; None for any
/// other line.
#[inline(always)]
fn id_value(line: &[u8]) -> Option<&[u8]> {
    match line.strip_prefix(b"id")?.split_first() {
        None => Some(b""),
        Some((b':', value)) => Some(value.strip_prefix(b" ").unwrap_or(value)),
        Some(_) => None,
    }
}

/// Whether clients take an `id` value: no NUL (the WHATWG rule) and at most [`MAX_ID_LEN`]
/// bytes (ssegate's own limit).
fn valid_id(value: &[u8]) -> bool {
    value.len() <= MAX_ID_LEN && !value.contains(&0)
}

/// [`line_ends`] with AVX2: two 32-byte compares per byte value. Callable (safely) only
/// from code compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn line_ends_avx2(block: &[u8; 64]) -> (u64, u64) {
    use std::arch::x86_64::{
        _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_set1_epi8,
    };
    // SAFETY: the two unaligned loads read the 64 bytes of `block`.
    let (lo, hi) = unsafe {
        (
            _mm256_loadu_si256(block.as_ptr().cast()),
            _mm256_loadu_si256(block.as_ptr().add(32).cast()),
        )
    };
    let mask = |byte: u8| {
        let b = _mm256_set1_epi8(byte as i8);
        let l = _mm256_movemask_epi8(_mm256_cmpeq_epi8(lo, b)) as u32;
        let h = _mm256_movemask_epi8(_mm256_cmpeq_epi8(hi, b)) as u32;
        u64::from(l) | (u64::from(h) << 32)
    };
    (mask(b'\n'), mask(b'\r'))
}

/// Bit masks of the LF and the CR bytes of a 64-byte block (bit `k` is `block[k]`).
#[cfg(any(test, not(target_arch = "x86_64")))]
fn line_ends_scalar(block: &[u8; 64]) -> (u64, u64) {
    let (mut lf, mut cr) = (0u64, 0u64);
    for (k, &b) in block.iter().enumerate() {
        lf |= u64::from(b == b'\n') << k;
        cr |= u64::from(b == b'\r') << k;
    }
    (lf, cr)
}

#[cfg(not(target_arch = "x86_64"))]
use line_ends_scalar as line_ends;

/// Error for field values that would break framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    /// A single-line field (`id`, `event`) contained CR or LF.
    #[error("SSE {field} must not contain CR or LF")]
    NewlineInField {
        /// The offending field name.
        field: &'static str,
    },
    /// An `id` contained NUL, which clients ignore.
    #[error("SSE id must not contain NUL")]
    NulInId,
}

fn check_single_line(field: &'static str, value: &str) -> Result<(), FieldError> {
    match memchr2(b'\r', b'\n', value.as_bytes()) {
        Some(_) => Err(FieldError::NewlineInField { field }),
        None => Ok(()),
    }
}

/// Append one event to `out` (a `bytes::BytesMut`): optional `id:` and `event:` lines (values must not
/// contain CR/LF → Err, and id must not contain NUL), then `data:` — one `data:` line per line of
/// `data` (split on LF, CRLF, or CR so multi-line data round-trips), then a blank line.
/// `data` empty → a single `data:` line (still an event). Use "data: " with one space after the colon.
///
/// On error nothing is appended.
pub fn write_event(
    out: &mut BytesMut,
    id: Option<&str>,
    event: Option<&str>,
    data: &str,
) -> Result<(), FieldError> {
    if let Some(id) = id {
        check_single_line("id", id)?;
        if memchr(0, id.as_bytes()).is_some() {
            return Err(FieldError::NulInId);
        }
    }
    if let Some(event) = event {
        check_single_line("event", event)?;
    }
    out.reserve(id.map_or(0, |v| v.len() + 5) + event.map_or(0, |v| v.len() + 8) + data.len() + 8);
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\n");
    }
    if let Some(event) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(b"\n");
    }
    let mut rest = data.as_bytes();
    loop {
        out.extend_from_slice(b"data: ");
        match memchr2(b'\r', b'\n', rest) {
            Some(k) => {
                out.extend_from_slice(&rest[..k]);
                out.extend_from_slice(b"\n");
                let eol_len = if rest[k] == b'\r' && rest.get(k + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[k + eol_len..];
            }
            None => {
                out.extend_from_slice(rest);
                out.extend_from_slice(b"\n");
                break;
            }
        }
    }
    out.extend_from_slice(b"\n");
    Ok(())
}

/// Append a `retry: <ms>` line followed by a blank line.
pub fn write_retry(out: &mut BytesMut, millis: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = millis;
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.reserve(7 + (digits.len() - at) + 2);
    out.extend_from_slice(b"retry: ");
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    // ----- Reference: a naive, byte-at-a-time WHATWG parser with full line buffering. -----

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct RefEvent {
        ty: Vec<u8>,
        data: Vec<u8>,
        id: Option<Vec<u8>>,
    }

    #[derive(Debug)]
    struct RefOut {
        events: Vec<RefEvent>,
        last_id: Option<Vec<u8>>,
        /// `events_after[p]`: events dispatched within the first `p` bytes.
        events_after: Vec<usize>,
        /// `safe_after[p]`: structurally safe injection point after the first `p` bytes.
        safe_after: Vec<bool>,
    }

    fn reference(s: &[u8]) -> RefOut {
        let start = if s.starts_with(&BOM) { 3 } else { 0 };
        let mut out = RefOut {
            events: Vec::new(),
            last_id: None,
            events_after: vec![0; start + 1],
            safe_after: vec![false; start + 1],
        };
        out.safe_after[0] = true;
        out.safe_after[start] = true;
        let mut line = Vec::new();
        let mut in_line = false;
        let mut prev_cr = false;
        let mut block_has_field = false;
        let mut data = Vec::new();
        let mut ty = Vec::new();
        for &b in &s[start..] {
            if prev_cr && b == b'\n' {
                prev_cr = false;
            } else if b == b'\r' || b == b'\n' {
                prev_cr = b == b'\r';
                in_line = false;
                if line.is_empty() {
                    if !data.is_empty() {
                        data.pop(); // trailing LF
                        out.events.push(RefEvent {
                            ty: if ty.is_empty() {
                                b"message".to_vec()
                            } else {
                                ty.clone()
                            },
                            data: std::mem::take(&mut data),
                            id: out.last_id.clone(),
                        });
                    }
                    data.clear();
                    ty.clear();
                    block_has_field = false;
                } else if line[0] != b':' {
                    block_has_field = true;
                    let (name, value) = match line.iter().position(|&c| c == b':') {
                        Some(k) => (&line[..k], &line[k + 1..]),
                        None => (&line[..], &[][..]),
                    };
                    let value = value.strip_prefix(b" ").unwrap_or(value);
                    match name {
                        b"data" => {
                            data.extend_from_slice(value);
                            data.push(b'\n');
                        }
                        b"event" => ty = value.to_vec(),
                        // Our documented deviation: over-long ids are ignored too.
                        b"id" if !value.contains(&0) && value.len() <= MAX_ID_LEN => {
                            out.last_id = Some(value.to_vec())
                        }
                        _ => {}
                    }
                }
                line.clear();
            } else {
                prev_cr = false;
                in_line = true;
                line.push(b);
            }
            out.events_after.push(out.events.len());
            out.safe_after
                .push(!in_line && !prev_cr && !block_has_field);
        }
        out
    }

    /// Semantic oracle: injecting KEEPALIVE after `p` bytes changes nothing the client observes.
    fn injection_harmless(s: &[u8], p: usize) -> bool {
        let mut t = s[..p].to_vec();
        t.extend_from_slice(KEEPALIVE);
        t.extend_from_slice(&s[p..]);
        let (a, b) = (reference(s), reference(&t));
        a.events == b.events && a.last_id == b.last_id
    }

    /// Printable, bounded rendering of a test stream for assertion messages.
    fn show(s: &[u8]) -> String {
        let mut out = s.escape_ascii().to_string();
        if out.len() > 120 {
            out.truncate(120);
            out.push_str("...");
        }
        out
    }

    /// Feed `s` split at `cuts` (sorted), checking every piece against the reference.
    fn check_pieces(s: &[u8], r: &RefOut, cuts: &[usize]) -> Framer {
        let mut f = Framer::new();
        let mut prev = 0;
        for &cut in cuts.iter().chain(std::iter::once(&s.len())) {
            let got = f.feed(&s[prev..cut]);
            let want = r.events_after[cut] - r.events_after[prev];
            assert_eq!(
                got as usize,
                want,
                "events in piece {prev}..{cut} of {} cuts {cuts:?}",
                show(s)
            );
            assert_eq!(
                f.events() as usize,
                r.events_after[cut],
                "{} cuts {cuts:?}",
                show(s)
            );
            assert_eq!(
                f.at_boundary(),
                r.safe_after[cut],
                "at_boundary after {cut} bytes of {} (cuts {cuts:?})",
                show(s)
            );
            prev = cut;
        }
        assert_eq!(
            f.last_event_id(),
            r.last_id.as_deref(),
            "{} cuts {cuts:?}",
            show(s)
        );
        f
    }

    /// Whole stream, every single split, every byte-at-a-time prefix, and (for short streams)
    /// every pair of splits; plus soundness of the structural reference against the semantic one.
    fn check_all_splits(s: &[u8]) -> RefOut {
        let r = reference(s);
        assert_eq!(r.events_after.len(), s.len() + 1);
        check_pieces(s, &r, &[]);
        let all: Vec<usize> = (1..s.len()).collect();
        check_pieces(s, &r, &all);
        for a in 0..=s.len() {
            check_pieces(s, &r, &[a]);
        }
        if s.len() <= 48 {
            for a in 0..=s.len() {
                for b in a..=s.len() {
                    check_pieces(s, &r, &[a, b]);
                }
            }
        }
        for p in 0..=s.len() {
            // At p == 0 a BOM that follows cannot be foreseen; at_boundary() is true there by
            // contract.
            if r.safe_after[p] && !(p == 0 && s.first() == Some(&0xEF)) {
                assert!(
                    injection_harmless(s, p),
                    "unsafe boundary after {p} bytes of {}",
                    show(s)
                );
            }
        }
        r
    }

    fn check_vector(s: &[u8], events: u64, last_id: Option<&[u8]>, boundary: bool) {
        let r = check_all_splits(s);
        let mut f = Framer::new();
        assert_eq!(u64::from(f.feed(s)), events, "events in {}", show(s));
        assert_eq!(f.events(), events, "{}", show(s));
        assert_eq!(
            r.events.len() as u64,
            events,
            "reference disagrees on {}",
            show(s)
        );
        assert_eq!(f.last_event_id(), last_id, "{}", show(s));
        assert_eq!(
            f.at_boundary(),
            boundary,
            "final at_boundary of {}",
            show(s)
        );
    }

    /// (stream, events, last id, final at_boundary)
    type Vector<'a> = (Vec<u8>, u64, Option<&'a [u8]>, bool);
    /// (event type, data, last event id) of a dispatched event
    type Seen<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);

    #[test]
    fn vectors() {
        let bom = |s: &[u8]| [&BOM[..], s].concat();
        let vectors: Vec<Vector<'_>> = vec![
            (b"".to_vec(), 0, None, true),
            (b"data: a\n\ndata: b\n\n".to_vec(), 2, None, true),
            (b"data: a\r\n\r\ndata: b\r\n\r\n".to_vec(), 2, None, true),
            (b"data: a\r\rdata: b\r\r".to_vec(), 2, None, false),
            (
                b"data: a\r\n\ndata: b\r\rdata: c\n\r\n".to_vec(),
                3,
                None,
                true,
            ),
            (b"data: a\n\rdata: b\r\n\n".to_vec(), 2, None, true),
            (b"data: l1\ndata: l2\ndata:l3\n\n".to_vec(), 1, None, true),
            (
                b": hello\n: world\n\n:x\ndata: y\n\n: trailing\n".to_vec(),
                1,
                None,
                true,
            ),
            (b":\n:\r\n:\r".to_vec(), 0, None, false),
            (
                b"id: 1\nevent: up\nretry: 10\ndata: x\n\nid: 2\n\nretry: 5\n\nevent: e\n\n"
                    .to_vec(),
                1,
                Some(b"2"),
                true,
            ),
            (b"data\n\ndata:\n\ndata: \n\n".to_vec(), 3, None, true),
            (bom(b"data: x\n\n"), 1, None, true),
            (bom(b"id: 5\n"), 0, Some(b"5"), false),
            (bom(b""), 0, None, true),
            (BOM[..2].to_vec(), 0, None, false),
            (bom(&bom(b"data: x\n\n")), 0, None, true),
            (b"\xEF\xBBdata: x\n\n".to_vec(), 0, None, true),
            (b"\xEF\n\ndata: x\n\n".to_vec(), 1, None, true),
            (
                b"data: x\n\n\xEF\xBB\xBFdata: y\n\n".to_vec(),
                1,
                None,
                true,
            ),
            (
                b"id: 1\ndata: a\n\nid: 2\0x\ndata: b\n\n".to_vec(),
                2,
                Some(b"1"),
                true,
            ),
            (b"id: \0\n".to_vec(), 0, None, false),
            (
                b"Data: x\n\nfoo: bar\n\ndatax: 1\n\n data: 2\n\ndat\n\nd\n\n".to_vec(),
                0,
                None,
                true,
            ),
            (b"data\n\n".to_vec(), 1, None, true),
            (b"data\r".to_vec(), 0, None, false),
            (b"data: a\n\ndata: b\n".to_vec(), 1, None, false),
            (b"data: a\n\ndata: b".to_vec(), 1, None, false),
            (b"data: a\n\ndata: b\r\n".to_vec(), 1, None, false),
            (b"id\n".to_vec(), 0, Some(b""), false),
            (b"id: 7\nid:\n\n".to_vec(), 0, Some(b""), true),
            (b"id:  x \n".to_vec(), 0, Some(b" x "), false),
            (b"id:x\r".to_vec(), 0, Some(b"x"), false),
            (b"id: a:b\n".to_vec(), 0, Some(b"a:b"), false),
            (b"idx: 1\nid : 2\n\n".to_vec(), 0, None, true),
            (b"id: 1\nid: 2".to_vec(), 0, Some(b"1"), false),
            (b"\n\n\r\n\r".to_vec(), 0, None, false),
        ];
        for (s, events, last_id, boundary) in &vectors {
            check_vector(s, *events, *last_id, *boundary);
        }
    }

    #[test]
    fn long_ids() {
        let long = |n: usize, c: u8| vec![c; n];
        let line = |v: &[u8]| [b"id: ", v, b"\n"].concat();
        // Inline and heap committed ids, and pending values that spill because of the committed one.
        for (a, b) in [
            (10, 60),
            (60, 60),
            (64, 64),
            (65, 3),
            (3, 65),
            (200, 200),
            (1024, 5),
        ] {
            let s = [
                line(&long(a, b'a')),
                line(&long(b, b'b')),
                b"data: x\n\n".to_vec(),
            ]
            .concat();
            check_vector(&s, 1, Some(&long(b, b'b')), true);
        }
        // Over-long ids are ignored like ids with NUL; the previous id stays.
        for n in [MAX_ID_LEN + 1, 3000] {
            let s = [line(b"keep"), line(&long(n, b'z')), b"data: x\n\n".to_vec()].concat();
            check_vector(&s, 1, Some(b"keep"), true);
            let s = [line(&long(100, b'k')), line(&long(n, b'z'))].concat();
            check_vector(&s, 0, Some(&long(100, b'k')), false);
        }
        // NUL arriving in a later chunk of a long id.
        let s = [
            line(b"keep"),
            b"id: ".to_vec(),
            long(100, b'q'),
            b"\0q\n".to_vec(),
        ]
        .concat();
        check_vector(&s, 0, Some(b"keep"), false);
        // A poisoned pending value after a heap-stored id must not leave bytes behind.
        let s = [line(&long(70, b'a')), line(b"qqqqq\0"), line(b"xyz")].concat();
        check_vector(&s, 0, Some(b"xyz"), false);
        // Exactly MAX_ID_LEN is still recorded.
        let s = line(&long(MAX_ID_LEN, b'm'));
        let mut f = Framer::new();
        f.feed(&s);
        assert_eq!(f.last_event_id(), Some(&long(MAX_ID_LEN, b'm')[..]));
    }

    #[test]
    fn split_field_name() {
        let mut f = Framer::new();
        assert_eq!(f.feed(b"i"), 0);
        assert!(!f.at_boundary());
        f.feed(b"d: 7\n");
        assert_eq!(f.last_event_id(), Some(&b"7"[..]));
        f.feed(b"da");
        f.feed(b"ta");
        assert_eq!(f.feed(b"\n\n"), 1);
        assert!(f.at_boundary());
    }

    #[test]
    fn boundary_cases() {
        let at = |s: &[u8]| {
            let mut f = Framer::new();
            f.feed(s);
            f.at_boundary()
        };
        assert!(at(b""));
        assert!(!at(b"data: x\r"));
        assert!(!at(b"data: x\r\r"));
        assert!(at(b"data: x\n\n"));
        assert!(at(b"data: x\r\r\n"));
        assert!(!at(b"data: x\n"));
        assert!(at(b": c\n"));
        assert!(!at(b": c"));
        assert!(!at(b"id: 1\n"));
        assert!(!at(b"event: e\n"));
        assert!(!at(b"retry: 1\n"));
        assert!(!at(b"foo\n"));
        assert!(at(b"id: 1\n\n"));
    }

    /// 2,000 pseudo-random 64-byte blocks of LF, CR, NUL and other bytes.
    fn random_blocks(mut state: u64) -> impl Iterator<Item = [u8; 64]> {
        (0..2000).map(move |_| {
            let mut block = [0u8; 64];
            for b in &mut block {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = b"\n\rxd\0\xff"[(state % 6) as usize];
            }
            block
        })
    }

    #[test]
    fn line_end_masks_match_the_scalar_ones() {
        for block in random_blocks(0x2545_F491_4F6C_DD1D) {
            assert_eq!(line_ends(&block), line_ends_scalar(&block), "{block:?}");
        }
        let mut block = [b'x'; 64];
        block[0] = b'\n';
        block[63] = b'\r';
        assert_eq!(line_ends(&block), (1, 1 << 63));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_masks_match_the_scalar_ones() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for block in random_blocks(0x9E37_79B9_7F4A_7C15) {
            // SAFETY: AVX2 was detected above.
            let avx2 = unsafe { line_ends_avx2(&block) };
            assert_eq!(avx2, line_ends_scalar(&block), "{block:?}");
        }
    }

    #[test]
    fn an_invalid_last_id_leaves_the_last_valid_one_of_the_chunk() {
        // One chunk, no CR: the line-at-a-time path checks only the last id, then looks back.
        let mut f = Framer::new();
        assert_eq!(
            f.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: x\0y\ndata: c\n\n"),
            3
        );
        assert_eq!(f.last_event_id(), Some(&b"2"[..]));
        let long = format!("id: {}\ndata: d\n\n", "9".repeat(MAX_ID_LEN + 1));
        f.feed(long.as_bytes());
        assert_eq!(
            f.last_event_id(),
            Some(&b"2"[..]),
            "none valid in the chunk: kept"
        );
        f.feed(b"id\ndata: e\n\n");
        assert_eq!(f.last_event_id(), Some(&b""[..]));
    }

    #[test]
    fn pseudo_random_splits() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabets: [&[u8]; 4] = [
            b"dati\r\n x::",
            b"dataidevnrty:: \r\n\0x\xEF\xBB\xBF",
            // No CR: `feed`'s line-at-a-time path.
            b"dati\n\n x::",
            b"idxxxxxxxxxxxxxxxxxx:\n\0",
        ];
        for (k, alphabet) in alphabets.iter().enumerate() {
            let (count, max_len) = if k == 3 { (300, 400) } else { (3000, 48) };
            for _ in 0..count {
                let len = (next() % (max_len + 1)) as usize;
                let s: Vec<u8> = (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect();
                let r = reference(&s);
                let mut cuts = Vec::new();
                let mut at = 0;
                loop {
                    at += 1 + (next() % 9) as usize;
                    if at >= s.len() {
                        break;
                    }
                    cuts.push(at);
                }
                let whole = check_pieces(&s, &r, &[]);
                let chunked = check_pieces(&s, &r, &cuts);
                assert_eq!(whole.events(), r.events.len() as u64);
                assert_eq!(whole.at_boundary(), chunked.at_boundary());
                assert_eq!(whole.last_event_id(), chunked.last_event_id());
                if k < 3 {
                    for &p in cuts.iter().chain([0, s.len()].iter()) {
                        if r.safe_after[p] && !(p == 0 && s.first() == Some(&0xEF)) {
                            assert!(injection_harmless(&s, p), "{} at {p}", show(&s));
                        }
                    }
                }
            }
        }
    }

    /// Property tests: any bytes, any split, against the reference parser. Bounded: a fixed
    /// number of cases, no persistence files.
    mod proptests {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const TOKENS: &[&[u8]] = &[
            b"data: ",
            b"data:",
            b"id: ",
            b"id:",
            b"event: ",
            b"retry: ",
            b":",
            b": c",
            b"\r",
            b"\n",
            b"\r\n",
            b"\n\n",
            b"x",
            b"42",
            b" ",
            b"\0",
            b"\xEF\xBB\xBF",
            b"\xFF",
        ];

        fn stream() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                vec(any::<u8>(), 0..300),
                vec(
                    prop::sample::select(b"dati:evnry \r\n\0\xEF\xBB\xBF".to_vec()),
                    0..200
                ),
                vec(prop::sample::select(TOKENS), 0..80).prop_map(|t| t.concat()),
                // No CR at all: `feed`'s line-at-a-time path.
                vec(prop::sample::select(TOKENS), 0..80).prop_map(|t| t
                    .concat()
                    .into_iter()
                    .filter(|&b| b != b'\r')
                    .collect()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 1024,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn any_bytes_any_split_decode_like_the_reference(
                s in stream(),
                cuts in vec(any::<prop::sample::Index>(), 0..24),
            ) {
                let r = reference(&s);
                let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(s.len() + 1)).collect();
                cuts.sort_unstable();
                cuts.dedup();
                let whole = check_pieces(&s, &r, &[]);
                let split = check_pieces(&s, &r, &cuts);
                prop_assert_eq!(whole.events(), r.events.len() as u64);
                prop_assert_eq!(whole.last_event_id(), split.last_event_id());
                // Wherever the framer says a keepalive is safe, it is.
                for &p in cuts.iter().chain([s.len()].iter()) {
                    if r.safe_after[p] && !(p == 0 && s.first() == Some(&0xEF)) {
                        prop_assert!(injection_harmless(&s, p), "{} at {}", show(&s), p);
                    }
                }
            }
        }
    }

    #[test]
    fn write_event_round_trips() {
        let mut out = BytesMut::new();
        write_event(&mut out, Some("1"), Some("greet"), "hello").unwrap();
        write_event(&mut out, None, None, "").unwrap();
        write_event(&mut out, Some(""), None, "a\nb\r\nc\rd").unwrap();
        write_event(&mut out, None, Some("x"), " lead\n\ntrail\n").unwrap();
        write_event(&mut out, Some("42"), None, "\r\n").unwrap();
        write_retry(&mut out, 1500);
        let s = &out[..];
        assert!(s.starts_with(b"id: 1\nevent: greet\ndata: hello\n\ndata: \n\n"));
        let r = check_all_splits(s);
        let got: Vec<Seen<'_>> = r
            .events
            .iter()
            .map(|e| (&e.ty[..], &e.data[..], e.id.as_deref()))
            .collect();
        let want: Vec<Seen<'_>> = vec![
            (b"greet", b"hello", Some(b"1")),
            (b"message", b"", Some(b"1")),
            (b"message", b"a\nb\nc\nd", Some(b"")),
            (b"x", b" lead\n\ntrail\n", Some(b"")),
            (b"message", b"\n", Some(b"42")),
        ];
        assert_eq!(got, want);
        let mut f = Framer::new();
        assert_eq!(f.feed(s), 5);
        assert_eq!(f.last_event_id(), Some(&b"42"[..]));
        assert!(f.at_boundary());
    }

    #[test]
    fn write_event_multiline_data() {
        let mut out = BytesMut::new();
        write_event(&mut out, None, None, "a\nb\r\nc\rd").unwrap();
        assert_eq!(&out[..], b"data: a\ndata: b\ndata: c\ndata: d\n\n");
        let mut out = BytesMut::new();
        write_event(&mut out, None, None, "").unwrap();
        assert_eq!(&out[..], b"data: \n\n");
    }

    #[test]
    fn write_event_rejects_bad_fields() {
        let mut out = BytesMut::from(&b"keep"[..]);
        let nl = |field| Err(FieldError::NewlineInField { field });
        assert_eq!(write_event(&mut out, Some("a\nb"), None, "x"), nl("id"));
        assert_eq!(write_event(&mut out, Some("a\rb"), None, "x"), nl("id"));
        assert_eq!(write_event(&mut out, None, Some("e\r\n"), "x"), nl("event"));
        assert_eq!(write_event(&mut out, None, Some("\n"), "x"), nl("event"));
        assert_eq!(
            write_event(&mut out, Some("a\0"), None, "x"),
            Err(FieldError::NulInId)
        );
        assert_eq!(&out[..], b"keep", "nothing appended on error");
        assert_eq!(
            nl("id").unwrap_err().to_string(),
            "SSE id must not contain CR or LF"
        );
    }

    #[test]
    fn write_retry_format() {
        for (ms, want) in [
            (0u64, &b"retry: 0\n\n"[..]),
            (1500, b"retry: 1500\n\n"),
            (u64::MAX, b"retry: 18446744073709551615\n\n"),
        ] {
            let mut out = BytesMut::new();
            write_retry(&mut out, ms);
            assert_eq!(&out[..], want);
            let mut f = Framer::new();
            assert_eq!(f.feed(&out), 0);
            assert!(f.at_boundary());
        }
    }

    #[test]
    fn keepalive_is_harmless_comment() {
        let mut f = Framer::new();
        f.feed(b"id: 3\ndata: x\n\n");
        let before = (f.events(), f.at_boundary());
        f.feed(KEEPALIVE);
        assert_eq!((f.events(), f.at_boundary()), before);
        assert_eq!(f.last_event_id(), Some(&b"3"[..]));
    }

    #[test]
    fn clone_and_debug() {
        let mut f = Framer::new();
        f.feed(b"id: abc\ndata: 1");
        let mut g = f.clone();
        assert_eq!(g.feed(b"\n\n"), 1);
        assert_eq!(f.events(), 0);
        assert!(format!("{g:?}").contains("abc"));
    }

    #[test]
    fn framer_is_small() {
        let size = std::mem::size_of::<Framer>();
        assert!(size <= 96, "size_of::<Framer>() = {size}");
    }
}
