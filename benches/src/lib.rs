//! Criterion benches for the tiered cache. Each group puts our figure beside its raw baseline
//! (moka alone, redis-rs alone) measured in the same run; see `benches/tiers.rs` and run them
//! with `cargo bench -p benches`. They start their own redis-server through `testkit`.
