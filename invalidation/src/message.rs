//! The wire format of invalidation messages: small, binary, versioned, never a value.
//!
//! ```text
//! offset size field
//!  0     4    magic         'M' 'L' 'C' 'I'
//!  4     1    format        2
//!  5     1    action        1 evict keys, 2 clear namespace, 3 clear all, 4 replace (signed only)
//!  6     1    flags         bit 0: signed (a tag follows the body); other bits are 0
//!  7     8    origin        u64 LE: the writing cache's random id
//! 15     8    sequence      u64 LE: per origin, from 1, one per message built
//! 23     8    sent at       u64 LE: microseconds since the Unix epoch (lag metric, replay window)
//! 31     1    vouches v     at most 8
//! 32     8v   vouched       u64 LE each: earlier sequence numbers of this origin whose
//!                           messages were acknowledged as published (see `sequence`)
//! evict only:
//!        2    count n       u16 LE, at least 1
//!        n ×  key           u16 LE length, then the key's UTF-8 bytes
//! replace only:
//!        2+k  key           u16 LE length, then the key's UTF-8 bytes
//!        8    version       u64 LE: the write version the writer proposed and Redis took
//!        4+m  value         u32 LE length, then the entry's envelope (as stored in Redis)
//! signed only:
//!       32    tag           HMAC-SHA256 of the channel and every byte before the tag
//! evict only:
//!        n ×  version       u64 LE: each key's new write version
//! ```
//!
//! A replacement carries a small value to the other nodes, so their next read of it is an L1
//! hit. Its version is inside the signed part: the writer proposed it, and the write script
//! published the message only if it took that version (otherwise the eviction went out).
//! Receivers apply the value only from a signed message; unsigned, it is an eviction at most.
//!
//! A writer's Lua script appends the version (it is assigned in Redis), so a single-key
//! message is built as [`evict_prefix`] plus 8 bytes: the versions stay the last bytes of an
//! eviction, after the tag, which therefore covers everything the client built (header,
//! vouches, keys) and not the versions. Why an unsigned version does no harm is argued in the
//! crate's `# Security` section.
//!
//! Decoding is strict: any length that does not add up is an error, never a panic.

// Without `test-util` the wire format is this crate's alone.
#![cfg_attr(not(any(test, feature = "test-util")), allow(unreachable_pub))]

use std::time::{SystemTime, UNIX_EPOCH};

use crate::sign::{Key, TAG_LEN};

/// The magic bytes every message starts with.
pub const MAGIC: [u8; 4] = *b"MLCI";
/// The format this build writes and reads.
pub const FORMAT: u8 = 2;
/// The most vouched numbers one message carries.
pub const MAX_VOUCHES: usize = 8;
/// The fixed header, up to and including the vouch count.
const HEADER: usize = 32;
const MAX_KEYS: usize = 4096;
const SIGNED: u8 = 1;

/// What a message asks receivers to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Evict these keys from L1 unless L1 holds a version at least as new.
    Evict(Vec<(String, u64)>),
    /// Drop the namespace's L1 (the channel names the namespace).
    ClearNamespace,
    /// Drop every L1 of every namespace on this bus.
    ClearAll,
    /// Key `key` now holds `value` (an entry's envelope) at write `version`.
    Replace {
        /// The cache key.
        key: String,
        /// The write version.
        version: u64,
        /// The entry's envelope, as stored in Redis.
        value: Vec<u8>,
    },
}

impl Action {
    fn code(&self) -> u8 {
        match self {
            Action::Evict(_) => 1,
            Action::ClearNamespace => 2,
            Action::ClearAll => 3,
            Action::Replace { .. } => 4,
        }
    }
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The writing cache's id.
    pub origin: u64,
    /// Its sequence number.
    pub seq: u64,
    /// When it was built, in microseconds since the Unix epoch (lag metric, replay window).
    pub sent_micros: u64,
    /// Earlier numbers of this origin known to be published (at most [`MAX_VOUCHES`]).
    pub vouches: Vec<u64>,
    /// What to do.
    pub action: Action,
    /// The tag, if the message is signed (ignored by [`encode`], which signs afresh).
    pub signature: Option<Signature>,
}

/// Where a signed message's tag is, and what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The HMAC-SHA256 tag.
    pub tag: [u8; TAG_LEN],
    /// How many leading bytes of the message it covers (all of them before the tag).
    pub covers: usize,
}

impl Signature {
    /// Whether the tag is `key`'s for these `bytes` (the message it was decoded from) on
    /// `channel`.
    pub fn verify(&self, key: &Key, channel: &str, bytes: &[u8]) -> bool {
        bytes
            .get(..self.covers)
            .is_some_and(|covered| key.verify(channel, covered, &self.tag))
    }
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// Shorter than a header, or not starting with the magic bytes.
    #[error("not an invalidation message")]
    NotAMessage,
    /// A format this build does not read.
    #[error("unsupported message format {0}")]
    UnsupportedFormat(u8),
    /// An unknown action byte.
    #[error("unknown action {0}")]
    UnknownAction(u8),
    /// The lengths inside do not add up to the message's size, or unknown flags are set.
    #[error("malformed message body")]
    Malformed,
    /// A key that is not UTF-8.
    #[error("a key is not UTF-8")]
    BadKey,
}

/// Microseconds since the Unix epoch now (0 if the clock is before 1970).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How a message is signed: with `key`, for `channel` (tags are bound to the channel).
#[derive(Debug, Clone, Copy)]
pub struct Signing<'a> {
    /// The shared secret.
    pub key: &'a Key,
    /// The channel the message is published on.
    pub channel: &'a str,
}

fn header(
    action: u8,
    signed: bool,
    origin: u64,
    seq: u64,
    sent: u64,
    vouches: &[u64],
    out: &mut Vec<u8>,
) {
    let vouches = &vouches[..vouches.len().min(MAX_VOUCHES)];
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    out.push(action);
    out.push(if signed { SIGNED } else { 0 });
    out.extend_from_slice(&origin.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&sent.to_le_bytes());
    // At most MAX_VOUCHES (8): fits a byte.
    out.push(vouches.len() as u8);
    for v in vouches {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn push_key(key: &str, out: &mut Vec<u8>) {
    // Keys longer than u16::MAX cannot be cache keys of ours (Redis keys are capped far
    // below); truncating at a char boundary keeps the message well-formed.
    let mut end = key.len().min(usize::from(u16::MAX));
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&u16::try_from(end).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(&key.as_bytes()[..end]);
}

fn seal(sign: Option<Signing<'_>>, out: &mut Vec<u8>) {
    if let Some(s) = sign {
        let tag = s.key.tag(s.channel, out);
        out.extend_from_slice(&tag);
    }
}

/// A one-key eviction without its version: the writer's script appends the 8-byte version.
/// Vouches beyond [`MAX_VOUCHES`] are left out.
pub fn evict_prefix(
    origin: u64,
    seq: u64,
    vouches: &[u64],
    key: &str,
    sign: Option<Signing<'_>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 8 * vouches.len() + 4 + key.len() + TAG_LEN + 8);
    header(
        1,
        sign.is_some(),
        origin,
        seq,
        now_micros(),
        vouches,
        &mut out,
    );
    out.extend_from_slice(&1u16.to_le_bytes());
    push_key(key, &mut out);
    seal(sign, &mut out);
    out
}

/// Encodes a whole message, signed if `sign` is given (`message.signature` is ignored).
///
/// # Panics
/// Never; an eviction of more than 4096 keys keeps the first 4096, and more than
/// [`MAX_VOUCHES`] vouches keep the first ones.
pub fn encode(message: &Message, sign: Option<Signing<'_>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    header(
        message.action.code(),
        sign.is_some(),
        message.origin,
        message.seq,
        message.sent_micros,
        &message.vouches,
        &mut out,
    );
    match &message.action {
        Action::Evict(keys) => {
            let keys = &keys[..keys.len().min(MAX_KEYS)];
            out.extend_from_slice(&u16::try_from(keys.len()).unwrap_or(0).to_le_bytes());
            for (key, _) in keys {
                push_key(key, &mut out);
            }
            seal(sign, &mut out);
            for (_, version) in keys {
                out.extend_from_slice(&version.to_le_bytes());
            }
        }
        Action::ClearNamespace | Action::ClearAll => seal(sign, &mut out),
        Action::Replace {
            key,
            version,
            value,
        } => {
            push_key(key, &mut out);
            out.extend_from_slice(&version.to_le_bytes());
            let len = value.len().min(u32::MAX as usize);
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.extend_from_slice(&value[..len]);
            seal(sign, &mut out);
        }
    }
    out
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<usize> {
    let b: [u8; 2] = bytes.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(usize::from(u16::from_le_bytes(b)))
}

/// The origin and sequence number of a message of this format, without decoding the rest
/// (`None` if `bytes` do not start like one).
pub fn origin_and_seq(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < HEADER || bytes[..4] != MAGIC || bytes[4] != FORMAT {
        return None;
    }
    Some((u64_at(bytes, 7)?, u64_at(bytes, 15)?))
}

/// Decodes and validates `bytes` (a signature is read, not checked: see
/// [`Signature::verify`]).
///
/// # Errors
/// A [`MessageError`] for each way the bytes can be wrong.
pub fn decode(bytes: &[u8]) -> Result<Message, MessageError> {
    if bytes.len() < HEADER || bytes[..4] != MAGIC {
        return Err(MessageError::NotAMessage);
    }
    if bytes[4] != FORMAT {
        return Err(MessageError::UnsupportedFormat(bytes[4]));
    }
    let action = bytes[5];
    if !(1..=4).contains(&action) {
        return Err(MessageError::UnknownAction(action));
    }
    let signed = match bytes[6] {
        0 => false,
        SIGNED => true,
        _ => return Err(MessageError::Malformed),
    };
    let malformed = || MessageError::Malformed;
    let origin = u64_at(bytes, 7).ok_or_else(malformed)?;
    let seq = u64_at(bytes, 15).ok_or_else(malformed)?;
    let sent_micros = u64_at(bytes, 23).ok_or_else(malformed)?;
    let count = usize::from(bytes[31]);
    if count > MAX_VOUCHES {
        return Err(MessageError::Malformed);
    }
    let mut at = HEADER;
    let mut vouches = Vec::with_capacity(count);
    for _ in 0..count {
        vouches.push(u64_at(bytes, at).ok_or_else(malformed)?);
        at += 8;
    }
    let mut keys = Vec::new();
    let mut replace = None;
    if action == 4 {
        let len = u16_at(bytes, at).ok_or_else(malformed)?;
        at += 2;
        let raw = bytes.get(at..at + len).ok_or_else(malformed)?;
        let key = std::str::from_utf8(raw).map_err(|_| MessageError::BadKey)?;
        at += len;
        let version = u64_at(bytes, at).ok_or_else(malformed)?;
        at += 8;
        let b: [u8; 4] = bytes
            .get(at..at + 4)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?;
        at += 4;
        let len = u32::from_le_bytes(b) as usize;
        let value = bytes.get(at..at.checked_add(len).ok_or_else(malformed)?);
        let value = value.ok_or_else(malformed)?.to_vec();
        at += len;
        replace = Some(Action::Replace {
            key: key.to_string(),
            version,
            value,
        });
    }
    if action == 1 {
        let n = u16_at(bytes, at).ok_or_else(malformed)?;
        if n == 0 || n > MAX_KEYS {
            return Err(MessageError::Malformed);
        }
        at += 2;
        keys.reserve(n.min(64));
        for _ in 0..n {
            let len = u16_at(bytes, at).ok_or_else(malformed)?;
            at += 2;
            let raw = bytes.get(at..at + len).ok_or_else(malformed)?;
            let key = std::str::from_utf8(raw).map_err(|_| MessageError::BadKey)?;
            keys.push(key.to_string());
            at += len;
        }
    }
    let signature = if signed {
        let tag: [u8; TAG_LEN] = bytes
            .get(at..at + TAG_LEN)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?;
        let covers = at;
        at += TAG_LEN;
        Some(Signature { tag, covers })
    } else {
        None
    };
    if bytes.len() != at + 8 * keys.len() {
        return Err(MessageError::Malformed);
    }
    let action = match action {
        1 => Action::Evict(
            keys.into_iter()
                .enumerate()
                .map(|(i, key)| Ok((key, u64_at(bytes, at + 8 * i).ok_or_else(malformed)?)))
                .collect::<Result<_, MessageError>>()?,
        ),
        2 => Action::ClearNamespace,
        3 => Action::ClearAll,
        _ => replace.ok_or_else(malformed)?,
    };
    Ok(Message {
        origin,
        seq,
        sent_micros,
        vouches,
        action,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn evict(keys: &[(&str, u64)]) -> Message {
        Message {
            origin: 7,
            seq: 3,
            sent_micros: 1_000,
            vouches: vec![1, 2],
            action: Action::Evict(keys.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            signature: None,
        }
    }

    fn clear(action: Action) -> Message {
        Message {
            action,
            ..evict(&[])
        }
    }

    #[test]
    fn round_trips() {
        for m in [
            evict(&[("a", 1)]),
            evict(&[("α:{b}", 2), ("", 0), ("c", u64::MAX)]),
            Message {
                vouches: vec![],
                ..evict(&[("a", 1)])
            },
            clear(Action::ClearNamespace),
            clear(Action::ClearAll),
            clear(Action::Replace {
                key: "k".into(),
                version: u64::MAX,
                value: vec![],
            }),
        ] {
            assert_eq!(decode(&encode(&m, None)).unwrap(), m);
        }
    }

    #[test]
    fn a_replacement_cut_short_or_with_a_length_past_its_end_is_malformed() {
        let m = clear(Action::Replace {
            key: "k".into(),
            version: 3,
            value: vec![7; 10],
        });
        let bytes = encode(&m, None);
        for end in HEADER..bytes.len() {
            assert!(decode(&bytes[..end]).is_err(), "cut at {end}");
        }
        let mut long = bytes.clone();
        let at = bytes.len() - 10 - 4;
        long[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&long), Err(MessageError::Malformed));
        let mut trailing = bytes;
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(MessageError::Malformed));
    }

    #[test]
    fn signed_messages_round_trip_and_verify_on_their_channel_only() {
        let key = Key::new(b"secret");
        let sign = Signing {
            key: &key,
            channel: "users:!inval",
        };
        let replace = clear(Action::Replace {
            key: "a".into(),
            version: 9,
            value: vec![1, 2, 3],
        });
        for m in [
            evict(&[("a", 1), ("b", 2)]),
            clear(Action::ClearAll),
            replace,
        ] {
            let bytes = encode(&m, Some(sign));
            let d = decode(&bytes).unwrap();
            let s = d.signature.clone().unwrap();
            assert!(s.verify(&key, "users:!inval", &bytes));
            assert!(!s.verify(&key, "orders:!inval", &bytes));
            assert!(!s.verify(&Key::new(b"other"), "users:!inval", &bytes));
            assert_eq!(
                Message {
                    signature: None,
                    ..d
                },
                m
            );
        }
    }

    #[test]
    fn a_prefix_plus_the_scripts_version_is_a_message_and_the_tag_does_not_cover_it() {
        let key = Key::new(b"k");
        let sign = Signing {
            key: &key,
            channel: "c",
        };
        for signing in [None, Some(sign)] {
            let mut bytes = evict_prefix(9, 4, &[1, 3], "users-42", signing);
            assert_eq!(origin_and_seq(&bytes), Some((9, 4)));
            bytes.extend_from_slice(&17u64.to_le_bytes());
            let m = decode(&bytes).unwrap();
            assert_eq!((m.origin, m.seq, m.vouches.clone()), (9, 4, vec![1, 3]));
            assert_eq!(m.action, Action::Evict(vec![("users-42".into(), 17)]));
            assert!(m.sent_micros > 0);
            assert_eq!(m.signature.is_some(), signing.is_some());
            if let Some(s) = m.signature {
                assert_eq!(s.covers, bytes.len() - 8 - TAG_LEN);
                assert!(s.verify(&key, "c", &bytes));
                // Another version: the same tag still verifies (see the crate's `# Security`).
                let n = bytes.len();
                bytes[n - 8..].copy_from_slice(&99u64.to_le_bytes());
                assert!(s.verify(&key, "c", &bytes));
                // Any other byte changed: it does not.
                bytes[20] ^= 1;
                assert!(!s.verify(&key, "c", &bytes));
            }
        }
    }

    #[test]
    fn junk_is_an_error_never_a_panic() {
        let good = encode(&evict(&[("a", 1), ("bb", 2)]), None);
        assert_eq!(decode(b"hello"), Err(MessageError::NotAMessage));
        assert_eq!(decode(&[]), Err(MessageError::NotAMessage));
        let mut f = good.clone();
        f[4] = 1;
        assert_eq!(decode(&f), Err(MessageError::UnsupportedFormat(1)));
        let mut a = good.clone();
        a[5] = 9;
        assert_eq!(decode(&a), Err(MessageError::UnknownAction(9)));
        let mut flags = good.clone();
        flags[6] = 2;
        assert_eq!(decode(&flags), Err(MessageError::Malformed));
        let mut many = good.clone();
        many[31] = 9;
        assert_eq!(decode(&many), Err(MessageError::Malformed));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(MessageError::Malformed));
        let mut zero = good[..HEADER + 16].to_vec();
        zero.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(decode(&zero), Err(MessageError::Malformed));
        let mut bad_key = encode(&evict(&[("ab", 1)]), None);
        bad_key[HEADER + 16 + 4] = 0xff;
        assert_eq!(decode(&bad_key), Err(MessageError::BadKey));
        let mut c = encode(&clear(Action::ClearAll), None);
        c.push(1);
        assert_eq!(decode(&c), Err(MessageError::Malformed));
        // A signed flag without a tag, and a tag without the flag.
        let mut unsigned_claim = encode(&clear(Action::ClearAll), None);
        unsigned_claim[6] = 1;
        assert_eq!(decode(&unsigned_claim), Err(MessageError::Malformed));
        let key = Key::new(b"k");
        let mut stripped = encode(
            &clear(Action::ClearAll),
            Some(Signing {
                key: &key,
                channel: "c",
            }),
        );
        stripped[6] = 0;
        assert_eq!(decode(&stripped), Err(MessageError::Malformed));
    }

    #[test]
    fn extreme_numbers_decode() {
        let m = Message {
            origin: u64::MAX,
            seq: u64::MAX,
            sent_micros: u64::MAX,
            vouches: vec![u64::MAX; MAX_VOUCHES],
            action: Action::Evict(vec![("k".into(), u64::MAX)]),
            signature: None,
        };
        assert_eq!(decode(&encode(&m, None)).unwrap(), m);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let _ = origin_and_seq(&bytes);
        }

        /// Bytes that start like a message (magic, format, a valid action) reach the
        /// length checks: still an error or a message, never a panic.
        #[test]
        fn arbitrary_bodies_never_panic(
            action in 1u8..=3,
            flags in 0u8..=2,
            vouches in 0u8..=10,
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&[FORMAT, action, flags]);
            bytes.extend_from_slice(&[0u8; 24]);
            bytes.push(vouches);
            bytes.extend_from_slice(&body);
            if let Ok(m) = decode(&bytes) {
                // Whatever decodes encodes back to the same bytes (nothing is ignored),
                // unsigned messages at least.
                if m.signature.is_none() {
                    prop_assert_eq!(encode(&m, None), bytes);
                }
            }
        }

        #[test]
        fn arbitrary_messages_round_trip(
            keys in proptest::collection::vec((".{0,20}", any::<u64>()), 1..20),
            vouches in proptest::collection::vec(any::<u64>(), 0..=MAX_VOUCHES),
            origin in any::<u64>(),
            seq in any::<u64>(),
            sent in any::<u64>(),
            action in 1u8..=4,
            signed in any::<bool>(),
            value in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let action = match action {
                1 => Action::Evict(keys),
                2 => Action::ClearNamespace,
                3 => Action::ClearAll,
                _ => Action::Replace { key: keys[0].0.clone(), version: keys[0].1, value },
            };
            let m = Message { origin, seq, sent_micros: sent, vouches, action, signature: None };
            let key = Key::new(b"p");
            let sign = signed.then_some(Signing { key: &key, channel: "ch" });
            let bytes = encode(&m, sign);
            let d = decode(&bytes).unwrap();
            prop_assert_eq!(d.signature.as_ref().is_some_and(|s| s.verify(&key, "ch", &bytes)), signed);
            prop_assert_eq!(Message { signature: None, ..d }, m);
        }
    }
}
