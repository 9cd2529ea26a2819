//! Positions in a user's history, and the rule that decides whether a client can resume.
//!
//! A position is `<epoch>:<id>`. The id is the per-user stream entry id (`<ms>-<seq>` on Redis,
//! a counter in the in-process bus); the epoch names one lifetime of that user's history and
//! changes whenever the history was lost (flushed, evicted, expired, Redis restarted without
//! persistence). Ids are compared as numbers, never guessed from arithmetic: Redis ids have holes.
//!
//! An epoch ends in a short check of the user it belongs to ([`EPOCH_CHECK_LEN`] hex digits), so
//! a position copied from another user is told apart from a lost history (`bad-position` rather
//! than `unknown-epoch`). It is not a secret: positions never grant access, the connection's
//! user decides whose history is read.
//!
//! [`decide`] is the whole resume rule, written once for every bus: all or nothing, never a
//! partial replay (`docs` in the README, "Resume").

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// Hex digits at the end of an epoch that check the user.
pub const EPOCH_CHECK_LEN: usize = 6;

/// A stream entry id: `<ms>-<seq>`, or a bare counter (read as `<n>-0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// One pass over the bytes: this runs for every frame a connection sends (its cursor).
    pub fn parse(s: &str) -> Option<StreamId> {
        let bytes = s.as_bytes();
        match bytes.iter().position(|b| *b == b'-') {
            Some(dash) => Some(StreamId {
                ms: decimal(&bytes[..dash])?,
                seq: decimal(&bytes[dash + 1..])?,
            }),
            None => Some(StreamId {
                ms: decimal(bytes)?,
                seq: 0,
            }),
        }
    }
}

/// A run of 1 to 20 ASCII digits as a `u64` (`None` on anything else or on overflow).
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, b| {
        let digit = b.wrapping_sub(b'0');
        (digit <= 9)
            .then(|| n.checked_mul(10)?.checked_add(u64::from(digit)))
            .flatten()
    })
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// `<epoch>:<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Box<str>,
    pub id: StreamId,
}

impl Position {
    /// Parses a client's position; `None` for anything that is not `<epoch>:<id>` with a
    /// well-formed epoch (hex, long enough to hold its user check) and id.
    pub fn parse(s: &str) -> Option<Position> {
        let (epoch, id) = s.split_once(':')?;
        if epoch.len() < EPOCH_CHECK_LEN + 1
            || epoch.len() > 64
            || !epoch.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        Some(Position {
            epoch: epoch.into(),
            id: StreamId::parse(id)?,
        })
    }

    /// Just the id of a frame's position (`<epoch>:<id>`), on the delivery path.
    pub fn split(s: &str) -> Option<(&str, StreamId)> {
        // A byte scan: `split_once`'s searcher cost more than the rest of the parse.
        let colon = s.bytes().position(|b| b == b':')?;
        Some((&s[..colon], StreamId::parse(&s[colon + 1..])?))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.id)
    }
}

/// Whether `epoch` was made for `user` (its last digits are the user's check).
pub fn epoch_is_for(epoch: &str, user_check: &str) -> bool {
    epoch.len() > EPOCH_CHECK_LEN && epoch.ends_with(user_check)
}

/// Why a resume did not recover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// The position's epoch is not the user's current one: the history it points into is gone.
    UnknownEpoch,
    /// Entries after the position were trimmed (or expired): the gap cannot be filled.
    TooOld,
    /// More than the replay limit was missed.
    OverLimit,
    /// Not a position of this user's history: garbage, another user's, or from the future.
    BadPosition,
}

impl LostReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::UnknownEpoch => "unknown-epoch",
            LostReason::TooOld => "too-old",
            LostReason::OverLimit => "over-limit",
            LostReason::BadPosition => "bad-position",
        }
    }
}

/// A user's history as one atomic read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryView {
    /// The user's current epoch.
    pub epoch: Arc<str>,
    /// The check that ends every epoch of this user.
    pub user_check: Box<str>,
    /// The last id ever given in this epoch (`0-0` if none).
    pub top: StreamId,
    /// The lowest id a client may hold and still recover: nothing after it is missing. `0-0`
    /// while nothing was ever removed; the first entry still held once the head was trimmed (the
    /// highest id trimmed away is not recorded by Redis 7.0's trimming, so a client whose own
    /// entry was the last trimmed is told `too-old` too); the top while the entries are gone.
    pub safe_from: StreamId,
}

impl HistoryView {
    pub fn top_position(&self) -> String {
        format!("{}:{}", self.epoch, self.top)
    }
}

/// What a resume yields: all the entries after the position, or none and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Catchup {
    Recovered {
        /// `(position, payload)` in id order.
        entries: Vec<(Arc<str>, Bytes)>,
        /// The top position when the history was read.
        top: String,
    },
    Lost {
        reason: LostReason,
        top: String,
    },
}

impl Catchup {
    pub fn top(&self) -> &str {
        match self {
            Catchup::Recovered { top, .. } | Catchup::Lost { top, .. } => top,
        }
    }
}

/// Whether a resume from `since` can recover, before any entry is read: `Ok(true)` when there
/// is something to read, `Ok(false)` when the position is the top (nothing was missed).
///
/// The rule (all of it, in order):
/// - another user's epoch, or an id above the top: `bad-position`;
/// - an epoch that is not the current one: `unknown-epoch`;
/// - the id is the top: recovered, nothing to replay (even if the entries have expired);
/// - an id below [`HistoryView::safe_from`]: `too-old`. Entries are only ever lost from the
///   head (trimming, expiry), so from there on nothing after the client's id is missing, and no
///   guess is made from the ids' arithmetic (they have holes).
pub fn check(view: &HistoryView, since: &Position) -> Result<bool, LostReason> {
    if !epoch_is_for(&since.epoch, &view.user_check) {
        return Err(LostReason::BadPosition);
    }
    if *since.epoch != *view.epoch {
        return Err(LostReason::UnknownEpoch);
    }
    if since.id > view.top {
        return Err(LostReason::BadPosition);
    }
    if since.id == view.top {
        return Ok(false);
    }
    if since.id < view.safe_from {
        return Err(LostReason::TooOld);
    }
    Ok(true)
}

/// The whole decision: `after` holds the entries after `since` as read in the same atomic view
/// (at most `limit + 1` of them, so that "more than the limit" can be told).
pub fn decide(
    view: &HistoryView,
    since: &Position,
    after: Vec<(StreamId, Bytes)>,
    limit: usize,
) -> Catchup {
    let top = view.top_position();
    match check(view, since) {
        Err(reason) => Catchup::Lost { reason, top },
        Ok(false) => Catchup::Recovered {
            entries: Vec::new(),
            top,
        },
        Ok(true) if after.len() > limit => Catchup::Lost {
            reason: LostReason::OverLimit,
            top,
        },
        Ok(true) => Catchup::Recovered {
            entries: after
                .into_iter()
                .filter(|(id, _)| *id > since.id)
                .map(|(id, payload)| (Arc::from(format!("{}:{id}", view.epoch)), payload))
                .collect(),
            top,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(top: u64, safe_from: u64) -> HistoryView {
        HistoryView {
            epoch: Arc::from("0123456789abcdef"),
            user_check: "abcdef".into(),
            top: StreamId { ms: top, seq: 0 },
            safe_from: StreamId {
                ms: safe_from,
                seq: 0,
            },
        }
    }

    fn at(ms: u64) -> Position {
        Position {
            epoch: "0123456789abcdef".into(),
            id: StreamId { ms, seq: 0 },
        }
    }

    /// The parse as it was written first (`str::parse` after a digit check), which the
    /// one-pass parse must agree with on every input.
    fn reference_parse(s: &str) -> Option<StreamId> {
        let digits = |d: &str| {
            (!d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit()))
                .then(|| d.parse::<u64>().ok())
                .flatten()
        };
        match s.split_once('-') {
            Some((ms, seq)) => Some(StreamId {
                ms: digits(ms)?,
                seq: digits(seq)?,
            }),
            None => Some(StreamId {
                ms: digits(s)?,
                seq: 0,
            }),
        }
    }

    proptest! {
        #[test]
        fn the_one_pass_parse_agrees_with_the_reference(
            s in "[0-9]{0,21}(-[0-9]{0,21})?|[-0-9a+ ]{0,12}|\\PC{0,8}",
            ms in any::<u64>(),
            seq in any::<u64>(),
        ) {
            prop_assert_eq!(StreamId::parse(&s), reference_parse(&s));
            let id = StreamId { ms, seq };
            prop_assert_eq!(StreamId::parse(&id.to_string()), Some(id));
            let position = format!("00ff00abcdef:{id}");
            prop_assert_eq!(Position::split(&position), Some(("00ff00abcdef", id)));
        }
    }

    #[test]
    fn parses_ids_and_positions() {
        assert_eq!(
            StreamId::parse("1700000000000-3"),
            Some(StreamId {
                ms: 1_700_000_000_000,
                seq: 3
            })
        );
        assert_eq!(StreamId::parse("42"), Some(StreamId { ms: 42, seq: 0 }));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "+1",
            " 1",
            "1 ",
            "99999999999999999999999",
        ] {
            assert_eq!(StreamId::parse(bad), None, "{bad:?}");
        }
        let p = Position::parse("00ff00abcdef:17-2").unwrap();
        assert_eq!(p.to_string(), "00ff00abcdef:17-2");
        for bad in [
            "",
            ":",
            "abc:1-0",
            "zzzzzzzzzz:1-0",
            "00ff00abcdef",
            "00ff00abcdef:x",
            "00ff00abcdef:1:2",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_rule_names_each_reason() {
        let v = view(10, 5);
        assert_eq!(check(&v, &at(10)), Ok(false), "at the top");
        assert_eq!(check(&v, &at(5)), Ok(true), "at the first entry held");
        assert_eq!(check(&v, &at(4)), Err(LostReason::TooOld), "below it");
        assert_eq!(
            check(&v, &at(11)),
            Err(LostReason::BadPosition),
            "from the future"
        );
        let mut other_epoch = at(5);
        other_epoch.epoch = "ffffffffffabcdef".into();
        assert_eq!(check(&v, &other_epoch), Err(LostReason::UnknownEpoch));
        let mut other_user = at(5);
        other_user.epoch = "0123456789123456".into();
        assert_eq!(check(&v, &other_user), Err(LostReason::BadPosition));
        // The entries expired with nothing missed: the top still recovers; below it does not.
        let expired = view(10, 10);
        assert_eq!(check(&expired, &at(10)), Ok(false));
        assert_eq!(check(&expired, &at(9)), Err(LostReason::TooOld));
        // A client that connected before the first message (position 0-0) recovers everything.
        assert_eq!(check(&view(10, 0), &at(0)), Ok(true));
    }

    proptest! {
        /// From any position inside retention, resume yields exactly the suffix; from any other
        /// position (trimmed past, from the future, or more than the limit), nothing at all.
        #[test]
        fn resume_yields_the_suffix_or_nothing(
            gaps in proptest::collection::vec(1u64..5, 1..60),
            trimmed in 0usize..60,
            pick in 0u64..300,
            limit in 1usize..40,
        ) {
            // A history with holes in its ids, the first `trimmed` entries trimmed away.
            let ids: Vec<u64> = gaps.iter().scan(0, |at, g| { *at += g; Some(*at) }).collect();
            let trimmed = trimmed.min(ids.len());
            let held: Vec<u64> = ids[trimmed..].to_vec();
            let top = *ids.last().unwrap();
            let safe_from = match (trimmed, held.first()) {
                (0, _) => 0,
                (_, Some(first)) => *first,
                (_, None) => top,
            };
            let v = view(top, safe_from);
            // Any id a client could hold: delivered ids, holes, past the top.
            let since = at(pick % (top + 3));
            let after: Vec<(StreamId, Bytes)> = held
                .iter()
                .filter(|id| **id > since.id.ms)
                .take(limit + 1)
                .map(|id| (StreamId { ms: *id, seq: 0 }, Bytes::from(id.to_string())))
                .collect();
            let missed: Vec<u64> = ids.iter().copied().filter(|id| *id > since.id.ms).collect();
            let recoverable = since.id.ms <= top
                && missed.iter().all(|id| held.contains(id))
                && missed.len() <= limit;
            match decide(&v, &since, after, limit) {
                Catchup::Recovered { entries, .. } => {
                    prop_assert!(recoverable);
                    let got: Vec<String> = entries.iter().map(|(_, p)| String::from_utf8(p.to_vec()).unwrap()).collect();
                    let want: Vec<String> = missed.iter().map(u64::to_string).collect();
                    prop_assert_eq!(got, want, "exactly the suffix");
                    prop_assert!(entries.iter().all(|(pos, _)| pos.starts_with("0123456789abcdef:")));
                }
                Catchup::Lost { reason, top: at_top } => {
                    // Between the last id trimmed and the first held, the rule cannot tell
                    // whether the client's own entry was the last trimmed: it says too-old.
                    let undecidable = trimmed > 0 && since.id.ms >= ids[trimmed - 1] && since.id.ms < safe_from;
                    prop_assert!(!recoverable || undecidable, "{:?} for a recoverable position", reason);
                    prop_assert_eq!(at_top, format!("0123456789abcdef:{top}-0"));
                }
            }
        }
    }
}
