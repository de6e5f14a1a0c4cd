//! The synchronization primitives of L1 admission (`coherence`): parking_lot's lock and std's
//! atomics, or, with the `shuttle` feature, shuttle's, so that a permutation scheduler can
//! interleave every lock and atomic step of the real code (`coherence`'s `permutations`
//! tests: `cargo test -p tiered --features shuttle --lib permutations`).

#[cfg(not(feature = "shuttle"))]
pub(crate) use parking_lot::{Mutex, MutexGuard};
#[cfg(feature = "shuttle")]
pub(crate) use shim::{Mutex, MutexGuard};
#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::atomic::{AtomicU64, fence};
#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::atomic::{AtomicU64, fence};

#[cfg(feature = "shuttle")]
mod shim {
    use std::fmt;

    /// shuttle's mutex with parking_lot's signature (no poisoning to handle).
    pub(crate) struct Mutex<T>(shuttle::sync::Mutex<T>);

    pub(crate) type MutexGuard<'a, T> = shuttle::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Mutex(shuttle::sync::Mutex::new(T::default()))
        }
    }

    impl<T> fmt::Debug for Mutex<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Mutex")
        }
    }
}
