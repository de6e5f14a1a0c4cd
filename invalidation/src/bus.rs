//! [`Bus`]: one subscriber connection per process, a heartbeat on it, and gap detection.
//!
//! Here: the handle, the queue from the subscriber connection to the bus's task, the heartbeat
//! and the task's loop. What each batch of the queue asks for, and handing it to the
//! consumers, is in `plan.rs`; the settings in `config.rs`, what consumers are told in
//! `event.rs`, the writers' side in `publisher.rs`, the counters in `stats.rs`.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use l2::{Connection, Subscriber};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::BusConfig;
use crate::event::{Consumer, Event};
use crate::lease::Lease;
use crate::plan::{Received, State, deliver};
use crate::publisher::Publisher;
use crate::stats::{BusStats, Counters};

/// How many items the queue between the subscriber connection and the bus's task holds; a
/// message that finds it full is dropped, and that is a gap ([`GapReason::Overflow`]).
///
/// [`GapReason::Overflow`]: crate::GapReason::Overflow
pub const QUEUE_CAPACITY: usize = 65_536;

/// How many bytes of messages the queue holds at most: 32 MiB. Messages beyond it are dropped
/// like those that find the queue full (a gap), so a flood of large messages costs a gap, not
/// memory.
pub const QUEUE_BYTES: usize = 32 << 20;

/// Payloads longer than this are not invalidation messages (counted as malformed, dropped
/// before they are queued): 64 KiB, room for a cache key of the longest allowed length
/// (60,000 bytes) with its header, vouches, tag and version.
pub const MAX_MESSAGE_LEN: usize = 64 << 10;

pub(crate) enum Raw {
    /// Decoded, checked and (if an eviction) applied by the subscriber's callback.
    Message(Received),
    /// Left to the task whole: large, or arrived while the callback was over its budget.
    Payload {
        channel: String,
        payload: Vec<u8>,
    },
    Disconnected,
    Subscribed(String),
    Beat(Beat),
}

impl Raw {
    /// The bytes it holds against the queue's byte budget ([`QUEUE_BYTES`]).
    fn bytes(&self) -> usize {
        match self {
            Raw::Message(m) => m.len,
            Raw::Payload { payload, .. } => payload.len(),
            _ => 0,
        }
    }
}

/// Messages up to this size are applied by the subscriber's callback (one key, or a few):
/// larger ones are left to the bus's task, so no single message holds the callback long.
const INLINE_MAX_LEN: usize = 2048;

/// The share of each [`BUDGET_WINDOW`] the callback may spend applying messages itself.
const BUDGET_WINDOW: Duration = Duration::from_millis(100);
const BUDGET_SPEND: Duration = Duration::from_millis(25);

/// How much the subscriber's callback may do itself. Pushes reach it through redis-rs's own
/// unbounded channel, so a callback slower than the messages arrive would let that channel
/// grow without bound: past its budget (a flood), the callback only copies each message into
/// the bus's bounded queue, as cheaply as it can, and the task applies it (a queue that
/// fills is a gap, never memory).
#[derive(Default)]
struct Budget {
    window: parking_lot::Mutex<(Option<std::time::Instant>, Duration)>,
}

impl Budget {
    /// Whether a message of `len` bytes may be applied by the callback now.
    fn allows(&self, len: usize) -> bool {
        if len > INLINE_MAX_LEN {
            return false;
        }
        let mut w = self.window.lock();
        let now = std::time::Instant::now();
        if w.0
            .is_none_or(|start| now.duration_since(start) >= BUDGET_WINDOW)
        {
            *w = (Some(now), Duration::ZERO);
        }
        w.1 < BUDGET_SPEND
    }

    fn spend(&self, took: Duration) {
        let mut w = self.window.lock();
        w.1 = w.1.saturating_add(took);
    }
}

/// Heartbeat `n`: the subscriber's `run_id`, and its probes' trip (`None`: no channel to probe
/// on yet).
pub(crate) struct Beat {
    pub(crate) n: u64,
    pub(crate) run_id: Result<String, l2::Error>,
    pub(crate) probe: Option<Result<Duration, l2::Error>>,
    /// When the probe round started.
    pub(crate) sent: std::time::Instant,
}

pub(crate) struct Inner {
    subscriber: Subscriber,
    pub(crate) config: BusConfig,
    /// Bounded ([`QUEUE_CAPACITY`]): a flood costs a gap, not memory.
    tx: mpsc::Sender<Raw>,
    /// Shared with the subscriber's callbacks, which apply evictions (see [`Consumer`]).
    pub(crate) consumers: Arc<RwLock<HashMap<String, Vec<Consumer>>>>,
    /// Shared with the subscriber's callbacks (which must not hold the bus itself).
    pub(crate) counters: Arc<Counters>,
    /// This bus's own probe channel, named after the first channel listened to (so an ACL
    /// user's channel pattern covers it).
    probe_channel: OnceLock<String>,
    lease: Lease,
    /// Held through `listen`: a consumer that joins a channel whose subscription is on its
    /// way waits for it, and is never dropped by its failure unawares.
    listening: tokio::sync::Mutex<()>,
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
            consumers: Arc::default(),
            counters: Arc::default(),
            probe_channel: OnceLock::new(),
            lease,
            listening: tokio::sync::Mutex::new(()),
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

    /// Subscribes to `channel` (if not yet) and hands its events to `consumer`: evictions on
    /// the subscriber connection's reader as each message is read, everything else from the
    /// bus's task, in order (see [`Consumer`]). Gaps of the connection reach every consumer.
    /// Several consumers of one channel share its subscription, and each message reaches each
    /// of them once.
    ///
    /// # Errors
    /// As [`Subscriber::listen`] (for example an ACL user without rights on the channel); the
    /// consumer is then dropped. Calls run one at a time, so a consumer added while another's
    /// subscription is on its way waits for it (and subscribes itself if it failed).
    pub async fn listen(&self, channel: &str, consumer: Consumer) -> l2::Result<()> {
        let _one_at_a_time = self.inner.listening.lock().await;
        let first = {
            let mut consumers = self.inner.consumers.write();
            let list = consumers.entry(channel.to_string()).or_default();
            list.push(consumer);
            list.len() == 1
        };
        // One reader callback per channel, whatever the number of consumers: it hands each
        // message to all of them, and queues it once.
        if !first {
            return Ok(());
        }
        let tx = self.inner.tx.clone();
        let counters = Arc::clone(&self.inner.counters);
        let consumers = Arc::clone(&self.inner.consumers);
        let secret = self.inner.config.secret.clone();
        let budget = Budget::default();
        let subscriber = &self.inner.subscriber;
        let listening = subscriber
            .listen(channel, move |event| {
                let raw = match event {
                    l2::Event::Message { payload, .. } if payload.len() > MAX_MESSAGE_LEN => {
                        counters.malformed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    l2::Event::Message { channel, payload } if !budget.allows(payload.len()) => {
                        Raw::Payload {
                            channel: channel.to_string(),
                            payload: payload.to_vec(),
                        }
                    }
                    l2::Event::Message { channel, payload } => {
                        let started = std::time::Instant::now();
                        let mut received = Received::read(channel, payload, secret.as_ref());
                        // Here, before the queue: the eviction reaches L1 without waiting for
                        // the bus's task, and before any probe that arrives after it is
                        // queued (so before its proof).
                        if let Some(evictions) = received.evictions() {
                            let list = consumers.read().get(*channel).cloned();
                            for c in list.into_iter().flatten() {
                                c(Event::Evict(evictions.clone()));
                            }
                        }
                        received.mark_applied();
                        budget.spend(started.elapsed());
                        Raw::Message(received)
                    }
                    l2::Event::Subscribed { channel } => Raw::Subscribed(channel.to_string()),
                    l2::Event::Disconnected => Raw::Disconnected,
                    _ => return,
                };
                let bytes = raw.bytes();
                let queued = counters.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
                let full = queued > QUEUE_BYTES
                    || matches!(tx.try_send(raw), Err(mpsc::error::TrySendError::Full(_)));
                if full {
                    counters.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    // Before returning: a probe that arrives after this message is queued
                    // after the flag is set, so its proof never outruns the gap (see `run`).
                    counters.overflows.fetch_add(1, Ordering::Relaxed);
                    counters.overflowed.store(true, Ordering::Release);
                }
            })
            .await;
        if let Err(e) = listening {
            self.inner.consumers.write().remove(channel);
            return Err(e);
        }
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
        Publisher::new(channel, self.inner.config.secret.clone())
    }

    /// The counters so far.
    pub fn stats(&self) -> BusStats {
        self.inner.counters.snapshot()
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
            // gap is applied before the round's proof (see `State::on_beat`).
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
                        _ = tx.send(Raw::Beat(Beat { n, run_id, probe, sent })) => {}
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
        // A batch is at most 1,024 items or 4 MiB of messages, whichever comes first.
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        while batch.len() < 1024 && bytes < 4 << 20 {
            match rx.try_recv() {
                Ok(raw) => {
                    bytes += raw.bytes();
                    batch.push(raw);
                }
                Err(_) => break,
            }
        }
        inner
            .counters
            .queued_bytes
            .fetch_sub(bytes, Ordering::AcqRel);
        // After collecting the batch: an item dropped before any item of it (say, a message
        // ahead of a probe's return) set the flag before that item was queued, so the gap is
        // part of this plan and is delivered before the probe's proof renews the lease.
        let overflowed = inner.counters.overflowed.swap(false, Ordering::AcqRel);
        let plan = state.plan(&inner, batch, overflowed);
        let confirmed = plan.confirmed;
        deliver(&inner, plan);
        // Only now: the messages that arrived ahead of the probes have been applied.
        if let Some(sent) = confirmed {
            inner.lease.confirm(sent);
        }
    }
}
