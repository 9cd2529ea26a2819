//! A bus that writes each message as a JSON line, `{"user":…,"message":…}`: `replay`'s output,
//! so a replay runs the same driver as a consumer and prints exactly what users would receive.
//!
//! It only publishes: nobody subscribes to a file.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Bus, BusError, Catchup, Outgoing, Position};

pub struct LinesBus {
    state: Mutex<State>,
}

struct State {
    out: Option<Box<dyn Write + Send>>,
    users: HashSet<Arc<str>>,
}

impl LinesBus {
    /// Writes to `out`; `None` only counts (a replay run for its summary).
    pub fn new(out: Option<Box<dyn Write + Send>>) -> Self {
        LinesBus {
            state: Mutex::new(State {
                out,
                users: HashSet::new(),
            }),
        }
    }

    /// Distinct users that received a message.
    pub fn users(&self) -> usize {
        self.state.lock().map(|s| s.users.len()).unwrap_or(0)
    }

    /// Flushes the output.
    pub fn flush(&self) -> std::io::Result<()> {
        match self.state.lock() {
            Ok(mut s) => s.out.as_mut().map_or(Ok(()), |o| o.flush()),
            Err(_) => Ok(()),
        }
    }
}

/// `{"user":…,"message":…}` around the already-encoded message.
pub fn write_line(w: &mut impl Write, msg: &Outgoing) -> std::io::Result<()> {
    w.write_all(b"{\"user\":")?;
    serde_json::to_writer(&mut *w, &*msg.user)?;
    w.write_all(b",\"message\":")?;
    w.write_all(&msg.payload)?;
    w.write_all(b"}\n")
}

#[async_trait]
impl Bus for LinesBus {
    async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let state = &mut *state;
        for msg in batch {
            if let Some(out) = state.out.as_mut() {
                // A closed stdout (`| head`) is the end of the output, not worth retrying.
                write_line(out, msg).map_err(|_| BusError::Closed)?;
            }
            if !state.users.contains(&msg.user) {
                state.users.insert(msg.user.clone());
            }
        }
        Ok(())
    }

    async fn subscribe(&self, _user: &Arc<str>) -> Result<(), BusError> {
        Err(BusError::Unavailable(
            "a line output has no subscribers".into(),
        ))
    }

    async fn unsubscribe(&self, _user: &Arc<str>) -> Result<(), BusError> {
        Ok(())
    }

    async fn catch_up(
        &self,
        _user: &Arc<str>,
        _since: Option<&Position>,
        _limit: usize,
    ) -> Result<Catchup, BusError> {
        Err(BusError::Unavailable(
            "a line output keeps no history".into(),
        ))
    }
}
