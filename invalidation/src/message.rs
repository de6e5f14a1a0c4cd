//! The wire format of invalidation messages: small, binary, versioned, never a value.
//!
//! ```text
//! offset size field
//!  0     4    magic         'M' 'L' 'C' 'I'
//!  4     1    format        1
//!  5     1    action        1 evict keys, 2 clear namespace, 3 clear all
//!  6     8    origin        u64 LE: the writing cache's random id
//! 14     8    sequence      u64 LE: per origin, from 1, one per message
//! 22     8    sent at       u64 LE: microseconds since the Unix epoch, for the lag metric only
//! evict only:
//! 30     2    count n       u16 LE, at least 1
//!        n ×  key           u16 LE length, then the key's UTF-8 bytes
//!        n ×  version       u64 LE: each key's new write version
//! ```
//!
//! A writer's Lua script appends the version (it is assigned in Redis), so a single-key
//! message is built as [`evict_prefix`] plus 8 bytes. Decoding is strict: any length that does
//! not add up is an error, never a panic.

use std::time::{SystemTime, UNIX_EPOCH};

/// The magic bytes every message starts with.
pub const MAGIC: [u8; 4] = *b"MLCI";
/// The format this build writes and reads.
pub const FORMAT: u8 = 1;
const HEADER: usize = 30;
const MAX_KEYS: usize = 4096;

/// What a message asks receivers to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Evict these keys from L1 unless L1 holds a version at least as new.
    Evict(Vec<(String, u64)>),
    /// Drop the namespace's L1 (the channel names the namespace).
    ClearNamespace,
    /// Drop every L1 of every namespace on this bus.
    ClearAll,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The writing cache's id.
    pub origin: u64,
    /// Its sequence number.
    pub seq: u64,
    /// When it was built, in microseconds since the Unix epoch (for the lag metric).
    pub sent_micros: u64,
    /// What to do.
    pub action: Action,
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
    /// The lengths inside do not add up to the message's size.
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

fn header(action: u8, origin: u64, seq: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    out.push(action);
    out.extend_from_slice(&origin.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&now_micros().to_le_bytes());
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

/// A one-key eviction without its version: the writer's script appends the 8-byte version.
pub fn evict_prefix(origin: u64, seq: u64, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 4 + key.len() + 8);
    header(1, origin, seq, &mut out);
    out.extend_from_slice(&1u16.to_le_bytes());
    push_key(key, &mut out);
    out
}

/// Encodes a whole message.
///
/// # Panics
/// Never; an eviction of more than 4096 keys keeps the first 4096.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match &message.action {
        Action::Evict(keys) => {
            let keys = &keys[..keys.len().min(MAX_KEYS)];
            header(1, message.origin, message.seq, &mut out);
            out.extend_from_slice(&u16::try_from(keys.len()).unwrap_or(0).to_le_bytes());
            for (key, _) in keys {
                push_key(key, &mut out);
            }
            for (_, version) in keys {
                out.extend_from_slice(&version.to_le_bytes());
            }
        }
        Action::ClearNamespace => header(2, message.origin, message.seq, &mut out),
        Action::ClearAll => header(3, message.origin, message.seq, &mut out),
    }
    // Keep the sender's time as given (tests build messages with chosen times).
    out[22..30].copy_from_slice(&message.sent_micros.to_le_bytes());
    out
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes and validates `bytes`.
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
    let (origin, seq, sent_micros) = (u64_at(bytes, 6), u64_at(bytes, 14), u64_at(bytes, 22));
    let action = match bytes[5] {
        1 => Action::Evict(decode_keys(&bytes[HEADER..])?),
        2 | 3 if bytes.len() != HEADER => return Err(MessageError::Malformed),
        2 => Action::ClearNamespace,
        3 => Action::ClearAll,
        other => return Err(MessageError::UnknownAction(other)),
    };
    Ok(Message {
        origin,
        seq,
        sent_micros,
        action,
    })
}

fn decode_keys(body: &[u8]) -> Result<Vec<(String, u64)>, MessageError> {
    let count = match body.get(..2) {
        Some(b) => usize::from(u16::from_le_bytes([b[0], b[1]])),
        None => return Err(MessageError::Malformed),
    };
    if count == 0 || count > MAX_KEYS {
        return Err(MessageError::Malformed);
    }
    let mut at = 2;
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        let len = match body.get(at..at + 2) {
            Some(b) => usize::from(u16::from_le_bytes([b[0], b[1]])),
            None => return Err(MessageError::Malformed),
        };
        at += 2;
        let raw = body.get(at..at + len).ok_or(MessageError::Malformed)?;
        let key = std::str::from_utf8(raw).map_err(|_| MessageError::BadKey)?;
        keys.push(key.to_string());
        at += len;
    }
    if body.len() != at + 8 * count {
        return Err(MessageError::Malformed);
    }
    Ok(keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| (key, u64_at(body, at + 8 * i)))
        .collect())
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
            action: Action::Evict(keys.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
        }
    }

    #[test]
    fn round_trips() {
        for m in [
            evict(&[("a", 1)]),
            evict(&[("α:{b}", 2), ("", 0), ("c", u64::MAX)]),
            Message {
                action: Action::ClearNamespace,
                ..evict(&[])
            },
            Message {
                action: Action::ClearAll,
                ..evict(&[])
            },
        ] {
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn a_prefix_plus_the_scripts_version_is_a_message() {
        let mut bytes = evict_prefix(9, 4, "users-42");
        bytes.extend_from_slice(&17u64.to_le_bytes());
        let m = decode(&bytes).unwrap();
        assert_eq!((m.origin, m.seq), (9, 4));
        assert_eq!(m.action, Action::Evict(vec![("users-42".into(), 17)]));
        assert!(m.sent_micros > 0);
    }

    #[test]
    fn junk_is_an_error_never_a_panic() {
        let good = encode(&evict(&[("a", 1), ("bb", 2)]));
        assert_eq!(decode(b"hello"), Err(MessageError::NotAMessage));
        assert_eq!(decode(&[]), Err(MessageError::NotAMessage));
        let mut f = good.clone();
        f[4] = 2;
        assert_eq!(decode(&f), Err(MessageError::UnsupportedFormat(2)));
        let mut a = good.clone();
        a[5] = 9;
        assert_eq!(decode(&a), Err(MessageError::UnknownAction(9)));
        for cut in HEADER..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(MessageError::Malformed));
        let mut zero = good[..HEADER].to_vec();
        zero.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(decode(&zero), Err(MessageError::Malformed));
        let mut bad_key = encode(&evict(&[("ab", 1)]));
        bad_key[HEADER + 4] = 0xff;
        assert_eq!(decode(&bad_key), Err(MessageError::BadKey));
        let mut clear = encode(&Message {
            action: Action::ClearAll,
            ..evict(&[])
        });
        clear.push(1);
        assert_eq!(decode(&clear), Err(MessageError::Malformed));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_evictions_round_trip(
            keys in proptest::collection::vec((".{0,20}", any::<u64>()), 1..20),
            origin in any::<u64>(),
            seq in any::<u64>(),
        ) {
            let m = Message { origin, seq, sent_micros: 5, action: Action::Evict(keys) };
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }
}
