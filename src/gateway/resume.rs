//! Resume: where a connection starts in its user's history, and what it is sent to get there.
//!
//! The order is what makes it exact (the recipe of Centrifugo's recovery, and the reference's
//! "contract points"): the connection is attached to the live feed first (its session queue
//! collects whatever arrives), then the history is read after the client's position in one
//! atomic read. Live frames that the replay already holds are then dropped by the [`Cursor`],
//! which every delivered frame passes: a frame at or below the last position sent is a
//! duplicate. So there is neither a gap nor a repeat at the boundary, and frames go out in id
//! order.
//!
//! All or nothing: a position the history cannot continue from (another epoch, trimmed past,
//! more than `--resume-max` behind, malformed, another user's, from the future) replays
//! nothing, and the client is told why so it can refetch what it shows.

use std::sync::Arc;

use bytes::Bytes;

use super::hub::{Hub, frames_of};
use super::protocol::resumed_frame;
use super::session::SharedFrame;
use crate::bus::{BusError, Catchup, LostReason, Position, StreamId};

/// The longest epoch a cursor holds inline (foldercast's are 14 characters). A longer one (not
/// foldercast's) never matches, so frames carrying it count as a new epoch: told, never lost.
const EPOCH_INLINE: usize = 32;

/// The last position a connection delivered. Held inline, without a heap allocation: one lives
/// in every connection, and a small allocation per connection made while the connection starts
/// pins allocator pages (session 5 measured idle connections 0.4 KB larger with a boxed epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    epoch: [u8; EPOCH_INLINE],
    epoch_len: u8,
    last: StreamId,
    /// Whether anything was delivered through this cursor yet.
    moved: bool,
}

/// What to do with a frame, given what the connection already delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Deliver,
    /// At or below the last position delivered: the replay or an earlier frame had it.
    Duplicate,
    /// The user's history has a new epoch (it was lost while the connection was open): the
    /// client must be told, since what came before it in the old epoch may be gone.
    NewEpoch,
}

impl Cursor {
    /// A cursor at `position` (`<epoch>:<id>`).
    pub fn at(position: &str) -> Cursor {
        let (epoch, last) = Position::split(position).unwrap_or(("", StreamId::ZERO));
        let mut cursor = Cursor {
            epoch: [0; EPOCH_INLINE],
            epoch_len: 0,
            last,
            moved: false,
        };
        cursor.set_epoch(epoch);
        cursor
    }

    fn epoch(&self) -> &str {
        std::str::from_utf8(self.epoch_bytes()).unwrap_or("")
    }

    /// Compared as bytes on the delivery path: no UTF-8 check per frame.
    fn epoch_bytes(&self) -> &[u8] {
        &self.epoch[..usize::from(self.epoch_len)]
    }

    fn set_epoch(&mut self, epoch: &str) {
        let len = if epoch.len() <= EPOCH_INLINE {
            epoch.len()
        } else {
            0
        };
        self.epoch[..len].copy_from_slice(&epoch.as_bytes()[..len]);
        self.epoch_len = len as u8;
    }

    /// Whether the frame at `position` goes out; moves the cursor when it does.
    pub fn admit(&mut self, position: &str) -> Admit {
        let Some((epoch, id)) = Position::split(position) else {
            // Never written by foldercast's buses; let it through rather than lose it.
            return Admit::Deliver;
        };
        if epoch.is_empty() || epoch.as_bytes() != self.epoch_bytes() {
            self.set_epoch(epoch);
            self.last = id;
            self.moved = true;
            return Admit::NewEpoch;
        }
        if id <= self.last {
            return Admit::Duplicate;
        }
        self.last = id;
        self.moved = true;
        Admit::Deliver
    }

    pub fn position(&self) -> String {
        format!("{}:{}", self.epoch(), self.last)
    }

    /// Whether anything was delivered through it.
    pub fn moved(&self) -> bool {
        self.moved
    }
}

/// Where a connection starts.
pub struct Start {
    /// At the position the replay continues from, or at the top.
    pub cursor: Cursor,
    /// The `resumed` frame, when the client asked to resume.
    pub resumed: Option<Resumed>,
    /// The history after the client's position, in order (empty unless recovered).
    pub replay: Vec<SharedFrame>,
}

/// The outcome of a resume, as the `resumed` frame reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    pub recovered: bool,
    pub position: String,
    pub reason: Option<LostReason>,
}

impl Resumed {
    /// The frame at `position` opened a new epoch while the connection was open: whatever came
    /// before it may be gone. The client is told (and refetches); that frame and the ones after
    /// it follow, from the start of the new epoch.
    pub fn epoch_lost(position: &str) -> Resumed {
        let epoch = Position::split(position).map_or("", |(epoch, _)| epoch);
        Resumed {
            recovered: false,
            position: format!("{epoch}:{}", StreamId::ZERO),
            reason: Some(LostReason::UnknownEpoch),
        }
    }

    /// The frame, counting the replayed frames that `replayed` says pass the connection's filter.
    pub fn frame(&self, replayed: usize) -> String {
        resumed_frame(
            self.recovered,
            replayed,
            &self.position,
            self.reason.map(LostReason::as_str),
        )
    }
}

/// Reads where `user`'s connection starts: at the top without `since`; with it, the replay
/// after it or the reason there is none. Call it after the connection was registered (attached
/// to the live feed).
pub async fn start(
    hub: &Hub,
    user: &Arc<str>,
    since: Option<&str>,
    limit: usize,
) -> Result<Start, BusError> {
    let Some(since) = since else {
        let top = hub.bus().catch_up(user, None, limit).await?;
        return Ok(Start {
            cursor: Cursor::at(top.top()),
            resumed: None,
            replay: Vec::new(),
        });
    };
    let catchup = match Position::parse(since) {
        Some(position) => hub.bus().catch_up(user, Some(&position), limit).await?,
        None => Catchup::Lost {
            reason: LostReason::BadPosition,
            top: hub
                .bus()
                .catch_up(user, None, limit)
                .await?
                .top()
                .to_owned(),
        },
    };
    hub.stats.count_resume(match &catchup {
        Catchup::Recovered { .. } => "recovered",
        Catchup::Lost { reason, .. } => reason.as_str(),
    });
    Ok(match catchup {
        Catchup::Recovered { entries, top } => {
            let messages: Vec<(&str, Bytes)> = entries
                .iter()
                .map(|(position, payload)| (&**position, payload.clone()))
                .collect();
            Start {
                cursor: Cursor::at(since),
                resumed: Some(Resumed {
                    recovered: true,
                    position: top,
                    reason: None,
                }),
                replay: frames_of(&messages),
            }
        }
        Catchup::Lost { reason, top } => Start {
            cursor: Cursor::at(&top),
            resumed: Some(Resumed {
                recovered: false,
                position: top,
                reason: Some(reason),
            }),
            replay: Vec::new(),
        },
    })
}

/// After a gap in the live feed: the history after the connection's last position, or (when
/// the history cannot continue from there) a `resumed` frame saying so, the cursor moved to the
/// top. A recovered catch-up is silent: the client just sees every message, in order.
pub async fn after_gap(
    hub: &Hub,
    user: &Arc<str>,
    cursor: &mut Cursor,
    limit: usize,
) -> Result<(Option<Resumed>, Vec<SharedFrame>), BusError> {
    let start = start(hub, user, Some(&cursor.position()), limit).await?;
    let moved = cursor.moved;
    *cursor = start.cursor;
    cursor.moved = moved;
    Ok(match start.resumed {
        Some(resumed) if !resumed.recovered => {
            tracing::warn!(%user, reason = ?resumed.reason, "a gap in the live feed could not be filled: told the client");
            (Some(resumed), Vec::new())
        }
        _ => (None, start.replay),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_drops_what_was_sent_and_notices_a_new_epoch() {
        let mut c = Cursor::at("aaaaaaaaaaaaaa:5-0");
        assert!(!c.moved());
        assert_eq!(c.admit("aaaaaaaaaaaaaa:5-0"), Admit::Duplicate);
        assert_eq!(c.admit("aaaaaaaaaaaaaa:4-9"), Admit::Duplicate);
        assert_eq!(c.admit("aaaaaaaaaaaaaa:5-1"), Admit::Deliver);
        assert_eq!(c.admit("aaaaaaaaaaaaaa:12-0"), Admit::Deliver);
        assert_eq!(c.position(), "aaaaaaaaaaaaaa:12-0");
        assert!(c.moved());
        assert_eq!(c.admit("bbbbbbbbbbbbbb:3-0"), Admit::NewEpoch);
        assert_eq!(c.admit("bbbbbbbbbbbbbb:3-0"), Admit::Duplicate);
        assert_eq!(c.admit("bbbbbbbbbbbbbb:4-0"), Admit::Deliver);
        assert_eq!(c.admit("not a position"), Admit::Deliver);
    }
}
