//! The bus's counters, and [`BusStats`], the snapshot of them that [`Bus::stats`] gives.
//!
//! [`Bus::stats`]: crate::Bus::stats

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::message;

const LAG_SAMPLES: usize = 4096;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) unsigned: AtomicU64,
    pub(crate) forged: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) overflows: AtomicU64,
    /// Set by the subscriber's callback when it drops an item on a full queue, before it
    /// returns; the bus's task takes it after collecting each batch (see `run`).
    pub(crate) overflowed: AtomicBool,
    /// Bytes of the message payloads in the queue ([`crate::QUEUE_BYTES`] at most).
    pub(crate) queued_bytes: std::sync::atomic::AtomicUsize,
    pub(crate) origins: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) heartbeats_missed: AtomicU64,
    pub(crate) probes_late: AtomicU64,
    pub(crate) probe_micros: AtomicU64,
    pub(crate) last_message_micros: AtomicU64,
    pub(crate) connected: AtomicBool,
    // When the bus was last seen going down (µs since the epoch); 0 while connected.
    pub(crate) down_since_micros: AtomicU64,
    pub(crate) lags: Mutex<VecDeque<u64>>,
}

impl Counters {
    pub(crate) fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
        self.down_since_micros.store(0, Ordering::Relaxed);
    }

    pub(crate) fn down(&self) {
        self.connected.store(false, Ordering::Relaxed);
        let _ = self.down_since_micros.compare_exchange(
            0,
            message::now_micros(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Keeps a propagation lag (µs), with the last [`LAG_SAMPLES`] before it.
    pub(crate) fn sample_lag(&self, lag: u64) {
        let mut lags = self.lags.lock();
        if lags.len() == LAG_SAMPLES {
            lags.pop_front();
        }
        lags.push_back(lag);
    }

    /// A snapshot of the counters.
    pub(crate) fn snapshot(&self) -> BusStats {
        let mut lags: Vec<u64> = self.lags.lock().iter().copied().collect();
        lags.sort_unstable();
        let at = |q: f64| -> u64 {
            if lags.is_empty() {
                return 0;
            }
            let i = ((lags.len() - 1) as f64 * q).round() as usize;
            lags[i.min(lags.len() - 1)]
        };
        BusStats {
            received: self.received.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            unsigned: self.unsigned.load(Ordering::Relaxed),
            forged: self.forged.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
            origins: self.origins.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            heartbeats_missed: self.heartbeats_missed.load(Ordering::Relaxed),
            probes_late: self.probes_late.load(Ordering::Relaxed),
            probe_micros: self.probe_micros.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            down_since_micros: self.down_since_micros.load(Ordering::Relaxed),
            last_message_micros: self.last_message_micros.load(Ordering::Relaxed),
            lag_p50_micros: at(0.5),
            lag_p99_micros: at(0.99),
            lag_max_micros: lags.last().copied().unwrap_or(0),
            lag_samples: lags.len(),
        }
    }
}

/// A snapshot of the bus's counters, from [`Bus::stats`].
///
/// [`Bus::stats`]: crate::Bus::stats
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusStats {
    /// Messages received.
    pub received: u64,
    /// Messages that did not decode (logged and skipped), or longer than
    /// [`MAX_MESSAGE_LEN`].
    ///
    /// [`MAX_MESSAGE_LEN`]: crate::MAX_MESSAGE_LEN
    pub malformed: u64,
    /// With a secret: messages dropped because they were not signed.
    pub unsigned: u64,
    /// With a secret: messages dropped because their tag was wrong (another secret, another
    /// channel, or altered bytes).
    pub forged: u64,
    /// With a secret: signed clears dropped as replays (the (origin, sequence) of a clear
    /// already applied). Evictions are never dropped as replays: applying one again is
    /// harmless, and dropping a genuine one would not be.
    pub replayed: u64,
    /// Items dropped because the bus's queue was full (each batch of them is one
    /// [`GapReason::Overflow`]).
    ///
    /// [`GapReason::Overflow`]: crate::GapReason::Overflow
    pub overflows: u64,
    /// Writers whose sequence numbers are tracked (at most 4096).
    pub origins: u64,
    /// Gap events raised.
    pub gaps: u64,
    /// Heartbeats not answered in time.
    pub heartbeats_missed: u64,
    /// Probe rounds that did not come back through pub/sub within the heartbeat timeout (the
    /// [`Lease`] was not renewed by them).
    ///
    /// [`Lease`]: crate::Lease
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
