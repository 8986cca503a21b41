//! Endpoint selection for a backend.
//!
//! A [`Backend`] is the set of ready endpoints of one Service port, frozen when the routing
//! table is compiled. A request holds an `Arc<Backend>` for the life of its stream, so a
//! table swap never moves an open stream. Selection is lock-free.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The ready endpoints of one Service port and the state needed to choose among them.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/service:port`, for logs and errors.
    pub name: String,
    /// Ready endpoints, sorted and de-duplicated so every replica sees the same order.
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Backend {
    /// A backend over `endpoints` (sorted and de-duplicated here).
    pub fn new(name: impl Into<String>, mut endpoints: Vec<SocketAddr>) -> Self {
        endpoints.sort();
        endpoints.dedup();
        Backend {
            name: name.into(),
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// The ready endpoints, in their canonical order.
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    /// True when there is nothing to send a request to.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Round robin: each call returns the next endpoint. `None` when there are no endpoints.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.endpoints[i % self.endpoints.len()])
    }

    /// Up to `n` distinct endpoints to try in order: the first is [`Backend::pick`]'s choice,
    /// the rest follow it, so a connect failure can fall over to another endpoint.
    pub fn candidates(&self, n: usize) -> impl Iterator<Item = SocketAddr> + '_ {
        let len = self.endpoints.len();
        let start = if len == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % len
        };
        (0..n.min(len)).map(move |k| self.endpoints[(start + k) % len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8080))
    }

    #[test]
    fn round_robin_visits_every_endpoint_evenly() {
        let b = Backend::new("apps/svc:8080", vec![addr(3), addr(1), addr(2)]);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..300 {
            *counts.entry(b.pick().unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&c| c == 100), "{counts:?}");
    }

    #[test]
    fn endpoints_are_canonical() {
        let b = Backend::new("x", vec![addr(2), addr(1), addr(2)]);
        assert_eq!(b.endpoints(), &[addr(1), addr(2)]);
    }

    #[test]
    fn empty_backend_picks_nothing() {
        let b = Backend::new("x", vec![]);
        assert_eq!(b.pick(), None);
        assert_eq!(b.candidates(3).count(), 0);
    }

    #[test]
    fn candidates_are_distinct_and_bounded() {
        let b = Backend::new("x", vec![addr(1), addr(2), addr(3)]);
        let c: Vec<_> = b.candidates(5).collect();
        assert_eq!(c.len(), 3);
        let mut d = c.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 3);
        assert_eq!(b.candidates(2).count(), 2);
    }
}
