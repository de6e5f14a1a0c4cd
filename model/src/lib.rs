//! A model of the tiered cache's coherence protocol, checked exhaustively with [`stateright`]
//! (issue #19). Not a dependency of the library: it describes the design, step by step, and
//! [`Variant`] selects deliberately broken versions of it that the checker must refute.
//!
//! One key, two cache nodes, one Redis, one pub/sub path per node. Every step of the model is
//! one atomic step of the real system (a Lua script, a synchronous section between two
//! `.await`s, the delivery of one message); `model/README.md` maps each to its function.
//!
//! - **Redis**: the entry (a value, a tombstone or nothing) with its write version, the load
//!   lock, the server clock, and a replica. Scripts (`OVERWRITE`, `REMOVE`, `READ_OR_LOCK`,
//!   `COMPLETE`) are single steps; a write version is `max(previous + 1, clock)` and the clock
//!   moves on with every script. Key loss (`FLUSHALL`, eviction of the entry and its tombstone)
//!   empties the entry without any message; a failover goes back to the replica (losing the
//!   writes it had not received) and is a gap on every node.
//! - **The bus**: per node a FIFO path of eviction messages (version, origin, tick published).
//!   A disconnect loses the path's messages: a gap. A probe round is one step, `Renew`: a probe
//!   comes back behind every message published before it, so when it returns it was sent no
//!   later than the oldest message still on the path (or now, if the path is empty); the model
//!   takes that latest possible send tick s and renews the lease until s + Δ. Every real probe
//!   round renews to at most that, so the model's lease is never shorter than the real one.
//! - **Nodes**: L1 (at most one copy of the key), the admission tickets of the fills and writes
//!   running, the lease, and the highest version the node has seen announced.
//! - **Callers**: `set`, `invalidate`, `get_or_set`. A caller may go away at any await point:
//!   a write then runs on (its own task), a load runs on (its own task) and only the caller's
//!   answer is lost.
//!
//! Time is logical: `Tick` moves it on by one, Δ is a number of ticks.

use std::collections::VecDeque;
use std::fmt;

use stateright::{Model, Property};

/// Which protocol the model runs: the shipped one or a deliberately broken one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The protocol as shipped.
    Shipped,
    /// (a) Write versions are `previous + 1` only (no server clock): after key loss a new write
    /// restarts at a low version, and a node holding an older copy keeps it.
    VersionReset,
    /// (b) No admission floor on fills: a fill that read before an announcement inserts after it.
    DetachedFill,
    /// (c) A node's own acknowledged write does not raise its tickets' floors: an older own
    /// write inserts after a newer one.
    OvertakenWrite,
    /// (d) A node skips its own messages, and a write runs in its caller (cancelling the caller
    /// cuts it between Redis and L1): the writer keeps its stale copy.
    OwnWrite,
}

impl Variant {
    /// Every variant, the shipped one first.
    pub const ALL: [Variant; 5] = [
        Variant::Shipped,
        Variant::VersionReset,
        Variant::DetachedFill,
        Variant::OvertakenWrite,
        Variant::OwnWrite,
    ];
}

/// What a caller does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `set`: a new value (the change's own number).
    Set,
    /// `invalidate`: a tombstone.
    Invalidate,
    /// `get_or_set`: L1, else Redis, else the loader under the lock.
    Get,
}

/// The bounds of one check: which callers run (each starts at most once, at any moment), and
/// how often the environment may act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The protocol variant.
    pub variant: Variant,
    /// The callers: (node 0 or 1, what it does).
    pub ops: Vec<(u8, Kind)>,
    /// Δ in ticks (the lease runs until a probe's send tick + Δ).
    pub delta: u8,
    /// The last tick.
    pub max_time: u8,
    /// Nodes (1 or 2; a second node only adds interleavings to some witnesses).
    pub nodes: u8,
    /// Probe rounds (lease renewals) per node.
    pub probes: u8,
    /// Key losses (`FLUSHALL` or eviction of the entry and its tombstone).
    pub flushes: u8,
    /// Failovers to the replica.
    pub failovers: u8,
    /// Subscriber disconnects (one node's messages in flight lost: a gap on that node).
    pub disconnects: u8,
    /// Lock expiries (a holder paused past the lock's TTL).
    pub lock_expiries: u8,
    /// Whether callers of `get_or_set` may go away at await points.
    pub cancellation: bool,
}

impl Config {
    /// A configuration with the given callers and no environment events; Δ = 1, 3 ticks.
    pub fn new(variant: Variant, ops: Vec<(u8, Kind)>) -> Self {
        Config {
            variant,
            ops,
            delta: 1,
            max_time: 2,
            nodes: 2,
            probes: 1,
            flushes: 0,
            failovers: 0,
            disconnects: 0,
            lock_expiries: 0,
            cancellation: false,
        }
    }

    /// The configuration the test suite checks for the shipped protocol (debug builds): a read,
    /// a peer's write, a read again; key loss, a failover, a lock expiry, cancellation.
    pub fn small(variant: Variant) -> Self {
        Config {
            flushes: 1,
            cancellation: true,
            ..Config::new(
                variant,
                vec![(0, Kind::Get), (1, Kind::Set), (0, Kind::Get)],
            )
        }
    }

    /// The faults configuration (debug builds): a read and a peer's write under key loss, a
    /// failover, a disconnect, a lock expiry and cancellation.
    pub fn faults(variant: Variant) -> Self {
        Config {
            flushes: 1,
            failovers: 1,
            disconnects: 1,
            lock_expiries: 1,
            cancellation: true,
            ..Config::new(variant, vec![(0, Kind::Get), (1, Kind::Set)])
        }
    }

    /// A larger configuration (release builds): both nodes write and read, every environment
    /// event.
    pub fn large(variant: Variant) -> Self {
        Config {
            failovers: 1,
            lock_expiries: 1,
            ..Config::small(variant)
        }
    }

    /// The smallest configuration that exposes `variant`'s bug (the shipped protocol passes it
    /// too, see the tests).
    pub fn witness(variant: Variant) -> Self {
        use Kind::*;
        match variant {
            Variant::Shipped => Config::small(variant),
            Variant::VersionReset => Config {
                flushes: 1,
                ..Config::new(variant, vec![(0, Get), (1, Set), (0, Get)])
            },
            Variant::DetachedFill => Config::new(variant, vec![(0, Get), (1, Set)]),
            Variant::OvertakenWrite => Config {
                nodes: 1,
                ..Config::new(variant, vec![(0, Set), (0, Set)])
            },
            Variant::OwnWrite => Config {
                nodes: 1,
                cancellation: true,
                ..Config::new(variant, vec![(0, Get), (0, Set), (0, Get)])
            },
        }
    }
}

/// The key's entry in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stored {
    /// No entry (never written, flushed, evicted).
    Absent,
    /// A value: the number of the newest change it reflects, and its write version.
    Value {
        /// The newest change this value reflects.
        asof: u8,
        /// Its write version.
        version: u8,
    },
    /// A tombstone (reads as a miss) keeping the delete's write version.
    Tomb {
        /// Its write version.
        version: u8,
    },
}

impl Stored {
    fn version(self) -> u8 {
        match self {
            Stored::Absent => 0,
            Stored::Value { version, .. } | Stored::Tomb { version } => version,
        }
    }
}

/// Redis: one key, its lock, the server clock, a replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Redis {
    /// The entry.
    pub entry: Stored,
    /// The load lock: the id of the caller whose load holds it.
    pub lock: Option<u8>,
    /// How many times the lock was granted (identifies a lock lease).
    pub lock_epoch: u8,
    /// The server clock (moves on with every script: a script takes more than a microsecond).
    pub clock: u8,
    /// The number of the last change applied here.
    pub changes: u8,
    /// The replica: the entry and the number of the last change it received, as of the last
    /// tick (replication lags by less than a tick).
    pub replica: (Stored, u8),
}

/// An L1 copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Copy {
    /// The newest change the value reflects.
    pub asof: u8,
    /// Its write version.
    pub version: u8,
    /// Whether, when it was inserted, its version was at least every version this node had
    /// seen announced (what `l1_never_below_announced` checks).
    pub admitted_current: bool,
}

/// A message on a node's pub/sub path: write `version` happened, made by node `origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Msg {
    /// The write version.
    pub version: u8,
    /// The node that made it.
    pub origin: u8,
    /// The tick it was published.
    pub sent: u8,
}

/// One cache node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    /// Its L1 copy of the key.
    pub l1: Option<Copy>,
    /// L1 answers while `time < lease_until`.
    pub lease_until: u8,
    /// The highest version this node has seen announced (messages, its own acknowledged writes)
    /// since its last gap.
    pub seen: u8,
    /// Its pub/sub path: messages published, not yet applied, in order.
    pub path: VecDeque<Msg>,
    /// Probe rounds left.
    pub probes: u8,
}

/// An admission ticket: the lowest version its holder may still insert, or revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The floor.
    pub floor: u8,
    /// Revoked: nothing may be inserted.
    pub revoked: bool,
}

impl Ticket {
    fn admits(self, version: u8) -> bool {
        !self.revoked && version >= self.floor
    }
}

/// Where a caller is: the next step it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `write`: take a write ticket (revoking earlier fills' tickets).
    SetBegin,
    /// `write`: the `OVERWRITE` script.
    SetScript,
    /// `write`: the reply: raise the floor, insert into L1 through the ticket.
    SetReply {
        /// The value (the change's number).
        asof: u8,
        /// Its version.
        version: u8,
    },
    /// `remove`: take a write ticket, drop L1.
    DelBegin,
    /// `remove`: the `REMOVE` script.
    DelScript,
    /// `remove`: the reply: raise the floor, drop L1 again.
    DelReply {
        /// The tombstone's version.
        version: u8,
    },
    /// `l1_lookup`: an L1 hit while the lease holds, else a load with a fresh ticket.
    GetLookup,
    /// `resolve`: the `READ_OR_LOCK` script (a value, or the lock, or wait). With the lock, the
    /// loader runs in the same step: reading the source of truth any later changes nothing
    /// but the answer's age (any change in between breaks the lock, so `COMPLETE` refuses).
    GetReadOrLock,
    /// `run_load`: the `COMPLETE` script (writes only while the lock is still ours).
    GetComplete {
        /// The loaded value.
        asof: u8,
        /// The lock lease this load holds.
        epoch: u8,
    },
    /// `fill`: insert into L1 through the ticket, answer the caller.
    GetFill {
        /// The value.
        asof: u8,
        /// Its version.
        version: u8,
    },
}

/// A caller in progress.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Op {
    /// Its index in [`Config::ops`].
    pub id: u8,
    /// Its node.
    pub node: u8,
    /// Its next step.
    pub phase: Phase,
    /// Whether the caller still waits for the answer.
    pub caller: bool,
    /// The tick the call began.
    pub start: u8,
    /// Its admission ticket, once taken.
    pub ticket: Option<Ticket>,
}

/// Where a read's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An L1 hit.
    L1,
    /// Redis or the loader.
    L2,
}

/// A read answered in the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Read {
    /// The node.
    pub node: u8,
    /// The newest change the answer reflects.
    pub asof: u8,
    /// The tick the call began.
    pub start: u8,
    /// Where the answer came from.
    pub source: Source,
}

/// The whole system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    /// The logical time.
    pub time: u8,
    /// Redis.
    pub redis: Redis,
    /// The two nodes.
    pub nodes: [Node; 2],
    /// Callers in progress.
    pub ops: Vec<Op>,
    /// Which callers of [`Config::ops`] have started (a bit each).
    pub started: u16,
    /// Changes acknowledged (committed by their script) and not lost by a failover:
    /// (change number, tick).
    pub acked: Vec<(u8, u8)>,
    /// Change numbers handed out so far (the source of truth's newest change).
    pub issued: u8,
    /// Environment budgets left: flushes, failovers, disconnects, lock expiries.
    pub budget: [u8; 4],
    /// The first read that answered older than `no_read_older_than_delta` allows (sticky, so
    /// that correct reads add no states).
    pub stale_read: Option<Read>,
    /// Whether an L1 hit has answered with the newest change (sticky).
    pub hit_newest: bool,
}

/// A step of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Caller `id` of [`Config::ops`] calls.
    Call(u8),
    /// Caller `id` takes its next step.
    Step(u8),
    /// Caller `id` goes away (its work goes on, or, in [`Variant::OwnWrite`], a write is cut).
    Cancel(u8),
    /// The next message on node `n`'s path is applied.
    Deliver(u8),
    /// A probe round of node `n` comes back: the lease runs until its send tick + Δ.
    Renew(u8),
    /// Node `n`'s subscriber disconnects: its messages in flight are lost, a gap.
    Disconnect(u8),
    /// The key and its tombstone disappear from Redis (`FLUSHALL`, eviction).
    Flush,
    /// Failover to the replica: unreplicated writes are lost, a gap on every node.
    Failover,
    /// The lock's TTL runs out.
    ExpireLock,
    /// Time moves on by one tick.
    Tick,
}

/// The model: a [`Config`].
#[derive(Debug, Clone)]
pub struct Protocol {
    /// Its bounds and variant.
    pub config: Config,
}

impl Protocol {
    /// The model of `config`.
    pub fn new(config: Config) -> Self {
        Protocol { config }
    }

    fn next_version(&self, redis: &mut Redis) -> u8 {
        redis.clock += 1;
        let next = redis.entry.version() + 1;
        match self.config.variant {
            Variant::VersionReset => next,
            _ => next.max(redis.clock),
        }
    }

    /// `Admission::announced`: fills and writes that began earlier may only insert `version` or
    /// newer.
    fn raise(state: &mut State, node: u8, version: u8) {
        for op in state.ops.iter_mut().filter(|o| o.node == node) {
            if let Some(t) = &mut op.ticket {
                t.floor = t.floor.max(version);
            }
        }
    }

    /// `Admission::revoke_all` (or `begin_write`'s revocation of earlier tickets).
    fn revoke(state: &mut State, node: u8) {
        for op in state.ops.iter_mut().filter(|o| o.node == node) {
            if let Some(t) = &mut op.ticket {
                t.revoked = true;
            }
        }
    }

    /// `Admission::admit`: insert through the ticket.
    fn admit(state: &mut State, node: u8, ticket: Ticket, asof: u8, version: u8) {
        if ticket.admits(version) {
            let n = &mut state.nodes[node as usize];
            n.l1 = Some(Copy {
                asof,
                version,
                admitted_current: version >= n.seen,
            });
        }
    }

    /// A gap (`invalidate_local`): L1 out, every ticket revoked. What the node had seen
    /// announced before no longer binds it: after a failover the entry (and its version) may
    /// legitimately be older than announcements the node saw from the lost writes.
    fn gap(state: &mut State, node: u8) {
        let n = &mut state.nodes[node as usize];
        n.l1 = None;
        n.seen = 0;
        Self::revoke(state, node);
    }

    fn publish(&self, state: &mut State, version: u8, origin: u8) {
        let sent = state.time;
        for n in state.nodes.iter_mut().take(self.config.nodes as usize) {
            n.path.push_back(Msg {
                version,
                origin,
                sent,
            });
        }
    }

    /// The caller of `op` (if still there) gets the value reflecting change `asof`.
    fn answer(&self, state: &mut State, op: &Op, asof: u8, source: Source) {
        if !op.caller {
            return;
        }
        let read = Read {
            node: op.node,
            asof,
            start: op.start,
            source,
        };
        if state.stale_read.is_none() && asof < self.must_reflect(state, &read) {
            state.stale_read = Some(read);
        }
        if source == Source::L1 && asof > 0 && asof == Self::newest_change(state) {
            state.hit_newest = true;
        }
    }

    /// One step of caller `op`; returns it back unless it ended.
    fn step(&self, state: &mut State, mut op: Op) -> Option<Op> {
        let node = op.node;
        let n = node as usize;
        match op.phase {
            Phase::SetBegin => {
                Self::revoke(state, node);
                op.ticket = Some(Ticket {
                    floor: 0,
                    revoked: false,
                });
                op.phase = Phase::SetScript;
            }
            Phase::SetScript => {
                let version = self.next_version(&mut state.redis);
                state.issued += 1;
                let asof = state.issued;
                state.redis.entry = Stored::Value { asof, version };
                state.redis.changes = asof;
                state.redis.lock = None;
                state.acked.push((asof, state.time));
                self.publish(state, version, node);
                op.phase = Phase::SetReply { asof, version };
            }
            Phase::SetReply { asof, version } => {
                state.nodes[n].seen = state.nodes[n].seen.max(version);
                if self.config.variant != Variant::OvertakenWrite {
                    Self::raise(state, node, version);
                }
                let ticket = state
                    .ops
                    .iter()
                    .find(|o| o.id == op.id)
                    .and_then(|o| o.ticket)
                    .or(op.ticket);
                if let Some(t) = ticket {
                    // Our own floor was raised with the others (admits our version).
                    let t = if self.config.variant == Variant::OvertakenWrite {
                        t
                    } else {
                        Ticket {
                            floor: t.floor.max(version),
                            ..t
                        }
                    };
                    Self::admit(state, node, t, asof, version);
                }
                return None;
            }
            Phase::DelBegin => {
                Self::revoke(state, node);
                op.ticket = Some(Ticket {
                    floor: 0,
                    revoked: false,
                });
                state.nodes[n].l1 = None;
                op.phase = Phase::DelScript;
            }
            Phase::DelScript => {
                let version = self.next_version(&mut state.redis);
                state.issued += 1;
                state.redis.entry = Stored::Tomb { version };
                state.redis.changes = state.issued;
                state.redis.lock = None;
                state.acked.push((state.issued, state.time));
                self.publish(state, version, node);
                op.phase = Phase::DelReply { version };
            }
            Phase::DelReply { version } => {
                state.nodes[n].seen = state.nodes[n].seen.max(version);
                if self.config.variant != Variant::OvertakenWrite {
                    Self::raise(state, node, version);
                }
                state.nodes[n].l1 = None;
                return None;
            }
            Phase::GetLookup => {
                let nd = &state.nodes[n];
                if let Some(copy) = nd.l1.filter(|_| state.time < nd.lease_until) {
                    self.answer(state, &op, copy.asof, Source::L1);
                    return None;
                }
                op.ticket = Some(Ticket {
                    floor: 0,
                    revoked: false,
                });
                op.phase = Phase::GetReadOrLock;
            }
            Phase::GetReadOrLock => match state.redis.entry {
                Stored::Value { asof, version } => op.phase = Phase::GetFill { asof, version },
                Stored::Tomb { .. } | Stored::Absent => {
                    if state.redis.lock.is_none() {
                        state.redis.lock = Some(op.id);
                        state.redis.lock_epoch += 1;
                        op.phase = Phase::GetComplete {
                            asof: state.issued,
                            epoch: state.redis.lock_epoch,
                        };
                    }
                    // Else: the lock is taken; wait and read again.
                }
            },
            Phase::GetComplete { asof, .. } => {
                if state.redis.lock == Some(op.id) {
                    let version = self.next_version(&mut state.redis);
                    state.redis.entry = Stored::Value { asof, version };
                    state.redis.lock = None;
                    op.phase = Phase::GetFill { asof, version };
                } else {
                    // The lock passed on: answer, but neither L2 nor L1 gets the value.
                    self.answer(state, &op, asof, Source::L2);
                    return None;
                }
            }
            Phase::GetFill { asof, version } => {
                if let Some(t) = op.ticket {
                    Self::admit(state, node, t, asof, version);
                }
                self.answer(state, &op, asof, Source::L2);
                return None;
            }
        }
        Some(op)
    }

    fn deliver(&self, state: &mut State, node: u8) {
        let n = node as usize;
        let Some(msg) = state.nodes[n].path.pop_front() else {
            return;
        };
        if msg.origin == node && self.config.variant == Variant::OwnWrite {
            return;
        }
        // `on_announcement`.
        let version = msg.version;
        state.nodes[n].seen = state.nodes[n].seen.max(version);
        if self.config.variant != Variant::DetachedFill {
            Self::raise(state, node, version);
        }
        let nd = &mut state.nodes[n];
        if nd.l1.is_some_and(|c| c.version < version) {
            nd.l1 = None;
        }
    }

    /// The newest acknowledged change (surviving) the answer `read` must reflect: those
    /// acknowledged more than Δ before the read began.
    fn must_reflect(&self, state: &State, read: &Read) -> u8 {
        state
            .acked
            .iter()
            .filter(|(_, t)| t + self.config.delta < read.start)
            .map(|(c, _)| *c)
            .max()
            .unwrap_or(0)
    }

    /// How far a probe round of node `n` coming back now renews the lease: the latest tick it
    /// can have been sent (no later than the oldest message still on the path, which it did
    /// not overtake), plus Δ.
    fn renewal(config: &Config, state: &State, n: u8) -> u8 {
        let path = &state.nodes[n as usize].path;
        let sent = path.front().map_or(state.time, |m| m.sent);
        sent + config.delta
    }

    fn newest_change(state: &State) -> u8 {
        state.acked.iter().map(|(c, _)| *c).max().unwrap_or(0)
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let entry = Stored::Value {
            asof: 0,
            version: 1,
        };
        let node = Node {
            l1: None,
            // Nothing was cached before the bus subscribed: the lease starts confirmed.
            lease_until: self.config.delta,
            seen: 0,
            path: VecDeque::new(),
            probes: self.config.probes,
        };
        vec![State {
            time: 0,
            redis: Redis {
                entry,
                lock: None,
                lock_epoch: 0,
                clock: 1,
                changes: 0,
                replica: (entry, 0),
            },
            nodes: [node.clone(), node],
            ops: Vec::new(),
            started: 0,
            acked: Vec::new(),
            issued: 0,
            budget: [
                self.config.flushes,
                self.config.failovers,
                self.config.disconnects,
                self.config.lock_expiries,
            ],
            stale_read: None,
            hit_newest: false,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        for (i, _) in self.config.ops.iter().enumerate() {
            if state.started & (1 << i) == 0 {
                actions.push(Action::Call(i as u8));
            }
        }
        for op in &state.ops {
            actions.push(Action::Step(op.id));
            let awaiting = !matches!(
                op.phase,
                Phase::SetBegin | Phase::DelBegin | Phase::GetLookup
            );
            let cancellable = match self.config.ops[op.id as usize].1 {
                Kind::Get => self.config.cancellation && op.caller,
                // A write runs on its own task: a caller going away changes nothing, except in
                // the variant where it runs in the caller.
                Kind::Set | Kind::Invalidate => {
                    self.config.cancellation && self.config.variant == Variant::OwnWrite
                }
            };
            if awaiting && cancellable {
                actions.push(Action::Cancel(op.id));
            }
        }
        for n in 0..self.config.nodes {
            let nd = &state.nodes[n as usize];
            if !nd.path.is_empty() {
                actions.push(Action::Deliver(n));
                if state.budget[2] > 0 {
                    actions.push(Action::Disconnect(n));
                }
            }
            if nd.probes > 0 && Self::renewal(&self.config, state, n) > nd.lease_until {
                actions.push(Action::Renew(n));
            }
        }
        if state.budget[0] > 0 && state.redis.entry != Stored::Absent {
            actions.push(Action::Flush);
        }
        if state.budget[1] > 0 {
            actions.push(Action::Failover);
        }
        if state.budget[3] > 0 && state.redis.lock.is_some() {
            actions.push(Action::ExpireLock);
        }
        if state.time < self.config.max_time {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Call(id) => {
                let (node, kind) = self.config.ops[id as usize];
                state.started |= 1 << id;
                state.ops.push(Op {
                    id,
                    node,
                    phase: match kind {
                        Kind::Set => Phase::SetBegin,
                        Kind::Invalidate => Phase::DelBegin,
                        Kind::Get => Phase::GetLookup,
                    },
                    caller: true,
                    start: state.time,
                    ticket: None,
                });
            }
            Action::Step(id) => {
                let at = state.ops.iter().position(|o| o.id == id)?;
                let op = state.ops[at].clone();
                let before = state.clone();
                match self.step(&mut state, op) {
                    Some(op) => {
                        // `step` may have raised or revoked this op's ticket in `state.ops`,
                        // or taken its first one in `op`: keep whichever exists.
                        let ticket = state.ops[at].ticket.or(op.ticket);
                        state.ops[at] = Op { ticket, ..op };
                    }
                    None => {
                        state.ops.remove(at);
                    }
                }
                if state == before {
                    return None;
                }
            }
            Action::Cancel(id) => {
                let at = state.ops.iter().position(|o| o.id == id)?;
                match self.config.ops[id as usize].1 {
                    Kind::Get => state.ops[at].caller = false,
                    // `OwnWrite`: the write ran in the caller and is cut here.
                    Kind::Set | Kind::Invalidate => {
                        state.ops.remove(at);
                    }
                }
            }
            Action::Deliver(n) => self.deliver(&mut state, n),
            Action::Renew(n) => {
                let until = Self::renewal(&self.config, &state, n);
                let nd = &mut state.nodes[n as usize];
                nd.probes -= 1;
                nd.lease_until = until;
            }
            Action::Disconnect(n) => {
                state.budget[2] -= 1;
                state.nodes[n as usize].path.clear();
                Self::gap(&mut state, n);
            }
            Action::Flush => {
                state.budget[0] -= 1;
                state.redis.entry = Stored::Absent;
                state.redis.lock = None;
            }
            Action::Failover => {
                state.budget[1] -= 1;
                let (entry, changes) = state.redis.replica;
                state.redis.entry = entry;
                state.redis.changes = changes;
                state.redis.lock = None;
                // Writes the replica never received are lost (asynchronous replication): they
                // are no longer changes anyone can be expected to read.
                state.acked.retain(|(c, _)| *c <= changes);
                for n in 0..self.config.nodes {
                    state.nodes[n as usize].path.clear();
                    Self::gap(&mut state, n);
                }
            }
            Action::ExpireLock => {
                state.budget[3] -= 1;
                state.redis.lock = None;
            }
            Action::Tick => {
                state.time += 1;
                // Replication lags less than a tick: a failover loses this tick's writes.
                if self.config.failovers > 0 {
                    state.redis.replica = (state.redis.entry, state.redis.changes);
                }
            }
        }
        Some(state)
    }

    fn format_action(&self, action: &Action) -> String {
        match action {
            Action::Call(id) | Action::Step(id) | Action::Cancel(id) => {
                let (node, kind) = self.config.ops[*id as usize];
                format!("{action:?} [node {node} {kind:?}]")
            }
            _ => format!("{action:?}"),
        }
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("no_read_older_than_delta", |_, s: &State| {
                s.stale_read.is_none()
            }),
            Property::always("l1_never_below_announced", |_, s: &State| {
                s.nodes
                    .iter()
                    .all(|n| n.l1.is_none_or(|c| c.admitted_current))
            }),
            Property::always("one_load_per_lock_lease", |_, s: &State| {
                let live = s
                    .ops
                    .iter()
                    .filter(|o| match o.phase {
                        Phase::GetComplete { epoch, .. } => {
                            s.redis.lock == Some(o.id) && epoch == s.redis.lock_epoch
                        }
                        _ => false,
                    })
                    .count();
                live <= 1
            }),
            Property::eventually("eventually_l1_current", |m: &Protocol, s: &State| {
                let quiet = s.ops.is_empty()
                    && s.started.count_ones() as usize == m.config.ops.len()
                    && s.nodes.iter().all(|n| n.path.is_empty());
                let newest = Protocol::newest_change(s);
                quiet
                    && s.nodes
                        .iter()
                        .all(|n| n.l1.is_none_or(|c| c.asof >= newest))
            }),
            Property::sometimes("sometimes_l1_hit_sees_newest_change", |_, s: &State| {
                s.hit_newest
            }),
        ]
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}: callers {:?}, nodes {}, Δ={} ticks 0..={}, renewals/node {}, flushes {}, \
             failovers {}, disconnects {}, lock expiries {}, cancellation {}",
            self.variant,
            self.ops,
            self.nodes,
            self.delta,
            self.max_time,
            self.probes,
            self.flushes,
            self.failovers,
            self.disconnects,
            self.lock_expiries,
            self.cancellation
        )
    }
}
