//! What one batch of the bus's queue asks for ([`State::plan`]), and handing it to the
//! consumers ([`deliver`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::bus::{Beat, Inner, Raw};
use crate::event::{Consumer, Event, Eviction, GapReason};
use crate::message::{self, Action};
use crate::sequence::Sequences;
use crate::sign::Key;
use crate::stats::Counters;

/// How many recent clear messages are remembered to refuse their replays.
const RECENT_CLEARS: usize = 4096;

#[derive(Default)]
pub(crate) struct State {
    sequences: Sequences,
    /// With a secret: the (origin, seq) of recent clears, to refuse their replays; bounded
    /// (the oldest are forgotten: a clear replayed later only clears once more). No message is
    /// ever dropped for its age: a sender whose clock is off would lose every invalidation.
    clears: HashSet<(u64, u64)>,
    clears_order: VecDeque<(u64, u64)>,
    subscribed: HashSet<String>,
    run_id: Option<String>,
    /// The newest beat whose `run_id` was taken (beats overlap and may finish out of order).
    beat: u64,
}

/// A message as the subscriber's reader read it: decoded and checked once, there.
pub(crate) struct Received {
    channel: String,
    /// Whether its evictions were applied by the callback already (otherwise the task does).
    pub(crate) applied: bool,
    /// The payload's length (held against the queue's byte budget).
    pub(crate) len: usize,
    /// When it was read (µs since the epoch).
    at: u64,
    decoded: Result<message::Message, message::MessageError>,
    check: Check,
}

/// What the bus's secret says of a message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// The bus has no secret.
    Open,
    Unsigned,
    Forged,
    Signed,
}

impl Received {
    /// Decodes `payload` and checks its signature against `secret`, if any.
    pub(crate) fn read(channel: &str, payload: &[u8], secret: Option<&Key>) -> Received {
        let decoded = message::decode(payload);
        let check = match (secret, &decoded) {
            (None, _) => Check::Open,
            (Some(_), Err(_)) => Check::Unsigned,
            (Some(key), Ok(msg)) => match &msg.signature {
                None => Check::Unsigned,
                Some(s) if s.verify(key, channel, payload) => Check::Signed,
                Some(_) => Check::Forged,
            },
        };
        Received {
            channel: channel.to_string(),
            applied: false,
            len: payload.len(),
            at: message::now_micros(),
            decoded,
            check,
        }
    }

    /// Marks it applied by the callback, and drops its keys and value (the task needs only
    /// its number, vouches and kind; the queue's byte budget counts the payload, not what was
    /// decoded from it).
    pub(crate) fn mark_applied(&mut self) {
        self.applied = true;
        if let Ok(msg) = &mut self.decoded {
            match &mut msg.action {
                Action::Evict(keys) => *keys = Vec::new(),
                Action::Replace { key, value, .. } => {
                    *key = String::new();
                    *value = Vec::new();
                }
                Action::ClearNamespace | Action::ClearAll => {}
            }
        }
    }

    /// The evictions it asks for, if it is one the bus accepts. Never dropped as a replay:
    /// applying one again is harmless, and a replaced value is taken only over an older
    /// version. A replacement's value is kept only when the message is signed with the
    /// bus's secret; without one, it is an eviction.
    pub(crate) fn evictions(&self) -> Option<Vec<Eviction>> {
        if !matches!(self.check, Check::Open | Check::Signed) {
            return None;
        }
        let msg = self.decoded.as_ref().ok()?;
        match &msg.action {
            Action::Evict(keys) => Some(
                keys.iter()
                    .map(|(key, version)| Eviction {
                        key: key.clone(),
                        version: *version,
                        origin: msg.origin,
                        value: None,
                    })
                    .collect(),
            ),
            Action::Replace {
                key,
                version,
                value,
            } => Some(vec![Eviction {
                key: key.clone(),
                version: *version,
                origin: msg.origin,
                value: (self.check == Check::Signed).then(|| Arc::from(value.as_slice())),
            }]),
            Action::ClearNamespace | Action::ClearAll => None,
        }
    }
}

/// What one batch asks for, per channel.
#[derive(Default)]
pub(crate) struct Plan {
    gap_all: Option<GapReason>,
    gaps: HashMap<String, GapReason>,
    clears: HashMap<String, Vec<Event>>,
    /// Evictions the callback left to the task, in order of arrival.
    evictions: HashMap<String, Vec<Eviction>>,
    /// The start of the latest probe round that came back.
    pub(crate) confirmed: Option<std::time::Instant>,
}

impl State {
    /// What `batch` asks for: each item by its kind, in order, then what the sequences say
    /// after it; `overflowed`: items were dropped on a full queue before this batch's.
    pub(crate) fn plan(&mut self, inner: &Inner, batch: Vec<Raw>, overflowed: bool) -> Plan {
        let counters = &inner.counters;
        let now = Instant::now();
        let mut plan = Plan::default();
        for raw in batch {
            match raw {
                Raw::Message(received) => self.on_message(inner, &mut plan, received, now),
                Raw::Payload { channel, payload } => {
                    let received = Received::read(&channel, &payload, inner.config.secret.as_ref());
                    self.on_message(inner, &mut plan, received, now)
                }
                Raw::Disconnected => self.on_disconnect(counters),
                Raw::Subscribed(channel) => self.on_subscribed(&mut plan, channel),
                Raw::Beat(beat) => self.on_beat(counters, &mut plan, beat),
            }
        }
        self.after_batch(counters, &mut plan, now, inner.config.heartbeat_timeout);
        if overflowed {
            self.on_overflow(&mut plan);
        }
        plan
    }

    /// A message (decoded and checked by the reader, which applied it if it is an
    /// eviction): counted, its lag sampled, its number tracked, and a clear planned.
    fn on_message(&mut self, inner: &Inner, plan: &mut Plan, m: Received, now: Instant) {
        let counters = &inner.counters;
        // Values are taken only by the callback, in the order messages arrive: one applied
        // here could overtake a newer message the callback already applied.
        if !m.applied
            && let Some(evictions) = m.evictions()
        {
            plan.evictions
                .entry(m.channel.clone())
                .or_default()
                .extend(evictions.into_iter().map(|e| Eviction { value: None, ..e }));
        }
        counters.received.fetch_add(1, Ordering::Relaxed);
        counters.last_message_micros.store(m.at, Ordering::Relaxed);
        let Received {
            channel,
            applied: _,
            len,
            at,
            decoded,
            check,
        } = m;
        let msg = match decoded {
            Ok(msg) => msg,
            Err(e) => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "invalidation",
                    %channel, len, error = %e,
                    "skipping a malformed invalidation message"
                );
                return;
            }
        };
        if check == Check::Unsigned || check == Check::Forged {
            return self.drop_unauthentic(counters, &channel, check);
        }
        if check == Check::Signed
            && matches!(msg.action, Action::ClearNamespace | Action::ClearAll)
            && !self.first_clear(&msg)
        {
            return self.drop_unauthentic(counters, &channel, check);
        }
        counters.sample_lag(at.saturating_sub(msg.sent_micros));
        self.sequences
            .see(&channel, msg.origin, msg.seq, &msg.vouches, now);
        match msg.action {
            // Applied by the callback, or planned above.
            Action::Evict(_) | Action::Replace { .. } => {}
            Action::ClearNamespace => plan
                .clears
                .entry(channel)
                .or_default()
                .push(Event::ClearNamespace { origin: msg.origin }),
            Action::ClearAll => {
                let consumers = inner.consumers.read();
                for ch in consumers.keys() {
                    plan.clears
                        .entry(ch.clone())
                        .or_default()
                        .push(Event::ClearAll { origin: msg.origin });
                }
            }
        }
    }

    /// The subscriber connection dropped. Messages published from now on are lost, but
    /// nothing is dropped yet: the lease stops being renewed (so L1 stops answering as
    /// confirmed within Δ of the last proof), L1 entries stay for the outage policy, and the
    /// resubscription that ends the outage is the gap (see [`State::on_subscribed`]).
    fn on_disconnect(&mut self, counters: &Counters) {
        counters.down();
    }

    /// `channel` was subscribed. The first confirmation is the subscription itself, not a
    /// gap; every later one follows a reconnect, and is.
    fn on_subscribed(&mut self, plan: &mut Plan, channel: String) {
        if !self.subscribed.insert(channel.clone()) {
            plan.gaps.insert(channel, GapReason::Resubscribed);
        }
    }

    /// A heartbeat: the server's identity (another one is a gap on every channel) and the
    /// probe round (its start is a proof for the lease, if the identity read after it was).
    fn on_beat(&mut self, counters: &Counters, plan: &mut Plan, beat: Beat) {
        let Beat {
            n,
            run_id,
            probe,
            sent,
        } = beat;
        let run_id_read = run_id.is_ok();
        match run_id {
            Ok(run_id) if n > self.beat => {
                self.beat = n;
                counters.up();
                if self.run_id.as_ref().is_some_and(|old| *old != run_id) {
                    plan.gap_all = Some(GapReason::ServerRestarted);
                }
                self.run_id = Some(run_id);
            }
            // An older beat finishing after a newer one: nothing to learn.
            Ok(_) => {}
            Err(e) => {
                counters.down();
                counters.heartbeats_missed.fetch_add(1, Ordering::Relaxed);
                // No gap: a connection that stays up loses no messages (a paused or
                // stopped server delivers them late), and the lease, no longer
                // renewed, bounds how late. A connection that drops is a gap when it
                // is made again; a restarted server, by its new run_id.
                tracing::warn!(target: "invalidation", error = %e, "heartbeat missed");
            }
        }
        match probe {
            Some(Ok(took)) => {
                counters
                    .probe_micros
                    .store(took.as_micros() as u64, Ordering::Relaxed);
                // A proof only with the server's identity read after it.
                if run_id_read {
                    plan.confirmed = plan.confirmed.max(Some(sent));
                }
            }
            Some(Err(e)) => {
                // No gap: nothing is known lost. The lease is not renewed, so L1
                // stops answering once it runs out, until a probe comes back.
                counters.probes_late.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "invalidation", error = %e, "a pub/sub probe did not come back in time: the L1 lease is not renewed");
            }
            None => {}
        }
    }

    /// After a batch: its gaps forgive the numbers they may have lost, a number vouched for
    /// and still missing after `grace` is a gap, and writers idle for long are forgotten.
    fn after_batch(&mut self, counters: &Counters, plan: &mut Plan, now: Instant, grace: Duration) {
        if plan.gap_all.is_some() {
            self.sequences.forgive(None);
        }
        for channel in plan.gaps.keys() {
            self.sequences.forgive(Some(channel));
        }
        for channel in self.sequences.overdue(now, grace) {
            plan.gaps.entry(channel).or_insert(GapReason::SequenceGap);
        }
        // Forget writers not heard from for long (bounded memory; the count is bounded too).
        self.sequences.forget_idle(now, Duration::from_secs(600));
        counters
            .origins
            .store(self.sequences.origins() as u64, Ordering::Relaxed);
    }

    /// Items were dropped on a full queue: a gap on every channel, and the numbers they
    /// carried are forgiven.
    fn on_overflow(&mut self, plan: &mut Plan) {
        tracing::warn!(target: "invalidation", "the bus's queue overflowed: dropping L1");
        plan.gap_all = Some(GapReason::Overflow);
        self.sequences.forgive(None);
    }

    /// Counts a message dropped for `check` (unsigned, forged, or a signed clear already
    /// applied: a replay), and logs the first of each kind, then every 1024th.
    fn drop_unauthentic(&self, counters: &Counters, channel: &str, check: Check) {
        let (count, what) = match check {
            Check::Unsigned => (&counters.unsigned, "unsigned"),
            Check::Forged => (&counters.forged, "forged"),
            _ => (&counters.replayed, "replayed (a clear already applied)"),
        };
        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
        // A flood must not flood the log too.
        if n == 1 || n % 1024 == 0 {
            tracing::warn!(
                target: "invalidation",
                %channel, dropped = n, "dropping {what} invalidation messages"
            );
        }
    }

    /// Whether this clear's (origin, seq) is new (remembering it if so).
    fn first_clear(&mut self, msg: &message::Message) -> bool {
        let id = (msg.origin, msg.seq);
        if !self.clears.insert(id) {
            return false;
        }
        self.clears_order.push_back(id);
        if self.clears_order.len() > RECENT_CLEARS
            && let Some(old) = self.clears_order.pop_front()
        {
            self.clears.remove(&old);
        }
        true
    }
}

pub(crate) fn deliver(inner: &Inner, plan: Plan) {
    let consumers: HashMap<String, Vec<Consumer>> = inner.consumers.read().clone();
    let counters = &inner.counters;
    let mut gaps = plan.gaps;
    if let Some(reason) = plan.gap_all {
        for channel in consumers.keys() {
            gaps.insert(channel.clone(), reason);
        }
    }
    for (channel, list) in &consumers {
        if let Some(reason) = gaps.get(channel) {
            counters.gaps.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "invalidation", %channel, %reason, "invalidations may have been missed: dropping L1");
            for c in list {
                c(Event::Gap(*reason));
            }
        }
        for event in plan.clears.get(channel).into_iter().flatten() {
            for c in list {
                c(event.clone());
            }
        }
        if let Some(evictions) = plan.evictions.get(channel) {
            for c in list {
                c(Event::Evict(evictions.clone()));
            }
        }
    }
}
