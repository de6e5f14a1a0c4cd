//! [`Publisher`]: the messages of one writing cache, numbered, and vouching for the numbers
//! it knows were published.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

use crate::message::{self, Action, Signing};
use crate::sign::Key;

/// Builds the messages of one writing cache: its origin id, its sequence, and the vouches
/// for its acknowledged messages (see [`Publisher::acknowledged`]).
#[derive(Debug, Clone)]
pub struct Publisher {
    origin: u64,
    /// Shared by clones (one writer, one numbering). A sync mutex: a few instructions
    /// under it, never across `.await`.
    numbers: Arc<Mutex<Numbers>>,
    channel: Arc<str>,
    key: Option<Key>,
}

#[derive(Debug, Default)]
struct Numbers {
    /// The last number handed out.
    last: u64,
    /// Acknowledged numbers not yet vouched for by an acknowledged message, oldest first:
    /// every message built carries them, until one that does is itself acknowledged (a
    /// vouch carried by a message whose write failed would otherwise be lost with it).
    acknowledged: VecDeque<u64>,
    /// The vouches each recent message carried, by its number (bounded).
    carried: VecDeque<(u64, Vec<u64>)>,
}

/// How many built messages' vouches are remembered until they are acknowledged.
const CARRIED: usize = 64;

impl Publisher {
    /// A publisher for `channel`, with a new random origin id, signing with `key` if given.
    pub(crate) fn new(channel: &str, key: Option<Key>) -> Publisher {
        Publisher {
            origin: fastrand::u64(1..),
            numbers: Arc::default(),
            channel: channel.into(),
            key,
        }
    }

    /// This writer's origin id: receivers skip their own messages by it.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next number, and the vouches the message that takes it carries.
    fn next(&self) -> (u64, Vec<u64>) {
        let mut numbers = self.numbers.lock();
        // Wrapping: 2^64 messages never happen, and a wrap must not panic.
        numbers.last = numbers.last.wrapping_add(1);
        let vouches: Vec<u64> = numbers.acknowledged.iter().copied().collect();
        let seq = numbers.last;
        if !vouches.is_empty() {
            numbers.carried.push_back((seq, vouches.clone()));
            if numbers.carried.len() > CARRIED {
                numbers.carried.pop_front();
            }
        }
        (seq, vouches)
    }

    fn signing(&self) -> Option<Signing<'_>> {
        self.key.as_ref().map(|key| Signing {
            key,
            channel: &self.channel,
        })
    }

    /// The message announcing a change of `key`, without its version: the writing script
    /// appends it ([`l2::Announce`]). Call [`Publisher::acknowledged`] with it once the
    /// script returned Ok.
    pub fn evict(&self, key: &str) -> Vec<u8> {
        let (seq, vouches) = self.next();
        message::evict_prefix(self.origin, seq, &vouches, key, self.signing())
    }

    /// The messages announcing a change of `key` that may carry its new value: the eviction
    /// (as [`Publisher::evict`] builds it) and, when this publisher signs, a replacement
    /// carrying `value` (the entry's envelope) at the proposed write `version`, both under one
    /// number. The write script publishes one of the two ([`l2::Carry`]); call
    /// [`Publisher::acknowledged`] with either once it returned Ok. Without a secret no value
    /// is carried: receivers could not tell it from a forgery.
    pub fn evict_or_replace(
        &self,
        key: &str,
        version: u64,
        value: &[u8],
    ) -> (Vec<u8>, Option<Vec<u8>>) {
        let (seq, vouches) = self.next();
        let signing = self.signing();
        let evict = message::evict_prefix(self.origin, seq, &vouches, key, signing);
        let replace = signing.is_some().then(|| {
            let action = Action::Replace {
                key: key.to_string(),
                version,
                value: value.to_vec(),
            };
            self.encode(seq, vouches, action)
        });
        (evict, replace)
    }

    /// Whether this publisher signs its messages (and so may carry values).
    pub fn signs(&self) -> bool {
        self.key.is_some()
    }

    /// The message asking every node to drop this namespace's L1. Call
    /// [`Publisher::acknowledged`] with it once `PUBLISH` returned Ok.
    pub fn clear_namespace(&self) -> Vec<u8> {
        self.whole(Action::ClearNamespace)
    }

    /// The message asking every node to drop all of its L1. Call
    /// [`Publisher::acknowledged`] with it once `PUBLISH` returned Ok.
    pub fn clear_all(&self) -> Vec<u8> {
        self.whole(Action::ClearAll)
    }

    /// Records that `message` (built by this publisher, with or without the version the
    /// script appended) was certainly published: the script that publishes it, or
    /// `PUBLISH`, returned Ok. The next message built vouches for it, so a receiver that
    /// never gets it raises [`GapReason::SequenceGap`]; a message never acknowledged (its
    /// write failed or was cancelled) is never missed by anyone. Bytes this publisher did not
    /// build are ignored. Each acknowledged number is carried by every message built after it
    /// until one of those is acknowledged too (so a vouch is not lost with a write that
    /// failed); at most 8 wait, older ones are dropped (less detection, never a false gap).
    ///
    /// [`GapReason::SequenceGap`]: crate::GapReason::SequenceGap
    pub fn acknowledged(&self, message: &[u8]) {
        let Some((origin, seq)) = message::origin_and_seq(message) else {
            return;
        };
        if origin != self.origin {
            return;
        }
        let mut numbers = self.numbers.lock();
        // What this message vouched for is now vouched for by a published message.
        if let Some(at) = numbers.carried.iter().position(|(s, _)| *s == seq)
            && let Some((_, vouched)) = numbers.carried.remove(at)
        {
            numbers.acknowledged.retain(|n| !vouched.contains(n));
        }
        if numbers.acknowledged.contains(&seq) {
            return;
        }
        numbers.acknowledged.push_back(seq);
        if numbers.acknowledged.len() > message::MAX_VOUCHES {
            numbers.acknowledged.pop_front();
        }
    }

    fn whole(&self, action: Action) -> Vec<u8> {
        let (seq, vouches) = self.next();
        self.encode(seq, vouches, action)
    }

    /// Message `seq` of this publisher, sent now, signed if it signs.
    fn encode(&self, seq: u64, vouches: Vec<u64>, action: Action) -> Vec<u8> {
        message::encode(
            &message::Message {
                origin: self.origin,
                seq,
                sent_micros: message::now_micros(),
                vouches,
                action,
                signature: None,
            },
            self.signing(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher() -> Publisher {
        Publisher {
            origin: 5,
            numbers: Arc::default(),
            channel: "c".into(),
            key: None,
        }
    }

    fn decoded(mut bytes: Vec<u8>) -> message::Message {
        if bytes[5] == 1 {
            bytes.extend_from_slice(&1u64.to_le_bytes());
        }
        message::decode(&bytes).unwrap()
    }

    #[test]
    fn only_acknowledged_numbers_are_vouched_for_until_a_published_message_did_and_at_most_eight() {
        let p = publisher();
        let m1 = p.evict("a");
        let _burnt = p.evict("b");
        p.acknowledged(&m1);
        let m3 = decoded(p.evict("c"));
        assert_eq!((m3.seq, m3.vouches), (3, vec![1]));
        // 3's write failed (never acknowledged): the next message carries 1 again.
        let m4 = p.clear_namespace();
        assert_eq!(decoded(m4.clone()).vouches, vec![1]);
        // 4 is published: 1 has been vouched for by a published message; 4 waits its turn.
        p.acknowledged(&m4);
        let m5 = p.clear_all();
        assert_eq!(decoded(m5.clone()).vouches, vec![4]);
        // Bytes of another publisher, or not a message: ignored.
        p.acknowledged(&publisher_with_origin(6).evict("x"));
        p.acknowledged(b"junk");
        p.acknowledged(&m5);
        assert_eq!(decoded(p.evict("y")).vouches, vec![5]);
        // Twelve built and acknowledged without any carrying the others' vouches being
        // acknowledged first: the newest eight wait.
        let p = publisher();
        let built: Vec<Vec<u8>> = (0..12).map(|_| p.evict("k")).collect();
        for m in &built {
            p.acknowledged(m);
            p.acknowledged(m); // twice: once
        }
        let next = decoded(p.evict("z"));
        assert_eq!(
            next.vouches,
            (5..=12).collect::<Vec<u64>>(),
            "the newest eight"
        );
    }

    fn publisher_with_origin(origin: u64) -> Publisher {
        Publisher {
            origin,
            ..publisher()
        }
    }

    #[test]
    fn the_numbering_wraps_instead_of_panicking() {
        let p = publisher();
        p.numbers.lock().last = u64::MAX - 1;
        assert_eq!(decoded(p.evict("a")).seq, u64::MAX);
        assert_eq!(decoded(p.evict("b")).seq, 0);
    }
}
