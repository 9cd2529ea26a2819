//! foldercast: storage events in, live per-user folder updates out.
//!
//! # Layout
//! The modules follow the data, one stage or one external system each:
//!
//! - [`source`]: where raw events come from (fixture JSONL or Kafka), in lanes, each event with its
//!   position and its acknowledgement.
//! - [`event`], [`path`] and [`role`]: the input contract, decoded and validated once.
//! - [`membership`]: who may see a space (resolver seam; a fixture file, or oCIS behind a cache).
//! - [`notify`]: dedup, recipients, ancestor folder deltas, the per-user message, and the
//!   throttle that rate-limits and coalesces per user.
//! - [`bus`]: hands per-user messages from the pipeline to gateways (in-process, or Redis).
//! - [`consumer`]: the one driver that runs source → notify → throttle → bus, lane by lane, and
//!   acknowledges each event once the bus accepted everything derived from it.
//! - [`gateway`]: WebSocket and SSE delivery to authenticated users; never imports the pipeline.
//! - [`demo`]: the embedded default's demo page and its simulated folder tree.
//! - [`config`] and [`commands`]: the command line, one file per subcommand.
//! - [`http`]: the HTTP client plumbing shared by the oCIS resolver and OIDC sign-in.

pub mod allocator;
pub mod bus;
pub mod commands;
pub mod config;
pub mod consumer;
pub mod dashboard;
pub mod demo;
pub mod event;
pub mod gateway;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod notice;
pub mod notify;
pub mod path;
pub mod preferences;
pub mod role;
pub mod selftest;
pub mod source;
pub mod telemetry;
