//! Admission limits: the global connection limit and per-client-IP limits (concurrent streams,
//! connection rate).
//!
//! Per-client state lives in a map split into [`SHARDS`] shards, each behind its own `Mutex`.
//! A shard is locked only when the limit that needs it is enabled, and then only for a hash
//! lookup and a few arithmetic operations (nanoseconds) at connection admission, stream
//! admission and stream end; nothing is held across an `.await`, and no lock is taken per
//! event. Memory is bounded: each shard holds at most `max_clients / SHARDS` entries; when
//! full, entries with no open stream are evicted (those whose bucket is full first), so an
//! attacker cycling through addresses cannot grow the map. Entries with open streams are
//! never evicted (their number is bounded by the connection limit).
//!
//! IPv6 clients are keyed by their /64 prefix (one host usually owns a whole /64).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Number of shards of the per-client map.
pub const SHARDS: usize = 32;

/// A token bucket: `rate` tokens per second, up to `burst`. Pure; time is passed in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token at `now`, or says how long until one is available.
    pub fn take(&mut self, now: Instant, rate: f64, burst: u32) -> Result<(), Duration> {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// True when the bucket has refilled completely by `now` (its state is then redundant).
    pub fn is_full(&self, now: Instant, rate: f64, burst: u32) -> bool {
        let mut b = *self;
        b.refill(now, rate, burst);
        b.tokens >= f64::from(burst)
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: u32) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.last = now;
    }
}

/// Per-client limits; `0` disables each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClientLimits {
    /// Concurrent streams per client IP (`--max-streams-per-client`).
    pub max_streams: u32,
    /// New connections per second per client IP (`--client-connect-rate`).
    pub connect_rate: f64,
    /// Connections a client may open at once before the rate applies (`--client-connect-burst`).
    pub connect_burst: u32,
    /// Client IPs tracked at most (bounded memory).
    pub max_clients: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_streams: 0,
            connect_rate: 0.0,
            connect_burst: 0,
            max_clients: 65_536,
        }
    }
}

/// The key a client is limited by: its IPv4 address, or its IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    /// The key of `ip` (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => ClientKey((u128::from(v6) >> 64 << 64) | 1),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    streams: u32,
    bucket: TokenBucket,
}

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientRefusal {
    /// Too many new connections; retry after this long.
    Rate(Duration),
    /// Too many concurrent streams.
    Streams,
}

/// Per-client-IP admission state; see the module docs.
#[derive(Debug)]
pub struct ClientLimiter {
    limits: ClientLimits,
    shards: Box<[Mutex<HashMap<ClientKey, Entry>>]>,
    hasher: RandomState,
}

impl ClientLimiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: ClientLimits) -> Arc<Self> {
        Arc::new(ClientLimiter {
            limits,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ClientLimits {
        &self.limits
    }

    fn shard(&self, key: ClientKey) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Entry>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        // A poisoned shard only means a panic elsewhere; the map itself is always consistent.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry<'a>(
        &self,
        map: &'a mut HashMap<ClientKey, Entry>,
        key: ClientKey,
        now: Instant,
    ) -> &'a mut Entry {
        let (rate, burst) = (self.limits.connect_rate, self.limits.connect_burst.max(1));
        let cap = (self.limits.max_clients / SHARDS).max(1);
        if map.len() >= cap && !map.contains_key(&key) {
            map.retain(|_, e| e.streams > 0 || !e.bucket.is_full(now, rate, burst));
            if map.len() >= cap {
                map.retain(|_, e| e.streams > 0);
            }
        }
        map.entry(key).or_insert(Entry {
            streams: 0,
            bucket: TokenBucket::full(burst, now),
        })
    }

    /// Admits a new connection from `ip` at `now` (the connection-rate limit).
    pub fn admit_connection(&self, ip: IpAddr, now: Instant) -> Result<(), ClientRefusal> {
        if self.limits.connect_rate <= 0.0 {
            return Ok(());
        }
        let key = ClientKey::of(ip);
        let mut map = self.shard(key);
        let (rate, burst) = (self.limits.connect_rate, self.limits.connect_burst.max(1));
        self.entry(&mut map, key, now)
            .bucket
            .take(now, rate, burst)
            .map_err(ClientRefusal::Rate)
    }

    /// Admits a stream from `ip` (the concurrent-stream limit); the slot is released when the
    /// returned value is dropped.
    pub fn admit_stream(self: &Arc<Self>, ip: IpAddr) -> Result<ClientSlot, ClientRefusal> {
        if self.limits.max_streams == 0 {
            return Ok(ClientSlot(None));
        }
        let key = ClientKey::of(ip);
        let mut map = self.shard(key);
        let e = self.entry(&mut map, key, Instant::now());
        if e.streams >= self.limits.max_streams {
            return Err(ClientRefusal::Streams);
        }
        e.streams += 1;
        Ok(ClientSlot(Some((self.clone(), key))))
    }

    /// Client IPs currently tracked.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    fn release(&self, key: ClientKey) {
        let mut map = self.shard(key);
        if let Some(e) = map.get_mut(&key) {
            e.streams = e.streams.saturating_sub(1);
            if e.streams == 0 && self.limits.connect_rate <= 0.0 {
                map.remove(&key);
            }
        }
    }
}

/// One admitted stream of a client; releases its slot when dropped.
#[derive(Debug)]
pub struct ClientSlot(Option<(Arc<ClientLimiter>, ClientKey)>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some((limiter, key)) = self.0.take() {
            limiter.release(key);
        }
    }
}

/// The global limit on open client connections (`--max-connections`, 0 = unlimited).
#[derive(Debug, Default)]
pub struct ConnectionLimit {
    max: usize,
    open: AtomicUsize,
}

impl ConnectionLimit {
    /// A limit of `max` connections (0 = unlimited).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            max,
            open: AtomicUsize::new(0),
        })
    }

    /// Counts a new connection; `None` when the limit is reached.
    pub fn admit(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if self.max > 0 && prev >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionPermit(self.clone()))
    }

    /// Connections currently open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<ConnectionLimit>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        for _ in 0..3 {
            b.take(t0, 2.0, 3).unwrap();
        }
        let wait = b.take(t0, 2.0, 3).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        b.take(t0 + Duration::from_millis(500), 2.0, 3).unwrap();
        assert!(b.take(t0 + Duration::from_millis(500), 2.0, 3).is_err());
        assert!(!b.is_full(t0 + Duration::from_millis(1000), 2.0, 3));
        assert!(b.is_full(t0 + Duration::from_secs(2), 2.0, 3));
        // Never above the burst, however long idle.
        b.take(t0 + Duration::from_secs(3600), 2.0, 3).unwrap();
        b.take(t0 + Duration::from_secs(3600), 2.0, 3).unwrap();
        b.take(t0 + Duration::from_secs(3600), 2.0, 3).unwrap();
        assert!(b.take(t0 + Duration::from_secs(3600), 2.0, 3).is_err());
    }

    #[test]
    fn client_keys_group_ipv6_by_64_and_canonicalise_mapped_v4() {
        assert_eq!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::of(ip("::ffff:10.0.0.1")),
            ClientKey::of(ip("10.0.0.1"))
        );
        assert_ne!(ClientKey::of(ip("10.0.0.1")), ClientKey::of(ip("10.0.0.2")));
    }

    #[tokio::test(start_paused = true)]
    async fn connection_rate_is_per_client() {
        let l = ClientLimiter::new(ClientLimits {
            connect_rate: 1.0,
            connect_burst: 2,
            ..Default::default()
        });
        let now = Instant::now();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        l.admit_connection(a, now).unwrap();
        l.admit_connection(a, now).unwrap();
        assert_eq!(
            l.admit_connection(a, now),
            Err(ClientRefusal::Rate(Duration::from_secs(1)))
        );
        l.admit_connection(b, now).unwrap();
        l.admit_connection(a, now + Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn stream_slots_are_released_on_drop() {
        let l = ClientLimiter::new(ClientLimits {
            max_streams: 2,
            ..Default::default()
        });
        let a = ip("10.0.0.1");
        let s1 = l.admit_stream(a).unwrap();
        let s2 = l.admit_stream(a).unwrap();
        assert_eq!(l.admit_stream(a).unwrap_err(), ClientRefusal::Streams);
        let other = l.admit_stream(ip("10.0.0.2")).unwrap();
        drop(s1);
        let s3 = l.admit_stream(a).unwrap();
        drop((s2, s3, other));
        // Without a rate limit, idle clients leave no state behind.
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn disabled_limits_touch_no_state() {
        let l = ClientLimiter::new(ClientLimits::default());
        let _s: Vec<_> = (0..100)
            .map(|_| l.admit_stream(ip("10.0.0.1")).unwrap())
            .collect();
        for _ in 0..100 {
            l.admit_connection(ip("10.0.0.1"), Instant::now()).unwrap();
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn state_stays_bounded_under_address_churn() {
        let l = ClientLimiter::new(ClientLimits {
            connect_rate: 10.0,
            connect_burst: 5,
            max_streams: 4,
            max_clients: 256,
        });
        let now = Instant::now();
        // One client with an open stream is never evicted.
        let held = l.admit_stream(ip("192.0.2.1")).unwrap();
        for i in 0..100_000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 + i));
            l.admit_connection(addr, now).unwrap();
        }
        assert!(l.tracked() <= 256 + SHARDS, "{}", l.tracked());
        for _ in 0..3 {
            let _ = l.admit_stream(ip("192.0.2.1")).unwrap();
        }
        let s: Vec<_> = (0..3)
            .map(|_| l.admit_stream(ip("192.0.2.1")).unwrap())
            .collect();
        assert!(
            l.admit_stream(ip("192.0.2.1")).is_err(),
            "held slot was evicted"
        );
        drop((held, s));
    }

    #[test]
    fn connection_limit_counts_permits() {
        let c = ConnectionLimit::new(2);
        let a = c.admit().unwrap();
        let _b = c.admit().unwrap();
        assert!(c.admit().is_none());
        assert_eq!(c.open(), 2);
        drop(a);
        assert!(c.admit().is_some());
        let unlimited = ConnectionLimit::new(0);
        let _all: Vec<_> = (0..1000).map(|_| unlimited.admit().unwrap()).collect();
    }
}
