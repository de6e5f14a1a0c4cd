//! The write path: `set`, `invalidate` and `clear`, each one Redis script (or scan) that
//! changes L2 and announces the change, then this node's L1 under a write ticket.

use std::sync::Arc;

use l2::{Announce, EntryMeta};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::coherence::Admission;
use crate::error::Result;
use crate::options::EntryOptions;

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
            let message = self.publisher.evict(&key);
            let written = self
                .store
                .overwrite(&self.space.key(&key), &bytes, life, self.announce(&message))
                .await;
            self.note_l2(written.as_ref().err());
            match written {
                Ok(v) => {
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
