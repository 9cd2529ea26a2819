//! The devices of a user: what the bus keeps per user and device so that a device resumes
//! where it acknowledged, even without a position of its own (a restarted app, a new tab).
//!
//! A device is named by its client (`?device=`, or `device` in the `auth` frame). Per user and
//! device: when it was first and last seen, and the last position it acknowledged (`{"type":
//! "ack","position":…}`, cumulative: an older position never moves it back). A device unseen for
//! `--device-ttl` is forgotten. Device names are scoped to their user: the keys carry the user,
//! and nothing reads another user's.

use serde::{Deserialize, Serialize};

use super::position::Position;

/// Devices kept per user: a new one beyond this replaces the one seen least recently, so that a
/// client inventing a device name per connection cannot grow its user's record without bound.
pub const MAX_DEVICES: usize = 64;

/// The device among `devices` seen least recently.
pub fn least_recent<'a>(
    devices: impl Iterator<Item = (&'a String, &'a DeviceRecord)>,
) -> Option<String> {
    devices
        .min_by_key(|(_, r)| r.last_seen_ms)
        .map(|(name, _)| name.clone())
}

/// What the bus keeps for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceRecord {
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// The last position the device acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<String>,
}

impl DeviceRecord {
    /// Seen now (a new device is first seen now).
    pub fn seen(stored: Option<&str>, now_ms: i64) -> DeviceRecord {
        let mut record = stored
            .and_then(|s| serde_json::from_str::<DeviceRecord>(s).ok())
            .unwrap_or(DeviceRecord {
                first_seen_ms: now_ms,
                ..DeviceRecord::default()
            });
        record.last_seen_ms = now_ms;
        record
    }

    /// Takes `position` as acknowledged if it is later than what the device acknowledged (or
    /// of a newer history: another epoch). False when it is not a position, or older.
    pub fn acknowledge(&mut self, position: &str) -> bool {
        let Some(new) = Position::parse(position) else {
            return false;
        };
        let later = match self.acked.as_deref().and_then(Position::parse) {
            Some(old) if old.epoch == new.epoch => new.id > old.id,
            _ => true,
        };
        if later {
            self.acked = Some(position.to_owned());
        }
        later
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_only_move_forward_within_an_epoch() {
        let mut d = DeviceRecord::seen(None, 1000);
        assert_eq!((d.first_seen_ms, d.last_seen_ms), (1000, 1000));
        assert!(d.acknowledge("0123456789abcdef:5-0"));
        assert!(!d.acknowledge("0123456789abcdef:4-0"), "never backwards");
        assert!(d.acknowledge("0123456789abcdef:5-1"));
        assert!(
            d.acknowledge("fedcba9876543210:1-0"),
            "a new history replaces the old"
        );
        assert!(!d.acknowledge("not a position"));
        let again = DeviceRecord::seen(Some(&d.encode()), 2000);
        assert_eq!((again.first_seen_ms, again.last_seen_ms), (1000, 2000));
        assert_eq!(again.acked.as_deref(), Some("fedcba9876543210:1-0"));
    }
}
