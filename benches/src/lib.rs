//! Criterion benches for the tiered cache. Each group puts our figure beside its raw baseline
//! (moka alone, redis-rs alone) measured in the same run; see `benches/tiers.rs` and run them
//! with `cargo bench -p benches`. They start their own redis-server through `testkit`.

use serde::{Deserialize, Serialize};

pub mod http;

/// The value every bench and profile reads: a ~1 KiB typed struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// An id.
    pub id: u64,
    /// A name.
    pub name: String,
    /// An email address.
    pub email: String,
    /// Eight short tags.
    pub tags: Vec<String>,
    /// 700 bytes of text.
    pub bio: String,
    /// Forty numbers.
    pub scores: Vec<u32>,
}

/// The one profile used everywhere.
pub fn profile() -> Profile {
    Profile {
        id: 42,
        name: "Alice Example".into(),
        email: "alice@example.com".into(),
        tags: (0..8).map(|i| format!("tag-{i}")).collect(),
        bio: "x".repeat(700),
        scores: (0..40).collect(),
    }
}
