//! `get_or_set_many`: L1, then one L2 round trip, then one loader call for what is missing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use l2::{Key, Lock};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::{BoxError, Fallback, Inner, L1Entry, TieredCache};
use crate::error::{Error, Result};
use crate::flight::{Claim, Waiter};
use crate::options::EntryOptions;
use crate::stats::bump;

pub(crate) async fn get_or_set_many<V, K, F, Fut, I, E>(
    cache: &TieredCache<V>,
    keys: &[K],
    opts: EntryOptions,
    load: F,
) -> Result<HashMap<String, V>>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    K: AsRef<str>,
    F: FnOnce(Vec<String>) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<I, E>> + Send + 'static,
    I: IntoIterator<Item = (String, V)>,
    E: Into<BoxError>,
{
    let inner = &cache.inner;
    let mut out = HashMap::with_capacity(keys.len());
    let mut seen = HashSet::with_capacity(keys.len());
    let mut waiters: Vec<Waiter<Option<V>>> = Vec::new();
    let mut claims: Vec<Claim<Option<V>>> = Vec::new();
    // L1 entries that did not answer: maybe usable under the outage policy if Redis fails.
    let mut outage: HashMap<String, L1Entry<V>> = HashMap::new();
    for key in keys {
        let key = key.as_ref();
        if !seen.insert(key) {
            continue;
        }
        match inner.l1_lookup(key, &opts) {
            Ok(hit) => {
                if let Some(v) = hit {
                    out.insert(key.to_string(), v);
                }
                continue;
            }
            Err(Some(candidate)) => {
                outage.insert(key.to_string(), candidate);
            }
            Err(None) => {}
        }
        // Join a load in flight, or claim the key so single-key callers join ours.
        inner.no_stale_joins(key);
        let (waiter, claim) = inner.loads.join_or_claim(key);
        waiters.push(waiter);
        claims.extend(claim);
    }
    if !claims.is_empty() {
        let inner = Arc::clone(inner);
        let mut closed = inner.closed.clone();
        let limit = inner.max_load_time;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::timeout(limit, resolve_many(&inner, claims, outage, opts, load)) => {}
                _ = closed.changed() => {}
            }
        });
    }
    let deadline = tokio::time::Instant::now() + opts.hard_timeout;
    for waiter in waiters {
        let key = waiter.key().to_string();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match waiter.wait(left.max(Duration::from_millis(1))).await {
            Ok(Some(v)) => {
                out.insert(key, v);
            }
            Ok(None) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The batch load, on its own task: answers every claim however it ends (a dropped claim
/// answers `LoadAborted`).
async fn resolve_many<V, F, Fut, I, E>(
    inner: &Arc<Inner<V>>,
    claims: Vec<Claim<Option<V>>>,
    mut outage: HashMap<String, L1Entry<V>>,
    opts: EntryOptions,
    load: F,
) where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    F: FnOnce(Vec<String>) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<I, E>> + Send + 'static,
    I: IntoIterator<Item = (String, V)>,
    E: Into<BoxError>,
{
    let mut claims: Vec<(Claim<Option<V>>, Key)> = claims
        .into_iter()
        .map(|c| {
            let rkey = inner.space.key(c.key());
            (c, rkey)
        })
        .collect();
    let mut l2_usable = !opts.skip_l2 && inner.breaker.allow();
    let mut locks: Vec<Option<Lock>> = Vec::new();
    if l2_usable {
        let rkeys: Vec<Key> = claims.iter().map(|(_, k)| k.clone()).collect();
        let read = inner.store.lookup_many(&rkeys, &inner.codec).await;
        inner.note_l2(read.as_ref().err());
        l2_usable = read.is_ok();
        if let Ok(found) = read {
            let mut missing = Vec::with_capacity(claims.len());
            for ((claim, rkey), fetched) in claims.into_iter().zip(found) {
                match fetched {
                    Some(f) if f.is_fresh() => {
                        let key: Arc<str> = claim.key().into();
                        let value = inner.answer_from_l2(&key, f, &opts, &claim.token());
                        claim.finish(Ok(value));
                    }
                    _ => missing.push((claim, rkey)),
                }
            }
            claims = missing;
        }
        if claims.is_empty() {
            return;
        }
    }
    if !l2_usable && !opts.skip_l2 {
        // The outage policy, as for a single key: what L1 holds answers for those keys.
        let mut left = Vec::with_capacity(claims.len());
        for (claim, rkey) in claims {
            // Judged now, after the failed read: the lease may have run on meanwhile.
            let candidate = outage.remove(claim.key());
            match Fallback::outage_answer(candidate.as_ref(), &opts, &inner.lease) {
                Some(value) => {
                    bump(&inner.counters.outage_served);
                    claim.finish(Ok(value));
                }
                None => left.push((claim, rkey)),
            }
        }
        claims = left;
        if claims.is_empty() {
            return;
        }
    }
    if l2_usable {
        let rkeys: Vec<Key> = claims.iter().map(|(_, k)| k.clone()).collect();
        let locked = inner.store.try_lock_many(&rkeys, inner.lock_ttl).await;
        inner.note_l2(locked.as_ref().err());
        locks = locked.unwrap_or_default();
    }
    locks.resize(claims.len(), None);
    for _ in &claims {
        bump(&inner.counters.misses);
    }
    let names: Vec<String> = claims.iter().map(|(c, _)| c.key().to_string()).collect();
    let started = Instant::now();
    let loaded = tokio::spawn(async move {
        load(names)
            .await
            .map(|i| i.into_iter().collect::<HashMap<String, V>>())
            .map_err(Into::<BoxError>::into)
    });
    let loaded: std::result::Result<HashMap<String, V>, Error> = match loaded.await {
        Ok(Ok(map)) => Ok(map),
        Ok(Err(e)) => Err(Error::Loader {
            key: claims
                .iter()
                .map(|(c, _)| c.key())
                .collect::<Vec<_>>()
                .join(","),
            source: Arc::from(e),
        }),
        Err(_) => Err(Error::LoadAborted {
            key: claims
                .iter()
                .map(|(c, _)| c.key())
                .collect::<Vec<_>>()
                .join(","),
        }),
    };
    let mut map = match loaded {
        Ok(map) => map,
        Err(e) => {
            bump(&inner.counters.load_errors);
            let held: Vec<Lock> = locks.into_iter().flatten().collect();
            inner.store.release(held, inner.lock_ttl).await;
            for (claim, _) in claims {
                claim.finish(Err(e.clone()));
            }
            return;
        }
    };
    bump(&inner.counters.loads);
    let meta = opts.value_meta(None);
    let life = meta.stale_for;
    let negative = opts.absent_meta(None);
    // Encode each result; write those we hold the lock of, in one round trip per kind.
    let mut writes: Vec<(Lock, Vec<u8>)> = Vec::new();
    let mut negative_writes: Vec<(Lock, Vec<u8>)> = Vec::new();
    let mut release: Vec<Lock> = Vec::new();
    let mut results = Vec::with_capacity(claims.len());
    for ((claim, _), lock) in claims.into_iter().zip(locks) {
        let value = map.remove(claim.key());
        let encoded = match (&value, &negative) {
            (Some(_), _) => inner.encode_loaded(value.as_ref(), &meta).ok(),
            (None, Some(neg)) => inner.encode_loaded(None, neg).ok(),
            (None, None) => None,
        };
        let weight = encoded.as_ref().map_or(0, Vec::len);
        let slot = match (lock, encoded) {
            (Some(lock), Some(bytes)) if value.is_some() => {
                writes.push((lock, bytes));
                Some((false, writes.len() - 1))
            }
            (Some(lock), Some(bytes)) => {
                negative_writes.push((lock, bytes));
                Some((true, negative_writes.len() - 1))
            }
            (Some(lock), None) => {
                release.push(lock);
                None
            }
            (None, _) => None,
        };
        if value.is_none() {
            bump(&inner.counters.not_found);
        }
        results.push((claim, value, weight, slot));
    }
    let written = complete(inner, &writes, life).await;
    let written_negative = match &negative {
        Some(neg) => complete(inner, &negative_writes, neg.stale_for).await,
        None => Vec::new(),
    };
    // Per item: `None` where the write was refused, `Some(version)` otherwise (0 when it was
    // not attempted or Redis failed).
    let outcome = |slot: Option<(bool, usize)>| match slot {
        Some((false, i)) => written.get(i).copied().unwrap_or(Some(0)),
        Some((true, i)) => written_negative.get(i).copied().unwrap_or(Some(0)),
        None => Some(0),
    };
    inner.store.release(release, inner.lock_ttl).await;
    for (claim, value, weight, slot) in results {
        // A write refused because the lock passed on: a newer value exists; keep ours out of L1.
        let Some(version) = outcome(slot) else {
            bump(&inner.counters.duplicate_loads);
            claim.finish(Ok(value));
            continue;
        };
        if value.is_some() || negative.is_some() {
            let lifetimes = match (&value, &negative) {
                (None, Some(neg)) => neg,
                _ => &meta,
            };
            let (f, l) = (lifetimes.fresh_for, lifetimes.stale_for);
            let key: Arc<str> = claim.key().into();
            // As in a single load: a value Redis never saw is this node's for Δ at most.
            let entry = if !l2_usable && !opts.skip_l2 {
                inner.local_entry(value.clone(), weight, started, f, &opts)
            } else {
                Some(
                    inner
                        .entry(value.clone(), weight, f, l, &opts)
                        .version(version),
                )
            };
            if let Some(entry) = entry {
                inner.fill(&key, entry, &opts, &claim.token());
            }
        }
        claim.finish(Ok(value));
    }
}

/// Completes `writes` under their locks; on a Redis failure nothing counts as refused.
async fn complete<V>(
    inner: &Inner<V>,
    writes: &[(Lock, Vec<u8>)],
    ttl: Duration,
) -> Vec<Option<u64>>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    if writes.is_empty() {
        return Vec::new();
    }
    let done = inner.store.complete_locks(writes, ttl).await;
    inner.note_l2(done.as_ref().err());
    match done {
        Ok(written) => written,
        Err(_) => {
            let locks: Vec<Lock> = writes.iter().map(|(l, _)| l.clone()).collect();
            inner.store.release(locks, inner.lock_ttl).await;
            vec![Some(0); writes.len()]
        }
    }
}
