//! Checks the coherence model: `cargo run -p model --release -- <config> [variant]`.
//!
//! `<config>` is `small`, `faults`, `large` or `witness`; `[variant]` is `shipped` (the default),
//! `version-reset`, `detached-fill`, `overtaken-write`, `own-write` or `all`. Prints the
//! configuration, the unique state count, the time taken, and every discovery with its path.

use std::time::Instant;

use model::{Config, Protocol, Variant};
use stateright::{Checker, Model};

fn variant(name: &str) -> Option<Vec<Variant>> {
    Some(match name {
        "shipped" => vec![Variant::Shipped],
        "version-reset" => vec![Variant::VersionReset],
        "detached-fill" => vec![Variant::DetachedFill],
        "overtaken-write" => vec![Variant::OvertakenWrite],
        "own-write" => vec![Variant::OwnWrite],
        "all" => Variant::ALL.to_vec(),
        _ => return None,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = args.first().map_or("small", String::as_str);
    let Some(variants) = variant(args.get(1).map_or("shipped", String::as_str)) else {
        eprintln!(
            "usage: model <small|faults|large|witness> [shipped|version-reset|detached-fill|overtaken-write|own-write|all]"
        );
        std::process::exit(2);
    };
    let mut failed = false;
    for v in variants {
        let config = match size {
            "small" => Config::small(v),
            "large" => Config::large(v),
            "faults" => Config::faults(v),
            "witness" => Config::witness(v),
            _ => {
                eprintln!("unknown configuration {size:?}");
                std::process::exit(2);
            }
        };
        println!("== {config}");
        let t = Instant::now();
        let model = Protocol::new(config);
        let checker = model.clone().checker().threads(2).spawn_bfs().join();
        println!(
            "unique states {}, max depth {}, {:.2?}",
            checker.unique_state_count(),
            checker.max_depth(),
            t.elapsed()
        );
        for p in model.properties() {
            match (
                checker.discovery(p.name),
                p.expectation.discovery_is_failure(),
            ) {
                (Some(path), true) => {
                    failed |= v == Variant::Shipped;
                    println!("COUNTEREXAMPLE {}:", p.name);
                    for (state, action) in path.into_vec() {
                        if let Some(a) = action {
                            println!("  {}", model.format_action(&a));
                        } else {
                            println!("  => {state:?}");
                        }
                    }
                }
                (None, true) => println!("holds: {}", p.name),
                (Some(_), false) => println!("example found: {}", p.name),
                (None, false) => {
                    failed |= v == Variant::Shipped;
                    println!("NO EXAMPLE: {}", p.name);
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
