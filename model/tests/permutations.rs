//! Permutation tests (issue #19, part 2): the in-process mechanisms under shuttle's randomized
//! scheduler, each test named after the race it covers (as moka's `and_compute_with_race.rs`).
//!
//! `tiered::coherence::Admission`/`Ticket` and `invalidation::Lease` are crate-private and use
//! `std::sync`; driving them in place would mean rebuilding the whole workspace under
//! `--cfg shuttle` and exposing them. So this file carries faithful copies (same data layout,
//! same orderings of loads, stores, `fetch_max` and lock sections, line for line) built on
//! `shuttle::sync`. Keep them in step with `tiered/src/coherence.rs` and
//! `invalidation/src/lease.rs`.
//!
//! Run: `cargo test -p model --test permutations` (plain `cargo test --workspace` runs it too).

use std::collections::HashMap;

use shuttle::sync::atomic::{AtomicU64, Ordering};
use shuttle::sync::{Arc, Mutex};
use shuttle::thread;

const SCHEDULES: usize = 5_000;

const REVOKED: u64 = u64::MAX;
type Floor = Arc<AtomicU64>;

/// `coherence::Admission`.
#[derive(Default)]
struct Admission {
    keys: Mutex<HashMap<String, Vec<(u64, Floor)>>>,
    next_id: AtomicU64,
}

/// `coherence::Ticket`.
struct Ticket {
    admission: Arc<Admission>,
    key: String,
    id: u64,
    floor: Floor,
}

impl Admission {
    fn register(self: &Arc<Self>, key: &str, revoke_others: bool) -> Ticket {
        let floor: Floor = Arc::new(AtomicU64::new(0));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut keys = self.keys.lock().unwrap();
        let list = keys.entry(key.to_string()).or_default();
        if revoke_others {
            for (_, f) in list.iter() {
                f.store(REVOKED, Ordering::Release);
            }
        }
        list.push((id, Arc::clone(&floor)));
        drop(keys);
        Ticket {
            admission: Arc::clone(self),
            key: key.to_string(),
            id,
            floor,
        }
    }
    fn begin(self: &Arc<Self>, key: &str) -> Ticket {
        self.register(key, false)
    }
    fn begin_write(self: &Arc<Self>, key: &str) -> Ticket {
        self.register(key, true)
    }
    fn announced(&self, key: &str, version: u64) {
        if let Some(list) = self.keys.lock().unwrap().get(key) {
            for (_, f) in list {
                f.fetch_max(version, Ordering::AcqRel);
            }
        }
    }
    fn revoke_all(&self) {
        for list in self.keys.lock().unwrap().values() {
            for (_, f) in list {
                f.store(REVOKED, Ordering::Release);
            }
        }
    }
    /// `Admission::admit`: check, insert, check again.
    fn admit(l1: &L1, ticket: &Ticket, version: u64) {
        if !ticket.admits(version) {
            return;
        }
        l1.insert(version);
        if !ticket.admits(version) {
            l1.invalidate();
        }
    }
    /// A deliberately broken `admit`: no second check.
    fn admit_once(l1: &L1, ticket: &Ticket, version: u64) {
        if ticket.admits(version) {
            l1.insert(version);
        }
    }
    /// `Admission::on_announcement`.
    fn on_announcement(&self, l1: &L1, key: &str, version: u64) {
        self.announced(key, version);
        l1.evict_below(version);
    }
}

impl Ticket {
    fn admits(&self, version: u64) -> bool {
        let floor = self.floor.load(Ordering::Acquire);
        floor != REVOKED && version >= floor
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut keys = self.admission.keys.lock().unwrap();
        if let Some(list) = keys.get_mut(&self.key) {
            list.retain(|(i, _)| *i != self.id);
            if list.is_empty() {
                keys.remove(&self.key);
            }
        }
    }
}

/// L1 for one key: moka's operations are each atomic (one lock here).
#[derive(Default)]
struct L1(Mutex<Option<u64>>);

impl L1 {
    fn insert(&self, v: u64) {
        *self.0.lock().unwrap() = Some(v);
    }
    fn invalidate(&self) {
        *self.0.lock().unwrap() = None;
    }
    fn get(&self) -> Option<u64> {
        *self.0.lock().unwrap()
    }
    /// `on_announcement`'s get-then-invalidate (two L1 calls, as in the code).
    fn evict_below(&self, v: u64) {
        if self.get().is_some_and(|held| held < v) {
            self.invalidate();
        }
    }
}

/// A fill that read version 1 races the announcement of version 2; the fill began first.
fn fill_racing_announcement(admit: fn(&L1, &Ticket, u64)) {
    let admission = Arc::new(Admission::default());
    let l1 = Arc::new(L1::default());
    let ticket = admission.begin("k");
    let fill = {
        let l1 = Arc::clone(&l1);
        thread::spawn(move || admit(&l1, &ticket, 1))
    };
    let (a, l) = (Arc::clone(&admission), Arc::clone(&l1));
    let bus = thread::spawn(move || a.on_announcement(&l, "k", 2));
    fill.join().unwrap();
    bus.join().unwrap();
    assert_ne!(l1.get(), Some(1), "the fill's older read stayed in L1");
}

#[test]
fn race_fill_vs_announcement_never_leaves_the_older_read() {
    shuttle::check_random(|| fill_racing_announcement(Admission::admit), SCHEDULES);
}

/// The broken ordering: without the check after the insert, an announcement that lands
/// between the check and the insert finds nothing to evict, and the older read stays.
#[test]
#[should_panic(expected = "the fill's older read stayed in L1")]
fn race_fill_vs_announcement_without_the_second_check_fails() {
    shuttle::check_random(
        || fill_racing_announcement(Admission::admit_once),
        SCHEDULES,
    );
}

/// Two `set`s and an `invalidate` of one node: each takes a write ticket, gets its version from
/// Redis (one counter: the scripts' order), raises the floor (its own acknowledged write), then
/// inserts (or, for the delete, drops L1). Whatever the order, once the writes' messages are
/// applied L1 is empty or holds the newest version, and only if the newest change was a `set`.
#[test]
fn race_set_vs_set_vs_delete_leaves_only_the_newest_write() {
    shuttle::check_random(
        || {
            let admission = Arc::new(Admission::default());
            let l1 = Arc::new(L1::default());
            let redis = Arc::new(Mutex::new((0u64, false))); // (version, deleted)
            let mut handles = Vec::new();
            for delete in [false, false, true] {
                let (a, l, r) = (Arc::clone(&admission), Arc::clone(&l1), Arc::clone(&redis));
                handles.push(thread::spawn(move || {
                    let ticket = a.begin_write("k");
                    if delete {
                        l.invalidate();
                    }
                    let v = {
                        let mut r = r.lock().unwrap();
                        r.0 += 1;
                        r.1 = delete;
                        r.0
                    };
                    a.announced("k", v);
                    if delete {
                        drop(ticket);
                        l.invalidate();
                    } else {
                        Admission::admit(&l, &ticket, v);
                    }
                }));
            }
            for h in handles {
                h.join().unwrap();
            }
            let (newest, deleted) = *redis.lock().unwrap();
            // Until the writes' own messages come back, L1 may hold an older own write that
            // finished first (a newer one whose ticket it revoked inserted nothing): inside Δ,
            // as the docs say. The messages, in order, repair it.
            for v in 1..=newest {
                admission.on_announcement(&l1, "k", v);
            }
            match l1.get() {
                None => {}
                Some(v) => {
                    assert!(!deleted, "a value survived the newest change, a delete");
                    assert_eq!(v, newest, "an older own write overtook a newer one");
                }
            }
        },
        SCHEDULES,
    );
}

/// A gap (`invalidate_local`: revoke every ticket, then drop L1) during a fill: the fill
/// inserts nothing that outlives the gap.
#[test]
fn race_revoke_during_fill_leaves_nothing() {
    shuttle::check_random(
        || {
            let admission = Arc::new(Admission::default());
            let l1 = Arc::new(L1::default());
            let ticket = admission.begin("k");
            let l = Arc::clone(&l1);
            let fill = thread::spawn(move || Admission::admit(&l, &ticket, 1));
            let (a, l) = (Arc::clone(&admission), Arc::clone(&l1));
            let gap = thread::spawn(move || {
                a.revoke_all();
                l.invalidate();
            });
            fill.join().unwrap();
            gap.join().unwrap();
            assert_eq!(l1.get(), None, "a fill from before the gap survived it");
        },
        SCHEDULES,
    );
}

/// `invalidation::Lease` (time as plain numbers): `confirm` is a `fetch_max` of send + Δ.
struct Lease {
    until: Arc<AtomicU64>,
    bound: u64,
}

impl Lease {
    fn holds_at(&self, now: u64) -> bool {
        now < self.until.load(Ordering::Acquire)
    }
    fn confirm(&self, sent: u64) {
        self.until
            .fetch_max(sent.saturating_add(self.bound), Ordering::AcqRel);
    }
}

/// Probe rounds coming back out of order race readers: the lease never runs backwards (a
/// reader that saw it hold at t sees it hold at t again), and ends at the newest round + Δ.
#[test]
fn race_confirm_vs_holds_at_never_goes_backwards() {
    shuttle::check_random(
        || {
            let lease = Arc::new(Lease {
                until: Arc::new(AtomicU64::new(10)),
                bound: 10,
            });
            let mut rounds = Vec::new();
            for sent in [30u64, 5, 20] {
                let l = Arc::clone(&lease);
                rounds.push(thread::spawn(move || l.confirm(sent)));
            }
            let l = Arc::clone(&lease);
            let reader = thread::spawn(move || {
                let mut held = false;
                for _ in 0..3 {
                    let now = l.holds_at(25);
                    assert!(!held || now, "the lease ran backwards");
                    held = now;
                }
            });
            for r in rounds {
                r.join().unwrap();
            }
            reader.join().unwrap();
            assert!(lease.holds_at(39) && !lease.holds_at(40));
        },
        SCHEDULES,
    );
}
