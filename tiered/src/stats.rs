//! The counters a cache keeps ([`CacheStats`]), and the striped counter of the hot path.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) l1_hits: Striped,
    pub(crate) l2_hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) not_found: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) fail_safe: AtomicU64,
    pub(crate) lock_waits: AtomicU64,
    pub(crate) duplicate_loads: AtomicU64,
    pub(crate) unlocked_loads: AtomicU64,
    pub(crate) l2_failures: AtomicU64,
    pub(crate) invalidations_sent: AtomicU64,
    pub(crate) invalidations_received: AtomicU64,
    pub(crate) invalidations_ignored: AtomicU64,
    pub(crate) values_carried: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) l1_unconfirmed: AtomicU64,
    pub(crate) outage_served: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

const STRIPES: usize = 8;

/// A counter bumped on the hot path by many threads at once: one cache line per stripe and a
/// stripe per thread, so L1 hits on several cores do not fight over one line.
#[derive(Debug, Default)]
pub(crate) struct Striped([Padded; STRIPES]);

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Striped {
    pub(crate) fn bump(&self) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static STRIPE: usize = (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % STRIPES;
        }
        let i = STRIPE.with(|s| *s);
        self.0[i].0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

/// A snapshot of a cache's counters, from [`TieredCache::stats`](crate::TieredCache::stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads answered by a fresh L1 entry.
    pub l1_hits: u64,
    /// Reads answered by a fresh L2 entry.
    pub l2_hits: u64,
    /// Reads that needed the loader (or found nothing, for `get`).
    pub misses: u64,
    /// Loader runs that returned (values and "not found").
    pub loads: u64,
    /// Loader runs that failed, panicked or were cut off.
    pub load_errors: u64,
    /// Loads that returned "not found".
    pub not_found: u64,
    /// Stale values served inside the stale-while-revalidate window.
    pub stale_served: u64,
    /// Background refreshes started by stale reads.
    pub refreshes: u64,
    /// Stale values served because a load failed or passed its soft timeout.
    pub fail_safe: u64,
    /// Loads that waited for another process's lock.
    pub lock_waits: u64,
    /// Loads whose result was not written because the lock had passed to someone else (a
    /// newer write, or a duplicate load after the lock expired): counted, not an error.
    pub duplicate_loads: u64,
    /// Loads run without the Redis lock because Redis was unavailable or skipped.
    pub unlocked_loads: u64,
    /// L2 calls that failed for availability (timeouts, connection errors).
    pub l2_failures: u64,
    /// How many times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Changes this cache announced to other nodes (writes, deletes, clears).
    pub invalidations_sent: u64,
    /// Announcements from other nodes that evicted or cleared something here.
    pub invalidations_received: u64,
    /// Announcements ignored because L1 already held that version or a newer one.
    pub invalidations_ignored: u64,
    /// Of `invalidations_received`: peers' announcements that carried the new value, taken
    /// into L1 in place of the older copy (a signed bus only).
    pub values_carried: u64,
    /// Times L1 was dropped because invalidations may have been missed.
    pub gaps: u64,
    /// Reads that found a fresh L1 entry but asked L2, because the bus's lease had run out:
    /// it had not proven within Δ that every invalidation arrived (a slow server or cluster
    /// bus, or this process stalled). See [`invalidation::Lease`].
    pub l1_unconfirmed: u64,
    /// Reads answered under the outage policy: Redis could not be asked and the bus could not
    /// vouch for L1, and an L1 entry fresh by its own TTL was served within
    /// [`EntryOptions::outage_staleness`](crate::EntryOptions::outage_staleness).
    pub outage_served: u64,
    /// The L1 tier's own counters.
    pub l1: l1::Stats,
    /// The L2 store's counters (shared by caches on the same store).
    pub l2: l2::StoreStats,
}

impl CacheStats {
    /// The share of reads answered from a tier (L1 or L2) rather than the loader.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.l1_hits + self.l2_hits + self.stale_served + self.outage_served;
        let total = hits + self.misses;
        if total == 0 {
            return 0.0;
        }
        hits as f64 / total as f64
    }
}
