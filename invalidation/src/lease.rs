//! [`Lease`]: the read-side half of the staleness bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Whether this process has applied every invalidation published more than Δ ago: the
/// read-side half of the staleness bound. Cheap to clone and to check (one atomic load).
///
/// Each probe round ([`l2::Subscriber::probe`]) that comes back proves that every message
/// published before it started has arrived — and the bus applies messages in order, before
/// it takes the proof — so the lease runs until that start plus Δ ([`crate::BusConfig::bound`]).
/// An L1 entry served while the lease holds is at most Δ older than any change: even when
/// the bus is slow (an overloaded server or cluster bus), and even when this process was
/// stalled and has not yet noticed. Messages lost outright are gaps, not lease matters.
#[derive(Debug, Clone)]
pub struct Lease {
    base: std::time::Instant,
    /// Nanoseconds after `base` until which the lease holds.
    until: Arc<AtomicU64>,
    bound: Duration,
}

impl Lease {
    pub(crate) fn new(bound: Duration) -> Self {
        let base = std::time::Instant::now();
        Lease {
            base,
            // Nothing was cached before the bus subscribed: it starts confirmed.
            until: Arc::new(AtomicU64::new(nanos(bound))),
            bound,
        }
    }

    /// Whether the lease holds at `now` (so L1 may answer).
    #[inline]
    pub fn holds_at(&self, now: std::time::Instant) -> bool {
        nanos(now.saturating_duration_since(self.base)) < self.until.load(Ordering::Acquire)
    }

    /// How long ago the lease ran out, at `now` (`None` while it holds): how long this process
    /// has gone without proof that every invalidation reached it, beyond Δ.
    pub fn lapsed_for(&self, now: std::time::Instant) -> Option<Duration> {
        let at = nanos(now.saturating_duration_since(self.base));
        let until = self.until.load(Ordering::Acquire);
        (at >= until).then(|| Duration::from_nanos(at - until))
    }

    /// Whether the lease holds now.
    pub fn holds(&self) -> bool {
        self.holds_at(std::time::Instant::now())
    }

    /// Every message published before `sent` has been applied: the lease runs until
    /// `sent` + Δ (never backwards).
    pub(crate) fn confirm(&self, sent: std::time::Instant) {
        let until = nanos(
            sent.saturating_duration_since(self.base)
                .saturating_add(self.bound),
        );
        self.until.fetch_max(until, Ordering::AcqRel);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_runs_delta_from_the_last_confirmed_round_and_never_backwards() {
        let bound = Duration::from_millis(500);
        let lease = Lease::new(bound);
        let t0 = lease.base;
        assert!(lease.holds_at(t0 + Duration::from_millis(499)));
        assert!(!lease.holds_at(t0 + Duration::from_millis(500)));
        lease.confirm(t0 + Duration::from_millis(300));
        assert!(lease.holds_at(t0 + Duration::from_millis(799)));
        assert!(!lease.holds_at(t0 + Duration::from_millis(800)));
        // A round that started earlier but came back later does not shorten it.
        lease.confirm(t0 + Duration::from_millis(100));
        assert!(lease.holds_at(t0 + Duration::from_millis(799)));
        assert_eq!(lease.lapsed_for(t0 + Duration::from_millis(700)), None);
        assert_eq!(
            lease.lapsed_for(t0 + Duration::from_millis(1_050)),
            Some(Duration::from_millis(250))
        );
        // A clone is the same lease.
        let clone = lease.clone();
        lease.confirm(t0 + Duration::from_secs(2));
        assert!(clone.holds_at(t0 + Duration::from_millis(2499)));
    }
}
