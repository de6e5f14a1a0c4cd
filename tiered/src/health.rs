//! [`Health`]: what a readiness or status endpoint needs to know about a cache.

use std::time::Duration;

use serde::Serialize;

use crate::breaker::BreakerState;

/// The default hit-ratio floor: see [`TieredCacheBuilder::hit_ratio_floor`](crate::TieredCacheBuilder::hit_ratio_floor).
pub const DEFAULT_HIT_RATIO_FLOOR: f64 = 0.8;
/// Reads needed before the hit ratio is judged at all.
pub const MIN_READS_FOR_HIT_RATIO: u64 = 100;

/// The overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Everything as it should be.
    Ok,
    /// Serving, but something needs attention (Redis unreachable or the breaker not closed,
    /// or the hit ratio under its floor): see [`Health::reasons`].
    Degraded,
    /// Not ready: the invalidation bus has been down for longer than the staleness bound, so
    /// L1 can no longer be trusted to be coherent.
    Failed,
}

/// Redis as seen from one PING.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RedisHealth {
    /// Whether PING was answered within the L2 timeout.
    pub reachable: bool,
    /// Its round trip, in microseconds.
    pub latency_micros: Option<u64>,
    /// Why not, if not (the error's text, never a URL).
    pub error: Option<String>,
}

/// The invalidation bus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BusHealth {
    /// Whether its last heartbeat was answered.
    pub connected: bool,
    /// How long it has been down, in milliseconds (0 while up).
    pub down_for_ms: u64,
    /// The staleness bound P + T, in milliseconds: down for longer than this is not ready.
    pub bound_ms: u64,
    /// Milliseconds since the last message arrived (none yet: `None`).
    pub last_message_age_ms: Option<u64>,
    /// Gap events so far (each dropped L1).
    pub gaps: u64,
    /// Messages that did not decode.
    pub malformed: u64,
    /// Propagation lag of recent messages, 99th percentile, in microseconds.
    pub lag_p99_micros: u64,
}

/// A cache's health, from [`TieredCache::health`](crate::TieredCache::health): serializable, so
/// a status endpoint can return it as it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// Whether the node should receive traffic (false only for [`HealthStatus::Failed`]).
    pub ready: bool,
    /// The cache's namespace.
    pub namespace: String,
    /// Redis.
    pub redis: RedisHealth,
    /// The invalidation bus.
    pub bus: BusHealth,
    /// The circuit breaker in front of L2.
    pub breaker: BreakerState,
    /// Reads answered by L1 or L2 (stale hits included) out of all reads.
    pub hit_ratio: f64,
    /// Reads so far (the ratio is judged from [`MIN_READS_FOR_HIT_RATIO`] on).
    pub reads: u64,
    /// The floor under which the hit ratio makes the cache degraded.
    pub hit_ratio_floor: f64,
    /// Why the status is not `ok`, in words.
    pub reasons: Vec<String>,
}

/// The inputs of a verdict, gathered by the cache.
pub(crate) struct Observed {
    pub(crate) redis: RedisHealth,
    pub(crate) bus: BusHealth,
    pub(crate) breaker: BreakerState,
    pub(crate) hits: u64,
    pub(crate) reads: u64,
    pub(crate) floor: f64,
}

impl Health {
    pub(crate) fn judge(namespace: &str, o: Observed) -> Health {
        let mut reasons = Vec::new();
        let mut status = HealthStatus::Ok;
        if !o.bus.connected && o.bus.down_for_ms > o.bus.bound_ms {
            status = HealthStatus::Failed;
            reasons.push(format!(
                "the invalidation bus has been down for {} ms (bound {} ms): L1 may be stale",
                o.bus.down_for_ms, o.bus.bound_ms
            ));
        }
        let mut degrade = |why: String| {
            if status == HealthStatus::Ok {
                status = HealthStatus::Degraded;
            }
            reasons.push(why);
        };
        if !o.redis.reachable {
            degrade("redis is unreachable: reads fall back to the loader".into());
        }
        if o.breaker != BreakerState::Closed {
            degrade(format!("the L2 circuit breaker is {:?}", o.breaker).to_lowercase());
        }
        let hit_ratio = if o.reads == 0 {
            0.0
        } else {
            o.hits as f64 / o.reads as f64
        };
        if o.reads >= MIN_READS_FOR_HIT_RATIO && hit_ratio < o.floor {
            degrade(format!(
                "hit ratio {:.1}% is under its floor of {:.1}%",
                hit_ratio * 100.0,
                o.floor * 100.0
            ));
        }
        Health {
            ready: status != HealthStatus::Failed,
            status,
            namespace: namespace.to_string(),
            redis: o.redis,
            bus: o.bus,
            breaker: o.breaker,
            hit_ratio,
            reads: o.reads,
            hit_ratio_floor: o.floor,
            reasons,
        }
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            redis: RedisHealth {
                reachable: true,
                latency_micros: Some(50),
                error: None,
            },
            bus: BusHealth {
                connected: true,
                down_for_ms: 0,
                bound_ms: 1000,
                last_message_age_ms: Some(3),
                gaps: 0,
                malformed: 0,
                lag_p99_micros: 400,
            },
            breaker: BreakerState::Closed,
            hits: 95,
            reads: 100,
            floor: DEFAULT_HIT_RATIO_FLOOR,
        }
    }

    #[test]
    fn a_healthy_cache_is_ok_and_ready() {
        let h = Health::judge("users", observed());
        assert_eq!((h.status, h.ready), (HealthStatus::Ok, true));
        assert!(h.reasons.is_empty());
        assert!((h.hit_ratio - 0.95).abs() < 1e-9);
    }

    #[test]
    fn a_low_hit_ratio_or_an_unreachable_redis_is_degraded_not_failed() {
        let mut o = observed();
        o.hits = 70;
        let h = Health::judge("users", o);
        assert_eq!((h.status, h.ready), (HealthStatus::Degraded, true));
        assert!(h.reasons[0].contains("hit ratio 70.0%"), "{:?}", h.reasons);

        let mut o = observed();
        o.hits = 1;
        o.reads = 10;
        assert_eq!(
            Health::judge("users", o).status,
            HealthStatus::Ok,
            "too few reads to judge the ratio"
        );

        let mut o = observed();
        o.redis.reachable = false;
        o.breaker = BreakerState::Open;
        let h = Health::judge("users", o);
        assert_eq!(h.status, HealthStatus::Degraded);
        assert_eq!(h.reasons.len(), 2);
    }

    #[test]
    fn a_bus_down_past_the_bound_is_not_ready() {
        let mut o = observed();
        o.bus.connected = false;
        o.bus.down_for_ms = 500;
        assert_eq!(Health::judge("users", o).status, HealthStatus::Ok);
        let mut o = observed();
        o.bus.connected = false;
        o.bus.down_for_ms = 1500;
        let h = Health::judge("users", o);
        assert_eq!((h.status, h.ready), (HealthStatus::Failed, false));
    }

    #[test]
    fn it_serializes_for_a_status_endpoint() {
        let json = serde_json::to_value(Health::judge("users", observed())).unwrap();
        assert_eq!(json["status"], "ok");
        assert_eq!(json["bus"]["bound_ms"], 1000);
        assert_eq!(json["breaker"], "closed");
    }
}
