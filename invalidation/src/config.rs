//! [`BusConfig`]: the heartbeat period P, its timeout T, the staleness bound Δ = P + T they
//! give, and the secret; their defaults and limits.

use std::time::Duration;

use crate::sign::Key;

/// The default heartbeat period P: see [`BusConfig::heartbeat`].
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// The default heartbeat timeout T: see [`BusConfig::heartbeat_timeout`].
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest heartbeat period or timeout kept: a day.
const MAX_SETTING: Duration = Duration::from_secs(86_400);

/// Heartbeat, gap-detection and signing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    pub(crate) heartbeat: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) secret: Option<Key>,
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
    ///
    /// [`Subscriber::probe`]: l2::Subscriber::probe
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
        // Zero would never let a probe return in time (the lease would never renew) and
        // make every owed number a gap at once: kept between 1 ms and a day.
        self.heartbeat_timeout = timeout.clamp(Duration::from_millis(1), MAX_SETTING);
        self
    }

    /// A secret shared by every process on the bus: every message and probe is then signed
    /// (HMAC-SHA256, bound to its channel), and messages that are unsigned, forged, or repeat a
    /// clear already applied are dropped and counted
    /// ([`BusStats::unsigned`], [`BusStats::forged`], [`BusStats::replayed`]). Every process
    /// must have the same secret (one without it sends unsigned messages, which are dropped).
    /// See the crate's `# Security` section for what it does and does not protect. The secret
    /// is never printed. Default: none (every well-formed message is accepted).
    ///
    /// [`BusStats::unsigned`]: crate::BusStats::unsigned
    /// [`BusStats::forged`]: crate::BusStats::forged
    /// [`BusStats::replayed`]: crate::BusStats::replayed
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
    ///
    /// [`Lease`]: crate::Lease
    pub fn bound(&self) -> Duration {
        self.heartbeat.saturating_add(self.heartbeat_timeout)
    }
}
