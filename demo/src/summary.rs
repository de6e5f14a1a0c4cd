//! The summary the coordinator prints: requests, tiers, loads, invalidation lag and the
//! coherence checker's verdict.

use std::time::Duration;

use testkit::coherence::{Op, OpKind, Report};

use crate::RunArgs;
use crate::stats::{
    CacheCounts, Histogram, NodeReport, TIERS, Tier, bytes, latency, micros_as_ms, percent,
    thousands,
};

/// A ratio as a short percentage: `5%`, `2.5%`.
fn ratio(r: f64) -> String {
    let pct = (r * 1000.0).round() / 10.0;
    format!("{pct}%")
}

/// The Zipf exponent: `1.0`, `0.85`.
fn zipf(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.1}")
    } else {
        format!("{s}")
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Prints the summary of a finished run; `check` is the coherence checker's report over the
/// merged `history` (whose seed writes are not counted as writes here).
pub(crate) fn print(
    args: &RunArgs,
    reports: &[NodeReport],
    latencies: &[Histogram; TIERS],
    check: &Report,
    history: &[Op],
    delta: Duration,
    start_us: u64,
) {
    let sum = |f: fn(&NodeReport) -> u64| reports.iter().map(f).sum::<u64>();
    let reads = sum(|r| r.reads);
    let writes = sum(|r| r.writes);
    let deletes = sum(|r| r.deletes);
    let errors = sum(|r| r.errors);
    let requests = reads + writes + deletes;
    let mut cache = CacheCounts::default();
    for r in reports {
        cache.add(&r.cache);
    }

    println!(
        "nodes {} · workers {}/node · keys {} (zipf {}) · write ratio {} · L1 {} · TTL {} · SWR {} · DB latency {} · {}{}",
        args.nodes,
        args.workers,
        thousands(args.keys),
        zipf(args.zipf),
        ratio(args.write_ratio),
        bytes(args.l1_bytes),
        human(args.ttl),
        human(args.swr),
        human(args.db_latency),
        human(args.duration),
        if args.cluster {
            " · L2 on a 6-node Redis Cluster"
        } else {
            ""
        },
    );
    let per_second = requests as f64 / args.duration.as_secs_f64();
    println!(
        "requests {} ({}/s) · reads {} · writes {} · deletes {} · errors {}",
        thousands(requests),
        thousands(per_second.round() as u64),
        thousands(reads),
        thousands(writes),
        thousands(deletes),
        thousands(errors),
    );
    if let Some(e) = reports.iter().find_map(|r| r.first_error.as_deref()) {
        println!("first error: {e}");
    }
    println!();

    println!(
        "{:<8}{:>12}{:>10}{:>12}{:>12}",
        "tier", "count", "share", "p50", "p99"
    );
    let rows = [
        ("L1", Tier::L1, true),
        ("L2", Tier::L2, true),
        ("load", Tier::Load, true),
        ("write", Tier::Write, false),
    ];
    for (name, tier, is_read) in rows {
        let h = &latencies[tier as usize];
        let share = if is_read {
            percent(h.count(), reads)
        } else {
            "-".into()
        };
        println!(
            "{:<8}{:>12}{:>10}{:>12}{:>12}",
            name,
            thousands(h.count()),
            share,
            latency(h.quantile(0.5)),
            latency(h.quantile(0.99)),
        );
    }
    println!("share: of reads. L1: fresh in this node's L1. L2: from Redis, from a load another");
    println!("caller ran, or a stale value served while it refreshes. load: this read ran the");
    println!("loader. write: DB write, cache set, DB version check (or DB delete, invalidate).");
    println!();

    const LABEL: usize = 14;
    let line = |label: &str, text: String| println!("{label:<LABEL$}{text}");
    let l1 = latencies[Tier::L1 as usize].count();
    let l2 = latencies[Tier::L2 as usize].count();
    let loaded = latencies[Tier::Load as usize].count();
    line(
        "hit ratio",
        format!(
            "L1 {} of reads · L2 {} of L1 misses · either {} of reads",
            percent(l1, reads),
            percent(l2, l2 + loaded),
            percent(l1 + l2, reads),
        ),
    );
    let db_loads = sum(|r| r.db_loads);
    let per_100 = if reads == 0 {
        "-".to_string()
    } else {
        format!("{:.2}", db_loads as f64 * 100.0 / reads as f64)
    };
    line(
        "DB loads",
        format!(
            "{} for {} reads ({per_100} per 100 reads) · duplicate loads {}",
            thousands(db_loads),
            thousands(reads),
            thousands(cache.duplicate_loads),
        ),
    );
    line(
        "",
        format!(
            "waits for another node's load {} · DB queries in all {}",
            thousands(cache.lock_waits),
            thousands(sum(|r| r.db_queries)),
        ),
    );
    line(
        "cache stats",
        format!(
            "L1 hits {} · L2 hits {} · misses {} · loads {} · stale served {}",
            thousands(cache.l1_hits),
            thousands(cache.l2_hits),
            thousands(cache.misses),
            thousands(cache.loads),
            thousands(cache.stale_served),
        ),
    );
    let with_lag: Vec<_> = reports.iter().filter(|r| r.bus.lag_samples > 0).collect();
    let messages = sum(|r| r.bus.received);
    let gaps = sum(|r| r.bus.gaps);
    line(
        "invalidation",
        format!(
            "sent {} · messages received {} · evictions {} · gaps {}",
            thousands(cache.invalidations_sent),
            thousands(messages),
            thousands(cache.invalidations_received),
            thousands(gaps),
        ),
    );
    if !with_lag.is_empty() {
        let worst = |f: fn(&NodeReport) -> u64| with_lag.iter().map(|r| f(r)).max().unwrap_or(0);
        line(
            "",
            format!(
                "bus lag p50 {} · p99 {} · max {} (worst node; its last ≤ 4,096 messages)",
                micros_as_ms(worst(|r| r.bus.lag_p50_micros)),
                micros_as_ms(worst(|r| r.bus.lag_p99_micros)),
                micros_as_ms(worst(|r| r.bus.lag_max_micros)),
            ),
        );
    }
    line(
        "lease",
        format!(
            "fresh L1 entries held back {} · probe rounds late {} · last round {} (slowest node)",
            thousands(cache.l1_unconfirmed),
            thousands(sum(|r| r.bus.probes_late)),
            micros_as_ms(
                reports
                    .iter()
                    .map(|r| r.bus.probe_micros)
                    .max()
                    .unwrap_or(0)
            ),
        ),
    );
    line(
        "",
        "L1 answers only while the bus has proven within Δ that every invalidation arrived".into(),
    );
    let overtaken = sum(|r| r.overtaken);
    if overtaken > 0 {
        line(
            "overtaken",
            format!(
                "{} writes found a newer DB write after their cache set, and invalidated the key",
                thousands(overtaken)
            ),
        );
    }

    let recorded = sum(|r| r.reads_recorded);
    let sampled = if recorded < reads {
        format!(" (a sample of {} reads)", thousands(reads))
    } else {
        String::new()
    };
    let ok = check.violations.is_empty() && check.unknown_values == 0;
    line(
        "coherence",
        format!(
            "{} — {} violations in {} reads{sampled} against {} writes and {} deletes (Δ = {})",
            if ok { "OK" } else { "FAILED" },
            thousands(check.violations.len() as u64),
            thousands(check.reads as u64),
            thousands(writes),
            thousands(deletes),
            human(delta),
        ),
    );
    line(
        "",
        format!(
            "{} reads stale within Δ (largest lag {})",
            thousands(check.stale_within_delta as u64),
            micros_as_ms(check.max_lag_us),
        ),
    );
    if check.unknown_values > 0 {
        line(
            "",
            format!(
                "{} reads returned a value no recorded write produced",
                thousands(check.unknown_values as u64)
            ),
        );
    }
    for v in check.violations.iter().take(5) {
        let got = match &v.read.kind {
            OpKind::Read { value: Some(value) } => value.as_str(),
            _ => "nothing",
        };
        println!(
            "  node {} read {} at +{:.3} s and got {got} (version {}); version {} had been \
             acknowledged {} before",
            v.read.node,
            v.read.key,
            v.read.start_us.saturating_sub(start_us) as f64 / 1e6,
            v.saw,
            v.newest,
            micros_as_ms(v.lag_us),
        );
        // The key's changes around the read, to see what happened.
        let mut changes: Vec<&Op> = history
            .iter()
            .filter(|o| o.key == v.read.key && !matches!(o.kind, OpKind::Read { .. }))
            .filter(|o| o.end_us + 2_000_000 > v.read.start_us && o.start_us < v.read.end_us)
            .collect();
        changes.sort_by_key(|o| o.start_us);
        for o in changes.iter().rev().take(4).rev() {
            println!(
                "      node {} {} at +{:.3}..+{:.3} s",
                o.node,
                match &o.kind {
                    OpKind::Write { value, version } =>
                        format!("wrote {value} (version {version})"),
                    OpKind::Delete { version } => format!("deleted (version {version})"),
                    OpKind::Failed { value: Some(value) } => format!("failed to write {value}"),
                    OpKind::Failed { value: None } => "failed to delete".to_string(),
                    OpKind::Read { .. } => String::new(),
                },
                o.start_us.saturating_sub(start_us) as f64 / 1e6,
                o.end_us.saturating_sub(start_us) as f64 / 1e6,
            );
        }
    }
    if check.violations.len() > 5 {
        println!("  ... and {} more", check.violations.len() - 5);
    }
}
