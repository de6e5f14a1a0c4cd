//! A circuit breaker in front of L2: after repeated availability failures, reads stop asking
//! Redis (each would cost a full timeout) and go straight to the loader, until a probe works.
//!
//! Hand-written rather than a crate: it is a few dozen lines, it must count only availability
//! failures (timeouts, connection errors, not decode errors), and its hot path is one relaxed
//! atomic load.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The breaker's state, as reported by [`TieredCache::breaker_state`](crate::TieredCache::breaker_state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerState {
    /// L2 is used.
    Closed,
    /// L2 is skipped until the cool-down ends.
    Open,
    /// One probe call is trying L2.
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    tripped: AtomicBool,
    // Whether the state is anything but "closed, no failures": lets `success` skip the mutex
    // on the hot path.
    dirty: AtomicBool,
    state: Mutex<State>,
    opened: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            tripped: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            state: Mutex::new(State::Closed { failures: 0 }),
            opened: AtomicU64::new(0),
        }
    }

    // Short critical sections, no `.await` inside.
    fn state(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Whether a call may use L2 now. While open, the first call after the cool-down becomes
    /// the probe; if the probe never reports, another is let through a cool-down later.
    pub(crate) fn allow(&self) -> bool {
        if !self.tripped.load(Ordering::Relaxed) {
            return true;
        }
        let now = Instant::now();
        let mut state = self.state();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } | State::HalfOpen { since: until } if now >= until => {
                *state = State::HalfOpen {
                    since: now + self.cooldown,
                };
                true
            }
            _ => false,
        }
    }

    /// Redis was seen answering another way (the bus subscribed to it again): close the
    /// circuit now rather than after the cool-down. If L2 still fails, the threshold opens it
    /// again.
    pub(crate) fn reset(&self) {
        if self.tripped.load(Ordering::Relaxed) {
            tracing::info!(target: "tiered::breaker", "the bus reached Redis again: circuit closed");
        }
        *self.state() = State::Closed { failures: 0 };
        self.tripped.store(false, Ordering::Relaxed);
    }

    pub(crate) fn success(&self) {
        if !self.dirty.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state();
        if !matches!(*state, State::Closed { failures: 0 }) {
            if self.tripped.load(Ordering::Relaxed) {
                tracing::info!(target: "tiered::breaker", "L2 answers again: circuit closed");
            }
            *state = State::Closed { failures: 0 };
            self.tripped.store(false, Ordering::Relaxed);
        }
        self.dirty.store(false, Ordering::Release);
    }

    pub(crate) fn failure(&self) {
        let now = Instant::now();
        let mut state = self.state();
        self.dirty.store(true, Ordering::Release);
        let open = match *state {
            State::Closed { failures } if failures + 1 >= self.threshold => true,
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::HalfOpen { .. } => true,
            State::Open { .. } => false,
        };
        if open {
            tracing::warn!(
                target: "tiered::breaker",
                cooldown = ?self.cooldown,
                "L2 keeps failing: circuit open, reads go straight to the loader"
            );
            *state = State::Open {
                until: now + self.cooldown,
            };
            self.tripped.store(true, Ordering::Relaxed);
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn state_now(&self) -> BreakerState {
        match *self.state() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    pub(crate) fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_closes_after_a_good_probe() {
        let b = Breaker::new(3, Duration::from_secs(1));
        b.failure();
        b.failure();
        assert!(b.allow());
        assert_eq!(b.state_now(), BreakerState::Closed);
        b.failure();
        assert_eq!(b.state_now(), BreakerState::Open);
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(b.allow(), "the first call after the cool-down probes");
        assert!(!b.allow(), "only one probe at a time");
        b.success();
        assert_eq!(b.state_now(), BreakerState::Closed);
        assert!(b.allow());
        assert_eq!(b.times_opened(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_a_lost_probe_is_replaced() {
        let b = Breaker::new(1, Duration::from_secs(1));
        b.failure();
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(b.allow());
        b.failure();
        assert_eq!(b.state_now(), BreakerState::Open);
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(b.allow());
        // That probe never reports (its caller was cancelled): a later one is let through.
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(b.allow());
        assert_eq!(b.times_opened(), 2);
    }

    #[test]
    fn successes_reset_the_count() {
        let b = Breaker::new(2, Duration::from_secs(1));
        b.failure();
        b.success();
        b.failure();
        assert_eq!(b.state_now(), BreakerState::Closed);
    }
}
