//! Export to the `metrics` facade: the cache's own counters are the source of truth (cheap
//! striped atomics on the hot path); once a second they are pushed to whatever recorder the
//! application installed (Prometheus, StatsD, ...), as absolute counters and gauges.

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};

use crate::breaker::BreakerState;
use crate::cache::Inner;

/// The counters, by exported name, with their descriptions.
const COUNTERS: &[(&str, &str)] = &[
    ("tiered_l1_hits_total", "reads answered by a fresh L1 entry"),
    ("tiered_l2_hits_total", "reads answered by a fresh L2 entry"),
    ("tiered_misses_total", "reads that needed the loader"),
    ("tiered_loads_total", "loader runs that returned"),
    (
        "tiered_load_errors_total",
        "loader runs that failed, panicked or were cut off",
    ),
    (
        "tiered_duplicate_loads_total",
        "loads whose result lost the lock to a newer write or another load",
    ),
    (
        "tiered_stale_served_total",
        "stale values served inside the stale-while-revalidate window",
    ),
    (
        "tiered_fail_safe_total",
        "stale values served because a load failed or was late",
    ),
    (
        "tiered_l2_failures_total",
        "L2 calls that failed for availability",
    ),
    ("tiered_l2_timeouts_total", "L2 commands that timed out"),
    (
        "tiered_l2_decode_errors_total",
        "L2 entries that did not decode (evicted)",
    ),
    (
        "tiered_breaker_opened_total",
        "times the L2 circuit breaker opened",
    ),
    (
        "tiered_invalidations_sent_total",
        "changes announced to other nodes",
    ),
    (
        "tiered_invalidations_received_total",
        "announcements that evicted or cleared something here",
    ),
    (
        "tiered_values_carried_total",
        "announcements that carried a peer's new value into L1",
    ),
    (
        "tiered_gaps_total",
        "times L1 was dropped because invalidations may have been missed",
    ),
    (
        "tiered_l1_unconfirmed_total",
        "fresh L1 entries not served because the bus had not proven delivery within its bound",
    ),
    (
        "tiered_bus_probes_late_total",
        "pub/sub probe rounds that did not come back within the heartbeat timeout",
    ),
    (
        "tiered_outage_served_total",
        "L1 entries served under the outage policy while Redis was unreachable",
    ),
];

pub(crate) fn describe() {
    for (name, help) in COUNTERS {
        describe_counter!(*name, Unit::Count, *help);
    }
    describe_gauge!("tiered_l1_entries", Unit::Count, "entries in L1");
    describe_gauge!(
        "tiered_l1_bytes",
        Unit::Bytes,
        "bytes in L1, as weighed against its budget"
    );
    describe_gauge!(
        "tiered_breaker_state",
        "the L2 circuit breaker: 0 closed, 0.5 half-open, 1 open"
    );
    describe_gauge!(
        "tiered_bus_connected",
        "1 while the invalidation bus's heartbeat is answered"
    );
    describe_gauge!(
        "tiered_bus_lease_holds",
        "1 while the bus's lease lets L1 answer (every invalidation proven delivered within its bound)"
    );
    describe_gauge!(
        "tiered_bus_probe_seconds",
        Unit::Seconds,
        "the last pub/sub probe round's trip through every master and back"
    );
    describe_gauge!(
        "tiered_invalidation_lag_p99_seconds",
        Unit::Seconds,
        "99th percentile of the propagation lag of recent invalidations"
    );
    describe_gauge!(
        "tiered_invalidation_last_message_age_seconds",
        Unit::Seconds,
        "time since the last invalidation message arrived"
    );
}

pub(crate) fn export<V>(inner: &Inner<V>)
where
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let ns = inner.namespace.to_string();
    let c = &inner.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let l2 = inner.store.stats();
    let bus = inner.bus.stats();
    let values = [
        c.l1_hits.sum(),
        get(&c.l2_hits),
        get(&c.misses),
        get(&c.loads),
        get(&c.load_errors),
        get(&c.duplicate_loads),
        get(&c.stale_served),
        get(&c.fail_safe),
        get(&c.l2_failures),
        l2.timeouts,
        l2.decode_errors,
        inner.breaker.times_opened(),
        get(&c.invalidations_sent),
        get(&c.invalidations_received),
        get(&c.values_carried),
        get(&c.gaps),
        get(&c.l1_unconfirmed),
        bus.probes_late,
        get(&c.outage_served),
    ];
    for ((name, _), value) in COUNTERS.iter().zip(values) {
        counter!(*name, "namespace" => ns.clone()).absolute(value);
    }
    gauge!("tiered_l1_entries", "namespace" => ns.clone()).set(inner.l1.entry_count() as f64);
    gauge!("tiered_l1_bytes", "namespace" => ns.clone()).set(inner.l1.weighted_size() as f64);
    let breaker = match inner.breaker.state_now() {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 0.5,
        _ => 1.0,
    };
    gauge!("tiered_breaker_state", "namespace" => ns.clone()).set(breaker);
    gauge!("tiered_bus_connected", "namespace" => ns.clone()).set(if bus.connected {
        1.0
    } else {
        0.0
    });
    gauge!("tiered_bus_lease_holds", "namespace" => ns.clone()).set(if inner.lease.holds() {
        1.0
    } else {
        0.0
    });
    gauge!("tiered_bus_probe_seconds", "namespace" => ns.clone())
        .set(bus.probe_micros as f64 / 1e6);
    gauge!("tiered_invalidation_lag_p99_seconds", "namespace" => ns.clone())
        .set(bus.lag_p99_micros as f64 / 1e6);
    if bus.last_message_micros > 0 {
        let age = invalidation::now_micros().saturating_sub(bus.last_message_micros);
        gauge!("tiered_invalidation_last_message_age_seconds", "namespace" => ns)
            .set(age as f64 / 1e6);
    }
}
