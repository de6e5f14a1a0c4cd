//! What nodes measure and send back: latency histograms, the Zipf key sampler, the node
//! report, and the number formatting of the summary.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two (2^6 = 64): every bucket is within 1/64 (1.6 %) of its values.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values below 64 get a bucket each; above, 64 per power of two up to 2^63.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * SUB as usize;

/// A log-linear latency histogram in nanoseconds: constant memory however many samples, and
/// mergeable, so percentiles across nodes come from all their samples, not from averaging
/// each node's percentiles.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The middle of bucket `i`'s range.
fn value_of(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let e = (i / SUB) as u32 + SUB_BITS - 1;
    let low = (1u64 << e) | ((i % SUB) << (e - SUB_BITS));
    low + (1u64 << (e - SUB_BITS)) / 2
}

impl Histogram {
    /// Counts one sample.
    pub(crate) fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
    }

    /// Adds `other`'s samples.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// How many samples.
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1), or `None` without samples.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_nanos(value_of(i)));
            }
        }
        None
    }

    /// The non-empty buckets, for sending to the coordinator.
    pub(crate) fn to_sparse(&self) -> Vec<(u32, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    /// The inverse of [`Histogram::to_sparse`]; out-of-range buckets are an error.
    pub(crate) fn from_sparse(sparse: &[(u32, u64)]) -> Result<Histogram, String> {
        let mut h = Histogram::default();
        for &(i, c) in sparse {
            let slot = h
                .counts
                .get_mut(i as usize)
                .ok_or_else(|| format!("histogram bucket {i} out of range"))?;
            *slot += c;
            h.total += c;
        }
        Ok(h)
    }
}

/// Samples key ranks 0..n with probability proportional to 1 / (rank + 1)^s: a precomputed
/// CDF and a binary search.
#[derive(Debug)]
pub(crate) struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n` keys (n ≥ 1) with exponent `s` (0: uniform).
    pub(crate) fn new(n: u64, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut acc = 0.0;
        for rank in 1..=n {
            acc += (rank as f64).powf(-s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// A key rank: 0 is the hottest.
    pub(crate) fn sample(&self) -> usize {
        let u = fastrand::f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len().saturating_sub(1))
    }

    /// The probability of rank `i`.
    #[cfg(test)]
    fn share(&self, i: usize) -> f64 {
        let below = if i == 0 { 0.0 } else { self.cdf[i - 1] };
        self.cdf.get(i).map_or(0.0, |c| c - below)
    }
}

/// Which tier answered a read (or that it was a write), the index into the node's histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    /// A fresh L1 entry answered and no loader ran.
    L1 = 0,
    /// Not fresh in L1 and this call's loader did not run: L2, a joined load (in this process
    /// or another's), or a stale value inside the stale-while-revalidate window.
    L2 = 1,
    /// This call's loader ran (a database read).
    Load = 2,
    /// A write or delete: database write, cache update, database version check.
    Write = 3,
}

/// The number of [`Tier`]s.
pub(crate) const TIERS: usize = 4;

/// A node's cache counters that the summary uses (a copy of part of `tiered::CacheStats`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct CacheCounts {
    pub(crate) l1_hits: u64,
    pub(crate) l2_hits: u64,
    pub(crate) misses: u64,
    pub(crate) loads: u64,
    pub(crate) load_errors: u64,
    pub(crate) stale_served: u64,
    pub(crate) lock_waits: u64,
    pub(crate) duplicate_loads: u64,
    pub(crate) unlocked_loads: u64,
    pub(crate) l2_failures: u64,
    pub(crate) invalidations_sent: u64,
    pub(crate) invalidations_received: u64,
    pub(crate) invalidations_ignored: u64,
    pub(crate) gaps: u64,
    pub(crate) l1_unconfirmed: u64,
}

impl From<&tiered::CacheStats> for CacheCounts {
    fn from(s: &tiered::CacheStats) -> Self {
        CacheCounts {
            l1_hits: s.l1_hits,
            l2_hits: s.l2_hits,
            misses: s.misses,
            loads: s.loads,
            load_errors: s.load_errors,
            stale_served: s.stale_served,
            lock_waits: s.lock_waits,
            duplicate_loads: s.duplicate_loads,
            unlocked_loads: s.unlocked_loads,
            l2_failures: s.l2_failures,
            invalidations_sent: s.invalidations_sent,
            invalidations_received: s.invalidations_received,
            invalidations_ignored: s.invalidations_ignored,
            gaps: s.gaps,
            l1_unconfirmed: s.l1_unconfirmed,
        }
    }
}

impl CacheCounts {
    /// Adds `other`'s counters.
    pub(crate) fn add(&mut self, o: &CacheCounts) {
        self.l1_hits += o.l1_hits;
        self.l2_hits += o.l2_hits;
        self.misses += o.misses;
        self.loads += o.loads;
        self.load_errors += o.load_errors;
        self.stale_served += o.stale_served;
        self.lock_waits += o.lock_waits;
        self.duplicate_loads += o.duplicate_loads;
        self.unlocked_loads += o.unlocked_loads;
        self.l2_failures += o.l2_failures;
        self.invalidations_sent += o.invalidations_sent;
        self.invalidations_received += o.invalidations_received;
        self.invalidations_ignored += o.invalidations_ignored;
        self.gaps += o.gaps;
        self.l1_unconfirmed += o.l1_unconfirmed;
    }
}

/// A node's invalidation-bus figures (from `invalidation::BusStats`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct BusCounts {
    pub(crate) received: u64,
    pub(crate) gaps: u64,
    pub(crate) heartbeats_missed: u64,
    pub(crate) probes_late: u64,
    pub(crate) probe_micros: u64,
    pub(crate) lag_p50_micros: u64,
    pub(crate) lag_p99_micros: u64,
    pub(crate) lag_max_micros: u64,
    pub(crate) lag_samples: u64,
}

/// What a node sends back at the end, as JSON in its output directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct NodeReport {
    /// The node's index.
    pub(crate) node: u32,
    /// Reads answered (values and "not found").
    pub(crate) reads: u64,
    /// Writes done (database and cache).
    pub(crate) writes: u64,
    /// Deletes done (database and cache), not counted in `writes`.
    pub(crate) deletes: u64,
    /// Operations that failed (not recorded in the history).
    pub(crate) errors: u64,
    /// The first error's message.
    pub(crate) first_error: Option<String>,
    /// Writes whose cache update was overtaken by a newer database write, and so were
    /// followed by an invalidation.
    pub(crate) overtaken: u64,
    /// Reads recorded in the history (all of them, unless the node had to sample).
    pub(crate) reads_recorded: u64,
    /// Per [`Tier`]: the latency histogram, sparse.
    pub(crate) latencies: Vec<Vec<(u32, u64)>>,
    /// Loader runs (database reads for the cache), background refreshes included.
    pub(crate) db_loads: u64,
    /// Every database query: loads, writes, deletes and version checks.
    pub(crate) db_queries: u64,
    /// The cache's counters.
    pub(crate) cache: CacheCounts,
    /// The bus's figures.
    pub(crate) bus: BusCounts,
    /// Where the node wrote its history, one `Op::to_line` per line.
    pub(crate) ops_file: PathBuf,
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency for the table: `0.9 µs`, `92 µs`, `21.3 ms`, `1.20 s`.
pub(crate) fn latency(d: Option<Duration>) -> String {
    let Some(d) = d else {
        return "-".into();
    };
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.1} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Microseconds as milliseconds: `0.31 ms`.
pub(crate) fn micros_as_ms(us: u64) -> String {
    if us < 10_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// A share as a percentage: `91.2%`.
pub(crate) fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    let pct = part as f64 * 100.0 / whole as f64;
    if part > 0 && pct < 1.0 {
        format!("{pct:.2}%")
    } else {
        format!("{pct:.1}%")
    }
}

/// A byte count: `16 MiB`, `1.5 GiB`, `4,000 B`.
pub(crate) fn bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size {
            let v = n as f64 / size as f64;
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{} B", thousands(n))
}

/// Parses a byte count: a plain integer, or one with a binary suffix (`K`, `KiB`, `M`, `MiB`,
/// `G`, `GiB`, case-insensitive, `B` optional).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (try 16777216 or 16MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown byte unit `{other}` (use K, M or G)")),
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        for v in [
            0u64,
            1,
            63,
            64,
            65,
            127,
            128,
            129,
            1000,
            123_456,
            u64::MAX / 3,
        ] {
            let i = bucket_of(v);
            let mid = value_of(i);
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 1.0 / 64.0, "{v} -> {i} -> {mid}");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        let mut last = 0;
        for v in 0..100_000u64 {
            let i = bucket_of(v);
            assert!(i == last || i == last + 1, "{v}");
            last = i;
        }
    }

    #[test]
    fn quantiles_of_merged_histograms() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for i in 1..=100u64 {
            a.record(Duration::from_micros(i));
            b.record(Duration::from_millis(i));
        }
        a.merge(&Histogram::from_sparse(&b.to_sparse()).unwrap());
        assert_eq!(a.count(), 200);
        let p50 = a.quantile(0.5).unwrap();
        assert!(p50 > Duration::from_micros(98) && p50 < Duration::from_micros(102));
        let p99 = a.quantile(0.99).unwrap();
        assert!(p99 > Duration::from_millis(97) && p99 < Duration::from_millis(100));
    }

    #[test]
    fn zipf_prefers_low_ranks() {
        let z = Zipf::new(1000, 1.0);
        let mut hits = [0u32; 2];
        for _ in 0..20_000 {
            let r = z.sample();
            assert!(r < 1000);
            if r == 0 {
                hits[0] += 1;
            } else if r == 999 {
                hits[1] += 1;
            }
        }
        assert!(hits[0] > 2000 && hits[1] < 20, "{hits:?}");
        assert!((z.share(0) - 1.0 / 7.485).abs() < 0.001);
        let u = Zipf::new(4, 0.0);
        assert!((u.share(3) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn byte_counts_parse_and_print() {
        assert_eq!(parse_bytes("16777216"), Ok(16 << 20));
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("64 k"), Ok(64 << 10));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert_eq!(bytes(16 << 20), "16 MiB");
        assert_eq!(bytes(1500), "1.5 KiB");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }
}
