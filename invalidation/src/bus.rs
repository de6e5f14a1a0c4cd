//! [`Bus`]: one subscriber connection per process, a heartbeat on it, and gap detection.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use l2::{Connection, Subscriber};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::message::{self, Action};

/// The default heartbeat period P: see [`BusConfig::heartbeat`].
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// The default heartbeat timeout T: see [`BusConfig::heartbeat_timeout`].
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest heartbeat period or timeout kept: a day.
const MAX_SETTING: Duration = Duration::from_secs(86_400);

/// Heartbeat and gap-detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusConfig {
    heartbeat: Duration,
    heartbeat_timeout: Duration,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            heartbeat: DEFAULT_HEARTBEAT,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
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
    /// The subscriber connection dropped (killed, output buffer limit, server gone).
    Disconnected,
    /// The channel was subscribed again after a reconnect.
    Resubscribed,
    /// A heartbeat was not answered within its timeout (server stopped, connection half-open).
    HeartbeatMissed,
    /// The server's `run_id` changed: it restarted. On a cluster also: the cluster's epoch
    /// changed (a failover, which may have lost the old master's last writes), or the
    /// subscriber moved to another node.
    ServerRestarted,
    /// A writer's sequence skipped numbers that did not arrive in time.
    SequenceGap,
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GapReason::Disconnected => "subscriber disconnected",
            GapReason::Resubscribed => "resubscribed after a reconnect",
            GapReason::HeartbeatMissed => "heartbeat missed",
            GapReason::ServerRestarted => "server restarted or cluster failed over",
            GapReason::SequenceGap => "sequence gap",
        })
    }
}

/// What a consumer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Evict these keys unless L1 holds a version at least as new. Bursts are coalesced: one
    /// entry per key, with the newest version seen.
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

/// Whether this process has applied every invalidation published more than Δ ago: the
/// read-side half of the staleness bound. Cheap to clone and to check (one atomic load).
///
/// Each probe round ([`Subscriber::probe`]) that comes back proves that every message
/// published before it started has arrived — and the bus applies messages in order, before
/// it takes the proof — so the lease runs until that start plus Δ ([`BusConfig::bound`]).
/// An L1 entry served while the lease holds is at most Δ older than any change: even when
/// the bus is slow (an overloaded server or cluster bus), and even when this process was
/// stalled and has not yet noticed. Messages lost outright are gaps, not lease matters.
#[derive(Debug, Clone)]
pub struct Lease {
    base: std::time::Instant,
    /// Nanoseconds after `base` until which the lease holds.
    until: Arc<AtomicU64>,
    bound: Duration,
}

impl Lease {
    fn new(bound: Duration) -> Self {
        let base = std::time::Instant::now();
        Lease {
            base,
            // Nothing was cached before the bus subscribed: it starts confirmed.
            until: Arc::new(AtomicU64::new(nanos(bound))),
            bound,
        }
    }

    /// Whether the lease holds at `now` (so L1 may answer).
    #[inline]
    pub fn holds_at(&self, now: std::time::Instant) -> bool {
        nanos(now.saturating_duration_since(self.base)) < self.until.load(Ordering::Acquire)
    }

    /// Whether the lease holds now.
    pub fn holds(&self) -> bool {
        self.holds_at(std::time::Instant::now())
    }

    /// Every message published before `sent` has been applied: the lease runs until
    /// `sent` + Δ (never backwards).
    fn confirm(&self, sent: std::time::Instant) {
        let until = nanos(
            sent.saturating_duration_since(self.base)
                .saturating_add(self.bound),
        );
        self.until.fetch_max(until, Ordering::AcqRel);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Per-origin sequence tracking: numbers may arrive slightly out of order (a writer's
/// concurrent writes; on a cluster, messages published on different masters reach this node
/// by different paths), so a missing one is a gap only if it has not arrived within the
/// heartbeat timeout of the first later number. Each number's own wait counts: a steady
/// stream of reordered messages, each filled within milliseconds, is no gap.
struct Sequence {
    channel: String,
    next: u64,
    /// Numbers seen above `next`, with when each arrived.
    above: BTreeMap<u64, Instant>,
    missing_since: Option<Instant>,
    last_seen: Instant,
}

impl Sequence {
    fn see(&mut self, seq: u64, now: Instant) {
        self.last_seen = now;
        if seq < self.next {
            return;
        }
        if seq > self.next {
            self.above.entry(seq).or_insert(now);
            self.missing_since.get_or_insert(now);
            return;
        }
        self.next += 1;
        while self.above.remove(&self.next).is_some() {
            self.next += 1;
        }
        // `next` has been missing since the first number above it arrived.
        self.missing_since = self.above.values().min().copied();
    }

    /// Whether numbers have been missing for longer than `grace`; if so, starts over after
    /// the highest seen.
    fn overdue(&mut self, now: Instant, grace: Duration) -> bool {
        match self.missing_since {
            Some(since) if now.duration_since(since) > grace => {
                self.next = self
                    .above
                    .last_key_value()
                    .map_or(self.next, |(s, _)| s + 1);
                self.above.clear();
                self.missing_since = None;
                true
            }
            _ => false,
        }
    }
}

const LAG_SAMPLES: usize = 4096;

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    malformed: AtomicU64,
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
    /// Messages that did not decode (logged and skipped).
    pub malformed: u64,
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
    tx: mpsc::UnboundedSender<Raw>,
    consumers: RwLock<HashMap<String, Vec<Consumer>>>,
    counters: Counters,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            subscriber,
            config,
            tx,
            consumers: RwLock::default(),
            counters: Counters::default(),
            probe_channel: OnceLock::new(),
            lease: Lease::new(config.bound()),
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
        self.inner.config
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
        let subscriber = &self.inner.subscriber;
        subscriber
            .listen(channel, move |event| {
                let raw = match event {
                    l2::Event::Message { channel, payload } => Raw::Message {
                        channel: channel.to_string(),
                        payload: payload.to_vec(),
                    },
                    l2::Event::Subscribed { channel } => Raw::Subscribed(channel.to_string()),
                    l2::Event::Disconnected => Raw::Disconnected,
                    _ => return,
                };
                let _ = tx.send(raw);
            })
            .await?;
        let probe_channel = self
            .inner
            .probe_channel
            .get_or_init(|| format!("{channel}:probe:{:016x}", fastrand::u64(..)));
        subscriber.listen_for_probes(probe_channel).await
    }

    /// A publisher for `channel`, with a new random origin id.
    pub fn publisher(&self, channel: &str) -> Publisher {
        Publisher {
            origin: fastrand::u64(1..),
            seq: Arc::new(AtomicU64::new(0)),
            channel: channel.into(),
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

/// Builds the messages of one writing cache: its origin id and its sequence.
#[derive(Debug, Clone)]
pub struct Publisher {
    origin: u64,
    seq: Arc<AtomicU64>,
    channel: Arc<str>,
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

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The message announcing a change of `key`, without its version: the writing script
    /// appends it ([`l2::Announce`]).
    pub fn evict(&self, key: &str) -> Vec<u8> {
        message::evict_prefix(self.origin, self.next_seq(), key)
    }

    /// The message asking every node to drop this namespace's L1.
    pub fn clear_namespace(&self) -> Vec<u8> {
        self.whole(Action::ClearNamespace)
    }

    /// The message asking every node to drop all of its L1.
    pub fn clear_all(&self) -> Vec<u8> {
        self.whole(Action::ClearAll)
    }

    fn whole(&self, action: Action) -> Vec<u8> {
        message::encode(&message::Message {
            origin: self.origin,
            seq: self.next_seq(),
            sent_micros: message::now_micros(),
            action,
        })
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
                    let _ = tx.send(Raw::Beat { n, run_id, probe, sent });
                }
                _ = closed.changed() => {}
            }
        });
    }
}

/// The bus's task: decodes, tracks sequences, coalesces bursts, and hands events to the
/// consumers in order.
async fn run(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<Raw>,
    mut closed: watch::Receiver<()>,
) {
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
        let plan = state.plan(&inner, batch);
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
    sequences: HashMap<u64, Sequence>,
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
    evictions: HashMap<String, HashMap<String, Eviction>>,
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
                    let mut lags = counters.lags.lock().unwrap_or_else(|p| p.into_inner());
                    if lags.len() == LAG_SAMPLES {
                        lags.pop_front();
                    }
                    lags.push_back(received.saturating_sub(msg.sent_micros));
                    drop(lags);
                    self.sequences
                        .entry(msg.origin)
                        .or_insert_with(|| Sequence {
                            channel: channel.clone(),
                            next: msg.seq,
                            above: BTreeMap::new(),
                            missing_since: None,
                            last_seen: now,
                        })
                        .see(msg.seq, now);
                    match msg.action {
                        Action::Evict(keys) => {
                            let slot = plan.evictions.entry(channel).or_default();
                            for (key, version) in keys {
                                let e = slot.entry(key.clone()).or_insert(Eviction {
                                    key,
                                    version,
                                    origin: msg.origin,
                                });
                                if version > e.version {
                                    e.version = version;
                                    e.origin = msg.origin;
                                }
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
                    counters.down();
                    plan.gap_all = Some(GapReason::Disconnected);
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
                            tracing::warn!(target: "invalidation", error = %e, "heartbeat missed");
                            plan.gap_all = Some(GapReason::HeartbeatMissed);
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
        for seq in self.sequences.values_mut() {
            if seq.overdue(now, grace) {
                plan.gaps
                    .entry(seq.channel.clone())
                    .or_insert(GapReason::SequenceGap);
            }
        }
        // Forget writers not heard from for long (bounded memory).
        self.sequences
            .retain(|_, s| now.duration_since(s.last_seen) < Duration::from_secs(600));
        plan
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

    #[test]
    fn the_lease_runs_delta_from_the_last_confirmed_round_and_never_backwards() {
        let bound = Duration::from_millis(500);
        let lease = Lease::new(bound);
        let t0 = lease.base;
        assert!(lease.holds_at(t0 + Duration::from_millis(499)));
        assert!(!lease.holds_at(t0 + Duration::from_millis(500)));
        lease.confirm(t0 + Duration::from_millis(300));
        assert!(lease.holds_at(t0 + Duration::from_millis(799)));
        assert!(!lease.holds_at(t0 + Duration::from_millis(800)));
        // A round that started earlier but came back later does not shorten it.
        lease.confirm(t0 + Duration::from_millis(100));
        assert!(lease.holds_at(t0 + Duration::from_millis(799)));
        // A clone is the same lease.
        let clone = lease.clone();
        lease.confirm(t0 + Duration::from_secs(2));
        assert!(clone.holds_at(t0 + Duration::from_millis(2499)));
    }

    fn seq() -> Sequence {
        Sequence {
            channel: "c".into(),
            next: 1,
            above: BTreeMap::new(),
            missing_since: None,
            last_seen: Instant::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_order_numbers_within_the_grace_are_not_a_gap() {
        let mut s = seq();
        let grace = Duration::from_millis(500);
        s.see(1, Instant::now());
        s.see(3, Instant::now());
        s.see(2, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!s.overdue(Instant::now(), grace));
        assert_eq!(s.next, 4);
        s.see(1, Instant::now()); // a duplicate
        assert!(!s.overdue(Instant::now(), grace));
    }

    #[tokio::test(start_paused = true)]
    async fn a_number_missing_past_the_grace_is_a_gap_once() {
        let mut s = seq();
        let grace = Duration::from_millis(500);
        s.see(1, Instant::now());
        s.see(3, Instant::now());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(!s.overdue(Instant::now(), grace));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(s.overdue(Instant::now(), grace));
        assert!(!s.overdue(Instant::now(), grace), "reported once");
        s.see(4, Instant::now());
        assert_eq!(s.next, 5);
        assert!(s.missing_since.is_none());
    }

    /// A stream in which every number arrives a few milliseconds after the next one (two
    /// paths through a cluster) never leaves the set of later numbers empty, yet nothing is
    /// ever missing for long: no gap, however long it lasts.
    #[tokio::test(start_paused = true)]
    async fn steady_reordering_is_not_a_gap() {
        let mut s = seq();
        let grace = Duration::from_millis(300);
        s.see(1, Instant::now());
        // Odd numbers come at once; each even one two odd ones later.
        for k in 1..1000u64 {
            s.see(2 * k + 1, Instant::now());
            if k >= 2 {
                s.see(2 * (k - 1), Instant::now());
            }
            assert!(!s.above.is_empty(), "a later number is always waiting");
            tokio::time::advance(Duration::from_millis(2)).await;
            assert!(!s.overdue(Instant::now(), grace), "at {k}");
        }
    }
}
