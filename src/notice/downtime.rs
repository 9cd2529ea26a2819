//! Planned downtime: announcements that count down to it, sent once per step across every
//! gateway, kept in the bus so that a restart of any process loses none.
//!
//! An operator schedules a window (`foldercast announce-downtime`, `POST /api/downtimes`).
//! The schedule lives on the bus (Redis: a hash of downtimes and a sorted set of due
//! announcements): every gateway (and `run`) runs a [`Scheduler`] that claims due
//! announcements atomically (only one process gets each) and publishes them as notifications
//! with `downtime: {from, until}`; the last before the window carries `shutdown_advice: true`, so
//! clients stop sending requests. A client that connects between the first announcement and the
//! end of the window is sent the latest one on connect. Downtimes can be listed and cancelled.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::publish::{Publisher, Publishing};
use super::{Level, Notice, NoticeError, Targets};
use crate::bus::Bus;

/// When a service is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from: String,
    pub until: String,
}

/// How long before the window the announcements go out, by default.
pub const DEFAULT_STEPS: [Duration; 7] = [
    Duration::from_secs(3600),
    Duration::from_secs(1800),
    Duration::from_secs(600),
    Duration::from_secs(300),
    Duration::from_secs(60),
    Duration::from_secs(30),
    Duration::from_secs(10),
];

/// `POST /api/downtimes`, and what `foldercast announce-downtime` builds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DowntimeRequest {
    /// RFC 3339.
    pub from: String,
    pub until: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
    pub targets: Targets,
    /// How long before `from` each announcement goes out (`1h`, `30m`, `10s`…).
    #[serde(default)]
    pub steps: Option<Vec<String>>,
}

/// A scheduled downtime, as the bus keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Downtime {
    pub id: String,
    pub from: String,
    pub until: String,
    pub title: String,
    pub body: String,
    pub targets: Targets,
    /// When each announcement is due (ms since the epoch), in order; the last one carries
    /// the shutdown advice.
    pub due_ms: Vec<i64>,
    /// The latest announcement sent (its message), for clients that connect during the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
}

fn ms_of(time: &str, name: &str) -> Result<i64, NoticeError> {
    chrono::DateTime::parse_from_rfc3339(time)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            NoticeError::new(
                "bad-notification",
                format!("{name} {time:?} is not RFC 3339: {e}"),
            )
        })
}

impl DowntimeRequest {
    /// Validates the window and works out the announcements still to come (one at once, then
    /// one per step that is still ahead).
    pub fn schedule(self, now_ms: i64) -> Result<Downtime, NoticeError> {
        let from = ms_of(&self.from, "from")?;
        let until = ms_of(&self.until, "until")?;
        if until <= from {
            return Err(NoticeError::new(
                "bad-notification",
                "until must be after from",
            ));
        }
        if until <= now_ms {
            return Err(NoticeError::new(
                "bad-notification",
                "the window is over already",
            ));
        }
        let steps: Vec<Duration> = match &self.steps {
            None => DEFAULT_STEPS.to_vec(),
            Some(list) => list
                .iter()
                .map(|s| {
                    crate::config::parse_duration(s)
                        .map_err(|e| NoticeError::new("bad-notification", e))
                })
                .collect::<Result<_, _>>()?,
        };
        let mut due_ms: Vec<i64> = vec![now_ms];
        for step in steps {
            let due = from - i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
            if due > now_ms {
                due_ms.push(due);
            }
        }
        due_ms.sort_unstable();
        due_ms.dedup();
        let title = self
            .title
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| "Planned downtime".to_owned());
        let body = self.body.unwrap_or_else(|| {
            format!(
                "The service is down from {} until {}.",
                self.from, self.until
            )
        });
        let probe = Notice {
            level: Level::Warning,
            title: title.clone(),
            body: body.clone(),
            link: None,
            expires: Some(self.until.clone()),
            ack: None,
            action: None,
            targets: self.targets.clone(),
            downtime: None,
            shutdown_advice: false,
        };
        probe.validate()?;
        Ok(Downtime {
            id: format!("dt-{now_ms}-{:06x}", rand::random::<u32>() & 0xff_ffff),
            from: self.from,
            until: self.until,
            title,
            body,
            targets: self.targets,
            due_ms,
            last: None,
        })
    }
}

impl Downtime {
    /// The notification of announcement `step`.
    pub fn notice(&self, step: usize) -> Notice {
        Notice {
            level: Level::Warning,
            title: self.title.clone(),
            body: self.body.clone(),
            link: None,
            expires: Some(self.until.clone()),
            ack: None,
            action: None,
            targets: self.targets.clone(),
            downtime: Some(Window {
                from: self.from.clone(),
                until: self.until.clone(),
            }),
            shutdown_advice: step + 1 == self.due_ms.len(),
        }
    }

    /// Still of use at `now_ms` (its window not over).
    pub fn is_current(&self, now_ms: i64) -> bool {
        ms_of(&self.until, "until").is_ok_and(|until| until > now_ms)
    }
}

/// The bus member of announcement `step` of downtime `id`.
pub fn member(id: &str, step: usize) -> String {
    format!("{id}|{step}")
}

/// Claims and sends due announcements; one per process.
pub struct Scheduler {
    pub publisher: Arc<Publisher>,
    /// The downtimes under way that have been announced, as of the last tick: what a client that
    /// connects is told, without a bus read per connect (a reconnect storm would make one per
    /// client).
    pub announced: std::sync::RwLock<Vec<Downtime>>,
}

impl Scheduler {
    pub fn new(publisher: Arc<Publisher>) -> Self {
        Scheduler {
            publisher,
            announced: std::sync::RwLock::new(Vec::new()),
        }
    }
}

/// How often the scheduler looks for due announcements: an announcement goes out within this
/// of its time.
pub const TICK: Duration = Duration::from_millis(250);

impl Scheduler {
    fn bus(&self) -> &Arc<dyn Bus> {
        &self.publisher.bus
    }

    /// Stores a downtime and its announcements.
    pub async fn schedule(&self, downtime: &Downtime) -> Result<(), NoticeError> {
        let json = serde_json::to_string(downtime)
            .map_err(|e| NoticeError::new("bad-notification", e.to_string()))?;
        let due: Vec<(String, i64)> = downtime
            .due_ms
            .iter()
            .enumerate()
            .map(|(step, due)| (member(&downtime.id, step), *due))
            .collect();
        self.bus()
            .schedule(&downtime.id, &json, &due)
            .await
            .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))
    }

    /// The downtimes still of use, soonest first.
    pub async fn list(&self) -> Result<Vec<Downtime>, NoticeError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut all: Vec<Downtime> = self
            .bus()
            .scheduled()
            .await
            .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))?
            .iter()
            .filter_map(|json| serde_json::from_str::<Downtime>(json).ok())
            .filter(|d| d.is_current(now_ms))
            .collect();
        all.sort_by(|a, b| a.from.cmp(&b.from));
        Ok(all)
    }

    pub async fn cancel(&self, id: &str) -> Result<bool, NoticeError> {
        self.bus()
            .unschedule(id)
            .await
            .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))
    }

    /// Sends what is due, every [`TICK`], until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.send_due().await {
                tracing::warn!(error = %e, "downtime announcements: will try again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if let Ok(all) = self.list().await
                && let Ok(mut announced) = self.announced.write()
            {
                *announced = all.into_iter().filter(|d| d.last.is_some()).collect();
            }
        }
    }

    /// Claims every due announcement (no other process gets it) and publishes it.
    pub async fn send_due(&self) -> Result<usize, NoticeError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let claimed = self
            .bus()
            .claim_due(now_ms, 16)
            .await
            .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))?;
        let mut sent = 0;
        for claim in claimed {
            let Some((id, step)) = claim.rsplit_once('|') else {
                continue;
            };
            let Ok(step) = step.parse::<usize>() else {
                continue;
            };
            let Some(json) = self
                .bus()
                .scheduled()
                .await
                .map_err(|e| NoticeError::new("bus-unavailable", e.to_string()))?
                .into_iter()
                .find(|j| serde_json::from_str::<Downtime>(j).is_ok_and(|d| d.id == id))
            else {
                continue; // cancelled meanwhile
            };
            let Ok(mut downtime) = serde_json::from_str::<Downtime>(&json) else {
                continue;
            };
            let notice = downtime.notice(step);
            let key = format!("{id}-{step}");
            let who = Publishing {
                publisher: "downtime",
                idempotency_key: Some(&key),
            };
            match self.publisher.publish(&notice, who).await {
                Ok(published) => {
                    sent += 1;
                    tracing::info!(
                        downtime = id,
                        step,
                        targeted = published.targeted,
                        "downtime announced"
                    );
                    downtime.last = published.message;
                    if let Ok(json) = serde_json::to_string(&downtime) {
                        let _ = self.bus().schedule(&downtime.id, &json, &[]).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(downtime = id, step, error = %e, "a downtime announcement failed")
                }
            }
        }
        Ok(sent)
    }

    /// The latest announcements of downtimes under way that reach `user`, for a client that
    /// connects during one (from the snapshot the last tick took: at most [`TICK`] old).
    pub async fn current_for(&self, user: &str) -> Vec<String> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let all = match self.announced.read() {
            Ok(a) if !a.is_empty() => a.clone(),
            _ => return Vec::new(),
        };
        let mut out = Vec::new();
        for d in all {
            let Some(last) = d.last.clone() else { continue };
            if !d.is_current(now_ms) {
                continue;
            }
            let reaches = if d.targets.all || d.targets.users.iter().any(|u| u == user) {
                true
            } else if let Some(resolver) = &self.publisher.resolver {
                let mut found = false;
                for g in &d.targets.groups {
                    found |= resolver
                        .group_members(g)
                        .await
                        .is_ok_and(|m| m.iter().any(|u| &**u == user));
                }
                for s in &d.targets.spaces {
                    found |= resolver
                        .listers(s)
                        .await
                        .is_ok_and(|m| m.iter().any(|u| &**u == user));
                }
                found
            } else {
                false
            };
            if reaches {
                out.push(last);
            }
        }
        out
    }
}
