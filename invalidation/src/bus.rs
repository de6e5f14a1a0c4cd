//! [`Bus`]: one subscriber connection per process, a heartbeat on it, and gap detection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use l2::{Connection, Subscriber};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::lease::Lease;
use crate::message::{self, Action, Signing};
use crate::sequence::Sequences;
use crate::sign::Key;

/// The default heartbeat period P: see [`BusConfig::heartbeat`].
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// The default heartbeat timeout T: see [`BusConfig::heartbeat_timeout`].
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// With a secret, signed messages sent longer ago than this (by the sender's clock, against
/// this process's) are dropped as replays: 5 minutes.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(300);

/// How many items the queue between the subscriber connection and the bus's task holds; a
/// message that finds it full is dropped, and that is a gap ([`GapReason::Overflow`]).
pub const QUEUE_CAPACITY: usize = 65_536;

/// Payloads longer than this are not invalidation messages (counted as malformed, dropped
/// before they are queued): 1 MiB.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// The longest heartbeat period or timeout kept: a day.
const MAX_SETTING: Duration = Duration::from_secs(86_400);

/// How many recent clear messages are remembered to refuse their replays.
const RECENT_CLEARS: usize = 4096;

/// Heartbeat, gap-detection and signing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    heartbeat: Duration,
    heartbeat_timeout: Duration,
    secret: Option<Key>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            heartbeat: DEFAULT_HEARTBEAT,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            secret: None,
        }
    }
}

impl BusConfig {
    /// How often the subscriber is checked: `INFO server` on its connection must answer
    /// with the same `run_id`, and a probe published through every master must come back
    /// through pub/sub ([`Subscriber::probe`]). Beats start every P whatever the last one
    /// took. Default: [`DEFAULT_HEARTBEAT`].
    pub fn heartbeat(mut self, period: Duration) -> Self {
        // Zero would spin (and panics tokio's interval), and a period beyond a day would
        // overflow the timer: kept between 1 ms and a day.
        self.heartbeat = period.clamp(Duration::from_millis(1), MAX_SETTING);
        self
    }

    /// How long a heartbeat, and its probes' trip through pub/sub, may take before it
    /// counts as missed. Missing sequence numbers are also given this long to arrive.
    /// Default: [`DEFAULT_HEARTBEAT_TIMEOUT`].
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout.min(MAX_SETTING);
        self
    }

    /// A secret shared by every process on the bus: every message and probe is then signed
    /// (HMAC-SHA256, bound to its channel), and messages that are unsigned, forged, older than
    /// [`REPLAY_WINDOW`], or repeat a clear already applied are dropped and counted
    /// ([`BusStats::unsigned`], [`BusStats::forged`], [`BusStats::replayed`]). Every process
    /// must have the same secret (one without it sends unsigned messages, which are dropped).
    /// See the crate's `# Security` section for what it does and does not protect. The secret
    /// is never printed. Default: none (every well-formed message is accepted).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(Key::new(secret.as_ref()));
        self
    }

    /// Whether a secret is set.
    pub fn is_signed(&self) -> bool {
        self.secret.is_some()
    }

    /// The staleness bound Δ = P + T this configuration gives. Probes start every P and
    /// normally return within T; the [`Lease`] lasts Δ from the start of the last probe round
    /// that returned, so in steady state it never runs out.
    pub fn bound(&self) -> Duration {
        self.heartbeat.saturating_add(self.heartbeat_timeout)
    }
}

/// Why messages may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GapReason {
    /// Not raised any more on the drop itself: the resubscription that follows it is the gap
    /// ([`GapReason::Resubscribed`]), so L1 entries stay usable under the cache's outage
    /// policy while Redis is unreachable.
    Disconnected,
    /// The channel was subscribed again after a reconnect.
    Resubscribed,
    /// Not raised any more: a missed heartbeat only stops the lease's renewal (see
    /// [`crate::BusStats::heartbeats_missed`]); what it could hide (a restart, a dropped
    /// connection) is a gap of its own once Redis answers again.
    HeartbeatMissed,
    /// The server's `run_id` changed: it restarted. On a cluster also: the cluster's epoch
    /// changed (a failover, which may have lost the old master's last writes), or the
    /// subscriber moved to another node.
    ServerRestarted,
    /// A message its writer knew was published (vouched for by a later one) did not arrive
    /// in time.
    SequenceGap,
    /// Messages came faster than this process applies them and the queue between the
    /// subscriber connection and the bus was full ([`QUEUE_CAPACITY`]): some were dropped.
    Overflow,
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GapReason::Disconnected => "subscriber disconnected",
            GapReason::Resubscribed => "resubscribed after a reconnect",
            GapReason::HeartbeatMissed => "heartbeat missed",
            GapReason::ServerRestarted => "server restarted or cluster failed over",
            GapReason::SequenceGap => "sequence gap",
            GapReason::Overflow => "the bus's queue overflowed",
        })
    }
}

/// What a consumer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Evict these keys unless L1 holds a version at least as new. Bursts are coalesced: one
    /// entry per key and origin, with the newest version seen from that origin (one writer's
    /// message never stands for another's).
    Evict(Vec<Eviction>),
    /// Drop the namespace's L1.
    ClearNamespace {
        /// The writing cache.
        origin: u64,
    },
    /// Drop every L1.
    ClearAll {
        /// The writing cache.
        origin: u64,
    },
    /// Messages may have been missed: drop everything in L1 that was there before.
    Gap(GapReason),
}

/// One key to evict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The cache key (as the cache's caller gave it).
    pub key: String,
    /// The key's new write version.
    pub version: u64,
    /// The writing cache.
    pub origin: u64,
}

/// A consumer of one channel's events.
pub type Consumer = Arc<dyn Fn(Event) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

enum Raw {
    Message {
        channel: String,
        payload: Vec<u8>,
    },
    Disconnected,
    Subscribed(String),
    /// Heartbeat `n`: the subscriber's `run_id`, and its probes' trip (`None`: no channel
    /// to probe on yet).
    Beat {
        n: u64,
        run_id: Result<String, l2::Error>,
        probe: Option<Result<Duration, l2::Error>>,
        /// When the probe round started.
        sent: std::time::Instant,
    },
}

const LAG_SAMPLES: usize = 4096;

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    malformed: AtomicU64,
    unsigned: AtomicU64,
    forged: AtomicU64,
    replayed: AtomicU64,
    overflows: AtomicU64,
    /// Set by the subscriber's callback when it drops an item on a full queue, before it
    /// returns; the bus's task takes it after collecting each batch (see `run`).
    overflowed: AtomicBool,
    origins: AtomicU64,
    gaps: AtomicU64,
    heartbeats_missed: AtomicU64,
    probes_late: AtomicU64,
    probe_micros: AtomicU64,
    last_message_micros: AtomicU64,
    connected: AtomicBool,
    // When the bus was last seen going down (µs since the epoch); 0 while connected.
    down_since_micros: AtomicU64,
    lags: Mutex<VecDeque<u64>>,
}

impl Counters {
    fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
        self.down_since_micros.store(0, Ordering::Relaxed);
    }

    fn down(&self) {
        self.connected.store(false, Ordering::Relaxed);
        let _ = self.down_since_micros.compare_exchange(
            0,
            message::now_micros(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// A snapshot of the bus's counters, from [`Bus::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusStats {
    /// Messages received.
    pub received: u64,
    /// Messages that did not decode (logged and skipped), or longer than
    /// [`MAX_MESSAGE_LEN`].
    pub malformed: u64,
    /// With a secret: messages dropped because they were not signed.
    pub unsigned: u64,
    /// With a secret: messages dropped because their tag was wrong (another secret, another
    /// channel, or altered bytes).
    pub forged: u64,
    /// With a secret: signed messages dropped as replays (sent longer ago than
    /// [`REPLAY_WINDOW`], or a clear already applied).
    pub replayed: u64,
    /// Items dropped because the bus's queue was full (each batch of them is one
    /// [`GapReason::Overflow`]).
    pub overflows: u64,
    /// Writers whose sequence numbers are tracked (at most 4096).
    pub origins: u64,
    /// Gap events raised.
    pub gaps: u64,
    /// Heartbeats not answered in time.
    pub heartbeats_missed: u64,
    /// Probe rounds that did not come back through pub/sub within the heartbeat timeout (the
    /// [`Lease`] was not renewed by them).
    pub probes_late: u64,
    /// The last probe's trip through pub/sub (publish on every master to arrival here), µs.
    pub probe_micros: u64,
    /// Whether the last heartbeat was answered.
    pub connected: bool,
    /// Since when the bus has been down, in microseconds since the Unix epoch (0: it is up).
    pub down_since_micros: u64,
    /// When the last message arrived, in microseconds since the Unix epoch (0: never).
    pub last_message_micros: u64,
    /// Propagation lag (sender's clock to receiver's) of the last messages, in µs: median.
    pub lag_p50_micros: u64,
    /// ... 99th percentile.
    pub lag_p99_micros: u64,
    /// ... largest.
    pub lag_max_micros: u64,
    /// How many lag samples the figures above cover (the last 4096 at most).
    pub lag_samples: usize,
}

struct Inner {
    subscriber: Subscriber,
    config: BusConfig,
    /// Bounded ([`QUEUE_CAPACITY`]): a flood costs a gap, not memory.
    tx: mpsc::Sender<Raw>,
    consumers: RwLock<HashMap<String, Vec<Consumer>>>,
    /// Shared with the subscriber's callbacks (which must not hold the bus itself).
    counters: Arc<Counters>,
    /// This bus's own probe channel, named after the first channel listened to (so an ACL
    /// user's channel pattern covers it).
    probe_channel: OnceLock<String>,
    lease: Lease,
}

/// The invalidation bus of one process: a dedicated subscriber connection (RESP3, reconnects
/// and resubscribes by itself), a heartbeat on that connection, and gap detection. Caches
/// register a [`Consumer`] per namespace channel with [`Bus::listen`] and publish through
/// [`Publisher`]s.
///
/// Cheap to clone; its tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
    _lifeline: Arc<watch::Sender<()>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Opens the subscriber connection to the server of `conn` and starts the heartbeat.
    ///
    /// # Errors
    /// As [`Subscriber::connect`].
    pub async fn connect(conn: &Connection, config: BusConfig) -> l2::Result<Bus> {
        let subscriber = Subscriber::connect(conn).await?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let lease = Lease::new(config.bound());
        let inner = Arc::new(Inner {
            subscriber,
            config,
            tx,
            consumers: RwLock::default(),
            counters: Arc::default(),
            probe_channel: OnceLock::new(),
            lease,
        });
        inner.counters.up();
        let (lifeline, closed) = watch::channel(());
        tokio::spawn(heartbeat(Arc::downgrade(&inner), closed.clone()));
        tokio::spawn(run(Arc::clone(&inner), rx, closed));
        Ok(Bus {
            inner,
            _lifeline: Arc::new(lifeline),
        })
    }

    /// The subscriber connection (to listen on other channels, such as lock notices).
    pub fn subscriber(&self) -> &Subscriber {
        &self.inner.subscriber
    }

    /// The read-side lease: while it holds, L1 is at most Δ behind every change.
    pub fn lease(&self) -> &Lease {
        &self.inner.lease
    }

    /// The configuration.
    pub fn config(&self) -> BusConfig {
        self.inner.config.clone()
    }

    /// Subscribes to `channel` (if not yet) and hands its events to `consumer`, in order, one
    /// at a time. Gaps of the connection reach every consumer.
    ///
    /// # Errors
    /// As [`Subscriber::listen`] (for example an ACL user without rights on the channel).
    pub async fn listen(&self, channel: &str, consumer: Consumer) -> l2::Result<()> {
        self.inner
            .consumers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(channel.to_string())
            .or_default()
            .push(consumer);
        let tx = self.inner.tx.clone();
        let counters = Arc::clone(&self.inner.counters);
        let subscriber = &self.inner.subscriber;
        subscriber
            .listen(channel, move |event| {
                let raw = match event {
                    l2::Event::Message { payload, .. } if payload.len() > MAX_MESSAGE_LEN => {
                        counters.malformed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    l2::Event::Message { channel, payload } => Raw::Message {
                        channel: channel.to_string(),
                        payload: payload.to_vec(),
                    },
                    l2::Event::Subscribed { channel } => Raw::Subscribed(channel.to_string()),
                    l2::Event::Disconnected => Raw::Disconnected,
                    _ => return,
                };
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(raw) {
                    // Before returning: a probe that arrives after this message is queued
                    // after the flag is set, so its proof never outruns the gap (see `run`).
                    counters.overflows.fetch_add(1, Ordering::Relaxed);
                    counters.overflowed.store(true, Ordering::Release);
                }
            })
            .await?;
        let probe_channel = self
            .inner
            .probe_channel
            .get_or_init(|| format!("{channel}:probe:{:016x}", fastrand::u64(..)));
        match &self.inner.config.secret {
            Some(key) => {
                let (key, on) = (key.clone(), probe_channel.clone());
                let signer: l2::ProbeSigner =
                    Arc::new(move |payload| key.tag(&on, payload).to_vec());
                subscriber
                    .listen_for_probes_signed(probe_channel, signer)
                    .await
            }
            None => subscriber.listen_for_probes(probe_channel).await,
        }
    }

    /// A publisher for `channel`, with a new random origin id (signing with the bus's secret,
    /// if it has one).
    pub fn publisher(&self, channel: &str) -> Publisher {
        Publisher {
            origin: fastrand::u64(1..),
            numbers: Arc::default(),
            channel: channel.into(),
            key: self.inner.config.secret.clone(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> BusStats {
        let c = &self.inner.counters;
        let mut lags: Vec<u64> = c
            .lags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        lags.sort_unstable();
        let at = |q: f64| -> u64 {
            if lags.is_empty() {
                return 0;
            }
            let i = ((lags.len() - 1) as f64 * q).round() as usize;
            lags[i.min(lags.len() - 1)]
        };
        BusStats {
            received: c.received.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            unsigned: c.unsigned.load(Ordering::Relaxed),
            forged: c.forged.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            overflows: c.overflows.load(Ordering::Relaxed),
            origins: c.origins.load(Ordering::Relaxed),
            gaps: c.gaps.load(Ordering::Relaxed),
            heartbeats_missed: c.heartbeats_missed.load(Ordering::Relaxed),
            probes_late: c.probes_late.load(Ordering::Relaxed),
            probe_micros: c.probe_micros.load(Ordering::Relaxed),
            connected: c.connected.load(Ordering::Relaxed),
            down_since_micros: c.down_since_micros.load(Ordering::Relaxed),
            last_message_micros: c.last_message_micros.load(Ordering::Relaxed),
            lag_p50_micros: at(0.5),
            lag_p99_micros: at(0.99),
            lag_max_micros: lags.last().copied().unwrap_or(0),
            lag_samples: lags.len(),
        }
    }
}

/// Builds the messages of one writing cache: its origin id, its sequence, and the vouches
/// for its acknowledged messages (see [`Publisher::acknowledged`]).
#[derive(Debug, Clone)]
pub struct Publisher {
    origin: u64,
    /// Shared by clones (one writer, one numbering). A sync mutex: a few instructions
    /// under it, never across `.await`.
    numbers: Arc<Mutex<Numbers>>,
    channel: Arc<str>,
    key: Option<Key>,
}

#[derive(Debug, Default)]
struct Numbers {
    /// The last number handed out.
    last: u64,
    /// Acknowledged numbers not yet carried by a message built since, oldest first.
    acknowledged: VecDeque<u64>,
}

impl Publisher {
    /// This writer's origin id: receivers skip their own messages by it.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next number, and the vouches the message that takes it carries.
    fn next(&self) -> (u64, Vec<u64>) {
        let mut numbers = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        // Wrapping: 2^64 messages never happen, and a wrap must not panic.
        numbers.last = numbers.last.wrapping_add(1);
        let vouches = numbers.acknowledged.drain(..).collect();
        (numbers.last, vouches)
    }

    fn signing(&self) -> Option<Signing<'_>> {
        self.key.as_ref().map(|key| Signing {
            key,
            channel: &self.channel,
        })
    }

    /// The message announcing a change of `key`, without its version: the writing script
    /// appends it ([`l2::Announce`]). Call [`Publisher::acknowledged`] with it once the
    /// script returned Ok.
    pub fn evict(&self, key: &str) -> Vec<u8> {
        let (seq, vouches) = self.next();
        message::evict_prefix(self.origin, seq, &vouches, key, self.signing())
    }

    /// The message asking every node to drop this namespace's L1. Call
    /// [`Publisher::acknowledged`] with it once `PUBLISH` returned Ok.
    pub fn clear_namespace(&self) -> Vec<u8> {
        self.whole(Action::ClearNamespace)
    }

    /// The message asking every node to drop all of its L1. Call
    /// [`Publisher::acknowledged`] with it once `PUBLISH` returned Ok.
    pub fn clear_all(&self) -> Vec<u8> {
        self.whole(Action::ClearAll)
    }

    /// Records that `message` (built by this publisher, with or without the version the
    /// script appended) was certainly published: the script that publishes it, or
    /// `PUBLISH`, returned Ok. The next message built vouches for it, so a receiver that
    /// never gets it raises [`GapReason::SequenceGap`]; a message never acknowledged (its
    /// write failed or was cancelled) is never missed by anyone. Bytes this publisher did not
    /// build are ignored. At most 8 acknowledged numbers wait for the next message; older
    /// ones are dropped (less detection, never a false gap).
    pub fn acknowledged(&self, message: &[u8]) {
        let Some((origin, seq)) = message::origin_and_seq(message) else {
            return;
        };
        if origin != self.origin {
            return;
        }
        let mut numbers = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        if numbers.acknowledged.contains(&seq) {
            return;
        }
        numbers.acknowledged.push_back(seq);
        if numbers.acknowledged.len() > message::MAX_VOUCHES {
            numbers.acknowledged.pop_front();
        }
    }

    fn whole(&self, action: Action) -> Vec<u8> {
        let (seq, vouches) = self.next();
        message::encode(
            &message::Message {
                origin: self.origin,
                seq,
                sent_micros: message::now_micros(),
                vouches,
                action,
                signature: None,
            },
            self.signing(),
        )
    }
}

/// Checks the subscriber every P: its connection must answer `INFO server` within T, with
/// the same `run_id`, and its probes must come back through pub/sub within T. A beat starts
/// every P however long the last one takes, so a change is followed within P by a probe from
/// its master, and that probe is due T later. Ends when the bus is dropped.
async fn heartbeat(inner: std::sync::Weak<Inner>, mut closed: watch::Receiver<()>) {
    let Some(period) = inner.upgrade().map(|bus| bus.config.heartbeat) else {
        return;
    };
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1.. {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = closed.changed() => return,
        }
        let Some(bus) = inner.upgrade() else { return };
        let timeout = bus.config.heartbeat_timeout;
        let subscriber = bus.subscriber.clone();
        let probe_channel = bus.probe_channel.get().cloned();
        let tx = bus.tx.clone();
        drop(bus);
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let sent = std::time::Instant::now();
            // The probes first, then the run_id: a failover or a remade cluster link that
            // happened before a probe returned shows in the run_id read after it, and its
            // gap is applied before the round's proof (see `State::plan`).
            let beat = async {
                let probe = match &probe_channel {
                    Some(channel) => Some(subscriber.probe(channel, timeout).await),
                    None => None,
                };
                (subscriber.run_id(timeout).await, probe)
            };
            tokio::select! {
                (run_id, probe) = beat => {
                    // Waits while the queue is full: the beat is late, never lost.
                    tokio::select! {
                        _ = tx.send(Raw::Beat { n, run_id, probe, sent }) => {}
                        _ = closed.changed() => {}
                    }
                }
                _ = closed.changed() => {}
            }
        });
    }
}

/// The bus's task: decodes, tracks sequences, coalesces bursts, and hands events to the
/// consumers in order.
async fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<Raw>, mut closed: watch::Receiver<()>) {
    let mut state = State::default();
    loop {
        let first = tokio::select! {
            raw = rx.recv() => match raw {
                Some(raw) => raw,
                None => return,
            },
            _ = closed.changed() => return,
        };
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(raw) => batch.push(raw),
                Err(_) => break,
            }
        }
        // After collecting the batch: an item dropped before any item of it (say, a message
        // ahead of a probe's return) set the flag before that item was queued, so the gap is
        // part of this plan and is delivered before the probe's proof renews the lease.
        let overflowed = inner.counters.overflowed.swap(false, Ordering::AcqRel);
        let mut plan = state.plan(&inner, batch);
        if overflowed {
            tracing::warn!(target: "invalidation", "the bus's queue overflowed: dropping L1");
            plan.gap_all = Some(GapReason::Overflow);
            state.sequences.forgive(None);
        }
        let confirmed = plan.confirmed;
        deliver(&inner, plan).await;
        // Only now: the messages that arrived ahead of the probes have been applied.
        if let Some(sent) = confirmed {
            inner.lease.confirm(sent);
        }
    }
}

#[derive(Default)]
struct State {
    sequences: Sequences,
    /// With a secret: the (origin, seq) of recent clears, to refuse their replays; bounded
    /// (the oldest are forgotten, and the replay window refuses them after 5 minutes).
    clears: HashSet<(u64, u64)>,
    clears_order: VecDeque<(u64, u64)>,
    subscribed: HashSet<String>,
    run_id: Option<String>,
    /// The newest beat whose `run_id` was taken (beats overlap and may finish out of order).
    beat: u64,
}

/// What one batch asks for, per channel, after coalescing.
#[derive(Default)]
struct Plan {
    gap_all: Option<GapReason>,
    gaps: HashMap<String, GapReason>,
    clears: HashMap<String, Vec<Event>>,
    /// Per channel, per (key, origin): one writer's message never stands for another's.
    evictions: HashMap<String, HashMap<(String, u64), Eviction>>,
    /// The start of the latest probe round that came back.
    confirmed: Option<std::time::Instant>,
}

impl State {
    fn plan(&mut self, inner: &Inner, batch: Vec<Raw>) -> Plan {
        let counters = &inner.counters;
        let grace = inner.config.heartbeat_timeout;
        let now = Instant::now();
        let mut plan = Plan::default();
        for raw in batch {
            match raw {
                Raw::Message { channel, payload } => {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    let received = message::now_micros();
                    counters
                        .last_message_micros
                        .store(received, Ordering::Relaxed);
                    let msg = match message::decode(&payload) {
                        Ok(msg) => msg,
                        Err(e) => {
                            counters.malformed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                target: "invalidation",
                                %channel, len = payload.len(), error = %e,
                                "skipping a malformed invalidation message"
                            );
                            continue;
                        }
                    };
                    if let Some(key) = &inner.config.secret
                        && !self.authentic(counters, key, &channel, &payload, &msg, received)
                    {
                        continue;
                    }
                    let mut lags = counters.lags.lock().unwrap_or_else(|p| p.into_inner());
                    if lags.len() == LAG_SAMPLES {
                        lags.pop_front();
                    }
                    lags.push_back(received.saturating_sub(msg.sent_micros));
                    drop(lags);
                    self.sequences
                        .see(&channel, msg.origin, msg.seq, &msg.vouches, now);
                    match msg.action {
                        Action::Evict(keys) => {
                            let slot = plan.evictions.entry(channel).or_default();
                            for (key, version) in keys {
                                let e = slot.entry((key.clone(), msg.origin)).or_insert(Eviction {
                                    key,
                                    version,
                                    origin: msg.origin,
                                });
                                e.version = e.version.max(version);
                            }
                        }
                        Action::ClearNamespace => plan
                            .clears
                            .entry(channel)
                            .or_default()
                            .push(Event::ClearNamespace { origin: msg.origin }),
                        Action::ClearAll => {
                            let consumers =
                                inner.consumers.read().unwrap_or_else(|p| p.into_inner());
                            for ch in consumers.keys() {
                                plan.clears
                                    .entry(ch.clone())
                                    .or_default()
                                    .push(Event::ClearAll { origin: msg.origin });
                            }
                        }
                    }
                }
                Raw::Disconnected => {
                    // Messages published from now on are lost, but nothing is dropped yet:
                    // the lease stops being renewed (so L1 stops answering as confirmed within
                    // Δ of the last proof), L1 entries stay for the outage policy, and the
                    // resubscription that ends the outage is the gap (see `Raw::Subscribed`).
                    counters.down();
                }
                Raw::Subscribed(channel) => {
                    // The first confirmation is the subscription itself, not a gap.
                    if !self.subscribed.insert(channel.clone()) {
                        plan.gaps.insert(channel, GapReason::Resubscribed);
                    }
                }
                Raw::Beat {
                    n,
                    run_id,
                    probe,
                    sent,
                } => {
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
            }
        }
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
        plan
    }

    /// With a secret: whether `msg` (decoded from `payload`, on `channel`) is signed with it,
    /// recent, and not a clear already applied. Counts what it drops.
    fn authentic(
        &mut self,
        counters: &Counters,
        key: &Key,
        channel: &str,
        payload: &[u8],
        msg: &message::Message,
        received: u64,
    ) -> bool {
        let (count, what) = match &msg.signature {
            None => (&counters.unsigned, "unsigned"),
            Some(s) if !s.verify(key, channel, payload) => (&counters.forged, "forged"),
            Some(_) if received.abs_diff(msg.sent_micros) > REPLAY_WINDOW.as_micros() as u64 => {
                (&counters.replayed, "replayed (outside the replay window)")
            }
            Some(_) if !matches!(msg.action, Action::Evict(_)) && !self.first_clear(msg) => {
                (&counters.replayed, "replayed (a clear already applied)")
            }
            Some(_) => return true,
        };
        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
        // The first of each kind, then every 1024th: a flood must not flood the log too.
        if n == 1 || n % 1024 == 0 {
            tracing::warn!(
                target: "invalidation",
                %channel, dropped = n, "dropping {what} invalidation messages"
            );
        }
        false
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

async fn deliver(inner: &Inner, plan: Plan) {
    let consumers: HashMap<String, Vec<Consumer>> = inner
        .consumers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
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
                c(Event::Gap(*reason)).await;
            }
        }
        for event in plan.clears.get(channel).into_iter().flatten() {
            for c in list {
                c(event.clone()).await;
            }
        }
        if let Some(evictions) = plan.evictions.get(channel) {
            let evictions: Vec<Eviction> = evictions.values().cloned().collect();
            for c in list {
                c(Event::Evict(evictions.clone())).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher() -> Publisher {
        Publisher {
            origin: 5,
            numbers: Arc::default(),
            channel: "c".into(),
            key: None,
        }
    }

    fn decoded(mut bytes: Vec<u8>) -> message::Message {
        if bytes[5] == 1 {
            bytes.extend_from_slice(&1u64.to_le_bytes());
        }
        message::decode(&bytes).unwrap()
    }

    #[test]
    fn only_acknowledged_numbers_are_vouched_for_once_and_at_most_eight() {
        let p = publisher();
        let m1 = p.evict("a");
        let _burnt = p.evict("b");
        p.acknowledged(&m1);
        let m3 = decoded(p.evict("c"));
        assert_eq!((m3.seq, m3.vouches), (3, vec![1]));
        // Already carried by 3: not again.
        assert!(decoded(p.clear_namespace()).vouches.is_empty());
        // Bytes of another publisher, or not a message: ignored.
        p.acknowledged(&publisher_with_origin(6).evict("x"));
        p.acknowledged(b"junk");
        assert!(decoded(p.clear_all()).vouches.is_empty());
        let built: Vec<Vec<u8>> = (0..12).map(|_| p.evict("k")).collect();
        for m in &built {
            p.acknowledged(m);
            p.acknowledged(m); // twice: once
        }
        let next = decoded(p.evict("z"));
        assert_eq!(
            next.vouches,
            (10..=17).collect::<Vec<u64>>(),
            "the newest eight"
        );
    }

    fn publisher_with_origin(origin: u64) -> Publisher {
        Publisher {
            origin,
            ..publisher()
        }
    }

    #[test]
    fn the_numbering_wraps_instead_of_panicking() {
        let p = publisher();
        p.numbers.lock().unwrap().last = u64::MAX - 1;
        assert_eq!(decoded(p.evict("a")).seq, u64::MAX);
        assert_eq!(decoded(p.evict("b")).seq, 0);
    }
}
