//! Tracing: one span per public operation (`tiered`, at DEBUG level) with the operation, the
//! namespace, the key (hashed unless the cache opts in), the tier that answered and the
//! outcome. Values never appear. With no subscriber interested in DEBUG, a span costs one
//! cached check.

use std::fmt;

use tracing::Span;
use tracing::field::Empty;

/// The key as a span shows it: FNV-1a, 64 bits, in hex, unless raw keys were asked for.
struct Hashed<'a>(&'a str);

impl fmt::Display for Hashed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        write!(f, "#{h:016x}")
    }
}

/// A span for operation `op` on `key`.
pub(crate) fn span(op: &'static str, namespace: &str, key: &str, raw_keys: bool) -> Span {
    let span = tracing::debug_span!(
        "tiered",
        op,
        namespace,
        key = Empty,
        tier = Empty,
        outcome = Empty
    );
    if !span.is_disabled() {
        if raw_keys {
            span.record("key", key);
        } else {
            span.record("key", tracing::field::display(Hashed(key)));
        }
    }
    span
}

/// A span for operation `op` on a whole namespace or a batch (no single key).
pub(crate) fn span_all(op: &'static str, namespace: &str) -> Span {
    tracing::debug_span!("tiered", op, namespace, tier = Empty, outcome = Empty)
}

/// Records which tier answered and how.
pub(crate) fn answered(span: &Span, tier: &'static str, outcome: &'static str) {
    if !span.is_disabled() {
        span.record("tier", tier);
        span.record("outcome", outcome);
    }
}

/// Records the tier on the span the current code runs in (a flight's leader).
pub(crate) fn tier(tier: &'static str) {
    let span = Span::current();
    if !span.is_disabled() {
        span.record("tier", tier);
    }
}

/// Records the outcome of a result.
pub(crate) fn outcome<T>(span: &Span, result: &crate::Result<T>) {
    if !span.is_disabled() {
        span.record(
            "outcome",
            match result {
                Ok(_) => "ok",
                Err(e) if e.is_not_found() => "not_found",
                Err(e) if e.is_unavailable() => "unavailable",
                Err(_) => "error",
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hashed_stably() {
        assert_eq!(Hashed("").to_string(), "#cbf29ce484222325");
        assert_eq!(Hashed("42").to_string(), Hashed("42").to_string());
        assert_ne!(Hashed("42").to_string(), Hashed("43").to_string());
        assert!(!Hashed("secret@example.com").to_string().contains("secret"));
    }
}
