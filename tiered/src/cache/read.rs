//! The read path: the L1 lookup (the hot path), then the slow path a miss takes (L2, the
//! load, stale-while-revalidate, the outage policy), each as one flight per key.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use l1::Entry;
use l2::{Fetched, Key, LockAttempt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::coherence::Admission;
use crate::error::{Error, Result};
use crate::flight::FlightToken;
use crate::options::EntryOptions;
use crate::trace;

use super::{Inner, Loader};
use crate::stats::bump;
use l1::deadline_after;

/// What L1 holds: the value (or a cached "not found") and its logical deadlines. The L1
/// entry's own freshness ([`Entry::is_fresh`]) is how long this node trusts it without asking
/// L2; its expiry is the end of its stale and fail-safe life.
pub(crate) struct Cached<V> {
    pub(crate) value: Option<V>,
    pub(crate) fresh_until: Instant,
    /// Loaded by this node while Redis was unreachable: its L1 freshness ends Δ after the
    /// load began, and until then it answers without the bus's lease (it is as fresh as
    /// anything the lease could vouch for).
    pub(crate) local: bool,
}

pub(crate) type L1Entry<V> = Arc<Entry<Cached<V>>>;

/// A value kept to serve when a fresh one cannot be had.
pub(crate) struct Fallback<V> {
    pub(crate) value: Option<V>,
    pub(crate) version: u64,
    pub(crate) fresh: bool,
    pub(crate) in_swr: bool,
    /// The L1 entry it was read from, if any: a fail-safe fill puts it back only if it is
    /// still there (an announcement or a gap may have removed it meanwhile).
    pub(crate) source: Option<L1Entry<V>>,
}

impl<V: Clone> Fallback<V> {
    /// The stale-while-revalidate window is the caller's (`opts`), counted from the end of
    /// the value's freshness.
    pub(crate) fn from_l1(entry: &Entry<Cached<V>>, opts: &EntryOptions) -> Self {
        let now = Instant::now();
        let held = entry.value();
        Fallback {
            value: held.value.clone(),
            version: entry.write_version(),
            fresh: now < held.fresh_until,
            in_swr: now < deadline_after(held.fresh_until, opts.swr),
            source: None,
        }
    }

    /// What L1 held for a read that missed. While the bus's lease does not hold, the entry
    /// may have missed an invalidation: it is neither fresh nor servable as
    /// stale-while-revalidate (which serves old values, never ones known to be replaced);
    /// only fail-safe, when a load fails, or the outage policy ([`Fallback::outage_answer`]),
    /// may still use it.
    pub(crate) fn from_candidate(
        entry: &L1Entry<V>,
        opts: &EntryOptions,
        lease: &invalidation::Lease,
    ) -> Self {
        let mut fallback = Self::from_l1(entry, opts);
        fallback.source = Some(Arc::clone(entry));
        if !lease.holds() {
            fallback.fresh = false;
            fallback.in_swr = false;
        }
        fallback
    }

    /// Whether `candidate` may be served under the outage policy *now* (judged at the moment
    /// of answering, after whatever Redis call failed: the lease may have run on meanwhile).
    pub(crate) fn outage_answer(
        candidate: Option<&L1Entry<V>>,
        opts: &EntryOptions,
        lease: &invalidation::Lease,
    ) -> Option<Option<V>> {
        let candidate = candidate?;
        let now = Instant::now();
        let lapsed = lease.lapsed_for(now)?;
        (candidate.is_fresh_at(now) && lapsed < opts.outage_staleness)
            .then(|| candidate.value().value.clone())
    }

    /// A fallback may stand in for a failed load when fail-safe is on (or when it is still
    /// fresh: then only the check against L2 failed).
    pub(crate) fn usable(&self, opts: &EntryOptions) -> bool {
        self.fresh || !opts.fail_safe_max.is_zero()
    }
}

/// What one L2 read found.
pub(crate) enum L2Read<V> {
    Fresh(Fetched<Option<V>>),
    Stale(Fetched<Option<V>>),
    Miss,
    Down(l2::Error),
}

impl<V> Inner<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// The hot path: a fresh L1 entry's value (`Ok`), or what L1 holds otherwise (`Err`: a
    /// stale entry to fall back on, or nothing).
    pub(crate) fn l1_lookup(
        &self,
        key: &str,
        options: &EntryOptions,
    ) -> std::result::Result<Option<V>, Option<L1Entry<V>>> {
        if options.skip_l1 {
            return Err(None);
        }
        // The lease before the entry: a renewal seen here comes after the evictions it
        // vouches for (the bus applies them first), so the entry read next reflects them.
        let now = Instant::now();
        let confirmed = self.lease.holds_at(now);
        let entry = self.l1.get(key).ok_or(None)?;
        if !entry.is_fresh_at(now) {
            return Err(Some(entry));
        }
        if !confirmed && !entry.value().local {
            // The bus has not proven within Δ that every invalidation arrived: the entry
            // may be older than allowed. Not an answer; a stale candidate at most (see
            // `Fallback::from_candidate`). An entry this node loaded itself less than Δ ago
            // needs no such proof.
            bump(&self.counters.l1_unconfirmed);
            return Err(Some(entry));
        }
        self.counters.l1_hits.bump();
        Ok(entry.value().value.clone())
    }

    /// The stale value of `candidate` if it is inside the stale-while-revalidate window and a
    /// refresh of `key` is already running (counted as a stale hit).
    pub(crate) fn stale_while_refreshing(
        &self,
        key: &str,
        candidate: Option<&Entry<Cached<V>>>,
        options: &EntryOptions,
    ) -> Option<Option<V>> {
        let entry = candidate?;
        let held = entry.value();
        let now = Instant::now();
        if options.swr.is_zero()
            || now >= deadline_after(held.fresh_until, options.swr)
            || !self.lease.holds_at(now)
        {
            return None;
        }
        if !self.loads.is_running(key) {
            return None;
        }
        bump(&self.counters.stale_served);
        Some(held.value.clone())
    }

    /// An L1 entry for a value written now.
    pub(crate) fn entry(
        &self,
        value: Option<V>,
        weight: usize,
        fresh: Duration,
        life: Duration,
        opts: &EntryOptions,
    ) -> Entry<Cached<V>> {
        let now = Instant::now();
        let held = Cached {
            value,
            fresh_until: deadline_after(now, fresh),
            local: false,
        };
        Entry::new(Arc::clone(&self.namespace), held)
            .weight(weight)
            .time_to_live(life)
            .fresh_for(opts.l1_ttl.map_or(fresh, |t| t.min(fresh)))
    }

    /// An L1 entry for a value read from L2: no longer than the L2 entry lives.
    pub(crate) fn entry_from_l2(
        &self,
        f: &Fetched<Option<V>>,
        opts: &EntryOptions,
    ) -> Entry<Cached<V>> {
        let now = Instant::now();
        let fresh = f.fresh_remaining();
        let life = f.remaining.unwrap_or(f.meta.stale_for);
        let held = Cached {
            value: f.value.clone(),
            fresh_until: deadline_after(now, fresh),
            local: false,
        };
        Entry::new(Arc::clone(&self.namespace), held)
            .weight(f.size)
            .time_to_live(life)
            .fresh_for(opts.l1_ttl.map_or(fresh, |t| t.min(fresh)))
            .version(f.meta.write_version)
    }

    /// A fresh L2 entry is the answer: counted, and put in L1 if the flight's ticket admits
    /// it.
    pub(crate) fn answer_from_l2(
        &self,
        key: &Arc<str>,
        fetched: Fetched<Option<V>>,
        opts: &EntryOptions,
        token: &FlightToken<Option<V>>,
    ) -> Option<V> {
        bump(&self.counters.l2_hits);
        let entry = self.entry_from_l2(&fetched, opts);
        self.fill(key, entry, opts, token);
        fetched.value
    }

    /// Puts `entry` in L1 if the flight's ticket admits it (see `coherence`).
    pub(crate) fn fill(
        &self,
        key: &Arc<str>,
        entry: Entry<Cached<V>>,
        opts: &EntryOptions,
        token: &FlightToken<Option<V>>,
    ) {
        if !opts.skip_l1 {
            Admission::admit(&self.l1, key, token.ticket(), entry);
        }
    }

    /// As [`Inner::l2_read`], and takes the lock in the same round trip unless the entry is
    /// fresh.
    pub(crate) async fn l2_read_or_lock(&self, rkey: &Key) -> (L2Read<V>, LockAttempt) {
        match self
            .store
            .lookup_or_lock(rkey, &self.codec, self.lock_ttl)
            .await
        {
            Ok((found, attempt)) => (self.classify_read(Ok(found)), attempt),
            Err(e) => (self.classify_read(Err(e)), LockAttempt::NotTried),
        }
    }

    pub(crate) async fn l2_read(&self, rkey: &Key) -> L2Read<V> {
        let read = self.store.lookup(rkey, &self.codec).await;
        self.classify_read(read)
    }

    pub(crate) fn classify_read(&self, read: l2::Result<Option<Fetched<Option<V>>>>) -> L2Read<V> {
        match read {
            Ok(Some(f)) if f.is_fresh() => {
                self.breaker.success();
                L2Read::Fresh(f)
            }
            Ok(Some(f)) => {
                self.breaker.success();
                L2Read::Stale(f)
            }
            Ok(None) => {
                self.breaker.success();
                L2Read::Miss
            }
            // Bad bytes: evicted and counted by the store; a miss here.
            Err(e) if e.is_decode() => {
                self.breaker.success();
                L2Read::Miss
            }
            Err(e) => {
                self.note_l2(Some(&e));
                L2Read::Down(e)
            }
        }
    }

    /// The slow path, after L1 had no fresh entry.
    pub(crate) async fn past_l1(
        self: &Arc<Self>,
        key: &str,
        opts: EntryOptions,
        loader: Option<Loader<V>>,
        candidate: Option<L1Entry<V>>,
    ) -> Result<Option<V>> {
        let fallback = candidate
            .as_ref()
            .map(|e| Fallback::from_candidate(e, &opts, &self.lease));
        if let Some(fb) = &fallback
            && !fb.fresh
            && fb.in_swr
        {
            // Stale-while-revalidate from L1: answer now, refresh once in the background.
            bump(&self.counters.stale_served);
            if let Some(loader) = loader {
                let inner = Arc::clone(self);
                let key_arc: Arc<str> = key.into();
                let stale = fb.value.clone();
                let started = self.loads.start(key, move |token| {
                    // Callers that join the refresh get the stale value at once too.
                    token.answer(Ok(stale));
                    inner.bounded_flight(token, key_arc, opts, Some(loader), candidate)
                });
                if started {
                    bump(&self.counters.refreshes);
                }
            }
            return Ok(fb.value.clone());
        }
        let flights = if loader.is_some() {
            &self.loads
        } else {
            &self.reads
        };
        self.no_stale_joins(key);
        let inner = Arc::clone(self);
        let key_arc: Arc<str> = key.into();
        let outcome = flights
            .run(key, opts.hard_timeout, move |token| {
                inner.bounded_flight(token, key_arc, opts, loader, candidate)
            })
            .await;
        match (outcome, fallback) {
            (Err(e), Some(fb)) if e.is_load_failure() && fb.usable(&opts) => {
                bump(&self.counters.fail_safe);
                tracing::warn!(
                    target: "tiered::fail_safe",
                    namespace = %self.namespace,
                    error = %e,
                    "serving a stale value: the load failed or is late"
                );
                Ok(fb.value)
            }
            (outcome, _) => outcome,
        }
    }

    /// A flight's body, bounded by the maximum load time and the cache's life.
    pub(crate) fn bounded_flight(
        self: Arc<Self>,
        token: FlightToken<Option<V>>,
        key: Arc<str>,
        opts: EntryOptions,
        loader: Option<Loader<V>>,
        candidate: Option<L1Entry<V>>,
    ) -> impl Future<Output = Result<Option<V>>> + Send + 'static {
        let mut closed = self.closed.clone();
        let limit = self.max_load_time;
        // A read without a loader is bounded by the L2 timeouts already; a load gets the
        // cache's maximum load time, and stops with the cache.
        let loads = loader.is_some();
        async move {
            let body = self.fetch_or_load(Arc::clone(&key), opts, loader, candidate, token);
            if !loads {
                return body.await;
            }
            tokio::select! {
                r = tokio::time::timeout(limit, body) => r.unwrap_or_else(|_| Err(Error::WaitTimeout {
                    key: key.to_string(),
                    waited: limit,
                })),
                _ = closed.changed() => Err(Error::LoadAborted {
                    key: key.to_string(),
                }),
            }
        }
    }

    /// L2, then the lock and the loader: runs as a flight on its own task.
    pub(crate) async fn fetch_or_load(
        self: Arc<Self>,
        key: Arc<str>,
        opts: EntryOptions,
        loader: Option<Loader<V>>,
        candidate: Option<L1Entry<V>>,
        token: FlightToken<Option<V>>,
    ) -> Result<Option<V>> {
        let rkey = self.space.key(&key);
        let mut fallback = candidate
            .as_ref()
            .map(|e| Fallback::from_candidate(e, &opts, &self.lease));
        let mut l2_usable = !opts.skip_l2 && self.breaker.allow();
        let mut l2_error = None;
        let mut attempt = LockAttempt::NotTried;
        if l2_usable {
            // With a loader, the read also takes the lock when the entry is not fresh: one
            // round trip for both.
            let read = if loader.is_some() {
                let (read, a) = self.l2_read_or_lock(&rkey).await;
                attempt = a;
                read
            } else {
                self.l2_read(&rkey).await
            };
            match read {
                L2Read::Fresh(f) => {
                    if let LockAttempt::Taken(lock) = &attempt {
                        self.store.release(vec![lock.clone()], self.lock_ttl).await;
                    }
                    trace::tier("l2");
                    return Ok(self.answer_from_l2(&key, f, &opts, &token));
                }
                L2Read::Stale(f) => {
                    let entry = self.entry_from_l2(&f, &opts);
                    let fb = Fallback::from_l1(&entry, &opts);
                    if fb.in_swr && loader.is_some() && !token.is_answered() {
                        bump(&self.counters.stale_served);
                        bump(&self.counters.refreshes);
                        token.answer(Ok(fb.value.clone()));
                        self.fill(&key, entry, &opts, &token);
                    }
                    fallback = Some(fb);
                }
                L2Read::Miss => {}
                L2Read::Down(e) => {
                    l2_usable = false;
                    l2_error = Some(e);
                }
            }
        }
        // The outage policy: Redis cannot be asked and the bus cannot vouch for L1, but an
        // L1 entry fresh by its own TTL is still inside the outage staleness (judged now,
        // after the failed call).
        if !l2_usable
            && !opts.skip_l2
            && let Some(value) = Fallback::outage_answer(candidate.as_ref(), &opts, &self.lease)
        {
            bump(&self.counters.outage_served);
            trace::tier("l1");
            tracing::debug!(target: "tiered::outage", "serving an L1 entry the bus cannot vouch for: Redis is unreachable");
            return Ok(value);
        }
        let Some(loader) = loader else {
            if let Some(fb) = fallback.filter(|f| f.in_swr) {
                bump(&self.counters.stale_served);
                return Ok(fb.value);
            }
            bump(&self.counters.misses);
            if let Some(e) = l2_error {
                return Err(e.into());
            }
            if !opts.skip_l2 && !l2_usable {
                return Err(Error::CircuitOpen);
            }
            return Ok(None);
        };
        if !token.is_answered() {
            bump(&self.counters.misses);
        }
        // The load paths are boxed: their state is large, and a read that never reaches them
        // should not carry (and copy) it.
        if !l2_usable {
            bump(&self.counters.unlocked_loads);
            return Box::pin(self.run_load(&key, &opts, loader, fallback, &token, None)).await;
        }
        if let LockAttempt::Taken(lock) = attempt {
            // Read and locked atomically: nothing can have landed in between.
            return Box::pin(self.run_load(&key, &opts, loader, fallback, &token, Some(lock)))
                .await;
        }
        Box::pin(self.locked_load(&key, &rkey, &opts, loader, fallback, &token)).await
    }
}
