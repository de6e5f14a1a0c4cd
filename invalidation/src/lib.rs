//! The invalidation bus of the tiered cache (in progress).
//!
//! What it will be for: carrying small, versioned invalidation messages between the nodes that
//! share one Redis over pub/sub, and telling its subscriber when messages may have been missed
//! (a disconnect, a resubscribe, a restarted server, a missed heartbeat, a sequence gap), so
//! `tiered` can drop its L1 before serving another hit.
//!
//! What it is not for: evicting anything itself, or carrying values. It yields events; `tiered`
//! acts on them. It depends on [`l2::Connection`] and nothing of the in-process tier.
//!
//! Today this crate only fixes the names below; the bus itself lands with the coherence work.

/// The Redis pub/sub channel that carries the invalidations of `namespace`.
///
/// ```
/// assert_eq!(invalidation::channel_for(&l2::KeySpace::new("users")), "users:inval");
/// ```
pub fn channel_for(space: &l2::KeySpace) -> String {
    format!("{}inval", space.prefix())
}
