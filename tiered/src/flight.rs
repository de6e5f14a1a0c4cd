//! In-process single-flight: concurrent misses on one key share one load.
//!
//! Each load runs on its own task, so no caller owns it: a leader that is cancelled or times
//! out strands nobody, and a panicking loader ends as [`Error::LoadAborted`] for every waiter.
//! A change of a key detaches its flight ([`Flights::detach`]): callers that arrive afterwards
//! start a new load instead of joining the old one (moka's `get_with` alone joins such callers
//! to the pre-invalidation load). Whether the old load may still fill L1 is not decided here:
//! each flight holds a [`Ticket`] of the cache's [`Admission`], the one owner of that rule.

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::coherence::{Admission, Ticket};
use crate::error::{Error, Result};

type Outcome<V> = Option<Result<V>>;

struct Slot<V> {
    id: u64,
    /// When the load began.
    started: Instant,
    rx: watch::Receiver<Outcome<V>>,
}

struct Shared<V> {
    // Whether this load may still put its result in L1 (see `Admission`).
    ticket: Ticket,
    tx: watch::Sender<Outcome<V>>,
}

/// Handed to a load: its admission [`Ticket`] (whether its result may still go into L1), and
/// a way to answer its waiters before it ends (a stale value served while the load goes on).
pub(crate) struct FlightToken<V>(Arc<Shared<V>>);

impl<V> Clone for FlightToken<V> {
    fn clone(&self) -> Self {
        FlightToken(Arc::clone(&self.0))
    }
}

impl<V> FlightToken<V> {
    fn new(ticket: Ticket) -> (Self, watch::Receiver<Outcome<V>>) {
        let (tx, rx) = watch::channel(None);
        (FlightToken(Arc::new(Shared { ticket, tx })), rx)
    }

    /// The load's admission ticket.
    pub(crate) fn ticket(&self) -> &Ticket {
        &self.0.ticket
    }

    /// Answers the waiters now, unless they were answered already; the load may go on.
    /// Returns whether this was the answer.
    pub(crate) fn answer(&self, outcome: Result<V>) -> bool {
        let mut outcome = Some(Some(outcome));
        self.0.tx.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = outcome.take().flatten();
            true
        })
    }

    /// Whether the waiters have an answer.
    pub(crate) fn is_answered(&self) -> bool {
        self.0.tx.borrow().is_some()
    }
}

/// The loads in flight, by key.
pub(crate) struct Flights<V> {
    slots: Mutex<HashMap<Arc<str>, Slot<V>>>,
    admission: Arc<Admission>,
    next_id: AtomicU64,
}

impl<V> Flights<V> {
    /// Flights whose loads take their tickets from `admission`.
    pub(crate) fn new(admission: &Arc<Admission>) -> Arc<Self> {
        Arc::new(Flights {
            slots: Mutex::new(HashMap::new()),
            admission: Arc::clone(admission),
            next_id: AtomicU64::new(0),
        })
    }

    // The map is only touched in short critical sections without `.await`.
    fn slots(&self) -> MutexGuard<'_, HashMap<Arc<str>, Slot<V>>> {
        self.slots.lock()
    }

    /// How many loads are in flight.
    pub(crate) fn len(&self) -> usize {
        self.slots().len()
    }

    /// Detaches the flight of `key`, if any: later callers start a new load instead of
    /// joining it. The running load goes on (its waiters get its answer); whether it may still
    /// fill L1 is its ticket's matter.
    pub(crate) fn detach(&self, key: &str) {
        self.slots().remove(key);
    }

    /// Detaches the flight of `key` if it began before `not_before`: a caller that may not be
    /// answered with anything read before then must not join it.
    pub(crate) fn detach_if_older(&self, key: &str, not_before: Instant) {
        let mut slots = self.slots();
        if slots.get(key).is_some_and(|s| s.started < not_before) {
            slots.remove(key);
        }
    }

    /// Detaches every flight.
    pub(crate) fn detach_all(&self) {
        self.slots().clear();
    }

    /// Whether a load of `key` is in flight.
    pub(crate) fn is_running(&self, key: &str) -> bool {
        self.slots().contains_key(key)
    }

    /// Joins the flight of `key`, if one is running.
    pub(crate) fn join(&self, key: &str) -> Option<Waiter<V>> {
        self.slots().get(key).map(|slot| Waiter {
            key: key.into(),
            rx: slot.rx.clone(),
        })
    }

    /// Joins the flight of `key`, or claims it: the caller then owns the load and must run it
    /// (the returned [`Claim`] answers the waiters with `LoadAborted` if dropped unfinished).
    pub(crate) fn join_or_claim(self: &Arc<Self>, key: &str) -> (Waiter<V>, Option<Claim<V>>) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get(key) {
            let waiter = Waiter {
                key: key.into(),
                rx: slot.rx.clone(),
            };
            return (waiter, None);
        }
        let key: Arc<str> = key.into();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The ticket is taken with the slot, under its lock: a change that detaches the slot
        // after this also reaches the ticket.
        let (token, rx) = FlightToken::new(self.admission.begin(&key));
        slots.insert(
            Arc::clone(&key),
            Slot {
                id,
                started: Instant::now(),
                rx: rx.clone(),
            },
        );
        drop(slots);
        let waiter = Waiter {
            key: Arc::clone(&key),
            rx,
        };
        let claim = Claim {
            flights: Arc::clone(self),
            key,
            id,
            token,
            finished: false,
        };
        (waiter, Some(claim))
    }
}

/// Ownership of one flight: completes it when finished or dropped, however the load ends.
pub(crate) struct Claim<V> {
    flights: Arc<Flights<V>>,
    key: Arc<str>,
    id: u64,
    token: FlightToken<V>,
    finished: bool,
}

impl<V> Claim<V> {
    /// The key.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// The flight's token.
    pub(crate) fn token(&self) -> FlightToken<V> {
        self.token.clone()
    }

    /// Ends the flight and answers the waiters (unless answered already). The slot goes
    /// first, so a waiter that returns never sees its own flight still in the map.
    pub(crate) fn finish(mut self, outcome: Result<V>) {
        self.detach();
        self.token.answer(outcome);
        self.finished = true;
    }

    /// As [`Claim::finish`] for a leader that keeps `outcome` for itself: the outcome is
    /// cloned for the waiters only if anyone besides the leader waits.
    pub(crate) fn finish_for_others(mut self, outcome: &Result<V>)
    where
        V: Clone,
    {
        self.detach();
        // The leader's own receiver is one; after `detach` nobody new can join.
        if self.token.0.tx.receiver_count() > 1 {
            self.token.answer(outcome.clone());
        }
        self.finished = true;
    }

    fn detach(&self) {
        let mut slots = self.flights.slots();
        if slots.get(&*self.key).is_some_and(|s| s.id == self.id) {
            slots.remove(&*self.key);
        }
    }
}

impl<V> Drop for Claim<V> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.detach();
        // The load panicked or its task was dropped: waiters get an error, not silence.
        self.token.answer(Err(Error::LoadAborted {
            key: self.key.to_string(),
        }));
    }
}

/// A caller waiting on a flight.
pub(crate) struct Waiter<V> {
    key: Arc<str>,
    rx: watch::Receiver<Outcome<V>>,
}

impl<V> Waiter<V> {
    /// The key.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }
}

impl<V> Waiter<V> {
    fn aborted(&self) -> Error {
        Error::LoadAborted {
            key: self.key.to_string(),
        }
    }
}

impl<V: Clone> Waiter<V> {
    /// Waits at most `within` for the flight's answer.
    ///
    /// # Errors
    /// The load's error (shared by every waiter), [`Error::LoadAborted`] if it panicked, or
    /// [`Error::WaitTimeout`] if it took longer than `within` (the load goes on, and later
    /// callers still join it).
    pub(crate) async fn wait(mut self, within: Duration) -> Result<V> {
        let aborted = || Error::LoadAborted {
            key: self.key.to_string(),
        };
        match tokio::time::timeout(within, self.rx.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone().unwrap_or_else(|| Err(aborted())),
            Ok(Err(_closed)) => Err(aborted()),
            Err(_) => Err(Error::WaitTimeout {
                key: self.key.to_string(),
                waited: within,
            }),
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Flights<V> {
    /// Joins the load of `key` in flight, or leads one, then waits at most `wait` for its
    /// answer.
    ///
    /// A leader runs the load on its own task (no spawn, no thread hop: an L2 read costs one
    /// round trip) and hands it to a task of its own as soon as it stops waiting for it: an
    /// early answer (a stale value served while the load goes on), its deadline, or its
    /// cancellation. So no caller owns a load: followers never lose it.
    ///
    /// # Errors
    /// As [`Waiter::wait`].
    pub(crate) async fn run<F, Fut>(
        self: &Arc<Self>,
        key: &str,
        wait: Duration,
        load: F,
    ) -> Result<V>
    where
        F: FnOnce(FlightToken<V>) -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let (mut waiter, claim) = self.join_or_claim(key);
        let Some(claim) = claim else {
            return waiter.wait(wait).await;
        };
        let body: Body<V> = Box::pin(load(claim.token()));
        let mut leader = Leader {
            body: Some(body),
            claim: Some(claim),
        };
        enum Step<V> {
            Done(Result<V>),
            Answered(Result<V>),
            TimedOut,
        }
        let aborted = waiter.aborted();
        let panicked = waiter.aborted();
        let step = {
            let Some(body) = leader.body.as_mut() else {
                unreachable!("set above")
            };
            tokio::select! {
                biased;
                r = CatchUnwind(body) => Step::Done(r.unwrap_or(Err(panicked))),
                a = waiter.rx.wait_for(Option::is_some) => Step::Answered(match a {
                    Ok(outcome) => outcome.clone().unwrap_or(Err(aborted)),
                    Err(_) => Err(aborted),
                }),
                () = tokio::time::sleep(wait) => Step::TimedOut,
            }
        };
        match step {
            Step::Done(r) => {
                leader.body = None;
                if let Some(claim) = leader.claim.take() {
                    claim.finish_for_others(&r);
                }
                r
            }
            // The load goes on in its own task (`Leader::drop`).
            Step::Answered(r) => r,
            Step::TimedOut => Err(Error::WaitTimeout {
                key: key.to_string(),
                waited: wait,
            }),
        }
    }

    /// Starts a load of `key` on its own task unless one is in flight; does not wait.
    /// Returns whether it started one.
    pub(crate) fn start<F, Fut>(self: &Arc<Self>, key: &str, load: F) -> bool
    where
        F: FnOnce(FlightToken<V>) -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        if self.join(key).is_some() {
            return false;
        }
        match self.join_or_claim(key) {
            (_, Some(claim)) => {
                spawn_claimed(claim, load);
                true
            }
            (_, None) => false,
        }
    }
}

type Body<V> = std::pin::Pin<Box<dyn Future<Output = Result<V>> + Send>>;

/// Polls a load and turns a panic into `Err`, so a panicking load led inline fails its
/// waiters with `LoadAborted` instead of unwinding through the leader's caller.
struct CatchUnwind<'a, V>(&'a mut Body<V>);

impl<V> Future for CatchUnwind<'_, V> {
    type Output = std::thread::Result<Result<V>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let body = &mut *self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(r)) => std::task::Poll::Ready(Ok(r)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// A load led by a caller's task. If the caller stops polling it before it ends, the rest
/// runs on a task of its own, so the followers still get its answer.
struct Leader<V: Send + Sync + 'static> {
    body: Option<Body<V>>,
    claim: Option<Claim<V>>,
}

impl<V: Send + Sync + 'static> Drop for Leader<V> {
    fn drop(&mut self) {
        if let (Some(body), Some(claim)) = (self.body.take(), self.claim.take())
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let outcome = body.await;
                claim.finish(outcome);
            });
        }
        // Without a runtime the claim is dropped here: its waiters get `LoadAborted`.
    }
}

fn spawn_claimed<V, F, Fut>(claim: Claim<V>, load: F)
where
    V: Send + Sync + 'static,
    F: FnOnce(FlightToken<V>) -> Fut,
    Fut: Future<Output = Result<V>> + Send + 'static,
{
    let fut = load(claim.token());
    tokio::spawn(async move {
        let outcome = fut.await;
        claim.finish(outcome);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::{Barrier, Notify};

    const WAIT: Duration = Duration::from_secs(10);

    fn loader_error(key: &str) -> Error {
        Error::Loader {
            key: key.to_string(),
            source: Arc::new(std::io::Error::other("db down")),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_callers_share_one_load() {
        let flights = Flights::<u64>::new(&Admission::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(10_000));
        let mut tasks = Vec::new();
        for _ in 0..10_000 {
            let (flights, loads, barrier) = (flights.clone(), loads.clone(), barrier.clone());
            let arrived = arrived.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                // Counted in the same poll that joins the flight, so the load can wait until
                // every caller has asked (a caller that asks after the load ended would
                // rightly start another: there is no L1 here to answer it).
                arrived.fetch_add(1, Ordering::SeqCst);
                let all = arrived.clone();
                flights
                    .run("k", WAIT, |_| async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        while all.load(Ordering::SeqCst) < 10_000 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(7)
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0, "the in-flight map must return to empty");
    }

    #[tokio::test]
    async fn an_error_reaches_every_waiter_and_is_not_cached() {
        let flights = Flights::<u64>::new(&Admission::new());
        let release = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (flights, release) = (flights.clone(), release.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run("k", WAIT, |_| async move {
                        release.notified().await;
                        Err(loader_error("k"))
                    })
                    .await
            }));
        }
        while flights.len() == 0 {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        release.notify_one();
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Err(Error::Loader { .. })));
        }
        let again = flights.run("k", WAIT, |_| async { Ok(1) }).await.unwrap();
        assert_eq!(again, 1);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_loader_strands_nobody() {
        let flights = Flights::<u64>::new(&Admission::new());
        let barrier = Arc::new(Barrier::new(20));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (flights, barrier) = (flights.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                flights
                    .run("k", WAIT, |_| async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        panic!("loader bug")
                    })
                    .await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Err(Error::LoadAborted { .. })));
        }
        assert_eq!(flights.len(), 0);
        assert_eq!(
            flights.run("k", WAIT, |_| async { Ok(2) }).await.unwrap(),
            2
        );
    }

    #[tokio::test]
    async fn a_cancelled_leader_strands_nobody() {
        let flights = Flights::<u64>::new(&Admission::new());
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run("k", WAIT, |_| async move {
                        r.notified().await;
                        Ok(5)
                    })
                    .await
            })
        };
        while flights.len() == 0 {
            tokio::task::yield_now().await;
        }
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", WAIT, |_| async { Ok(99) }).await })
        };
        tokio::task::yield_now().await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        release.notify_one();
        assert_eq!(
            follower.await.unwrap().unwrap(),
            5,
            "the follower joined the first load"
        );
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn callers_after_an_invalidation_never_join_the_older_load() {
        let flights = Flights::<u64>::new(&Admission::new());
        let release_old = Arc::new(Notify::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let (r, l) = (release_old.clone(), loads.clone());
        let (token_tx, token_rx) = tokio::sync::oneshot::channel();
        let old = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run("k", WAIT, move |token| {
                        let _ = token_tx.send(token);
                        async move {
                            l.fetch_add(1, Ordering::SeqCst);
                            r.notified().await;
                            Ok(1)
                        }
                    })
                    .await
            })
        };
        let old_token = token_rx.await.unwrap();
        assert!(!old_token.ticket().is_revoked());

        // What `set` / `invalidate` do: a write ticket revokes older fills, and the slot goes.
        let _write = flights.admission.begin_write("k");
        flights.detach("k");
        assert!(
            old_token.ticket().is_revoked(),
            "the old load must learn not to fill L1"
        );
        let l = loads.clone();
        let new = flights
            .run("k", WAIT, move |token| async move {
                assert!(!token.ticket().is_revoked());
                l.fetch_add(1, Ordering::SeqCst);
                Ok(2)
            })
            .await
            .unwrap();
        assert_eq!(
            new, 2,
            "a caller after the invalidation must not get the old load's value"
        );
        assert_eq!(loads.load(Ordering::SeqCst), 2);

        release_old.notify_one();
        assert_eq!(
            old.await.unwrap().unwrap(),
            1,
            "callers before it still get their load"
        );
        assert_eq!(
            flights.len(),
            0,
            "the old load must not remove the new slot's successor"
        );
    }

    #[tokio::test]
    async fn every_later_announcement_reaches_a_load_detached_by_an_earlier_one() {
        let admission = Admission::new();
        let flights = Flights::<u64>::new(&admission);
        let (waiter, claim) = flights.join_or_claim("k");
        let claim = claim.unwrap();
        let token = claim.token();
        // Version 20 is announced: the load is detached, and may still fill with >= 20.
        flights.detach("k");
        admission.announced("k", 20);
        assert!(token.ticket().admits(20) && !token.ticket().admits(19));
        // Version 21 is announced while the load is still running: it must reach it too, or
        // its version-20 result would land in L1 after the eviction of version 21.
        admission.announced("k", 21);
        assert!(
            !token.ticket().admits(20),
            "a later announcement reaches the detached load"
        );
        assert!(token.ticket().admits(21));
        admission.revoke("k");
        assert!(
            !token.ticket().admits(u64::MAX - 1),
            "a local change reaches it as well"
        );
        claim.finish(Ok(1));
        assert_eq!(waiter.wait(WAIT).await.unwrap(), 1);
        drop(token);
        assert_eq!(
            admission.keys_tracked(),
            0,
            "nothing kept once the load ended"
        );
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_gives_up_at_its_deadline_and_the_load_goes_on() {
        let flights = Flights::<u64>::new(&Admission::new());
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let err = flights
            .run("k", Duration::from_millis(30), |_| async move {
                r.notified().await;
                Ok(3)
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::WaitTimeout { .. }), "{err:?}");
        assert_eq!(
            flights.len(),
            1,
            "the load goes on after the caller gave up"
        );
        let joined = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", WAIT, |_| async { Ok(0) }).await })
        };
        tokio::task::yield_now().await;
        release.notify_one();
        assert_eq!(joined.await.unwrap().unwrap(), 3);
        assert_eq!(flights.len(), 0);
    }
}
