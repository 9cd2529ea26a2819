//! One buffer for the same payload pushed to many users.
//!
//! Every user has a channel of their own, so an event with 100 recipients arrives at a gateway
//! as 100 pushes holding the same bytes. Queued for clients that read slowly, those copies are
//! what let a few large events pin gigabytes (issue 12). The subscriber keeps the payloads it
//! saw last, by content, and hands every later recipient of the same bytes the buffer it already
//! holds: the 100 queues then share one copy.
//!
//! Bounded in entries and bytes, oldest forgotten first: a payload seen again after it was
//! forgotten just gets a buffer of its own. Small payloads are not worth a lookup.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use bytes::Bytes;

/// Payloads shorter than this are not shared: for them a lookup (and a copy per distinct
/// payload) cost more than the copies they save. At 256 B the gateway's CPU per delivered
/// message rose by a quarter in `bench fanout` (300 B payloads, all distinct).
pub(crate) const MIN_SHARED: usize = crate::bus::OWN_BUFFER_FROM;
/// Distinct payloads remembered.
const MAX_ENTRIES: usize = 1024;
/// Bytes of remembered payloads (each a copy of its own, so nothing else is pinned).
const MAX_BYTES: usize = 8 << 20;

/// Length and a hash of the ends: cheap, and equal payloads always agree. Bytes compare
/// before a buffer is reused.
type Key = (usize, u64);

fn key_of(payload: &[u8]) -> Key {
    let mut hasher = DefaultHasher::new();
    let ends = 64.min(payload.len());
    payload[..ends].hash(&mut hasher);
    payload[payload.len() - ends..].hash(&mut hasher);
    (payload.len(), hasher.finish())
}

#[derive(Default)]
pub(super) struct SharedPayloads {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_key: HashMap<Key, Bytes>,
    order: VecDeque<Key>,
    bytes: usize,
}

impl SharedPayloads {
    /// The buffer to keep for `payload`: one already held with the same bytes, or a copy of
    /// `payload` of its own (so the push it is a slice of is not pinned), remembered.
    /// Shorter than [`MIN_SHARED`]: handed back as it is (a slice of the push, which the
    /// sink copies if it keeps it: `DeliverySink`). Too large to remember: a copy of its own.
    pub(super) fn share(&self, payload: Bytes) -> Bytes {
        if payload.len() < MIN_SHARED {
            return payload;
        }
        if payload.len() > MAX_BYTES / 4 {
            return Bytes::copy_from_slice(&payload);
        }
        let Ok(mut state) = self.state.lock() else {
            return payload;
        };
        let key = key_of(&payload);
        if let Some(held) = state.by_key.get(&key)
            && held[..] == payload[..]
        {
            return held.clone();
        }
        let own = Bytes::copy_from_slice(&payload);
        let state = &mut *state;
        match state.by_key.insert(key, own.clone()) {
            // Same ends, other bytes: the newer takes the place.
            Some(replaced) => state.bytes = state.bytes - replaced.len() + own.len(),
            None => {
                state.order.push_back(key);
                state.bytes += own.len();
            }
        }
        while state.order.len() > MAX_ENTRIES || state.bytes > MAX_BYTES {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            if let Some(gone) = state.by_key.remove(&oldest) {
                state.bytes -= gone.len();
            }
        }
        own
    }

    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        self.state
            .lock()
            .map(|s| (s.by_key.len(), s.bytes))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(fill: u8, len: usize) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    #[test]
    fn recipients_of_the_same_bytes_share_one_buffer() {
        let shared = SharedPayloads::default();
        let first = shared.share(payload(b'a', 4000));
        // Another push's buffer with the same bytes: the first one is handed back.
        let second = shared.share(payload(b'a', 4000));
        assert_eq!(first.as_ptr(), second.as_ptr());
        // Different bytes with the same ends are not confused.
        let mut other = vec![b'a'; 4000];
        other[2000] = b'b';
        let third = shared.share(Bytes::from(other.clone()));
        assert_eq!(&third[..], &other[..]);
        assert_ne!(third.as_ptr(), first.as_ptr());
    }

    #[test]
    fn the_held_copy_does_not_pin_the_push_it_came_from() {
        let shared = SharedPayloads::default();
        let push = Bytes::from(vec![b'p'; 10_000]);
        let kept = shared.share(push.slice(100..4100));
        let start = push.as_ptr() as usize;
        let at = kept.as_ptr() as usize;
        assert!(at < start || at >= start + push.len(), "a copy of its own");
    }

    #[test]
    fn small_payloads_pass_through() {
        let shared = SharedPayloads::default();
        let small = payload(b's', MIN_SHARED - 1);
        assert_eq!(shared.share(small.clone()).as_ptr(), small.as_ptr());
        assert_eq!(shared.held(), (0, 0));
    }

    #[test]
    fn what_is_held_stays_bounded() {
        let shared = SharedPayloads::default();
        for i in 0..5000u32 {
            let mut bytes = vec![0u8; 4096];
            bytes[..4].copy_from_slice(&i.to_le_bytes());
            shared.share(Bytes::from(bytes));
        }
        let (entries, bytes) = shared.held();
        assert!(
            entries <= MAX_ENTRIES && bytes <= MAX_BYTES,
            "{entries} {bytes}"
        );
        assert_eq!(bytes, entries * 4096);
    }
}
