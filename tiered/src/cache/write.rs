//! The write path: `set`, `invalidate` and `clear`, each one Redis script (or scan) that
//! changes L2 and announces the change, then this node's L1 under a write ticket.

use std::sync::Arc;

use std::time::Instant;

use l2::{Announce, Carry, EntryMeta};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::coherence::Admission;
use crate::error::Result;
use crate::options::EntryOptions;
use crate::sync::Mutex;

use super::Inner;
use crate::stats::bump;

impl<V> Inner<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// The body of `set`: writes L2 (announcing the change and breaking any load's lock), then
    /// this node's L1, under a write ticket taken before anything else.
    pub(crate) async fn write(
        self: Arc<Self>,
        key: Arc<str>,
        bytes: Vec<u8>,
        value: Option<V>,
        meta: EntryMeta,
        options: EntryOptions,
    ) -> Result<u64> {
        // Fills that began earlier read the old value: revoked. Announcements that arrive
        // while this write is on its way keep its (then older) value out of L1.
        let ticket = self.admission.begin_write(&key);
        self.detach(&key);
        let (fresh, life) = (meta.fresh_for, meta.stale_for);
        let weight = bytes.len();
        let mut version = 0;
        if !options.skip_l2 {
            // With `carry_values` and a bus secret, a small value rides in the announcement
            // under a version this node proposes (the script takes it or announces as usual): the other nodes' next
            // read of it is an L1 hit.
            let proposal = (self.carry_values
                && self.publisher.signs()
                && bytes.len() + key.len() <= CARRY_MAX_BYTES)
                .then(|| self.server_clock.propose(Instant::now()))
                .flatten();
            let (message, replace) = match proposal {
                Some(p) => self.publisher.evict_or_replace(&key, p, &bytes),
                None => (self.publisher.evict(&key), None),
            };
            let carry = proposal
                .zip(replace.as_deref())
                .map(|(version, message)| Carry { version, message });
            let written = self
                .store
                .overwrite_carrying(
                    &self.space.key(&key),
                    &bytes,
                    life,
                    self.announce(&message),
                    carry,
                )
                .await;
            self.note_l2(written.as_ref().err());
            match written {
                Ok(done) => {
                    let v = done.version;
                    self.server_clock.note(done.server_micros, Instant::now());
                    version = v;
                    // Published for certain: later messages vouch for its number, so a peer
                    // that misses it sees a gap (an unpublished number never is one).
                    self.publisher.acknowledged(&message);
                    // Before the L1 insert: an older write of this node's that finishes later
                    // keeps its value out, and a copy older than this write goes now (a newer
                    // write of this node's may have revoked our ticket: the call still returns
                    // with this node reading at least this version).
                    self.admission.on_announcement(&self.l1, &key, v);
                    bump(&self.counters.invalidations_sent);
                }
                Err(e) => {
                    // Whether it reached Redis is unknown: this node forgets the key.
                    self.admission.revoke(&key);
                    self.detach(&key);
                    self.l1.invalidate(&*key);
                    return Err(e.into());
                }
            }
        }
        // Loads that began while the write was on its way read the old value: callers from
        // now on do not join them (their tickets refuse it already).
        self.detach(&key);
        match value {
            Some(value) => {
                let entry = self
                    .entry(Some(value), weight, fresh, life, &options)
                    .version(version);
                Admission::admit(&self.l1, &key, &ticket, entry);
            }
            // `skip_l1`: this node keeps no copy, so none older than the write either.
            None => self.l1.invalidate(&*key),
        }
        Ok(version)
    }

    /// The body of `invalidate`: a tombstone in L2 (announced, breaking any load's lock), and
    /// the key out of this node's L1, before and after.
    pub(crate) async fn remove(self: Arc<Self>, key: Arc<str>) -> Result<u64> {
        let ticket = self.admission.begin_write(&key);
        self.detach(&key);
        self.l1.invalidate(&*key);
        let message = self.publisher.evict(&key);
        let removed = self
            .store
            .remove(
                &self.space.key(&key),
                self.defaults.l2_time_to_live(),
                self.announce(&message),
            )
            .await;
        self.note_l2(removed.as_ref().err());
        // The floor first: a concurrent `set` of this node that fills L1 after the
        // invalidation below sees it when it re-checks, and drops its older value. A delete
        // whose outcome is unknown revokes instead.
        match &removed {
            Ok(removal) => {
                self.publisher.acknowledged(&message);
                self.admission.announced(&key, removal.version);
            }
            Err(_) => self.admission.revoke(&key),
        }
        drop(ticket);
        self.detach(&key);
        self.l1.invalidate(&*key);
        let removal = removed?;
        bump(&self.counters.invalidations_sent);
        Ok(removal.version)
    }

    /// The body of `clear`: this node's L1 out, the namespace's keys out of L2, then the
    /// announcement, then this node's L1 again (fills that read before the delete).
    pub(crate) async fn clear(self: Arc<Self>) -> Result<u64> {
        self.invalidate_local();
        let deleted = self.store.clear(&self.space).await;
        self.note_l2(deleted.as_ref().err());
        // Announced even when the delete failed part-way: some keys may be gone already, and
        // other nodes must not keep copies of them.
        let message = self.publisher.clear_namespace();
        let published = self.store.publish(self.publisher.channel(), &message).await;
        self.note_l2(published.as_ref().err());
        if published.is_ok() {
            self.publisher.acknowledged(&message);
        }
        self.invalidate_local();
        let deleted = deleted?;
        published?;
        bump(&self.counters.invalidations_sent);
        Ok(deleted)
    }

    /// The announcement of a change: `message` on this cache's channel, sent by the script
    /// that makes the change.
    pub(crate) fn announce<'a>(&'a self, message: &'a [u8]) -> Announce<'a> {
        Announce {
            channel: self.publisher.channel(),
            message,
        }
    }
}

/// Values whose encoded bytes and key come to at most this ride in their write's announcement
/// (with `carry_values` and a signed bus): the message then stays within what the
/// subscriber's callback applies itself (values are taken only there, in arrival order).
pub(crate) const CARRY_MAX_BYTES: usize = 1536;

/// A lower bound of the Redis server's clock, from the last write's reply: the script read
/// `server_micros` before the reply arrived at `at`, so at any later instant the server's
/// clock is at least `server_micros` plus the time since `at` (clocks run at the same rate,
/// to a few parts per million).
#[derive(Debug, Default)]
pub(crate) struct ServerClock(Mutex<Option<(u64, Instant)>>);

impl ServerClock {
    pub(crate) fn note(&self, server_micros: u64, at: Instant) {
        *self.0.lock() = Some((server_micros, at));
    }

    /// A write version to propose for a write sent `now`: the lower bound, less 1 ms for the
    /// clocks' drift since the last reply. `None` before the first write. The script takes
    /// it only if it is above the key's version and not past its own clock.
    pub(crate) fn propose(&self, now: Instant) -> Option<u64> {
        let (server, at) = (*self.0.lock())?;
        let since = u64::try_from(now.saturating_duration_since(at).as_micros()).unwrap_or(0);
        Some(server.saturating_add(since).saturating_sub(1_000)).filter(|&p| p > 0)
    }
}
