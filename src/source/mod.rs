//! Event sources: where raw events come from, each with its lane, its position for logs and the
//! acknowledgement that tells the source it is handled.
//!
//! A source yields bytes, not decoded events: decoding is the pipeline's job, and a malformed
//! event must still be counted, logged with its position and dead-lettered, which needs the
//! original bytes.
//!
//! The shape fits every source foldercast reads: a Kafka partition, a JetStream shard of spaces
//! or a fixture file is a **lane**, whose events are handled in order; lanes proceed in
//! parallel. Each event carries an [`Ack`]: the driver runs it only once the bus accepted every
//! message derived from the event (some may have waited in the rate limiter). An event whose
//! `Ack` is dropped unrun is delivered again by the source (Kafka: replayed from the last
//! commit; JetStream: redelivered), and the bus's per-user guard keeps that from reaching a user
//! twice.

mod fixture;
pub mod kafka;
pub mod nats;

use async_trait::async_trait;

use crate::event::Rejection;

pub use fixture::{FixtureSource, Passes};

/// An ordered sequence of events within a source (a Kafka partition, a shard of spaces).
pub type Lane = u32;

/// One undecoded event and where it was read.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub bytes: Vec<u8>,
    /// Human-readable position: `events.jsonl:12`, `topic/partition@offset`.
    pub position: String,
    /// The record's key and headers where the source has them: a dead letter keeps them.
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Set by a source that already refused the event (a reva envelope that does not open):
    /// the driver counts, logs and dead-letters it like any refused event.
    pub rejected: Option<Rejection>,
}

impl RawEvent {
    pub fn new(bytes: Vec<u8>, position: String) -> Self {
        RawEvent {
            bytes,
            position,
            key: None,
            headers: Vec::new(),
            rejected: None,
        }
    }
}

/// Tells a source that one event is fully handled. Dropping it unrun leaves the event to be
/// delivered again.
pub struct Ack(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Ack {
    pub fn new(on_ack: impl FnOnce() + Send + Sync + 'static) -> Self {
        Ack(Some(Box::new(on_ack)))
    }

    /// For a source that keeps no acknowledgements (a file read once).
    pub fn none() -> Self {
        Ack(None)
    }

    pub fn ack(mut self) {
        if let Some(on_ack) = self.0.take() {
            on_ack();
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Ack" } else { "Ack(none)" })
    }
}

/// An event as a source hands it over.
#[derive(Debug)]
pub struct SourceEvent {
    pub raw: RawEvent,
    pub lane: Lane,
    pub ack: Ack,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read events from {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("nats: {0}")]
    Nats(String),
}

#[async_trait]
pub trait EventSource: Send + Sync {
    /// The next event, or `None` when the input is exhausted.
    async fn next(&self) -> Result<Option<SourceEvent>, SourceError>;

    /// Keeps a refused event (its original bytes) where an operator can look at it, with the
    /// reason. Sources without such a place only log it (the caller already did).
    async fn dead_letter(
        &self,
        _event: &SourceEvent,
        _rejection: &Rejection,
    ) -> Result<(), SourceError> {
        Ok(())
    }

    /// Stops fetching `lane` until [`EventSource::resume`]: its queue in the driver is full and
    /// stuck (membership down). False when the source cannot pause (the driver then waits).
    fn pause(&self, _lane: Lane) -> bool {
        false
    }

    fn resume(&self, _lane: Lane) {}

    /// Called once after the driver stopped: makes the acknowledgements durable (Kafka's final
    /// commit).
    async fn close(&self) {}
}
