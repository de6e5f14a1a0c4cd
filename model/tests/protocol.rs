//! Issue #19: the coherence protocol, checked exhaustively. The shipped protocol passes every
//! configuration below; each deliberately broken variant is refuted, and its counterexample is
//! printed (run with `--nocapture` to see it).
//!
//! `cargo test -p model --release -- --ignored` also checks the larger configurations.

use std::time::Instant;

use model::{Config, Protocol, Variant};
use stateright::{Checker, Model};

/// Checks `config` to the end; returns the names of the properties with a counterexample
/// (printing each path), after printing the state count and time.
fn check(config: Config) -> Vec<&'static str> {
    println!("== {config}");
    let t = Instant::now();
    let model = Protocol::new(config);
    let checker = model.clone().checker().threads(2).spawn_bfs().join();
    println!(
        "unique states {}, {:.2?}",
        checker.unique_state_count(),
        t.elapsed()
    );
    assert!(checker.is_done());
    let mut failed = Vec::new();
    for p in model.properties() {
        let found = checker.discovery(p.name);
        if let (true, Some(path)) = (p.expectation.discovery_is_failure(), found) {
            println!("counterexample to {}:", p.name);
            for (state, action) in path.into_vec() {
                match action {
                    Some(a) => println!("  {}", model.format_action(&a)),
                    None => println!("  => {state:?}"),
                }
            }
            failed.push(p.name);
        }
    }
    failed
}

fn shipped_passes(config: Config) {
    assert_eq!(config.variant, Variant::Shipped);
    let failed = check(config);
    assert!(failed.is_empty(), "the shipped protocol fails {failed:?}");
}

fn refuted(variant: Variant, property: &str) {
    let failed = check(Config::witness(variant));
    assert!(
        failed.contains(&property),
        "{variant:?} should fail {property}, failed {failed:?}"
    );
    // The same bounds, the shipped protocol: no counterexample.
    shipped_passes(Config {
        variant: Variant::Shipped,
        ..Config::witness(variant)
    });
}

#[test]
fn shipped_protocol_holds_under_faults() {
    shipped_passes(Config::faults(Variant::Shipped));
}

#[test]
fn version_reset_after_key_loss_is_found() {
    refuted(Variant::VersionReset, "no_read_older_than_delta");
}

#[test]
fn detached_fill_is_found() {
    refuted(Variant::DetachedFill, "l1_never_below_announced");
}

#[test]
fn overtaken_write_is_found() {
    refuted(Variant::OvertakenWrite, "l1_never_below_announced");
}

#[test]
fn own_write_cut_is_found() {
    refuted(Variant::OwnWrite, "no_read_older_than_delta");
}

#[test]
fn shipped_protocol_sometimes_serves_the_newest_change_from_l1() {
    let model = Protocol::new(Config::witness(Variant::OwnWrite));
    let model = Protocol::new(Config {
        variant: Variant::Shipped,
        ..model.config
    });
    let checker = model.checker().spawn_bfs().join();
    checker.assert_any_discovery("sometimes_l1_hit_sees_newest_change");
}

/// Larger: `cargo test -p model --release -- --ignored` (see `model/README.md` for times).
#[test]
#[ignore = "minutes in debug builds; run with --release"]
fn shipped_protocol_holds_on_larger_configurations() {
    // `Config::large` (47 M states, 334 s and 9 GB in release on 2 cores): run it with the
    // binary, `cargo run -p model --release -- large`.
    shipped_passes(Config::small(Variant::Shipped));
}
