//! [`EntryOptions`]: how long entries live and how loads behave, per call or as defaults.

use std::time::Duration;

/// The default bound on every call: see [`EntryOptions::hard_timeout`].
pub const DEFAULT_HARD_TIMEOUT: Duration = Duration::from_secs(10);
/// The default fail-safe throttle: see [`EntryOptions::fail_safe_throttle`].
pub const DEFAULT_FAIL_SAFE_THROTTLE: Duration = Duration::from_secs(30);
/// The default outage staleness: see [`EntryOptions::outage_staleness`].
pub const DEFAULT_OUTAGE_STALENESS: Duration = Duration::from_secs(30);
/// The longest any duration option may be: ten years. Longer ones are refused with
/// [`Error::Config`](crate::Error::Config) naming the option (deadlines are computed from them,
/// and Redis keeps expiries in milliseconds).
pub const MAX_OPTION_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Per-entry options: lifetimes, stale-while-revalidate, fail-safe, timeouts and tier skips.
///
/// Set defaults with [`TieredCacheBuilder::default_options`](crate::TieredCacheBuilder::default_options)
/// and override per call with the `_with` methods.
///
/// A value's life, counted from its write:
///
/// ```text
/// |---- fresh (ttl) ----|---- stale-while-revalidate ----|
/// |---- fresh (ttl) ----|---------- fail-safe max ---------------|
///                                                                 ^ gone from L1 and L2
/// ```
///
/// ```
/// use std::time::Duration;
/// use tiered::EntryOptions;
///
/// let opts = EntryOptions::new(Duration::from_secs(300))
///     .stale_while_revalidate(Duration::from_secs(60))
///     .l1_time_to_live(Duration::from_secs(30))
///     .fail_safe(Duration::from_secs(3600))
///     .soft_timeout(Duration::from_millis(100));
/// assert_eq!(opts.l2_time_to_live(), Duration::from_secs(300 + 3600));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryOptions {
    pub(crate) ttl: Duration,
    pub(crate) l1_ttl: Option<Duration>,
    pub(crate) swr: Duration,
    pub(crate) fail_safe_max: Duration,
    pub(crate) fail_safe_throttle: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) hard_timeout: Duration,
    pub(crate) jitter: Duration,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) skip_l1: bool,
    pub(crate) skip_l2: bool,
    pub(crate) outage_staleness: Duration,
}

impl EntryOptions {
    /// Values are fresh for `ttl` after their write; no stale window, no fail-safe, a hard
    /// timeout of [`DEFAULT_HARD_TIMEOUT`], both tiers.
    pub fn new(ttl: Duration) -> Self {
        EntryOptions {
            ttl,
            l1_ttl: None,
            swr: Duration::ZERO,
            fail_safe_max: Duration::ZERO,
            fail_safe_throttle: DEFAULT_FAIL_SAFE_THROTTLE,
            soft_timeout: None,
            hard_timeout: DEFAULT_HARD_TIMEOUT,
            jitter: Duration::ZERO,
            negative_ttl: None,
            skip_l1: false,
            skip_l2: false,
            outage_staleness: DEFAULT_OUTAGE_STALENESS,
        }
    }

    /// How long a value is fresh after its write. Set by [`EntryOptions::new`].
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The longest this node trusts its L1 copy without asking L2 again (it never exceeds the
    /// value's freshness). Shorter than the TTL, it bounds how stale L1 can be when an
    /// invalidation is lost. Default: the TTL.
    pub fn l1_time_to_live(mut self, ttl: Duration) -> Self {
        self.l1_ttl = Some(ttl);
        self
    }

    /// After the TTL, for `window`, a read returns the stale value at once and one background
    /// task per key per process refreshes it (the Redis lock keeps it to one across
    /// processes). Default: zero (off).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.swr = window;
        self
    }

    /// Fail-safe: keep values for `max` after their TTL, and when a load fails (error, panic,
    /// soft timeout) serve that old value instead of the error. Default: zero (off).
    pub fn fail_safe(mut self, max: Duration) -> Self {
        self.fail_safe_max = max;
        self
    }

    /// After a fail-safe activation, serve the old value as if fresh for `throttle` before
    /// trying the loader again, so a failing source is not hammered.
    /// Default: [`DEFAULT_FAIL_SAFE_THROTTLE`].
    pub fn fail_safe_throttle(mut self, throttle: Duration) -> Self {
        self.fail_safe_throttle = throttle;
        self
    }

    /// When a load runs longer than `timeout` and a fail-safe value exists, return that value
    /// and let the load finish in the background (its result then lands in both tiers).
    /// Without a fail-safe value the caller keeps waiting, up to the hard timeout.
    /// Default: none.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// No call waits longer than `timeout` for a load (its own or one it joined); it then
    /// returns a fail-safe value if one exists, else [`Error::WaitTimeout`](crate::Error::WaitTimeout).
    /// The load itself goes on, up to the cache's maximum load time.
    /// Default: [`DEFAULT_HARD_TIMEOUT`].
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = timeout;
        self
    }

    /// Shortens each written value's TTL by a random amount up to `max` (never below half the
    /// TTL), so values written together do not all expire together. Default: zero.
    pub fn jitter(mut self, max: Duration) -> Self {
        self.jitter = max;
        self
    }

    /// Caches "not found" ([`Loaded::not_found`](crate::Loaded::not_found)) for `ttl`, in
    /// both tiers. Default: not cached.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Neither reads nor fills L1. Default: false.
    pub fn skip_l1(mut self, skip: bool) -> Self {
        self.skip_l1 = skip;
        self
    }

    /// Neither reads nor writes L2, nor takes the Redis lock: loads are deduplicated in
    /// process only. Default: false.
    pub fn skip_l2(mut self, skip: bool) -> Self {
        self.skip_l2 = skip;
        self
    }

    /// The outage policy: how long, once the invalidation bus can no longer prove that every
    /// change reached this node (its lease ran out) *and* Redis cannot be asked (timeouts,
    /// connection errors, the circuit breaker open), L1 entries that are fresh by their own
    /// TTL are still served, as outage answers ([`CacheStats::outage_served`](crate::CacheStats::outage_served)).
    /// A read is then at most Δ + `staleness` behind a change acknowledged on another node
    /// that can still reach Redis (a partition); when Redis itself is down nobody can
    /// acknowledge a change, so nothing is missed. `Duration::ZERO` is the strict mode: such
    /// reads fail with the Redis error instead ([`Error::is_unavailable`](crate::Error::is_unavailable)).
    ///
    /// Whatever the policy, a value this node loaded itself while Redis was unreachable is
    /// used for Δ from the start of its load (it is as fresh as anything the bus could vouch
    /// for), so the loader runs at most once per key per Δ during an outage, and no such
    /// value outlives Δ.
    /// Default: [`DEFAULT_OUTAGE_STALENESS`] (30 s): long enough to ride out a Redis restart
    /// or failover without an error or a database stampede, short enough that a node cut off
    /// from Redis stops serving what it holds soon after.
    pub fn outage_staleness(mut self, staleness: Duration) -> Self {
        self.outage_staleness = staleness;
        self
    }

    /// The time to live: how long a written value is fresh.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The stale-while-revalidate window.
    pub fn swr(&self) -> Duration {
        self.swr
    }

    /// How long a value written with these options lives in Redis: the TTL plus the longer of
    /// the stale-while-revalidate window and the fail-safe maximum.
    pub fn l2_time_to_live(&self) -> Duration {
        self.ttl + self.swr.max(self.fail_safe_max)
    }

    /// The lifetimes of a value written now: fresh for `ttl` (the loader's) or the jittered
    /// TTL, kept for the longer of the stale-while-revalidate window and the fail-safe max.
    /// A loader's own TTL is clamped to `[1 ms, MAX_OPTION_DURATION]`.
    pub(crate) fn value_meta(&self, ttl: Option<Duration>) -> l2::EntryMeta {
        let fresh = ttl.map_or_else(|| self.jittered_ttl(), clamp_ttl);
        l2::EntryMeta {
            write_version: 0,
            fresh_for: fresh,
            stale_for: fresh + self.swr.max(self.fail_safe_max),
        }
    }

    /// The lifetimes of a cached "not found" (`ttl`, the loader's, or the negative TTL, with
    /// no stale window), or `None` when "not found" is not cached.
    pub(crate) fn absent_meta(&self, ttl: Option<Duration>) -> Option<l2::EntryMeta> {
        let negative = self.negative_ttl?;
        Some(l2::EntryMeta::new(ttl.map_or(negative, clamp_ttl)))
    }

    /// The TTL with jitter applied: in `[ttl - jitter, ttl]`, never below half the TTL.
    pub(crate) fn jittered_ttl(&self) -> Duration {
        let cut = self.jitter.min(self.ttl / 2);
        if cut.is_zero() {
            return self.ttl;
        }
        let nanos = u64::try_from(cut.as_nanos()).unwrap_or(u64::MAX);
        self.ttl - Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// What is wrong with the options, naming the option, if anything. Every duration is at
    /// most [`MAX_OPTION_DURATION`], and zero only where zero means "off".
    pub(crate) fn problem(&self) -> Result<(), String> {
        let bounded = [
            ("time_to_live", Some(self.ttl)),
            ("l1_time_to_live", self.l1_ttl),
            ("stale_while_revalidate", Some(self.swr)),
            ("fail_safe", Some(self.fail_safe_max)),
            ("fail_safe_throttle", Some(self.fail_safe_throttle)),
            ("soft_timeout", self.soft_timeout),
            ("hard_timeout", Some(self.hard_timeout)),
            ("jitter", Some(self.jitter)),
            ("negative_ttl", self.negative_ttl),
            ("outage_staleness", Some(self.outage_staleness)),
        ];
        for (name, value) in bounded {
            if let Some(d) = value
                && d > MAX_OPTION_DURATION
            {
                return Err(format!(
                    "{name} must be at most {MAX_OPTION_DURATION:?} (got {d:?})"
                ));
            }
        }
        if self.ttl < Duration::from_millis(1) {
            return Err("ttl must be at least 1 ms".into());
        }
        if self.hard_timeout.is_zero() {
            return Err("hard_timeout must be above zero".into());
        }
        if self.l1_ttl.is_some_and(|t| t.is_zero()) {
            return Err("l1_time_to_live must be above zero".into());
        }
        if self
            .negative_ttl
            .is_some_and(|t| t < Duration::from_millis(1))
        {
            return Err("negative_ttl must be at least 1 ms".into());
        }
        if self.fail_safe_throttle < Duration::from_millis(1) {
            return Err("fail_safe_throttle must be at least 1 ms".into());
        }
        if self.soft_timeout.is_some_and(|s| s.is_zero()) {
            return Err("soft_timeout must be above zero".into());
        }
        if self.soft_timeout.is_some_and(|s| s >= self.hard_timeout) {
            return Err("soft_timeout must be shorter than hard_timeout".into());
        }
        Ok(())
    }

    /// Checks the options as every call that takes them does.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the first option out of range.
    pub fn validate(&self) -> crate::Result<()> {
        self.problem()
            .map_err(|e| crate::Error::Config(format!("options: {e}")))
    }
}

/// A TTL chosen at run time (a loader's, a response's `max-age`) kept where a written entry
/// can live: at least 1 ms, at most [`MAX_OPTION_DURATION`].
pub(crate) fn clamp_ttl(ttl: Duration) -> Duration {
    ttl.clamp(Duration::from_millis(1), MAX_OPTION_DURATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_life_covers_the_longer_stale_window() {
        let o = EntryOptions::new(Duration::from_secs(10));
        assert_eq!(o.l2_time_to_live(), Duration::from_secs(10));
        let o = o.stale_while_revalidate(Duration::from_secs(5));
        assert_eq!(o.l2_time_to_live(), Duration::from_secs(15));
        let o = o.fail_safe(Duration::from_secs(60));
        assert_eq!(o.l2_time_to_live(), Duration::from_secs(70));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let o = EntryOptions::new(Duration::from_secs(10)).jitter(Duration::from_secs(30));
        for _ in 0..1000 {
            let t = o.jittered_ttl();
            assert!(
                t >= Duration::from_secs(5) && t <= Duration::from_secs(10),
                "{t:?}"
            );
        }
        let o = EntryOptions::new(Duration::from_secs(10));
        assert_eq!(o.jittered_ttl(), Duration::from_secs(10));
    }

    #[test]
    fn validation_names_the_field() {
        let e = EntryOptions::new(Duration::ZERO).problem().unwrap_err();
        assert!(e.contains("ttl"), "{e}");
        let e = EntryOptions::new(Duration::from_secs(1))
            .soft_timeout(Duration::from_secs(20))
            .problem()
            .unwrap_err();
        assert!(e.contains("soft_timeout"), "{e}");
        assert!(EntryOptions::new(Duration::from_secs(1)).problem().is_ok());
    }

    #[test]
    fn every_duration_at_its_extremes_is_refused_by_name_never_a_panic() {
        let base = EntryOptions::new(Duration::from_secs(1));
        let max = Duration::MAX;
        let cases: [(&str, EntryOptions); 10] = [
            ("time_to_live", base.time_to_live(max)),
            ("l1_time_to_live", base.l1_time_to_live(max)),
            ("stale_while_revalidate", base.stale_while_revalidate(max)),
            ("fail_safe", base.fail_safe(max)),
            ("fail_safe_throttle", base.fail_safe_throttle(max)),
            ("soft_timeout", base.soft_timeout(max)),
            ("hard_timeout", base.hard_timeout(max)),
            ("jitter", base.jitter(max)),
            ("negative_ttl", base.negative_ttl(max)),
            ("outage_staleness", base.outage_staleness(max)),
        ];
        for (name, o) in cases {
            let e = o.problem().unwrap_err();
            assert!(e.starts_with(name), "{name}: {e}");
        }
        for (name, o) in [
            (
                "fail_safe_throttle",
                base.fail_safe_throttle(Duration::ZERO),
            ),
            ("soft_timeout", base.soft_timeout(Duration::ZERO)),
            ("hard_timeout", base.hard_timeout(Duration::ZERO)),
            ("l1_time_to_live", base.l1_time_to_live(Duration::ZERO)),
        ] {
            let e = o.problem().unwrap_err();
            assert!(e.starts_with(name), "{name}: {e}");
        }
        // The largest accepted values compute their lifetimes without overflow.
        let big = EntryOptions::new(MAX_OPTION_DURATION)
            .stale_while_revalidate(MAX_OPTION_DURATION)
            .fail_safe(MAX_OPTION_DURATION);
        assert!(big.problem().is_ok());
        assert_eq!(big.l2_time_to_live(), MAX_OPTION_DURATION * 2);
    }
}
