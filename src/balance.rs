//! Endpoint selection for a backend: round robin, least connections and sticky consistent
//! hashing (optionally with bounded loads).
//!
//! A [`Backend`] is the set of ready endpoints of one Service port plus its policy, frozen
//! when the routing table is compiled; it lives inside the table and swaps with it. A request
//! asks it for a [`Backend::plan`] (the endpoints to try, in order) without taking a lock.
//!
//! The per-endpoint state ([`Endpoint`]: open streams through this replica, a retirement
//! signal) is not part of any one table: [`EndpointStore`] interns it per
//! `(backend, address)` across compiles, like the routing `StateStore` does for rules. So
//! least-connections still counts a stream opened under the previous table, and when an
//! endpoint disappears or turns unready the compile that notices it [`Endpoint::retire`]s the
//! shared state, which ends the streams still open on it, each after a `retry:` hint at an
//! event boundary (see `proxy::relay::EndpointBody`).
//!
//! # Consistent hashing: rendezvous (highest random weight)
//!
//! Sticky keys are mapped with rendezvous hashing: every endpoint gets the score
//! `mix(hash(key) ^ hash(endpoint))` and the key goes to the endpoint with the highest score.
//! Chosen over a ketama ring and Maglev because:
//! - *Minimal disruption, exactly.* Removing an endpoint moves only the keys that were on it;
//!   adding one moves only the keys that now score highest on it (about 1/N each way). Maglev
//!   moves a few extra keys on every change, and a ring's balance depends on how many
//!   virtual nodes it carries.
//! - *A natural per-key order.* Sorting the scores gives each key its own preference list,
//!   which is exactly the "next endpoint in the key's hash order" that consistent hashing
//!   with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) and connect fall-over need,
//!   and which is the same on every replica.
//! - *No table to keep.* What compile precomputes is one 64-bit hash per endpoint; there is
//!   no ring or lookup table whose size grows with the endpoint count and whose memory is
//!   duplicated per backend on every table swap. The price is O(N) score computations per
//!   *new stream*; streams last hours and N is the number of pods behind one Service, so
//!   this is noise next to the TCP connect that follows.
//!
//! Every replica must compute the same mapping from the same endpoint set, so the hash is
//! fixed and spelled out here rather than taken from `std` (whose `DefaultHasher` is
//! randomly keyed per process, and whose algorithm may change between Rust releases):
//! [`hash_key`] is 64-bit FNV-1a followed by the MurmurHash3 `fmix64` finalizer; an
//! endpoint hashes as its address text (`10.0.0.1:8080`, `[fd00::1]:8080`). The golden
//! tests below pin key → endpoint results: changing the hash is a deliberate, reviewed
//! event (it re-homes every session).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderMap, HeaderName};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

/// 64-bit FNV-1a of `bytes` followed by MurmurHash3's `fmix64`: the fixed hash of sticky
/// keys and endpoint addresses (see the module docs). Never change it casually.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

/// MurmurHash3's 64-bit finalizer: a bijection with full avalanche.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Rendezvous score of an endpoint for a key; the highest score wins.
fn score(key: u64, endpoint: u64) -> u64 {
    fmix64(key ^ endpoint)
}

/// One endpoint's state, shared by every table version that contains it.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    hash: u64,
    active: AtomicUsize,
    retired: AtomicBool,
    retire: Arc<Notify>,
}

impl Endpoint {
    /// Fresh state for `addr`: no streams, not retired.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Endpoint {
            addr,
            hash: hash_key(addr.to_string().as_bytes()),
            active: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            retire: Arc::new(Notify::new()),
        })
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Streams (and connect attempts) open on this endpoint through this replica.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// True once the endpoint has disappeared or turned unready.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Marks the endpoint gone and wakes every stream watching [`Endpoint::retired`].
    /// Idempotent.
    pub fn retire(&self) {
        if !self.retired.swap(true, Ordering::AcqRel) {
            self.retire.notify_waiters();
        }
    }

    /// A future that completes when the endpoint is retired after this call. Check
    /// [`Endpoint::is_retired`] after creating it to cover a retirement that came before.
    pub fn retired(&self) -> OwnedNotified {
        self.retire.clone().notified_owned()
    }
}

/// One stream (or connect attempt) on an endpoint: counted in [`Endpoint::active`] for as
/// long as it lives.
#[derive(Debug)]
pub struct EndpointLease {
    endpoint: Arc<Endpoint>,
}

impl EndpointLease {
    /// Counts one more stream on `endpoint`.
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.active.fetch_add(1, Ordering::AcqRel);
        EndpointLease { endpoint }
    }

    /// The endpoint this lease counts on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for EndpointLease {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Interns [`Endpoint`] state per `(backend, address)` across compiles, and retires the
/// endpoints a compile no longer finds ready.
#[derive(Debug, Default)]
pub struct EndpointStore {
    endpoints: Mutex<HashMap<(String, SocketAddr), Arc<Endpoint>>>,
}

impl EndpointStore {
    /// The shared state of `addr` in `backend` (`namespace/service:port`), created on first
    /// use.
    pub fn endpoint(&self, backend: &str, addr: SocketAddr) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((backend.to_string(), addr))
            .or_insert_with(|| Endpoint::new(addr))
            .clone()
    }

    /// Ends a compile. `resolved` are the backends whose ready endpoints this compile knows
    /// (their Service and port resolved); `live` are the `(backend, address)` pairs in the
    /// new table. Endpoints of a resolved backend that are not live disappeared or turned
    /// unready: they are retired (their open streams end) and forgotten. Endpoints of
    /// backends nobody resolved (e.g. a route was deleted) keep their streams; they are
    /// forgotten once they have none.
    pub fn sweep(&self, resolved: &HashSet<String>, live: &HashSet<(String, SocketAddr)>) {
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|key, ep| {
            if live.contains(key) {
                return true;
            }
            if resolved.contains(&key.0) {
                ep.retire();
                return false;
            }
            ep.active() > 0
        });
    }

    /// Number of interned endpoints (for tests and debugging).
    pub fn len(&self) -> usize {
        self.endpoints.lock().map_or(0, |m| m.len())
    }

    /// True when no endpoint is interned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a sticky rule finds its session key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The first value of a request header.
    Header(HeaderName),
    /// A cookie's value; ssegate issues the cookie when it is missing.
    Cookie(Box<str>),
    /// A query parameter's raw (not percent-decoded) value.
    Query(Box<str>),
    /// The client's IP address (the TCP peer), IPv4-mapped IPv6 taken as IPv4.
    SourceIp,
}

impl KeySource {
    /// The hashed session key of a request, or `None` when the request does not carry it
    /// (or carries it empty).
    pub fn key_hash(&self, headers: &HeaderMap, query: Option<&str>, peer: IpAddr) -> Option<u64> {
        let value: &[u8] = match self {
            KeySource::Header(name) => headers.get(name)?.as_bytes(),
            KeySource::Cookie(name) => cookie_value(headers, name)?,
            KeySource::Query(name) => query_value(query?, name)?,
            KeySource::SourceIp => {
                return Some(match peer.to_canonical() {
                    IpAddr::V4(v4) => hash_key(&v4.octets()),
                    IpAddr::V6(v6) => hash_key(&v6.octets()),
                });
            }
        };
        (!value.is_empty()).then(|| hash_key(value))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2 may send several).
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// The raw value of parameter `name` in a query string.
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a [u8]> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v.as_bytes())
    })
}

/// How a backend chooses the endpoint of a new stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    /// The next endpoint in turn.
    RoundRobin,
    /// The endpoint with the fewest open streams through this replica (ties in turn).
    LeastConnections,
    /// Rendezvous hashing of a session key; round robin for requests without the key.
    Sticky {
        /// Where the key comes from.
        key: KeySource,
        /// `Some(c)`: no endpoint takes more than `ceil(c * mean)` streams.
        bounded_load: Option<f64>,
    },
}

impl Policy {
    /// The key source of a sticky policy.
    pub fn key_source(&self) -> Option<&KeySource> {
        match self {
            Policy::Sticky { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The ready endpoints of one Service port and the policy that chooses among them.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/service:port`, for logs and errors.
    pub name: String,
    /// Ready endpoints, sorted by address and de-duplicated so every replica sees the
    /// same order.
    endpoints: Vec<Arc<Endpoint>>,
    policy: Policy,
    next: AtomicUsize,
}

impl Backend {
    /// A backend over `endpoints` (sorted and de-duplicated here) choosing by `policy`.
    pub fn new(name: impl Into<String>, policy: Policy, mut endpoints: Vec<Arc<Endpoint>>) -> Self {
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        Backend {
            name: name.into(),
            endpoints,
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// A round-robin backend over fresh (not interned) endpoint state.
    pub fn round_robin(name: impl Into<String>, addrs: Vec<SocketAddr>) -> Self {
        Self::new(
            name,
            Policy::RoundRobin,
            addrs.into_iter().map(Endpoint::new).collect(),
        )
    }

    /// The ready endpoints, in their canonical order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The ready endpoint addresses, in their canonical order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.endpoints.iter().map(|e| e.addr).collect()
    }

    /// The selection policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// True when there is nothing to send a request to.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Up to `n` distinct endpoints to try for a new stream, best first; the rest are the
    /// fall-over order for connect failures. `key` is the hashed session key of a sticky
    /// rule ([`KeySource::key_hash`]); without it a sticky backend balances round robin.
    /// Retired endpoints (gone in a table being published right now) are skipped.
    pub fn plan(&self, key: Option<u64>, n: usize) -> Vec<Arc<Endpoint>> {
        let live = || self.endpoints.iter().filter(|e| !e.is_retired());
        match (&self.policy, key) {
            (Policy::Sticky { bounded_load, .. }, Some(key)) => {
                let mut order: Vec<(u64, &Arc<Endpoint>)> =
                    live().map(|e| (score(key, e.hash), e)).collect();
                order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.addr.cmp(&b.1.addr)));
                if let Some(c) = bounded_load {
                    let mut loaded: Vec<(usize, &Arc<Endpoint>)> =
                        order.iter().map(|(_, e)| (e.active(), *e)).collect();
                    let cap = capacity(*c, loaded.iter().map(|(l, _)| l).sum(), loaded.len());
                    // Stable: endpoints under the bound first, each group in hash order.
                    loaded.sort_by_key(|(load, _)| *load >= cap);
                    return loaded.into_iter().take(n).map(|(_, e)| e.clone()).collect();
                }
                order.into_iter().take(n).map(|(_, e)| e.clone()).collect()
            }
            (Policy::LeastConnections, _) => {
                let mut order: Vec<(usize, &Arc<Endpoint>)> =
                    self.rotation().map(|e| (e.active(), e)).collect();
                // Stable sort: ties keep the rotation order, so they are taken in turn.
                order.sort_by_key(|(load, _)| *load);
                order.into_iter().take(n).map(|(_, e)| e.clone()).collect()
            }
            _ => self.rotation().take(n).cloned().collect(),
        }
    }

    /// The live endpoints starting at the next round-robin position.
    fn rotation(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        let len = self.endpoints.len();
        let start = if len == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % len
        };
        (0..len)
            .map(move |k| &self.endpoints[(start + k) % len])
            .filter(|e| !e.is_retired())
    }

    /// Most open streams on one endpoint divided by the mean over the ready endpoints;
    /// `None` while no stream is open.
    pub fn max_over_mean(&self) -> Option<f64> {
        let mut total = 0usize;
        let mut max = 0usize;
        let mut n = 0usize;
        for e in self.endpoints.iter().filter(|e| !e.is_retired()) {
            let a = e.active();
            total += a;
            max = max.max(a);
            n += 1;
        }
        (total > 0).then(|| max as f64 * n as f64 / total as f64)
    }
}

impl crate::metrics::BalanceSource for Backend {
    fn max_over_mean(&self) -> Option<f64> {
        Backend::max_over_mean(self)
    }
}

/// Streams one endpoint may hold when the next stream arrives: `ceil(c * (m + 1) / n)` for
/// `m` open streams over `n` endpoints (consistent hashing with bounded loads). At least 1.
fn capacity(c: f64, open: usize, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let cap = (c * (open + 1) as f64 / n as f64).ceil();
    (cap as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8080))
    }

    fn sticky(bounded_load: Option<f64>, eps: impl IntoIterator<Item = u8>) -> Backend {
        Backend::new(
            "apps/svc:80",
            Policy::Sticky {
                key: KeySource::Header(HeaderName::from_static("x-user-id")),
                bounded_load,
            },
            eps.into_iter().map(|i| Endpoint::new(addr(i))).collect(),
        )
    }

    /// Where each of `keys` goes.
    fn mapping(b: &Backend, keys: &[String]) -> Vec<SocketAddr> {
        keys.iter()
            .map(|k| b.plan(Some(hash_key(k.as_bytes())), 1)[0].addr())
            .collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    fn one(b: &Backend) -> SocketAddr {
        b.plan(None, 1)[0].addr()
    }

    #[test]
    fn round_robin_visits_every_endpoint_evenly() {
        let b = Backend::round_robin("apps/svc:8080", vec![addr(3), addr(1), addr(2)]);
        let mut counts = HashMap::new();
        for _ in 0..300 {
            *counts.entry(one(&b)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&c| c == 100), "{counts:?}");
    }

    #[test]
    fn endpoints_are_canonical() {
        let b = Backend::round_robin("x", vec![addr(2), addr(1), addr(2)]);
        assert_eq!(b.addrs(), vec![addr(1), addr(2)]);
    }

    #[test]
    fn empty_backend_plans_nothing() {
        for policy in [Policy::RoundRobin, Policy::LeastConnections] {
            let b = Backend::new("x", policy, vec![]);
            assert!(b.plan(None, 3).is_empty());
        }
        assert!(sticky(Some(1.25), []).plan(Some(1), 3).is_empty());
        assert_eq!(sticky(None, []).max_over_mean(), None);
    }

    #[test]
    fn plans_are_distinct_and_bounded() {
        for b in [
            Backend::round_robin("x", vec![addr(1), addr(2), addr(3)]),
            sticky(None, 1..=3),
            sticky(Some(1.1), 1..=3),
        ] {
            for key in [None, Some(7)] {
                let mut c: Vec<SocketAddr> = b.plan(key, 5).iter().map(|e| e.addr()).collect();
                assert_eq!(c.len(), 3);
                c.sort();
                c.dedup();
                assert_eq!(c.len(), 3);
                assert_eq!(b.plan(key, 2).len(), 2);
            }
        }
    }

    #[test]
    fn retired_endpoints_get_no_new_streams() {
        let b = sticky(None, 1..=3);
        b.endpoints()[1].retire();
        for k in keys(200) {
            let plan = b.plan(Some(hash_key(k.as_bytes())), 3);
            assert_eq!(plan.len(), 2);
            assert!(plan.iter().all(|e| e.addr() != addr(2)));
        }
        assert!(b.plan(None, 3).iter().all(|e| e.addr() != addr(2)));
    }

    #[test]
    fn hash_is_fixed() {
        // FNV-1a 64 test vectors, through fmix64.
        assert_eq!(hash_key(b""), fmix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash_key(b"a"), fmix64(0xaf63_dc4c_8601_ec8c));
        assert_eq!(hash_key(b"foobar"), fmix64(0x8594_4171_f739_67e8));
        assert_eq!(hash_key(b"user-0"), 891_071_719_710_467_650);
    }

    /// Golden data: a fixed key maps to a fixed endpoint. If this fails, the hash or the
    /// scoring changed, and every sticky session would move to another pod on upgrade
    /// (and replicas on different versions would disagree) - change it only on purpose.
    #[test]
    fn golden_key_to_endpoint_values() {
        let b = sticky(None, 1..=10);
        let got: Vec<u8> = mapping(&b, &keys(12))
            .iter()
            .map(|a| match a.ip() {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => unreachable!(),
            })
            .collect();
        assert_eq!(got, vec![5, 5, 5, 6, 3, 5, 4, 2, 10, 7, 10, 5]);
    }

    #[test]
    fn ten_thousand_keys_spread_within_ten_percent_of_even() {
        let b = sticky(None, 1..=10);
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for a in mapping(&b, &keys(10_000)) {
            *counts.entry(a).or_default() += 1;
        }
        assert_eq!(counts.len(), 10);
        for (a, c) in &counts {
            assert!((900..=1100).contains(c), "{a}: {c} keys ({counts:?})");
        }
    }

    #[test]
    fn removing_one_of_ten_moves_only_its_keys() {
        let keys = keys(10_000);
        let before = mapping(&sticky(None, 1..=10), &keys);
        let after = mapping(&sticky(None, (1..=10).filter(|&i| i != 4)), &keys);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*b, addr(4), "a key moved off a surviving endpoint");
                moved += 1;
            } else {
                assert_ne!(*b, addr(4));
            }
        }
        // About 1/N of the keys, and exactly those that were on the removed endpoint.
        assert!((800..=1200).contains(&moved), "{moved} moved");
    }

    #[test]
    fn adding_an_eleventh_moves_only_keys_to_it() {
        let keys = keys(10_000);
        let before = mapping(&sticky(None, 1..=10), &keys);
        let after = mapping(&sticky(None, 1..=11), &keys);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*a, addr(11), "a key moved between old endpoints");
                moved += 1;
            }
        }
        // 1/11 of 10k is ~909.
        assert!((727..=1091).contains(&moved), "{moved} moved");
    }

    #[test]
    fn same_endpoint_set_same_mapping_regardless_of_order_or_state() {
        let keys = keys(500);
        let a = sticky(None, 1..=6);
        let b = sticky(None, [6, 2, 4, 1, 5, 3, 3]);
        // Load on an unbounded sticky backend changes nothing.
        let _leases: Vec<_> = (0..5)
            .map(|_| EndpointLease::new(b.endpoints()[0].clone()))
            .collect();
        assert_eq!(mapping(&a, &keys), mapping(&b, &keys));
    }

    #[test]
    fn bounded_load_caps_a_hot_key_and_spills_in_hash_order() {
        let c = 1.25;
        let b = sticky(Some(c), 1..=10);
        let key = hash_key(b"hot-user");
        let order: Vec<SocketAddr> = sticky(None, 1..=10)
            .plan(Some(key), 10)
            .iter()
            .map(|e| e.addr())
            .collect();
        let mut leases = Vec::new();
        for i in 0..200usize {
            let chosen = b.plan(Some(key), 1)[0].clone();
            let cap = capacity(c, i, 10);
            assert!(chosen.active() < cap, "stream {i}: {} full", chosen.addr());
            // The key's first endpoint in hash order that still has room.
            let expected = order
                .iter()
                .find(|a| {
                    b.endpoints()
                        .iter()
                        .find(|e| e.addr() == **a)
                        .unwrap()
                        .active()
                        < cap
                })
                .unwrap();
            assert_eq!(chosen.addr(), *expected, "stream {i}");
            leases.push(EndpointLease::new(chosen));
            let total = i + 1;
            let max = b.endpoints().iter().map(|e| e.active()).max().unwrap();
            assert!(
                max as f64 <= (c * total as f64 / 10.0).ceil(),
                "{max} streams on one endpoint out of {total}"
            );
        }
        // Everything was one key, and still no endpoint holds much more than the mean.
        assert!(b.max_over_mean().unwrap() <= c + 0.05);
        // The first stream went to the key's own endpoint.
        drop(leases);
        assert_eq!(b.plan(Some(key), 1)[0].addr(), order[0]);
    }

    #[test]
    fn without_a_key_sticky_falls_back_to_round_robin() {
        let b = sticky(Some(1.25), 1..=3);
        let picks: Vec<SocketAddr> = (0..6).map(|_| one(&b)).collect();
        assert_eq!(
            picks,
            vec![addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]
        );
    }

    #[test]
    fn least_connections_takes_the_least_loaded_and_rotates_ties() {
        let b = Backend::new(
            "x",
            Policy::LeastConnections,
            (1..=3).map(|i| Endpoint::new(addr(i))).collect(),
        );
        let mut leases = Vec::new();
        for _ in 0..30 {
            let e = b.plan(None, 1)[0].clone();
            leases.push(EndpointLease::new(e));
            let loads: Vec<usize> = b.endpoints().iter().map(|e| e.active()).collect();
            let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            assert!(max - min <= 1, "{loads:?}");
        }
        // Close every stream on endpoint 1: the next ten go there.
        leases.retain(|l| l.endpoint().addr() != addr(1));
        for _ in 0..10 {
            let e = b.plan(None, 1)[0].clone();
            assert_eq!(e.addr(), addr(1));
            leases.push(EndpointLease::new(e));
        }
        // Fall-over order is by load too.
        leases.push(EndpointLease::new(b.endpoints()[2].clone()));
        let plan = b.plan(None, 3);
        assert_eq!(plan.last().unwrap().addr(), addr(3));
    }

    #[test]
    fn max_over_mean_reports_imbalance() {
        let b = Backend::round_robin("x", vec![addr(1), addr(2)]);
        assert_eq!(b.max_over_mean(), None);
        let l: Vec<_> = (0..3)
            .map(|_| EndpointLease::new(b.endpoints()[0].clone()))
            .collect();
        assert_eq!(b.max_over_mean(), Some(2.0));
        let _m = EndpointLease::new(b.endpoints()[1].clone());
        assert_eq!(b.max_over_mean(), Some(1.5));
        drop(l);
        assert_eq!(b.max_over_mean(), Some(2.0));
    }

    #[test]
    fn store_interns_and_retires_what_disappears() {
        let store = EndpointStore::default();
        let a = store.endpoint("apps/svc:80", addr(1));
        assert!(Arc::ptr_eq(&a, &store.endpoint("apps/svc:80", addr(1))));
        let b = store.endpoint("apps/svc:80", addr(2));
        let other = store.endpoint("apps/gone:80", addr(3));
        let lease = EndpointLease::new(other.clone());
        let resolved: HashSet<String> = ["apps/svc:80".to_string()].into();
        let live: HashSet<(String, SocketAddr)> = [("apps/svc:80".to_string(), addr(1))].into();
        store.sweep(&resolved, &live);
        assert!(!a.is_retired());
        assert!(b.is_retired(), "endpoint 2 left its resolved backend");
        assert!(
            !other.is_retired(),
            "an unresolved backend keeps its streams"
        );
        assert_eq!(store.len(), 2);
        drop(lease);
        store.sweep(&resolved, &live);
        assert_eq!(store.len(), 1);
        // A retired endpoint that comes back starts afresh.
        assert!(!store.endpoint("apps/svc:80", addr(2)).is_retired());
    }

    #[tokio::test]
    async fn retirement_wakes_watchers_created_before_it() {
        let e = Endpoint::new(addr(1));
        let watch = e.retired();
        let e2 = e.clone();
        tokio::spawn(async move { e2.retire() });
        watch.await;
        assert!(e.is_retired());
    }

    #[test]
    fn keys_come_from_header_cookie_query_or_peer() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        h.append("cookie", HeaderValue::from_static("a=1; sid=s-42 ;b=2"));
        h.append("cookie", HeaderValue::from_static("late=x"));
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let k = |src: KeySource, q: Option<&str>| src.key_hash(&h, q, peer);
        assert_eq!(
            k(
                KeySource::Header(HeaderName::from_static("x-user-id")),
                None
            ),
            Some(hash_key(b"alice"))
        );
        assert_eq!(
            k(KeySource::Header(HeaderName::from_static("x-other")), None),
            None
        );
        assert_eq!(
            k(KeySource::Cookie("sid".into()), None),
            Some(hash_key(b"s-42"))
        );
        assert_eq!(
            k(KeySource::Cookie("late".into()), None),
            Some(hash_key(b"x"))
        );
        assert_eq!(k(KeySource::Cookie("si".into()), None), None);
        let q = KeySource::Query("user".into());
        assert_eq!(k(q.clone(), Some("a=1&user=bob&z")), Some(hash_key(b"bob")));
        assert_eq!(k(q.clone(), Some("username=bob")), None);
        assert_eq!(k(q.clone(), Some("user=")), None);
        assert_eq!(k(q.clone(), Some("user")), None);
        assert_eq!(k(q, None), None);
        let v4 = k(KeySource::SourceIp, None);
        assert_eq!(v4, Some(hash_key(&[192, 0, 2, 7])));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(KeySource::SourceIp.key_hash(&h, None, mapped), v4);
    }
}
