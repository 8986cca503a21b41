//! Log-linear histogram of nanosecond values: 32 sub-buckets per power of two (at most ~3 %
//! relative error), fixed size, lock-free recording from many tasks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-bucket bits per power of two.
const P: u32 = 5;
const SUB: usize = 1 << P;
/// Buckets needed for every u64.
const BUCKETS: usize = (64 - P as usize + 1) * SUB;

/// Bucket index of `v`.
fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let m = (v >> (e - P)) as usize & (SUB - 1);
    (e - P + 1) as usize * SUB + m
}

/// Smallest value that falls in bucket `i`, and the bucket's width.
fn bounds(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, 1);
    }
    let e = (i / SUB) as u32 + P - 1;
    let m = (i % SUB) as u64;
    let shift = e - P;
    ((SUB as u64 + m) << shift, 1u64 << shift)
}

/// A histogram shared by recording tasks.
pub struct AtomicHist {
    buckets: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for AtomicHist {
    fn default() -> Self {
        AtomicHist {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl AtomicHist {
    /// Records one value.
    pub fn record(&self, v: u64) {
        self.record_n(v, 1);
    }

    /// Records `n` occurrences of `v`.
    pub fn record_n(&self, v: u64, n: u64) {
        self.buckets[index(v)].fetch_add(n, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    /// A copy of the current counts.
    pub fn snapshot(&self) -> Hist {
        Hist {
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            max: self.max.load(Ordering::Relaxed),
        }
    }

    /// Forgets everything recorded so far.
    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Relaxed);
        }
        self.max.store(0, Ordering::Relaxed);
    }
}

/// A snapshot of an [`AtomicHist`].
#[derive(Clone, Debug)]
pub struct Hist {
    counts: Vec<u64>,
    max: u64,
}

impl Hist {
    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Largest recorded value (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), as the middle of its bucket; None when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        if rank >= total {
            return Some(self.max);
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, w) = bounds(i);
                return Some((lo + w / 2).min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_the_bucket_that_contains_it() {
        let mut v = 0u64;
        while v < u64::MAX / 3 {
            let (lo, w) = bounds(index(v));
            assert!(lo <= v && v - lo < w, "{v}: [{lo}, +{w})");
            v = v * 3 / 2 + 1;
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn small_values_are_exact_and_large_ones_within_3_percent() {
        let h = AtomicHist::default();
        for v in 1..=100u64 {
            h.record(v * 1000);
        }
        h.record(7);
        let s = h.snapshot();
        assert_eq!(s.count(), 101);
        assert_eq!(s.max(), 100_000);
        let p50 = s.quantile(0.5).unwrap() as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.03, "{p50}");
        let p99 = s.quantile(0.99).unwrap() as f64;
        assert!((p99 - 99_000.0).abs() / 99_000.0 < 0.03, "{p99}");
        assert_eq!(s.quantile(0.0).unwrap(), 7);
        assert_eq!(s.quantile(1.0).unwrap(), 100_000);
    }

    #[test]
    fn empty_and_reset() {
        let h = AtomicHist::default();
        assert_eq!(h.snapshot().quantile(0.5), None);
        h.record_n(5, 3);
        assert_eq!(h.snapshot().count(), 3);
        h.reset();
        assert_eq!(h.snapshot().count(), 0);
        assert_eq!(h.snapshot().max(), 0);
    }
}
