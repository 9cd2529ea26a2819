//! oCIS's own events: reva events on NATS JetStream (stream `main-queue`), turned into
//! foldercast's storage events.
//!
//! oCIS publishes every event, of every service, as a go-micro envelope on one subject
//! (`ocis-interfaces.md` §2.1): [`envelope`] opens it and [`reva`] maps each event that changes
//! what a folder view shows to foldercast's input contract, so the rest of the pipeline (decode,
//! dedup, recipients, ancestors, throttle) stays the one it is for every source. What a reva
//! event does not carry (an item's size, the path of an item known by id) needs the oCIS API:
//! the mapping says so ([`reva::Mapped::Lookup`]) rather than guess.
//!
//! [`jetstream`] holds the stream itself: today, writing a fixture of envelopes into it
//! (`replay --to-nats`). Not here yet (issue 11): the JetStream pull consumer (acks after the
//! bus accepted, progress acks while waiting on oCIS, bounded redeliveries, dead letters), and
//! the lookups.

pub mod consumer;
pub mod envelope;
pub mod jetstream;
pub mod lookup;
pub mod reva;
