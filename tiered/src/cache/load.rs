//! The load path: the key's Redis lock (taken, waited for, extended, released on every exit),
//! the loader on its own task, fail-safe and soft timeouts, and the conditional write.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use l1::Entry;
use l2::{EntryMeta, Key, Lock, RedisStore};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::flight::FlightToken;
use crate::options::EntryOptions;
use crate::trace;

use super::read::{Cached, Fallback, L2Read};
use super::{Inner, Loaded, Loader};
use crate::stats::bump;
use l1::deadline_after;

/// Releases a lock on every exit path: if the load ends without releasing it (an error,
/// a panic, a cut-off), a task releases it, so waiters take over at once.
struct LockGuard {
    store: RedisStore,
    lock: Option<Lock>,
    ttl: Duration,
}

impl LockGuard {
    fn take(&mut self) -> Option<Lock> {
        self.lock.take()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (store, ttl) = (self.store.clone(), self.ttl);
            rt.spawn(async move { store.release(vec![lock], ttl).await });
        }
    }
}

/// Aborts the loader's task if the load is dropped (cut off at the maximum load time, or
/// the cache shut down).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<V> Inner<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// The bytes a loaded result is written as: the value, or an "absent" marker.
    pub(crate) fn encode_loaded(&self, value: Option<&V>, meta: &EntryMeta) -> l2::Result<Vec<u8>> {
        match value {
            Some(v) => self.codec.encode(v, meta),
            None => self.codec.encode_absent(meta),
        }
    }

    /// Serves `fallback` as a fail-safe answer, counting it once and throttling the loader:
    /// L1 then holds the old value as fresh for the throttle period.
    pub(crate) fn serve_fail_safe(
        &self,
        key: &Arc<str>,
        fallback: &Fallback<V>,
        opts: &EntryOptions,
        token: &FlightToken<Option<V>>,
        why: &(dyn fmt::Display + Sync),
    ) {
        // Only this flight's body answers from here on, so check-then-answer is not racy;
        // count before answering, so a caller that returns sees the count.
        if !token.is_answered() {
            bump(&self.counters.fail_safe);
            tracing::warn!(
                target: "tiered::fail_safe",
                namespace = %self.namespace,
                reason = %why,
                "serving a stale value: the load failed or is late"
            );
            token.answer(Ok(fallback.value.clone()));
        }
        // Put back only what L1 still holds: an announcement or a gap that removed it since
        // the read must not be undone.
        let still_there = fallback.source.as_ref().is_none_or(|source| {
            self.l1
                .get(&**key)
                .is_some_and(|now| Arc::ptr_eq(&now, source))
        });
        if !fallback.fresh && still_there {
            let throttle = opts.fail_safe_throttle;
            let entry = self
                .entry(fallback.value.clone(), 0, throttle, throttle, opts)
                .version(fallback.version);
            self.fill(key, entry, opts, token);
        }
    }

    /// Takes the key's Redis lock and loads, or waits for the holder's value.
    pub(crate) async fn locked_load(
        &self,
        key: &Arc<str>,
        rkey: &Key,
        opts: &EntryOptions,
        loader: Loader<V>,
        mut fallback: Option<Fallback<V>>,
        token: &FlightToken<Option<V>>,
    ) -> Result<Option<V>> {
        // A live holder extends its lock every third of its TTL, so polling at that pace (on
        // top of the notices) finds a dead holder's lock gone within about one TTL.
        let poll = self.lock_ttl / 3;
        let mut waited = false;
        loop {
            // Watch before trying, so a notice sent between the two still wakes us.
            let mut wait = self.waiters.watch(rkey);
            let locked = self.store.try_lock(rkey, self.lock_ttl).await;
            self.note_l2(locked.as_ref().err());
            match locked {
                Ok(Some(lock)) => {
                    drop(wait);
                    // The value may have landed between our read and the lock.
                    match self.l2_read(rkey).await {
                        L2Read::Fresh(f) => {
                            self.store.release(vec![lock], self.lock_ttl).await;
                            return Ok(self.answer_from_l2(key, f, opts, token));
                        }
                        L2Read::Stale(f) if fallback.is_none() => {
                            let entry = self.entry_from_l2(&f, opts);
                            fallback = Some(Fallback::from_l1(&entry, opts));
                        }
                        _ => {}
                    }
                    return self
                        .run_load(key, opts, loader, fallback, token, Some(lock))
                        .await;
                }
                Ok(None) => {
                    if !waited {
                        waited = true;
                        bump(&self.counters.lock_waits);
                    }
                    wait.notified(poll).await;
                    match self.l2_read(rkey).await {
                        L2Read::Fresh(f) => {
                            return Ok(self.answer_from_l2(key, f, opts, token));
                        }
                        L2Read::Down(_) => break,
                        L2Read::Stale(_) | L2Read::Miss => {}
                    }
                }
                Err(_) => break,
            }
        }
        bump(&self.counters.unlocked_loads);
        self.run_load(key, opts, loader, fallback, token, None)
            .await
    }

    /// Runs the loader on its own task (a panic becomes an error), extending `lock` while it
    /// runs and serving the fallback at the soft timeout; then writes L2 (only while the lock
    /// holds) and L1.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_load(
        &self,
        key: &Arc<str>,
        opts: &EntryOptions,
        loader: Loader<V>,
        fallback: Option<Fallback<V>>,
        token: &FlightToken<Option<V>>,
        lock: Option<Lock>,
    ) -> Result<Option<V>> {
        let started = Instant::now();
        // Without a lock (and not skipping L2 on purpose) the load runs because Redis could
        // not be asked: its value is this node's alone (see `local_entry`).
        let mut redis_unreachable = lock.is_none() && !opts.skip_l2;
        let mut lost_lock = false;
        let mut task = AbortOnDrop(tokio::spawn(loader()));
        let mut guard = LockGuard {
            store: self.store.clone(),
            lock,
            ttl: self.lock_ttl,
        };
        let extend_every = self.lock_ttl / 3;
        let extend = tokio::time::sleep(extend_every);
        tokio::pin!(extend);
        let soft = opts
            .soft_timeout
            .filter(|_| fallback.as_ref().is_some_and(|f| f.usable(opts)));
        let soft_sleep = tokio::time::sleep(soft.unwrap_or(Duration::ZERO));
        tokio::pin!(soft_sleep);
        let mut soft_armed = soft.is_some();
        let outcome = loop {
            tokio::select! {
                r = &mut task.0 => break r,
                () = &mut soft_sleep, if soft_armed => {
                    soft_armed = false;
                    if let Some(fb) = &fallback {
                        self.serve_fail_safe(key, fb, opts, token, &"soft timeout");
                    }
                }
                () = &mut extend, if guard.lock.is_some() => {
                    extend.as_mut().reset(tokio::time::Instant::now() + extend_every);
                    if let Some(lock) = &guard.lock {
                        match self.store.extend_lock(lock, self.lock_ttl).await {
                            Ok(true) => {}
                            // Someone else has it now: our result will not be written.
                            Ok(false) => {
                                tracing::debug!(target: "tiered::lock", "lost the lock while loading");
                                guard.lock = None;
                                lost_lock = true;
                            }
                            Err(e) => self.note_l2(Some(&e)),
                        }
                    }
                }
            }
        };
        let loaded = match outcome {
            Ok(Ok(loaded)) => loaded,
            failed => {
                bump(&self.counters.load_errors);
                let error = match failed {
                    Ok(Err(source)) => Error::Loader {
                        key: key.to_string(),
                        source: Arc::from(source),
                    },
                    _ => Error::LoadAborted {
                        key: key.to_string(),
                    },
                };
                // Release now (and wake the waiters, one of which loads again).
                if let Some(lock) = guard.take() {
                    self.store.release(vec![lock], self.lock_ttl).await;
                }
                if let Some(fb) = fallback.filter(|f| f.usable(opts)) {
                    self.serve_fail_safe(key, &fb, opts, token, &error);
                    return Ok(fb.value);
                }
                return Err(error);
            }
        };
        bump(&self.counters.loads);
        trace::tier("loader");
        let Loaded { value, ttl } = loaded;
        if value.is_none() {
            bump(&self.counters.not_found);
        }
        let meta = match &value {
            Some(_) => opts.value_meta(ttl),
            None => match opts.absent_meta(ttl) {
                Some(meta) => meta,
                // "Not found" is not cached: release the lock and answer.
                None => {
                    if let Some(lock) = guard.take() {
                        self.store.release(vec![lock], self.lock_ttl).await;
                    }
                    return Ok(None);
                }
            },
        };
        let (fresh, life) = (meta.fresh_for, meta.stale_for);
        let encoded = self.encode_loaded(value.as_ref(), &meta);
        let mut weight = 0;
        // A lock lost while loading went to a newer write or another loader: our value is
        // no answer for L1 (as when the conditional write is refused below).
        let mut may_fill = !lost_lock;
        if lost_lock {
            bump(&self.counters.duplicate_loads);
        }
        let mut version = 0;
        match encoded {
            Ok(bytes) => {
                weight = bytes.len();
                if let Some(lock) = guard.take() {
                    let done = self.store.complete_lock(&lock, &bytes, life).await;
                    self.note_l2(done.as_ref().err());
                    match done {
                        Ok(Some(v)) => version = v,
                        Ok(None) => {
                            // The lock passed on: a newer write (whose value must win) or a
                            // duplicate load. Do not put ours in L1 either.
                            bump(&self.counters.duplicate_loads);
                            may_fill = false;
                        }
                        Err(e) => {
                            redis_unreachable |= e.is_unavailable();
                            guard.lock = Some(lock);
                        }
                    }
                }
                // Without the lock (Redis was failing or skipped) nothing is written: a plain
                // write could overwrite a newer value.
            }
            Err(e) => {
                tracing::warn!(
                    target: "tiered::l2",
                    namespace = %self.namespace,
                    error = %e,
                    "loaded value not written to L2"
                );
            }
        }
        drop(guard);
        if may_fill {
            let entry = if redis_unreachable {
                // Redis could not be asked or written: nobody else will see this value, and
                // no lock kept its load unique. This node may use it for Δ from the load's
                // start (see `Cached::local`), and not longer.
                self.local_entry(value.clone(), weight, started, fresh, opts)
            } else {
                Some(
                    self.entry(value.clone(), weight, fresh, life, opts)
                        .version(version),
                )
            };
            if let Some(entry) = entry {
                self.fill(key, entry, opts, token);
            }
        }
        Ok(value)
    }

    /// An L1 entry for a value loaded from the source at `started` without Redis: fresh (and
    /// answering without the lease) until `started` + Δ at most, then kept for fail-safe as
    /// an ordinary entry would be. `None` if Δ has passed already.
    pub(crate) fn local_entry(
        &self,
        value: Option<V>,
        weight: usize,
        started: Instant,
        fresh: Duration,
        opts: &EntryOptions,
    ) -> Option<Entry<Cached<V>>> {
        let trusted = self.delta.checked_sub(started.elapsed())?;
        let fresh = fresh.min(trusted).min(opts.l1_ttl.unwrap_or(Duration::MAX));
        if fresh.is_zero() {
            return None;
        }
        let life = fresh.max(opts.fail_safe_max);
        let now = Instant::now();
        let held = Cached {
            value,
            fresh_until: deadline_after(now, fresh),
            local: true,
        };
        Some(
            Entry::new(Arc::clone(&self.namespace), held)
                .weight(weight)
                .time_to_live(life)
                .fresh_for(fresh),
        )
    }
}
