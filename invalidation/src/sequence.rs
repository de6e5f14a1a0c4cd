//! The sequence judge: decides, from the sequence numbers and vouches of each writer's
//! messages, when a message that was certainly published has not arrived.
//!
//! # Why vouches
//! A writer numbers a message when it builds it, but the message is published by the Lua
//! script that writes Redis. When that write fails (the link is cut, it times out, the caller
//! is cancelled) the number is never published. Judging gaps by holes in the numbering would
//! call each such number a lost message, and every peer would drop its whole L1 for a write
//! that never happened. So a hole proves nothing; only a number the writer *knows* was
//! published can be missed.
//!
//! The writer learns that when its script (or `PUBLISH`) returns Ok: the cache then calls
//! [`Publisher::acknowledged`](crate::Publisher::acknowledged). Each message the writer builds
//! afterwards carries the acknowledged numbers not yet carried by an earlier message (at most
//! [`MAX_VOUCHES`](crate::message::MAX_VOUCHES); beyond that the oldest are dropped: less
//! detection, never a false gap). A receiver that gets a message vouching for a number it has
//! not received *owes* that number; if it is still owed after the heartbeat timeout T (pub/sub
//! keeps order along each path, so on one server an acknowledged message arrives before any
//! message built after its acknowledgement; on a cluster the paths differ by less than T), it
//! was lost: a [`GapReason::SequenceGap`](crate::GapReason::SequenceGap), reported once.
//!
//! What this gives up: a lost message is noticed only when a later message of the same writer
//! arrives and vouches for it, and only if it was acknowledged before that later message was
//! built. A lost message also shows through the lease: the probe round it was published before
//! never comes back with it missing unless the message itself was dropped on its way, which is
//! the case this judge is for. A vouch is also lost with the message that carries it, when
//! that message's own write fails; those numbers are then not checked.
//!
//! # Bounds
//! Per (channel, origin) the judge keeps the highest number received, a window of the
//! [`WINDOW`] numbers below it (one bit each), the first number received (numbers before it
//! were published before this process listened, and are not owed), and at most [`MAX_OWED`]
//! owed numbers. At most [`MAX_ORIGINS`] writers are tracked; beyond that the least recently
//! heard from are forgotten (a forgotten writer starts afresh). No arithmetic on a received
//! number can overflow: `u64::MAX` is a number like any other.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// How many numbers below the highest received a writer's window remembers.
pub(crate) const WINDOW: u64 = 1024;
/// The most owed numbers kept per writer (the oldest are dropped beyond it).
pub(crate) const MAX_OWED: usize = 64;
/// The most writers tracked at once.
pub(crate) const MAX_ORIGINS: usize = 4096;

const WORDS: usize = (WINDOW / 64) as usize;

/// One writer's numbers as seen on one channel.
struct Origin {
    /// The first number received: vouches below it are for messages published before.
    base: u64,
    /// The highest number received.
    high: u64,
    /// Bit `n % WINDOW` is set when `n` (within `WINDOW` of `high`) was received.
    seen: [u64; WORDS],
    /// Vouched for but not received, with when each became owed.
    owed: BTreeMap<u64, Instant>,
    /// When it was last heard from, and the judge's tick then (for the least recently used).
    last_seen: Instant,
    tick: u64,
}

impl Origin {
    fn new(seq: u64, now: Instant, tick: u64) -> Origin {
        let mut origin = Origin {
            base: seq,
            high: seq,
            seen: [0; WORDS],
            owed: BTreeMap::new(),
            last_seen: now,
            tick,
        };
        origin.mark(seq);
        origin
    }

    fn bit(n: u64) -> (usize, u64) {
        let i = n % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn mark(&mut self, n: u64) {
        let (w, b) = Self::bit(n);
        self.seen[w] |= b;
    }

    fn unmark(&mut self, n: u64) {
        let (w, b) = Self::bit(n);
        self.seen[w] &= !b;
    }

    /// Whether `n` is known received: `Some(true)`/`Some(false)` within the window, `None`
    /// when it is too old to tell.
    fn received(&self, n: u64) -> Option<bool> {
        if n > self.high {
            return Some(false);
        }
        if self.high - n >= WINDOW {
            return None;
        }
        let (w, b) = Self::bit(n);
        Some(self.seen[w] & b != 0)
    }

    fn receive(&mut self, seq: u64) {
        // A number a whole window away from the others, either way, is a writer that
        // restarted its numbering or lost a great many writes, or a forgery: judge from it
        // afresh (nothing before it is owed). Left in place, a forged number near u64::MAX
        // would put every genuine one out of the window for good.
        if seq.abs_diff(self.high) >= WINDOW {
            *self = Origin::new(seq, self.last_seen, self.tick);
            return;
        }
        self.owed.remove(&seq);
        if seq > self.high {
            let ahead = seq - self.high;
            if ahead >= WINDOW {
                self.seen = [0; WORDS];
            } else {
                // Clear the slots of the numbers skipped over (they now stand for newer ones).
                let mut n = self.high;
                while n < seq {
                    n += 1;
                    self.unmark(n);
                }
            }
            self.high = seq;
            self.mark(seq);
        } else if self.high - seq < WINDOW {
            self.mark(seq);
        }
    }

    fn vouch(&mut self, vouched: u64, by: u64, now: Instant) {
        // Vouches are for earlier messages, sent after this writer's first message seen here.
        if vouched >= by || vouched < self.base {
            return;
        }
        if self.received(vouched) == Some(false) {
            self.owed.entry(vouched).or_insert(now);
            if self.owed.len() > MAX_OWED {
                self.owed.pop_first();
            }
        }
    }
}

/// The sequence numbers of every writer heard from, per channel.
#[derive(Default)]
pub(crate) struct Sequences {
    channels: HashMap<String, HashMap<u64, Origin>>,
    origins: usize,
    tick: u64,
}

impl Sequences {
    /// Records message `seq` of `origin` on `channel`, which vouches for `vouches`.
    pub(crate) fn see(
        &mut self,
        channel: &str,
        origin: u64,
        seq: u64,
        vouches: &[u64],
        now: Instant,
    ) {
        self.tick = self.tick.wrapping_add(1);
        let tick = self.tick;
        let table = match self.channels.get_mut(channel) {
            Some(table) => table,
            None => self.channels.entry(channel.to_string()).or_default(),
        };
        let entry = match table.get_mut(&origin) {
            Some(entry) => {
                entry.receive(seq);
                entry
            }
            None => {
                self.origins += 1;
                table
                    .entry(origin)
                    .or_insert_with(|| Origin::new(seq, now, tick))
            }
        };
        entry.last_seen = now;
        entry.tick = tick;
        for &v in vouches {
            entry.vouch(v, seq, now);
        }
        if self.origins > MAX_ORIGINS {
            self.shrink(MAX_ORIGINS * 3 / 4);
        }
    }

    /// Forgets the least recently heard from writers until `keep` are left.
    fn shrink(&mut self, keep: usize) {
        let mut ticks: Vec<u64> = self
            .channels
            .values()
            .flat_map(|t| t.values().map(|o| o.tick))
            .collect();
        if ticks.len() <= keep {
            return;
        }
        let drop = ticks.len() - keep;
        let (_, cutoff, _) = ticks.select_nth_unstable(drop - 1);
        let cutoff = *cutoff;
        for table in self.channels.values_mut() {
            table.retain(|_, o| o.tick > cutoff);
        }
        self.channels.retain(|_, t| !t.is_empty());
        self.origins = self.channels.values().map(HashMap::len).sum();
    }

    /// The channels on which a vouched number has been owed for longer than `grace`: each
    /// is a gap, reported once (its owed numbers are forgotten).
    pub(crate) fn overdue(&mut self, now: Instant, grace: Duration) -> Vec<String> {
        let mut gaps = Vec::new();
        for (channel, table) in &mut self.channels {
            let mut gap = false;
            for origin in table.values_mut() {
                if origin
                    .owed
                    .values()
                    .any(|since| now.saturating_duration_since(*since) > grace)
                {
                    origin.owed.clear();
                    gap = true;
                }
            }
            if gap {
                gaps.push(channel.clone());
            }
        }
        gaps
    }

    /// Forgets what `channel` (every channel if `None`) owes: a gap raised for another reason
    /// covers those messages already.
    pub(crate) fn forgive(&mut self, channel: Option<&str>) {
        for (ch, table) in &mut self.channels {
            if channel.is_none_or(|c| c == ch) {
                for origin in table.values_mut() {
                    origin.owed.clear();
                }
            }
        }
    }

    /// Forgets writers not heard from for `idle`.
    pub(crate) fn forget_idle(&mut self, now: Instant, idle: Duration) {
        for table in self.channels.values_mut() {
            table.retain(|_, o| now.saturating_duration_since(o.last_seen) < idle);
        }
        self.channels.retain(|_, t| !t.is_empty());
        self.origins = self.channels.values().map(HashMap::len).sum();
    }

    /// How many writers are tracked.
    pub(crate) fn origins(&self) -> usize {
        self.origins
    }

    /// How many numbers are owed in all.
    #[cfg(test)]
    fn owed(&self) -> usize {
        self.channels
            .values()
            .flat_map(|t| t.values())
            .map(|o| o.owed.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(500);

    fn now() -> Instant {
        Instant::now()
    }

    async fn after(d: Duration) {
        tokio::time::advance(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burnt_number_is_never_a_gap() {
        let mut s = Sequences::default();
        // 2 was built but its write failed: never published, never acknowledged, never
        // vouched for. 3 vouches for 1 (acknowledged) only.
        s.see("c", 7, 1, &[], now());
        s.see("c", 7, 3, &[1], now());
        for _ in 0..10 {
            after(T).await;
            assert!(s.overdue(now(), T).is_empty());
        }
        s.see("c", 7, 4, &[3], now());
        after(T * 3).await;
        assert!(s.overdue(now(), T).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vouched_number_missing_past_the_grace_is_a_gap_once() {
        let mut s = Sequences::default();
        s.see("c", 7, 1, &[], now());
        // 2 was acknowledged, and lost on the way.
        s.see("c", 7, 3, &[1, 2], now());
        after(Duration::from_millis(400)).await;
        assert!(s.overdue(now(), T).is_empty());
        after(Duration::from_millis(200)).await;
        assert_eq!(s.overdue(now(), T), vec!["c".to_string()]);
        assert!(s.overdue(now(), T).is_empty(), "reported once");
        after(T * 2).await;
        assert!(s.overdue(now(), T).is_empty(), "reported once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_vouched_number_that_arrives_late_within_the_grace_is_not_a_gap() {
        let mut s = Sequences::default();
        s.see("c", 7, 1, &[], now());
        s.see("c", 7, 3, &[2], now());
        after(Duration::from_millis(300)).await;
        s.see("c", 7, 2, &[], now());
        after(T * 2).await;
        assert!(s.overdue(now(), T).is_empty());
        assert_eq!(s.owed(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn numbers_before_the_first_received_and_forged_vouches_are_not_owed() {
        let mut s = Sequences::default();
        // This process joined at 10: 3..9 were published before it listened.
        s.see("c", 7, 10, &[3, 4, 9], now());
        // A vouch for a later number, or its own, is no vouch.
        s.see("c", 7, 11, &[11, 12, u64::MAX], now());
        assert_eq!(s.owed(), 0);
        after(T * 2).await;
        assert!(s.overdue(now(), T).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn extreme_numbers_never_panic() {
        let mut s = Sequences::default();
        for seq in [u64::MAX, 0, u64::MAX - 1, u64::MAX, 1, u64::MAX / 2] {
            s.see("c", u64::MAX, seq, &[0, u64::MAX, u64::MAX - 1, 1], now());
            s.see(
                "c",
                0,
                seq,
                &[seq.wrapping_sub(1), seq.wrapping_add(1)],
                now(),
            );
        }
        after(T * 2).await;
        let _ = s.overdue(now(), T);
        assert_eq!(s.origins(), 2);
    }

    /// A forged number near u64::MAX under a real writer's origin must not put the writer's
    /// genuine numbers out of the window for good: once the writer is heard again, losses of
    /// its acknowledged messages are gaps again.
    #[tokio::test(start_paused = true)]
    async fn a_forged_jump_does_not_switch_off_gap_detection() {
        let mut s = Sequences::default();
        s.see("c", 7, 1, &[], now());
        s.see("c", 7, u64::MAX - 5, &[], now());
        s.see("c", 7, 2, &[1], now());
        s.see("c", 7, 3, &[2], now());
        // 4 was acknowledged and lost; 5 vouches for it.
        s.see("c", 7, 5, &[3, 4], now());
        after(T * 2).await;
        assert_eq!(s.overdue(now(), T), vec!["c".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_old_numbers_without_calling_them_missing() {
        let mut s = Sequences::default();
        s.see("c", 7, 1, &[], now());
        s.see("c", 7, 2, &[], now());
        s.see("c", 7, 5000, &[2, 4999], now());
        // A jump of a whole window: judged afresh from 5000, so nothing before it is owed
        // (2 fell out of the window; 4999 was before the new start).
        assert_eq!(s.owed(), 0);
        s.see("c", 7, 5002, &[5001], now());
        assert_eq!(s.owed(), 1);
        s.see("c", 7, 5001, &[], now());
        assert_eq!(s.owed(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_random_origins_stay_bounded() {
        let mut s = Sequences::default();
        for _ in 0..10_000 {
            let origin = fastrand::u64(..);
            let v: Vec<u64> = (0..8).map(|_| fastrand::u64(..)).collect();
            s.see("c", origin, fastrand::u64(..), &v, now());
            assert!(s.origins() <= MAX_ORIGINS);
        }
        // The most recent writer is still known: a vouch from it is judged.
        s.see("c", 42, 100, &[], now());
        s.see("c", 42, 102, &[101], now());
        assert!(s.owed() >= 1);
        assert!(s.origins() <= MAX_ORIGINS);
        after(Duration::from_secs(700)).await;
        s.forget_idle(now(), Duration::from_secs(600));
        assert_eq!(s.origins(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn writers_are_tracked_per_channel() {
        let mut s = Sequences::default();
        // Someone else uses origin 7 on another channel: the two never mix.
        s.see("a", 7, 1, &[], now());
        s.see("b", 7, 100, &[], now());
        s.see("a", 7, 3, &[2], now());
        after(T * 2).await;
        assert_eq!(s.overdue(now(), T), vec!["a".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_for_another_reason_forgives_what_is_owed() {
        let mut s = Sequences::default();
        s.see("a", 7, 1, &[], now());
        s.see("a", 7, 3, &[2], now());
        s.forgive(None);
        after(T * 2).await;
        assert!(s.overdue(now(), T).is_empty());
    }
}
