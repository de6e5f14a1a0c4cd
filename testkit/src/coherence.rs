//! A coherence checker for histories of cache operations recorded by several nodes.
//!
//! Each node records every operation with its start and end time (microseconds on a clock all
//! nodes share: the same host's wall clock) and, for writes and deletes, the write version the
//! cache gave it. [`check`] then finds every read that returned something older than the newest
//! change acknowledged more than Δ before the read started.
//!
//! Versions order the changes of one key (they are assigned by Redis, one after another), so
//! the checker needs no assumption about which of two overlapping writes won.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Wrote `value`, which got write version `version`.
    Write {
        /// The value written (unique across the history).
        value: String,
        /// Its write version.
        version: u64,
    },
    /// Deleted the key; the deletion got write version `version`.
    Delete {
        /// The deletion's write version.
        version: u64,
    },
    /// A write (`Some(value)`) or delete (`None`) that returned an error: it may or may not
    /// have taken effect (a timeout during a failover, say). A read of its value, or a read of
    /// nothing after it started, is counted as uncertain rather than judged — until a
    /// successful change that started after it returned is more than Δ old; then such a read
    /// is a violation like any other.
    Failed {
        /// The value it tried to write; `None` for a delete.
        value: Option<String>,
    },
    /// Read the key: a value, or nothing.
    Read {
        /// What the read returned.
        value: Option<String>,
    },
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Which node ran it.
    pub node: u32,
    /// The key.
    pub key: String,
    /// When it started (µs).
    pub start_us: u64,
    /// When it returned (µs).
    pub end_us: u64,
    /// What it did.
    pub kind: OpKind,
}

impl Op {
    /// One line of text: `node key start end W value version | D version | R value-or--`.
    pub fn to_line(&self) -> String {
        let head = format!(
            "{} {} {} {}",
            self.node, self.key, self.start_us, self.end_us
        );
        match &self.kind {
            OpKind::Write { value, version } => format!("{head} W {value} {version}"),
            OpKind::Delete { version } => format!("{head} D {version}"),
            OpKind::Read { value } => format!("{head} R {}", value.as_deref().unwrap_or("-")),
            OpKind::Failed { value } => format!("{head} F {}", value.as_deref().unwrap_or("-")),
        }
    }

    /// Parses [`Op::to_line`]'s output (keys and values must not contain spaces; a value
    /// `-` means nothing was read).
    pub fn from_line(line: &str) -> Option<Op> {
        let f: Vec<&str> = line.split(' ').collect();
        let (node, key, start_us, end_us) = (
            f.first()?.parse().ok()?,
            f.get(1)?,
            f.get(2)?.parse().ok()?,
            f.get(3)?.parse().ok()?,
        );
        let kind = match (*f.get(4)?, f.len()) {
            ("W", 7) => OpKind::Write {
                value: f[5].to_string(),
                version: f[6].parse().ok()?,
            },
            ("D", 6) => OpKind::Delete {
                version: f[5].parse().ok()?,
            },
            ("R", 6) => OpKind::Read {
                value: (f[5] != "-").then(|| f[5].to_string()),
            },
            ("F", 6) => OpKind::Failed {
                value: (f[5] != "-").then(|| f[5].to_string()),
            },
            _ => return None,
        };
        Some(Op {
            node,
            key: key.to_string(),
            start_us,
            end_us,
            kind,
        })
    }
}

/// A read that returned something older than a change acknowledged more than Δ before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The read.
    pub read: Op,
    /// The version it saw (0: nothing, and no deletion explains it).
    pub saw: u64,
    /// The newest version acknowledged more than Δ before the read.
    pub newest: u64,
    /// How long before the read that version was acknowledged (µs).
    pub lag_us: u64,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Reads checked.
    pub reads: usize,
    /// Writes in the history.
    pub writes: usize,
    /// Deletes in the history.
    pub deletes: usize,
    /// Reads that saw a value older than allowed.
    pub violations: Vec<Violation>,
    /// The largest lag seen by any read, within Δ or not (µs): how long before the read
    /// started the first change newer than what it saw had been acknowledged.
    pub max_lag_us: u64,
    /// Reads that saw something older than the newest acknowledged change (within Δ).
    pub stale_within_delta: usize,
    /// Reads whose value no write in the history produced (a bug in the cache or the test).
    pub unknown_values: usize,
    /// Failed writes and deletes in the history ([`OpKind::Failed`]).
    pub failed: usize,
    /// Reads not judged because a failed write or delete may explain them.
    pub uncertain: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} reads, {} writes, {} deletes checked: {} violations, {} stale reads within Δ, \
             {} unknown values, {} failed changes, {} uncertain reads, largest lag {:.1} ms",
            self.reads,
            self.writes,
            self.deletes,
            self.violations.len(),
            self.stale_within_delta,
            self.unknown_values,
            self.failed,
            self.uncertain,
            self.max_lag_us as f64 / 1000.0
        )
    }
}

/// Checks `ops` (from all nodes, in any order) against the staleness bound `delta`.
pub fn check(ops: &[Op], delta: Duration) -> Report {
    let delta_us = u64::try_from(delta.as_micros()).unwrap_or(u64::MAX);
    let mut report = Report::default();
    // Per key: changes (version, start, end, is_delete), and the version of each value.
    let mut changes: HashMap<&str, Vec<(u64, u64, u64, bool)>> = HashMap::new();
    let mut version_of: HashMap<&str, u64> = HashMap::new();
    // Failed writes by value, failed deletes by key: (start, end) of each.
    let mut failed_values: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut failed_deletes: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for op in ops {
        match &op.kind {
            OpKind::Write { value, version } => {
                report.writes += 1;
                version_of.insert(value, *version);
                changes
                    .entry(&op.key)
                    .or_default()
                    .push((*version, op.start_us, op.end_us, false));
            }
            OpKind::Delete { version } => {
                report.deletes += 1;
                changes
                    .entry(&op.key)
                    .or_default()
                    .push((*version, op.start_us, op.end_us, true));
            }
            OpKind::Failed { value } => {
                report.failed += 1;
                match value {
                    Some(v) => {
                        failed_values.insert(v, (op.start_us, op.end_us));
                    }
                    None => failed_deletes
                        .entry(&op.key)
                        .or_default()
                        .push((op.start_us, op.end_us)),
                }
            }
            OpKind::Read { .. } => {}
        }
    }
    for op in ops {
        let OpKind::Read { value } = &op.kind else {
            continue;
        };
        report.reads += 1;
        let empty = Vec::new();
        let key_changes = changes.get(op.key.as_str()).unwrap_or(&empty);
        // A failed change landed, if at all, before it returned. A successful change that
        // started after that and was acknowledged more than Δ before this read supersedes
        // it: the read is then judged against that change, not excused.
        let superseded_at = |failed_end: u64| {
            key_changes
                .iter()
                .filter(|c| c.1 > failed_end && c.2 + delta_us < op.start_us)
                .map(|c| c.2)
                .min()
        };
        match value {
            Some(v) if failed_values.contains_key(v.as_str()) => {
                let (_, failed_end) = failed_values[v.as_str()];
                match superseded_at(failed_end) {
                    None => report.uncertain += 1,
                    Some(acked) => {
                        let lag = op.start_us - acked;
                        report.max_lag_us = report.max_lag_us.max(lag);
                        report.violations.push(Violation {
                            read: op.clone(),
                            saw: 0,
                            newest: key_changes
                                .iter()
                                .filter(|c| c.2 + delta_us < op.start_us)
                                .map(|c| c.0)
                                .max()
                                .unwrap_or(0),
                            lag_us: lag,
                        });
                    }
                }
                continue;
            }
            None => {
                let excused = failed_deletes.get(op.key.as_str()).is_some_and(|list| {
                    list.iter()
                        .any(|&(start, end)| start < op.end_us && superseded_at(end).is_none())
                });
                if excused {
                    report.uncertain += 1;
                    continue;
                }
            }
            Some(_) => {}
        }
        // The version this read stands for.
        let saw = match value {
            Some(v) => match version_of.get(v.as_str()) {
                Some(version) => *version,
                None => {
                    report.unknown_values += 1;
                    continue;
                }
            },
            // Nothing: explained by the newest deletion that started before the read ended.
            None => key_changes
                .iter()
                .filter(|c| c.3 && c.1 < op.end_us)
                .map(|c| c.0)
                .max()
                .unwrap_or(0),
        };
        // The first acknowledgement of a change newer than what was seen.
        let first_newer_ack = key_changes
            .iter()
            .filter(|c| c.0 > saw && c.2 < op.start_us)
            .map(|c| c.2)
            .min();
        let Some(acked) = first_newer_ack else {
            continue;
        };
        let lag = op.start_us - acked;
        report.max_lag_us = report.max_lag_us.max(lag);
        if lag <= delta_us {
            report.stale_within_delta += 1;
            continue;
        }
        let newest = key_changes
            .iter()
            .filter(|c| c.2 + delta_us < op.start_us)
            .map(|c| c.0)
            .max()
            .unwrap_or(0);
        report.violations.push(Violation {
            read: op.clone(),
            saw,
            newest,
            lag_us: lag,
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(node: u32, start: u64, end: u64, kind: OpKind) -> Op {
        Op {
            node,
            key: "k".into(),
            start_us: start,
            end_us: end,
            kind,
        }
    }

    fn write(start: u64, end: u64, value: &str, version: u64) -> Op {
        op(
            1,
            start,
            end,
            OpKind::Write {
                value: value.into(),
                version,
            },
        )
    }

    fn read(start: u64, value: Option<&str>) -> Op {
        op(
            2,
            start,
            start + 10,
            OpKind::Read {
                value: value.map(String::from),
            },
        )
    }

    const DELTA: Duration = Duration::from_millis(100);

    #[test]
    fn a_stale_read_within_delta_is_allowed_and_beyond_it_is_a_violation() {
        let ops = vec![
            write(0, 10, "a", 1),
            write(1_000, 1_010, "b", 2),
            read(50_000, Some("a")),
            read(200_000, Some("a")),
            read(200_000, Some("b")),
        ];
        let r = check(&ops, DELTA);
        assert_eq!(r.reads, 3);
        assert_eq!(r.stale_within_delta, 1);
        assert_eq!(r.violations.len(), 1);
        assert_eq!(r.violations[0].saw, 1);
        assert_eq!(r.violations[0].newest, 2);
        assert_eq!(r.max_lag_us, 200_000 - 1_010);
    }

    #[test]
    fn overlapping_writes_are_ordered_by_version_not_by_time() {
        // "b" started later but Redis applied it first: "a" (version 2) is the newest.
        let ops = vec![
            write(0, 500, "a", 2),
            write(10, 20, "b", 1),
            read(300_000, Some("a")),
        ];
        assert!(check(&ops, DELTA).violations.is_empty());
        let ops = vec![
            write(0, 500, "a", 2),
            write(10, 20, "b", 1),
            read(300_000, Some("b")),
        ];
        assert_eq!(check(&ops, DELTA).violations.len(), 1);
    }

    #[test]
    fn nothing_is_fine_after_a_delete_and_a_violation_after_a_write() {
        let delete = op(1, 100, 200, OpKind::Delete { version: 2 });
        let ops = vec![write(0, 10, "a", 1), delete.clone(), read(500_000, None)];
        assert!(check(&ops, DELTA).violations.is_empty());
        let ops = vec![
            write(0, 10, "a", 1),
            delete,
            write(300, 400, "c", 3),
            read(500_000, None),
        ];
        assert_eq!(check(&ops, DELTA).violations.len(), 1);
        assert!(check(&[read(5, None)], DELTA).violations.is_empty());
    }

    #[test]
    fn lines_round_trip() {
        for o in [
            write(1, 2, "n1-7", 9),
            op(3, 4, 5, OpKind::Delete { version: 6 }),
            read(7, None),
            read(8, Some("x")),
        ] {
            assert_eq!(Op::from_line(&o.to_line()), Some(o));
        }
        assert_eq!(Op::from_line("junk"), None);
    }

    #[test]
    fn reads_a_failed_change_may_explain_are_uncertain_not_violations() {
        let ops = vec![
            op(
                0,
                0,
                10,
                OpKind::Write {
                    value: "a".into(),
                    version: 1,
                },
            ),
            // A write that timed out: it may have landed.
            op(
                0,
                20,
                30,
                OpKind::Failed {
                    value: Some("b".into()),
                },
            ),
            op(
                1,
                2_000_000,
                2_000_010,
                OpKind::Read {
                    value: Some("b".into()),
                },
            ),
            // A delete that failed may explain reading nothing.
            op(0, 40, 50, OpKind::Failed { value: None }),
            op(1, 2_000_100, 2_000_110, OpKind::Read { value: None }),
        ];
        let report = check(&ops, Duration::from_millis(500));
        assert_eq!(report.failed, 2);
        assert_eq!(report.uncertain, 2);
        assert!(report.violations.is_empty());
        assert_eq!(report.unknown_values, 0);
        // Once a later successful write is more than Δ old, the failed value is no excuse.
        let mut later = ops.clone();
        later.push(op(
            0,
            3_000_000,
            3_000_010,
            OpKind::Write {
                value: "d".into(),
                version: 4,
            },
        ));
        later.push(op(
            1,
            5_000_000,
            5_000_010,
            OpKind::Read {
                value: Some("b".into()),
            },
        ));
        later.push(op(1, 5_000_100, 5_000_110, OpKind::Read { value: None }));
        let report = check(&later, Duration::from_millis(500));
        assert_eq!(report.violations.len(), 2, "{report}");
        // A failed change does not hide a real violation of another value.
        let mut ops = ops;
        ops.push(op(
            0,
            2_500_000,
            2_500_010,
            OpKind::Write {
                value: "c".into(),
                version: 3,
            },
        ));
        ops.push(op(
            1,
            3_000_100,
            3_000_110,
            OpKind::Read {
                value: Some("a".into()),
            },
        ));
        assert_eq!(check(&ops, Duration::from_millis(500)).violations.len(), 1);
        let line = ops[1].to_line();
        assert_eq!(Op::from_line(&line), Some(ops[1].clone()));
    }
}
