//! The value envelope: a fixed binary header in front of a MessagePack payload.
//!
//! ```text
//! offset size field
//!  0     4    magic           C1 'M' 'L' 'C'  (0xC1 is never the first byte of MessagePack)
//!  4     1    format version  1
//!  5     1    flags           bit 1: an "absent" marker (negative cache, empty payload);
//!                             bit 2: a tombstone (deleted, kept for its version; a miss);
//!                             bit 0 is reserved for compression; any other set bit is refused
//!  6     8    type tag        u64 LE, chosen by the caller (TypeTag::from_name)
//! 14     8    write version   u64 LE
//! 22     8    fresh for (ms)  u64 LE, relative to the write
//! 30     8    stale for (ms)  u64 LE, relative to the write: the whole life, also the Redis PTTL
//! 38     4    payload length  u32 LE
//! 42     n    payload         MessagePack with named fields (rmp-serde `to_vec_named` layout)
//! ```
//!
//! Deadlines are durations relative to the write, never wall-clock instants: a reader learns how
//! old an entry is from the key's remaining life in Redis (PTTL), so freshness does not depend
//! on the clocks of writer and reader agreeing.

// Without `test-util` the layout constants are this crate's alone.
#![cfg_attr(not(any(test, feature = "test-util")), allow(unreachable_pub))]

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DecodeError, Error, Result};

/// Flag: the entry records that the value does not exist (a cached "not found"); no payload.
pub const FLAG_ABSENT: u8 = 0b10;
/// Flag: the entry was deleted; kept only for its write version, it reads as a miss.
pub const FLAG_TOMBSTONE: u8 = 0b100;

/// A tombstone: a header with [`FLAG_TOMBSTONE`], type tag 0 and no payload (its write version
/// is stamped by the delete script).
pub(crate) static TOMBSTONE: [u8; HEADER_LEN] = {
    let mut t = [0u8; HEADER_LEN];
    t[0] = MAGIC[0];
    t[1] = MAGIC[1];
    t[2] = MAGIC[2];
    t[3] = MAGIC[3];
    t[4] = FORMAT_VERSION;
    t[5] = FLAG_TOMBSTONE;
    // fresh for 1 ms, stale for 1 ms: valid deadlines.
    t[22] = 1;
    t[30] = 1;
    t
};

/// The largest write version an entry may carry: 2^52. The write scripts stamp
/// `max(previous + 1, server clock in µs)`, which stays far below it (µs since 1970 reach 2^52
/// in the year 2112), and Lua's doubles count exactly up to 2^53. An entry claiming more was
/// written behind the cache's back: it is refused as undecodable (and evicted), and the
/// scripts read it as version 0, so it can never outrank a real write.
pub const MAX_WRITE_VERSION: u64 = 1 << 52;

/// The magic bytes every entry starts with.
pub const MAGIC: [u8; 4] = [0xC1, b'M', b'L', b'C'];
/// The envelope format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// The header length in bytes.
pub const HEADER_LEN: usize = 42;
/// The default maximum encoded size of one entry: 4 MiB.
pub const DEFAULT_MAX_SIZE: usize = 4 << 20;

/// Identifies the Rust type (and its schema) that an entry holds, so one type's bytes never
/// decode as another's. Derive it from a stable name with [`TypeTag::from_name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TypeTag(pub u64);

impl TypeTag {
    /// A tag from a stable name such as `"myapp.User/v2"` (64-bit FNV-1a; usable in `const`).
    /// Change the name when the type changes incompatibly.
    pub const fn from_name(name: &str) -> Self {
        let bytes = name.as_bytes();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < bytes.len() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        TypeTag(hash)
    }
}

impl fmt::Display for TypeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type {:#018x}", self.0)
    }
}

/// The metadata written with each value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    /// The write version (from the writer's sequence or Redis, never a wall clock).
    pub write_version: u64,
    /// How long after the write the value is fresh.
    pub fresh_for: Duration,
    /// How long after the write the value may still be served as stale; also its Redis TTL.
    /// At least `fresh_for`.
    pub stale_for: Duration,
}

impl EntryMeta {
    /// Fresh for `ttl`, no stale window, version 0.
    pub fn new(ttl: Duration) -> Self {
        EntryMeta {
            write_version: 0,
            fresh_for: ttl,
            stale_for: ttl,
        }
    }

    /// Adds a stale-while-revalidate window after the fresh period.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_for = self.fresh_for + window;
        self
    }

    /// Sets the write version.
    pub fn write_version(mut self, version: u64) -> Self {
        self.write_version = version;
        self
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The flags byte.
    pub flags: u8,
    /// The writer's type tag.
    pub type_tag: TypeTag,
    /// Version and deadlines.
    pub meta: EntryMeta,
    /// The payload length.
    pub payload_len: usize,
}

/// Encodes and decodes values of one type `T` with one [`TypeTag`] and a size limit.
pub struct Codec<T> {
    tag: TypeTag,
    max_size: usize,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Codec<T> {
    fn clone(&self) -> Self {
        Codec {
            tag: self.tag,
            max_size: self.max_size,
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Codec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("type", &std::any::type_name::<T>())
            .field("tag", &self.tag)
            .field("max_size", &self.max_size)
            .finish()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<T: Serialize + DeserializeOwned> Codec<T> {
    /// A codec for `T` under `tag`, with a maximum encoded size of [`DEFAULT_MAX_SIZE`].
    pub fn new(tag: TypeTag) -> Self {
        Codec {
            tag,
            max_size: DEFAULT_MAX_SIZE,
            _type: PhantomData,
        }
    }

    /// The maximum encoded size (header included). Larger values are refused on write and read
    /// as misses. Default: [`DEFAULT_MAX_SIZE`].
    pub fn max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// The type tag.
    pub fn tag(&self) -> TypeTag {
        self.tag
    }

    /// The size limit.
    pub fn limit(&self) -> usize {
        self.max_size
    }

    /// Encodes `value` with `meta` into a new buffer.
    ///
    /// # Errors
    /// [`Error::Encode`] if serde fails, [`Error::TooLarge`] over the size limit,
    /// [`Error::InvalidTtl`] if `stale_for` is under 1 ms or shorter than `fresh_for`.
    pub fn encode(&self, value: &T, meta: &EntryMeta) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(256);
        self.encode_into(value, meta, &mut buf)?;
        Ok(buf)
    }

    /// Encodes into `buf` (cleared first), so a caller can reuse one buffer.
    ///
    /// # Errors
    /// As [`Codec::encode`].
    pub fn encode_into(&self, value: &T, meta: &EntryMeta, buf: &mut Vec<u8>) -> Result<()> {
        self.write_header(meta, 0, buf)?;
        rmp_serde::encode::write_named(buf, value).map_err(|e| Error::Encode(Arc::new(e)))?;
        if buf.len() > self.max_size {
            return Err(Error::TooLarge {
                size: buf.len(),
                max: self.max_size,
            });
        }
        let payload_len = u32::try_from(buf.len() - HEADER_LEN).map_err(|_| Error::TooLarge {
            size: buf.len(),
            max: self.max_size,
        })?;
        buf[38..42].copy_from_slice(&payload_len.to_le_bytes());
        Ok(())
    }

    /// Encodes an "absent" marker with `meta`: the value is known not to exist (negative
    /// caching). Readers see it through [`Codec::decode_optional`] as `None`.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`] as for [`Codec::encode`].
    pub fn encode_absent(&self, meta: &EntryMeta) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(HEADER_LEN);
        self.write_header(meta, FLAG_ABSENT, &mut buf)?;
        Ok(buf)
    }

    fn write_header(&self, meta: &EntryMeta, flags: u8, buf: &mut Vec<u8>) -> Result<()> {
        if meta.stale_for < Duration::from_millis(1) || meta.stale_for < meta.fresh_for {
            return Err(Error::InvalidTtl(meta.stale_for));
        }
        buf.clear();
        buf.extend_from_slice(&MAGIC);
        buf.push(FORMAT_VERSION);
        buf.push(flags);
        buf.extend_from_slice(&self.tag.0.to_le_bytes());
        buf.extend_from_slice(&meta.write_version.to_le_bytes());
        buf.extend_from_slice(&ms(meta.fresh_for).to_le_bytes());
        buf.extend_from_slice(&ms(meta.stale_for).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        debug_assert_eq!(buf.len(), HEADER_LEN);
        Ok(())
    }

    /// As [`Codec::decode`], but an "absent" marker ([`Codec::encode_absent`]) decodes as
    /// `None`.
    ///
    /// # Errors
    /// As [`Codec::decode`].
    pub fn decode_optional(&self, bytes: &[u8]) -> Result<(Header, Option<T>), DecodeError> {
        let header = decode_header(bytes)?;
        if header.type_tag != self.tag {
            return Err(DecodeError::WrongType {
                expected: self.tag,
                found: header.type_tag,
            });
        }
        if header.flags & FLAG_ABSENT != 0 {
            if header.payload_len != 0 {
                return Err(DecodeError::TrailingBytes(header.payload_len));
            }
            return Ok((header, None));
        }
        let payload = &bytes[HEADER_LEN..];
        let value =
            rmp_serde::from_slice(payload).map_err(|e| DecodeError::Payload(Arc::new(e)))?;
        Ok((header, Some(value)))
    }

    /// Decodes and validates `bytes`: magic, format version, flags, type tag, deadlines,
    /// length, then the payload.
    ///
    /// # Errors
    /// A distinct [`DecodeError`] for each way the bytes can be wrong. Never panics.
    /// An "absent" marker is [`DecodeError::Absent`] here; read it with
    /// [`Codec::decode_optional`].
    pub fn decode(&self, bytes: &[u8]) -> Result<(Header, T), DecodeError> {
        match self.decode_optional(bytes)? {
            (header, Some(value)) => Ok((header, value)),
            (_, None) => Err(DecodeError::Absent),
        }
    }
}

/// Validates and decodes the header of `bytes`, including that the payload length matches.
///
/// # Errors
/// [`DecodeError`] as for [`Codec::decode`], except the type and payload checks.
pub fn decode_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    if bytes.len() < MAGIC.len() || bytes[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        // The format version is readable before the rest of the header is.
        if bytes.len() > 4 && bytes[4] != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(bytes[4]));
        }
        return Err(DecodeError::Truncated {
            expected: HEADER_LEN,
            actual: bytes.len(),
        });
    }
    let version = bytes[4];
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let flags = bytes[5];
    if flags & !(FLAG_ABSENT | FLAG_TOMBSTONE) != 0 {
        return Err(DecodeError::UnsupportedFlags(flags));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let type_tag = TypeTag(u64_at(6));
    let write_version = u64_at(14);
    if write_version > MAX_WRITE_VERSION {
        return Err(DecodeError::BadVersion(write_version));
    }
    let fresh_ms = u64_at(22);
    let stale_ms = u64_at(30);
    if fresh_ms > stale_ms {
        return Err(DecodeError::BadDeadlines { fresh_ms, stale_ms });
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&bytes[38..42]);
    let payload_len = u32::from_le_bytes(len) as usize;
    let actual = bytes.len() - HEADER_LEN;
    if actual < payload_len {
        return Err(DecodeError::Truncated {
            expected: HEADER_LEN + payload_len,
            actual: bytes.len(),
        });
    }
    if actual > payload_len {
        return Err(DecodeError::TrailingBytes(actual - payload_len));
    }
    Ok(Header {
        flags,
        type_tag,
        meta: EntryMeta {
            write_version,
            fresh_for: Duration::from_millis(fresh_ms),
            stale_for: Duration::from_millis(stale_ms),
        },
        payload_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Price {
        cents: u64,
        currency: String,
    }

    const USER: TypeTag = TypeTag::from_name("test.User/v1");
    const PRICE: TypeTag = TypeTag::from_name("test.Price/v1");

    fn meta() -> EntryMeta {
        EntryMeta::new(Duration::from_secs(10))
            .stale_while_revalidate(Duration::from_secs(5))
            .write_version(7)
    }

    fn alice() -> User {
        User {
            id: 42,
            name: "alice".into(),
        }
    }

    #[test]
    fn round_trip_keeps_value_and_meta() {
        let codec = Codec::<User>::new(USER);
        let bytes = codec.encode(&alice(), &meta()).unwrap();
        assert_eq!(&bytes[..4], &MAGIC);
        let (header, user) = codec.decode(&bytes).unwrap();
        assert_eq!(user, alice());
        assert_eq!(header.meta, meta());
        assert_eq!(header.type_tag, USER);
    }

    #[test]
    fn another_types_bytes_never_decode() {
        // rmp-serde alone would decode a User as a Price without complaint.
        let bytes = Codec::<User>::new(USER).encode(&alice(), &meta()).unwrap();
        let err = Codec::<Price>::new(PRICE).decode(&bytes).unwrap_err();
        assert!(
            matches!(err, DecodeError::WrongType { expected, found } if expected == PRICE && found == USER)
        );
    }

    #[test]
    fn each_kind_of_bad_bytes_has_its_own_error() {
        let codec = Codec::<User>::new(USER);
        let good = codec.encode(&alice(), &meta()).unwrap();

        assert!(matches!(
            codec.decode(b"hello world"),
            Err(DecodeError::BadMagic)
        ));
        assert!(matches!(codec.decode(b""), Err(DecodeError::BadMagic)));

        let mut v = good.clone();
        v[4] = 9;
        assert!(matches!(
            codec.decode(&v),
            Err(DecodeError::UnsupportedVersion(9))
        ));
        assert!(matches!(
            codec.decode(&v[..10]),
            Err(DecodeError::UnsupportedVersion(9))
        ));

        let mut f = good.clone();
        f[5] = 1;
        assert!(matches!(
            codec.decode(&f),
            Err(DecodeError::UnsupportedFlags(1))
        ));

        // An absent marker: no payload; a value reader refuses it, an optional reader gets None.
        let absent = codec.encode_absent(&meta()).unwrap();
        assert_eq!(absent.len(), HEADER_LEN);
        assert!(matches!(codec.decode(&absent), Err(DecodeError::Absent)));
        assert_eq!(codec.decode_optional(&absent).unwrap().1, None);
        assert_eq!(codec.decode_optional(&good).unwrap().1, Some(alice()));
        let mut padded = good.clone();
        padded[5] = FLAG_ABSENT;
        assert!(matches!(
            codec.decode_optional(&padded),
            Err(DecodeError::TrailingBytes(_))
        ));

        assert!(matches!(
            codec.decode(&good[..20]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            codec.decode(&good[..good.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));

        let mut t = good.clone();
        t.push(0);
        assert!(matches!(
            codec.decode(&t),
            Err(DecodeError::TrailingBytes(1))
        ));

        let mut d = good.clone();
        d[22..30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            codec.decode(&d),
            Err(DecodeError::BadDeadlines { .. })
        ));

        // A payload that is valid MessagePack of the wrong shape, with a consistent header.
        let mut p = good[..HEADER_LEN].to_vec();
        p.push(0xc0); // nil
        p[38..42].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(codec.decode(&p), Err(DecodeError::Payload(_))));
    }

    #[test]
    fn oversized_values_are_refused_on_encode() {
        let codec = Codec::<Vec<u8>>::new(TypeTag::from_name("bytes")).max_size(1000);
        let err = codec
            .encode(&vec![7u8; 2000], &EntryMeta::new(Duration::from_secs(1)))
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge { max: 1000, .. }));
    }

    #[test]
    fn deadlines_are_validated_on_encode() {
        let codec = Codec::<User>::new(USER);
        let zero = EntryMeta::new(Duration::ZERO);
        assert!(matches!(
            codec.encode(&alice(), &zero),
            Err(Error::InvalidTtl(_))
        ));
        let mut inverted = meta();
        inverted.stale_for = Duration::from_secs(1);
        assert!(matches!(
            codec.encode(&alice(), &inverted),
            Err(Error::InvalidTtl(_))
        ));
    }

    #[test]
    fn tags_are_stable() {
        // The tag is part of the stored format: it must never change for a given name.
        assert_eq!(TypeTag::from_name("").0, 0xcbf2_9ce4_8422_2325);
        assert_eq!(TypeTag::from_name("a").0, 0xaf63_dc4c_8601_ec8c);
        assert_ne!(USER, PRICE);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = Codec::<User>::new(USER).decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = Codec::<User>::new(USER).decode(&framed);
        }
    }
}
