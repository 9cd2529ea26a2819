//! oCIS's own events: reva events on NATS JetStream (stream `main-queue`), turned into
//! foldercast's storage events.
//!
//! oCIS publishes every event, of every service, as a go-micro envelope on one subject
//! (`ocis-interfaces.md` §2.1): [`envelope`] opens it and [`reva`] maps each event that changes
//! what a folder view shows to foldercast's input contract, so the rest of the pipeline (decode,
//! dedup, recipients, ancestors, throttle) stays the one it is for every source. What a reva
//! event does not carry (an item's size, the path of an item known by id) needs the oCIS API:
//! the mapping says so ([`reva::Mapped::Lookup`]) rather than guess, and [`lookup`] completes
//! it through oCIS, or resyncs the space when nothing exact can be said.
//!
//! [`consumer`] is the source the driver reads: a durable JetStream pull consumer, lanes by
//! space, acknowledgements after the bus accepted, progress acks while oCIS is asked, dead
//! letters. [`jetstream`] writes a fixture of envelopes into a stream, as oCIS would
//! (`replay --to-nats`).

pub mod consumer;
pub mod envelope;
pub mod jetstream;
pub mod lookup;
pub mod reva;
