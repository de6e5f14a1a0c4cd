//! In-process single-flight: concurrent misses on one key share one load.
//!
//! Each load runs on its own task, so no caller owns it: a leader that is cancelled or times
//! out strands nobody, and a panicking loader ends as [`Error::LoadAborted`] for every waiter.
//! Invalidating a key detaches its flight: callers that arrive afterwards start a new load
//! instead of joining the old one, and the old load's [`FlightToken`] tells it not to fill L1
//! (moka's `get_with` alone joins such callers to the pre-invalidation load).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};

type Outcome<V> = Option<Result<V>>;

struct Slot<V> {
    id: u64,
    token: FlightToken,
    rx: watch::Receiver<Outcome<V>>,
}

/// Handed to a load: tells it whether its key was invalidated since it started, in which case
/// its result must not be put in L1.
#[derive(Debug, Clone, Default)]
pub(crate) struct FlightToken(Arc<AtomicBool>);

impl FlightToken {
    /// Whether the key was invalidated after this load started.
    pub(crate) fn is_invalidated(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn invalidate(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The loads in flight, by key.
pub(crate) struct Flights<V> {
    slots: Mutex<HashMap<Arc<str>, Slot<V>>>,
    next_id: AtomicU64,
}

impl<V> Flights<V> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Flights {
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    // The map is only touched in short critical sections without `.await`; a poisoned lock
    // (a panic inside one) leaves the map consistent, so keep using it.
    fn slots(&self) -> MutexGuard<'_, HashMap<Arc<str>, Slot<V>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many loads are in flight.
    pub(crate) fn len(&self) -> usize {
        self.slots().len()
    }

    /// Detaches the flight of `key`, if any: later callers start a new load, and the running
    /// one is told (through its token) not to fill L1.
    pub(crate) fn invalidate(&self, key: &str) {
        if let Some(slot) = self.slots().remove(key) {
            slot.token.invalidate();
        }
    }

    /// Detaches every flight.
    pub(crate) fn invalidate_all(&self) {
        for (_, slot) in self.slots().drain() {
            slot.token.invalidate();
        }
    }
}

/// Completes a flight when its task ends, however it ends.
struct Completion<V> {
    flights: Arc<Flights<V>>,
    key: Arc<str>,
    id: u64,
    tx: watch::Sender<Outcome<V>>,
}

impl<V> Drop for Completion<V> {
    fn drop(&mut self) {
        if self.tx.borrow().is_none() {
            // The load panicked or its task was dropped: waiters get an error, not silence.
            self.tx.send_replace(Some(Err(Error::LoadAborted {
                key: self.key.to_string(),
            })));
        }
        let mut slots = self.flights.slots();
        if slots.get(&*self.key).is_some_and(|s| s.id == self.id) {
            slots.remove(&*self.key);
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Flights<V> {
    /// Joins the load of `key` in flight, or starts one with `load` on its own task, then waits
    /// at most `wait` for its result.
    ///
    /// # Errors
    /// The load's error (shared by every waiter), [`Error::LoadAborted`] if it panicked, or
    /// [`Error::WaitTimeout`] if it took longer than `wait` (the load goes on, and later callers
    /// still join it).
    pub(crate) async fn run<F, Fut>(
        self: &Arc<Self>,
        key: &str,
        wait: Duration,
        load: F,
    ) -> Result<V>
    where
        F: FnOnce(FlightToken) -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let mut rx = {
            let mut slots = self.slots();
            match slots.get(key) {
                Some(slot) => slot.rx.clone(),
                None => {
                    let key: Arc<str> = key.into();
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let token = FlightToken::default();
                    let (tx, rx) = watch::channel(None);
                    slots.insert(
                        Arc::clone(&key),
                        Slot {
                            id,
                            token: token.clone(),
                            rx: rx.clone(),
                        },
                    );
                    drop(slots);
                    let completion = Completion {
                        flights: Arc::clone(self),
                        key,
                        id,
                        tx,
                    };
                    let fut = load(token);
                    tokio::spawn(async move {
                        let result = fut.await;
                        completion.tx.send_replace(Some(result));
                        drop(completion);
                    });
                    rx
                }
            }
        };
        match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone().unwrap_or_else(|| {
                Err(Error::LoadAborted {
                    key: key.to_string(),
                })
            }),
            Ok(Err(_closed)) => Err(Error::LoadAborted {
                key: key.to_string(),
            }),
            Err(_) => Err(Error::WaitTimeout {
                key: key.to_string(),
                waited: wait,
            }),
        }
    }
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
        let flights = Flights::<u64>::new();
        let loads = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(10_000));
        let mut tasks = Vec::new();
        for _ in 0..10_000 {
            let (flights, loads, barrier) = (flights.clone(), loads.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                flights
                    .run("k", WAIT, |_| async move {
                        loads.fetch_add(1, Ordering::SeqCst);
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
        let flights = Flights::<u64>::new();
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
        let flights = Flights::<u64>::new();
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
        let flights = Flights::<u64>::new();
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
        let flights = Flights::<u64>::new();
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
        assert!(!old_token.is_invalidated());

        flights.invalidate("k");
        assert!(
            old_token.is_invalidated(),
            "the old load must learn not to fill L1"
        );
        let l = loads.clone();
        let new = flights
            .run("k", WAIT, move |token| async move {
                assert!(!token.is_invalidated());
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
    async fn a_waiter_gives_up_at_its_deadline_and_the_load_goes_on() {
        let flights = Flights::<u64>::new();
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
