//! Sending a notification: the message, bounded batches through the bus, idempotency.
//!
//! The message is encoded once and its bytes shared by every recipient, as an event's are. It
//! goes out in batches of [`BATCH`] users: each batch is one bus call (on Redis, script calls of
//! a bounded size), so a notification to 100,000 users never holds Redis for long at a time,
//! and the per-user guard, keyed by the notification id, keeps a retried batch from reaching a
//! user twice.
//!
//! A notification that asks for acknowledgements (`ack`: "user" or "device") is also kept per
//! user outside the trimmed history ([`Bus::owe`]) for [`CRITICAL_RETENTION`]: each device is
//! sent it on every connect until it acknowledges (for "user", any one device's acknowledgement
//! ends it for all).
//!
//! An idempotency key (`Idempotency-Key`, `--idempotency-key`) is recorded on the bus for
//! [`IDEMPOTENCY_TTL`] with the answer of the first publish: a retry within that time publishes
//! nothing and gets that answer again, marked `replayed`. The notification id is derived from
//! the key, so even a retry of a publish that failed half-way (its record is dropped) reaches
//! the users it had not reached, and no one twice.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::audience::{self, Resolved};
use super::{AckMode, Level, Notice, NoticeError};
use crate::bus::{Bus, Outgoing, OwedNotice};
use crate::membership::MembershipResolver;

/// Users per bus call: one script call on Redis. Each user's message costs its own stream,
/// guard and channel, so a call is kept small: `bench publish` measured 11.3 ms for the longest
/// call at 500 users a batch (the bus cuts at 256 messages), too long to hold Redis for.
pub const BATCH: usize = 64;
/// How long an idempotency key makes a repeat a no-op.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest idempotency key accepted.
pub const MAX_KEY: usize = 200;

/// The message every recipient receives (`"type":"notification"` in the user-message schema).
#[derive(Debug, Serialize)]
pub struct NotificationMessage<'a> {
    #[serde(rename = "type")]
    pub message_type: &'static str,
    pub notification_id: &'a str,
    /// The same id, as every message's `event_id`: what resumes and guards key on.
    pub event_id: &'a str,
    pub level: Level,
    pub title: &'a str,
    pub body: &'a str,
    pub time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<&'a str>,
    pub ack: Option<AckMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// A planned downtime this announces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<&'a super::downtime::Window>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shutdown_advice: bool,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub notification_id: String,
    /// Users it was sent to (each once).
    pub targeted: usize,
    /// Users it was not sent to because they turned notifications off (`preferences.rs`;
    /// never for a critical one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub muted: usize,
    /// How each target was resolved.
    pub resolved: Vec<ResolvedOut>,
    /// True when an idempotency key made this call a repeat: nothing was sent again.
    pub replayed: bool,
    /// The message sent (not on a replay).
    #[serde(skip)]
    pub message: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// [`Resolved`], as it is stored with an idempotency key and answered again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedOut {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub users: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl From<&Resolved> for ResolvedOut {
    fn from(r: &Resolved) -> Self {
        ResolvedOut {
            kind: r.kind.to_owned(),
            id: r.id.clone(),
            users: r.users,
            source: r.source.map(str::to_owned),
        }
    }
}

/// How long a notification that asks for acknowledgements is kept for devices that have not
/// acknowledged it (`--critical-retention`).
pub const CRITICAL_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Publishes notifications over one bus, resolving targets with one directory.
pub struct Publisher {
    pub resolver: Option<Arc<dyn MembershipResolver>>,
    pub bus: Arc<dyn Bus>,
    /// How long an unacknowledged notification is kept ([`CRITICAL_RETENTION`]).
    pub retention: Duration,
}

/// Who asks, for idempotency keys (scoped to their publisher) and logs.
#[derive(Debug, Clone)]
pub struct Publishing<'a> {
    pub publisher: &'a str,
    pub idempotency_key: Option<&'a str>,
}

const PENDING: &str = "pending";

impl Publisher {
    pub async fn publish(
        &self,
        notice: &Notice,
        who: Publishing<'_>,
    ) -> Result<Published, NoticeError> {
        notice.validate()?;
        let record = match who.idempotency_key {
            Some(key) => {
                if key.is_empty()
                    || key.len() > MAX_KEY
                    || key.chars().any(|c| c.is_control() || c.is_whitespace())
                {
                    return Err(NoticeError::new(
                        "bad-notification",
                        format!(
                            "an idempotency key is 1 to {MAX_KEY} printable characters without spaces"
                        ),
                    ));
                }
                let record = format!("fc:idempotency:{}:{key}", who.publisher);
                let earlier = self
                    .bus
                    .record_once(&record, PENDING, IDEMPOTENCY_TTL)
                    .await
                    .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))?;
                match earlier.as_deref() {
                    None => {}
                    Some(PENDING) => {
                        return Err(NoticeError::new(
                            "in-progress",
                            "a publish with this idempotency key is still running",
                        ));
                    }
                    Some(answer) => {
                        let mut published: Published =
                            serde_json::from_str(answer).map_err(|e| {
                                NoticeError::new(
                                    "bus-unavailable",
                                    format!("an unreadable idempotency record: {e}"),
                                )
                            })?;
                        published.replayed = true;
                        return Ok(published);
                    }
                }
                Some((record, key))
            }
            None => None,
        };
        let result = self
            .send(notice, &who, record.as_ref().map(|(_, key)| *key))
            .await;
        if let Some((record, _)) = &record {
            let answer = result
                .as_ref()
                .ok()
                .and_then(|p| serde_json::to_string(p).ok());
            // A failed publish forgets its key, so that a retry sends what did not go out.
            if let Err(e) = self
                .bus
                .rerecord(record, answer.as_deref(), IDEMPOTENCY_TTL)
                .await
            {
                tracing::warn!(error = %e, "recording an idempotency key's answer failed");
            }
        }
        result
    }

    async fn send(
        &self,
        notice: &Notice,
        who: &Publishing<'_>,
        idempotency_key: Option<&str>,
    ) -> Result<Published, NoticeError> {
        let audience = audience::resolve(self.resolver.as_deref(), &notice.targets).await?;
        let (users, muted) = crate::preferences::wanting_notifications(
            &*self.bus,
            &audience.users,
            notice.level == super::Level::Critical,
        )
        .await;
        let now = chrono::Utc::now();
        let id = match idempotency_key {
            Some(key) => format!("n-{}-{key}", who.publisher),
            None => format!("n-{}-{:08x}", now.timestamp_millis(), rand::random::<u32>()),
        };
        let time = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let message = NotificationMessage {
            message_type: "notification",
            notification_id: &id,
            event_id: &id,
            level: notice.level,
            title: &notice.title,
            body: &notice.body,
            time: &time,
            link: notice.link.as_deref(),
            expires: notice.expires.as_deref(),
            ack: notice.ack,
            action: notice.action.as_ref(),
            downtime: notice.downtime.as_ref(),
            shutdown_advice: notice.shutdown_advice,
        };
        let payload = Bytes::from(
            serde_json::to_vec(&message)
                .map_err(|e| NoticeError::new("bad-notification", e.to_string()))?,
        );
        let event_id: Arc<str> = Arc::from(id.as_str());
        if let Some(mode) = notice.ack {
            // Owed first: a device that connects while the live messages go out is told on
            // connect, and a publish that fails half-way still leaves every user owing it.
            let owed = OwedNotice {
                id: event_id.clone(),
                payload: payload.clone(),
                per_device: mode == AckMode::Device,
                published_ms: now.timestamp_millis(),
            };
            for chunk in users.chunks(BATCH) {
                self.bus
                    .owe(chunk, &owed, self.retention)
                    .await
                    .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))?;
            }
        }
        for chunk in users.chunks(BATCH) {
            let batch: Vec<Outgoing> = chunk
                .iter()
                .map(|user| {
                    Outgoing::for_event(user.clone(), payload.clone(), Some(event_id.clone()))
                })
                .collect();
            self.bus
                .publish(&batch)
                .await
                .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))?;
        }
        tracing::info!(
            notification_id = %id,
            publisher = who.publisher,
            targeted = users.len(),
            muted,
            level = ?notice.level,
            "notification published"
        );
        Ok(Published {
            notification_id: id,
            targeted: users.len(),
            muted,
            resolved: audience.resolved.iter().map(ResolvedOut::from).collect(),
            replayed: false,
            message: String::from_utf8(payload.to_vec()).ok(),
        })
    }
}
