//! NATS JetStream (oCIS's events): the server answers, the stream exists and carries the
//! subject read, and the durable consumer's state.

use super::{Check, within};

const SYSTEM: &str = "nats";

/// What to check: the flags `consume --nats` takes.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub stream: String,
    pub subject: String,
    pub durable: String,
}

pub async fn check(t: &Target) -> Vec<Check> {
    let mut checks = Vec::new();
    let client = match within(async_nats::connect(&t.url)).await {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::fail(
                SYSTEM,
                format!("cannot reach {}: {e}", t.url),
                "check --nats: the NATS server oCIS publishes to (its OCIS_EVENTS_ENDPOINT)",
            ));
            return checks;
        }
    };
    checks.push(Check::pass(SYSTEM, format!("{}: reachable", t.url)));
    let js = async_nats::jetstream::new(client);
    let mut stream = match within(js.get_stream(&t.stream)).await {
        Ok(s) => s,
        Err(e) => {
            checks.push(Check::fail(
                SYSTEM,
                format!("stream {} is not there ({e})", t.stream),
                "oCIS creates it when it first publishes: is OCIS_EVENTS_ENDPOINT this server? Otherwise set --nats-stream to the stream oCIS uses (main-queue by default)",
            ));
            return checks;
        }
    };
    match within(stream.info()).await {
        Ok(info) => {
            let subjects = &info.config.subjects;
            if subjects.iter().any(|s| covers(s, &t.subject)) {
                checks.push(Check::pass(
                    SYSTEM,
                    format!(
                        "stream {}: {} message(s), subject {} is one of its {subjects:?}",
                        t.stream, info.state.messages, t.subject
                    ),
                ));
            } else {
                checks.push(Check::fail(
                    SYSTEM,
                    format!(
                        "stream {} carries {subjects:?}, not subject {}",
                        t.stream, t.subject
                    ),
                    "set --nats-subject to one of the stream's subjects",
                ));
            }
        }
        Err(e) => checks.push(Check::fail(
            SYSTEM,
            format!("stream {}: unreadable ({e})", t.stream),
            "check the NATS account's permissions on JetStream",
        )),
    }
    let consumer =
        within(stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>(&t.durable))
            .await;
    match consumer {
        Ok(mut c) => match within(c.info()).await {
            Ok(info) => checks.push(Check::pass(
                SYSTEM,
                format!(
                    "consumer {}: {} pending, {} awaiting acknowledgement",
                    t.durable, info.num_pending, info.num_ack_pending
                ),
            )),
            Err(e) => checks.push(Check::skipped(
                SYSTEM,
                format!("consumer {}: unreadable ({e})", t.durable),
            )),
        },
        Err(_) => checks.push(Check::pass(
            SYSTEM,
            format!(
                "consumer {}: not created yet; consume --nats creates it (--nats-start)",
                t.durable
            ),
        )),
    }
    checks
}

/// Whether a stream subject (with `*` and `>` wildcards) covers `subject`.
fn covers(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_with_wildcards() {
        use super::covers;
        assert!(covers("main-queue", "main-queue"));
        assert!(covers("events.>", "events.a.b"));
        assert!(covers("events.*", "events.a"));
        assert!(!covers("events.*", "events.a.b"));
        assert!(!covers("other", "main-queue"));
    }
}
