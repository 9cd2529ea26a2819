//! Which events may be acknowledged to their source: those whose every message was accepted by
//! the bus.
//!
//! An event's messages leave in two ways: at once, in the lane's batch, or later, when the rate
//! limiter releases a held change that includes them. The book numbers each event
//! ([`EventRef`]), counts its held messages, and hands back its [`Ack`] once the batch it came
//! in was published and every held message was released and published too. A lane that stops
//! without publishing simply drops the book: nothing in it was acknowledged, so the source
//! delivers those events again.

use std::collections::HashMap;

use crate::notify::throttle::EventRef;
use crate::source::Ack;

#[derive(Default)]
pub struct AckBook {
    next: EventRef,
    /// Events published in part, waiting for `held` released messages.
    waiting: HashMap<EventRef, Waiting>,
    /// Messages the rate limiter still holds, over all waiting events.
    held: usize,
}

struct Waiting {
    held: u32,
    ack: Ack,
}

impl AckBook {
    /// A number for the next event of the lane.
    pub fn number(&mut self) -> EventRef {
        self.next += 1;
        self.next
    }

    /// The batch that carried event `event` was published; `held` of its messages are still in
    /// the rate limiter. Returns the ack when nothing is held.
    pub fn published(&mut self, event: EventRef, held: u32, ack: Ack) -> Option<Ack> {
        if held == 0 {
            return Some(ack);
        }
        self.held += held as usize;
        self.waiting.insert(event, Waiting { held, ack });
        None
    }

    /// A held message of `event` was published. Returns the ack when it was the last one.
    pub fn released(&mut self, event: EventRef) -> Option<Ack> {
        let waiting = self.waiting.get_mut(&event)?;
        waiting.held = waiting.held.saturating_sub(1);
        self.held = self.held.saturating_sub(1);
        if waiting.held > 0 {
            return None;
        }
        self.waiting.remove(&event).map(|w| w.ack)
    }

    /// Events published in part and not yet acknowledged.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Messages the rate limiter still holds for them.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

    use super::*;

    fn counting(n: &Arc<AtomicU32>) -> Ack {
        let n = n.clone();
        Ack::new(move || {
            n.fetch_add(1, Relaxed);
        })
    }

    #[test]
    fn an_event_is_acknowledged_after_its_last_held_message() {
        let acked = Arc::new(AtomicU32::new(0));
        let mut book = AckBook::default();
        let (a, b) = (book.number(), book.number());
        assert_ne!(a, b);
        book.published(a, 0, counting(&acked)).unwrap().ack();
        assert!(book.published(b, 2, counting(&acked)).is_none());
        assert_eq!(book.held(), 2);
        assert!(book.released(b).is_none());
        assert_eq!(book.held(), 1);
        assert_eq!(acked.load(Relaxed), 1);
        book.released(b).unwrap().ack();
        assert_eq!(acked.load(Relaxed), 2);
        assert_eq!(book.waiting(), 0);
        assert_eq!(book.held(), 0);
        assert!(book.released(b).is_none(), "a stray release is ignored");
        assert_eq!(book.held(), 0, "and moves nothing");
    }

    #[test]
    fn a_dropped_book_acknowledges_nothing() {
        let acked = Arc::new(AtomicU32::new(0));
        let mut book = AckBook::default();
        let e = book.number();
        assert!(book.published(e, 1, counting(&acked)).is_none());
        drop(book);
        assert_eq!(acked.load(Relaxed), 0);
    }
}
