//! Message and probe signatures: HMAC-SHA256 under the bus's shared secret, bound to the
//! channel, so a message signed for one namespace is worthless on another.

// Without `test-util` the wire format is this crate's alone.
#![cfg_attr(not(any(test, feature = "test-util")), allow(unreachable_pub))]

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The length of a tag in bytes.
pub const TAG_LEN: usize = 32;

/// A shared secret, keyed once: cheap to clone, never printed.
#[derive(Clone)]
pub struct Key {
    keyed: Arc<Hmac<Sha256>>,
    /// A short digest of the secret, so two configurations can be compared without it.
    id: [u8; TAG_LEN],
}

impl Key {
    /// Keys HMAC-SHA256 with `secret` (any length is accepted: HMAC hashes long keys).
    ///
    /// # Panics
    /// Never: HMAC accepts keys of every length.
    pub fn new(secret: &[u8]) -> Key {
        #[allow(clippy::expect_used)]
        let keyed = Hmac::<Sha256>::new_from_slice(secret)
            .expect("HMAC takes keys of any length (an invariant of the hmac crate)");
        let id = mac_of(&keyed, "key id", b"");
        Key {
            keyed: Arc::new(keyed),
            id,
        }
    }

    /// The tag of `bytes` on `channel`.
    pub fn tag(&self, channel: &str, bytes: &[u8]) -> [u8; TAG_LEN] {
        mac_of(&self.keyed, channel, bytes)
    }

    /// Whether `tag` is the tag of `bytes` on `channel` (compared in constant time).
    pub fn verify(&self, channel: &str, bytes: &[u8], tag: &[u8]) -> bool {
        let mut mac = start(&self.keyed, channel);
        mac.update(bytes);
        mac.verify_slice(tag).is_ok()
    }
}

fn start(keyed: &Hmac<Sha256>, channel: &str) -> Hmac<Sha256> {
    let mut mac = keyed.clone();
    // Length-prefixed, so no (channel, bytes) pair reads as another.
    mac.update(&(channel.len() as u64).to_le_bytes());
    mac.update(channel.as_bytes());
    mac
}

fn mac_of(keyed: &Hmac<Sha256>, channel: &str, bytes: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = start(keyed, channel);
    mac.update(bytes);
    mac.finalize().into_bytes().into()
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.id == other.id
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<secret>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_bind_key_channel_and_bytes() {
        let k = Key::new(b"s3cret");
        let t = k.tag("a", b"hello");
        assert!(k.verify("a", b"hello", &t));
        assert!(!k.verify("b", b"hello", &t));
        assert!(!k.verify("a", b"hellO", &t));
        assert!(!Key::new(b"other").verify("a", b"hello", &t));
        assert!(!k.verify("a", b"hello", &t[..31]));
        assert_eq!(k, Key::new(b"s3cret"));
        assert_ne!(k, Key::new(b"other"));
        assert_eq!(format!("{k:?}"), "Key(<secret>)");
    }
}
