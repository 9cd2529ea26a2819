//! What foldercast's integration tests (`tests/`) and benchmarks (`bench/`) share, so that each
//! speaks to the gateway the same way: one WebSocket client instead of a copy per file.

pub mod ws;
