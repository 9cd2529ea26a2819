//! Event sources: where raw events come from, each with its position for logs.
//!
//! A source yields bytes, not decoded events: decoding is the pipeline's job, and a malformed
//! event must still be counted, logged with its position and skipped (or sent to a dead-letter
//! topic), which needs the original bytes.

mod fixture;
pub mod kafka;

use async_trait::async_trait;

pub use fixture::{FixtureSource, Passes};

/// One undecoded event and where it was read.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub bytes: Vec<u8>,
    /// Human-readable position: `events.jsonl:12`, later `topic/partition@offset`.
    pub position: String,
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
}

#[async_trait]
pub trait EventSource: Send {
    /// The next event, or `None` when the input is exhausted.
    async fn next_event(&mut self) -> Result<Option<RawEvent>, SourceError>;
}
