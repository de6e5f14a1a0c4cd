//! Redis keys: an injective encoding of namespace, optional schema version and key.
//!
//! A key reads `NAMESPACE:{KEY}` or, with a schema version, `NAMESPACE:vN:{KEY}`. Each part is
//! escaped (`%` `:` `{` `}` `#` and control characters become `%XX`), so `("a:b", "c")` and
//! `("a", "b:c")` never meet, and the braces are always the Redis Cluster hash tag: a key and
//! its lock key (`…}:lock`) live in one slot, so the scripts that touch both stay valid on a
//! cluster. A key whose encoding is longer than [`MAX_KEY_LEN`] keeps a readable prefix and
//! ends with `#` and 128 bits of SHA-256 of the whole escaped key (`#` never appears unescaped
//! otherwise, so a hashed key never equals a plain one).
//!
//! ```
//! use l2::{Key, KeySpace};
//! let users = KeySpace::new("users").schema_version(2);
//! assert_eq!(users.key("42").as_str(), "users:v2:{42}");
//! assert_eq!(KeySpace::new("a:b").key("c").as_str(), "a%3Ab:{c}");
//! let k = KeySpace::new("http").request_key("/search", [("q", "rust"), ("page", "2")]);
//! assert_eq!(k.as_str(), "http:{:/search?page=2&q=rust}");
//! // A request key starts with a bare `:`, which `key` always escapes: the two never meet.
//! let plain = KeySpace::new("http").key("/search?page=2&q=rust");
//! assert_eq!(plain.as_str(), "http:{/search?page=2&q=rust}");
//! assert_ne!(plain, k);
//! ```

use std::fmt::{self, Write as _};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The commands the library sends, as ACL rules: connection set-up, reads and writes of
/// strings, scripts (and what they call), transactions, pub/sub, `SCAN` for clears, and the
/// cluster topology.
const ACL_COMMANDS: &str = "+ping +hello +auth +select +readonly \
     +get +getrange +strlen +pttl +set +setrange +pexpire +del +unlink +scan +time \
     +eval +evalsha +script|load +multi +exec +discard \
     +wait +publish +subscribe +unsubscribe +cluster|slots +cluster|shards +cluster|nodes +cluster|info +cluster|links";

/// Encoded keys longer than this are hashed behind a readable prefix.
pub const MAX_KEY_LEN: usize = 200;
const READABLE_PREFIX: usize = 64;
const NOTICE_SUFFIX: &str = "!notify";

/// A namespace (and optional schema version): the prefix of every key it makes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySpace {
    namespace: Arc<str>,
    prefix: Arc<str>,
}

impl KeySpace {
    /// The key space of `namespace`. Any string is allowed; it is escaped.
    pub fn new(namespace: &str) -> Self {
        let mut prefix = String::with_capacity(namespace.len() + 1);
        escape_into(namespace, &mut prefix, "");
        prefix.push(':');
        KeySpace {
            namespace: namespace.into(),
            prefix: prefix.into(),
        }
    }

    /// Adds a schema version: bump it when the stored type changes, and old entries are
    /// simply never read again.
    pub fn schema_version(self, version: u32) -> Self {
        let mut prefix = self.prefix.to_string();
        write!(prefix, "v{version}:").expect("writing to a String cannot fail");
        KeySpace {
            namespace: self.namespace,
            prefix: prefix.into(),
        }
    }

    /// The namespace as given.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The encoded prefix shared by every key of this space (ends with `:`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key for `key`.
    pub fn key(&self, key: &str) -> Key {
        let mut escaped = String::with_capacity(key.len() + 4);
        escape_into(key, &mut escaped, "");
        self.finish(escaped)
    }

    /// The key for a request: `path`, then the query parameters sorted by name (and by value
    /// for repeated names), so the same logical request always gives the same key. Names and
    /// values are escaped (`&`, `=` and `?` too), so parameters never run into each other.
    /// It starts with a bare `:` (which [`KeySpace::key`] always escapes), so no plain key
    /// equals a request key.
    pub fn request_key<I, N, V>(&self, path: &str, params: I) -> Key
    where
        I: IntoIterator<Item = (N, V)>,
        N: AsRef<str>,
        V: AsRef<str>,
    {
        let mut params: Vec<(N, V)> = params.into_iter().collect();
        params.sort_by(|a, b| (a.0.as_ref(), a.1.as_ref()).cmp(&(b.0.as_ref(), b.1.as_ref())));
        let mut escaped = String::with_capacity(path.len() + 1 + 16 * params.len());
        escaped.push(':');
        escape_into(path, &mut escaped, "?");
        for (i, (name, value)) in params.iter().enumerate() {
            escaped.push(if i == 0 { '?' } else { '&' });
            escape_into(name.as_ref(), &mut escaped, "&=?");
            escaped.push('=');
            escape_into(value.as_ref(), &mut escaped, "&=?");
        }
        self.finish(escaped)
    }

    /// The pub/sub channel on which writers of this space wake lock waiters: the prefix then
    /// `!notify` (a data key always has `{` after the prefix, so the two never meet).
    pub fn notice_channel(&self) -> String {
        format!("{}{NOTICE_SUFFIX}", self.prefix)
    }

    /// A Redis `SCAN MATCH` pattern for every key of this space: the prefix with the glob
    /// characters `* ? [ ] \` escaped, then `*`. A space without a schema version also matches
    /// its versioned keys (`users:*` covers `users:v2:…`).
    pub fn match_pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.prefix.len() + 2);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        pattern
    }

    /// The least-privilege Redis ACL rules for a user that caches in this space only: its keys
    /// (`~prefix*`), its channels (`&prefix*`), and only the commands the library sends — no
    /// `@dangerous` command (no `KEYS`, `FLUSHDB`, `INFO`, `CONFIG`, …). Every feature works
    /// with them, on one server or a cluster; a restart is then noticed by the disconnect it
    /// causes rather than by `INFO`'s `run_id`. Use as
    /// `ACL SETUSER <name> on ><password> <rules>`.
    ///
    /// ```
    /// let rules = l2::KeySpace::new("users").acl_rules();
    /// assert!(rules.starts_with("resetkeys resetchannels ~users:* &users:* -@all "));
    /// ```
    pub fn acl_rules(&self) -> String {
        let pattern = self.match_pattern();
        format!("resetkeys resetchannels ~{pattern} &{pattern} -@all {ACL_COMMANDS}")
    }

    fn finish(&self, escaped: String) -> Key {
        let total = self.prefix.len() + escaped.len() + 2;
        let mut out = String::with_capacity(total.min(MAX_KEY_LEN + 40));
        out.push_str(&self.prefix);
        out.push('{');
        if total <= MAX_KEY_LEN {
            out.push_str(&escaped);
        } else {
            // Cut at a char boundary that does not split a %XX escape.
            let mut cut = READABLE_PREFIX.min(escaped.len());
            while !escaped.is_char_boundary(cut) {
                cut -= 1;
            }
            if let Some(pct) = escaped[cut.saturating_sub(2)..cut].rfind('%') {
                cut = cut.saturating_sub(2) + pct;
            }
            out.push_str(&escaped[..cut]);
            out.push('#');
            let digest = Sha256::digest(escaped.as_bytes());
            for b in &digest[..16] {
                write!(out, "{b:02x}").expect("writing to a String cannot fail");
            }
        }
        out.push('}');
        Key(out.into())
    }
}

/// An encoded Redis key, made by a [`KeySpace`]. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// The key as stored in Redis.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared string, for use as an L1 key without copying.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }

    /// The key of this key's lock: same hash tag, so same cluster slot.
    pub fn lock_key(&self) -> String {
        format!("{}:lock", self.0)
    }

    /// The notice channel of the key's space ([`KeySpace::notice_channel`]).
    pub fn notice_channel(&self) -> String {
        let prefix = self.0.find('{').map_or(&*self.0, |at| &self.0[..at]);
        format!("{prefix}{NOTICE_SUFFIX}")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl redis::ToRedisArgs for Key {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg(self.0.as_bytes());
    }
}

impl redis::ToSingleRedisArg for Key {}

fn escape_into(s: &str, out: &mut String, extra: &str) {
    for c in s.chars() {
        if matches!(c, '%' | ':' | '{' | '}' | '#') || c.is_control() || extra.contains(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                write!(out, "%{b:02X}").expect("writing to a String cannot fail");
            }
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn separators_never_collide() {
        assert_ne!(KeySpace::new("a:b").key("c"), KeySpace::new("a").key("b:c"));
        assert_ne!(KeySpace::new("a").key("b}:{c"), KeySpace::new("a").key("b"));
        assert_ne!(
            KeySpace::new("users").schema_version(2).key("x"),
            KeySpace::new("users").key("v2:x")
        );
    }

    #[test]
    fn the_hash_tag_is_the_only_brace_pair() {
        let k = KeySpace::new("n{s}").key("a{b}c");
        assert_eq!(k.as_str(), "n%7Bs%7D:{a%7Bb%7Dc}");
        assert!(k.lock_key().starts_with(k.as_str()));
    }

    #[test]
    fn long_keys_are_hashed_behind_a_readable_prefix() {
        let long = "x".repeat(500);
        let k = KeySpace::new("ns").key(&long);
        assert!(k.as_str().len() <= MAX_KEY_LEN);
        assert!(k.as_str().starts_with("ns:{xxxxxxxx"));
        assert!(k.as_str().contains('#'));
        assert_eq!(k, KeySpace::new("ns").key(&long), "hashing is stable");
        let mut other = long.clone();
        other.push('y');
        assert_ne!(k, KeySpace::new("ns").key(&other));
        // Cutting never splits an escape.
        let escapes = ":".repeat(300);
        let k = KeySpace::new("ns").key(&escapes);
        let body = &k.as_str()[4..k.as_str().find('#').unwrap()];
        assert_eq!(body.len() % 3, 0, "{body}");
    }

    #[test]
    fn glob_characters_are_escaped_in_patterns() {
        assert_eq!(
            KeySpace::new("a*b?[c]\\").match_pattern(),
            "a\\*b\\?\\[c\\]\\\\:*"
        );
    }

    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    proptest! {
        #[test]
        fn escaping_is_reversible(s in ".*") {
            let mut e = String::new();
            escape_into(&s, &mut e, "&=?");
            let clean = !e.contains([':', '{', '}', '#']);
            prop_assert!(clean, "unescaped separator in {:?}", e);
            prop_assert_eq!(decode(&e), s);
        }

        #[test]
        fn keys_are_injective(
            ns1 in ".{0,12}", k1 in ".{0,40}", v1 in proptest::option::of(0u32..4),
            ns2 in ".{0,12}", k2 in ".{0,40}", v2 in proptest::option::of(0u32..4),
        ) {
            let space = |ns: &str, v: Option<u32>| match v {
                Some(v) => KeySpace::new(ns).schema_version(v),
                None => KeySpace::new(ns),
            };
            let a = space(&ns1, v1).key(&k1);
            let b = space(&ns2, v2).key(&k2);
            prop_assert_eq!(a == b, (ns1, v1, k1) == (ns2, v2, k2));
        }

        #[test]
        fn separator_shuffles_never_collide(a in "[a-c:]{0,8}", b in "[a-c:]{0,8}") {
            // Moving a ':' between namespace and key always changes the key.
            let joined = format!("{a}:{b}");
            if let Some((x, y)) = joined.split_once(':') {
                let k1 = KeySpace::new(x).key(y);
                if let Some((p, q)) = joined.rsplit_once(':')
                    && (p, q) != (x, y)
                {
                    prop_assert_ne!(k1, KeySpace::new(p).key(q));
                }
            }
        }

        #[test]
        fn long_keys_stay_injective(k1 in "[ab]{190,260}", k2 in "[ab]{190,260}") {
            let s = KeySpace::new("ns");
            prop_assert_eq!(s.key(&k1) == s.key(&k2), k1 == k2);
        }

        #[test]
        fn query_parameter_order_does_not_matter(
            params in proptest::collection::vec(("[a-z&=?]{0,4}", "[a-z0-9&=]{0,4}"), 0..6),
            seed in any::<u64>(),
        ) {
            let space = KeySpace::new("http");
            let mut shuffled = params.clone();
            // A deterministic shuffle from the seed.
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                shuffled.swap(i, (state % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(space.request_key("/p", params.clone()), space.request_key("/p", shuffled));
        }

        #[test]
        fn plain_keys_never_equal_request_keys(
            key in "[a-z/:?&=%]{0,12}",
            path in "[a-z/:?&=%]{0,8}",
            params in proptest::collection::btree_map("[a-z&=:]{1,3}", "[a-z&=:]{0,3}", 0..3),
        ) {
            let space = KeySpace::new("http");
            prop_assert_ne!(space.key(&key), space.request_key(&path, &params));
        }

        #[test]
        fn different_queries_give_different_keys(
            p1 in proptest::collection::btree_map("[a-z&=]{1,3}", "[a-z&=]{0,3}", 0..4),
            p2 in proptest::collection::btree_map("[a-z&=]{1,3}", "[a-z&=]{0,3}", 0..4),
        ) {
            let space = KeySpace::new("http");
            prop_assert_eq!(space.request_key("/p", &p1) == space.request_key("/p", &p2), p1 == p2);
        }
    }
}
