//! The JetStream side of the NATS source: the stream oCIS writes to, and (for demos and
//! tests) writing a fixture of envelopes into it, as oCIS would.
//!
//! async-nats appears only in this module.

use async_nats::jetstream;

/// Where oCIS's events are: `main-queue` (stream and subject) unless configured otherwise.
#[derive(Debug, Clone)]
pub struct StreamTarget {
    pub url: String,
    pub stream: String,
    pub subject: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("publishing to {subject}: {reason}")]
    Publish { subject: String, reason: String },
    #[error(
        "--nats-durable {name:?} is the consumer of oCIS's {name} service: sharing it would take \
         events from that service; choose a name of foldercast's own (the default is foldercast)"
    )]
    StolenDurable { name: String },
}

/// Connects to the NATS server of `target`: the client, and its JetStream context.
pub async fn connect(
    target: &StreamTarget,
) -> Result<(async_nats::Client, jetstream::Context), NatsError> {
    let client = async_nats::connect(&target.url)
        .await
        .map_err(|e| NatsError::Connect {
            url: target.url.clone(),
            reason: e.to_string(),
        })?;
    let js = jetstream::new(client.clone());
    Ok((client, js))
}

/// Creates the stream `name` with the one subject `subject` (file storage, as oCIS does) if
/// it is missing.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
) -> Result<(), NatsError> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::Stream {
        stream: name.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(())
}

/// Publishes raw envelopes to a stream, each acknowledged by JetStream before the next.
pub struct EnvelopeProducer {
    js: jetstream::Context,
    subject: String,
}

impl EnvelopeProducer {
    /// Connects, and creates the stream (one subject, file storage, as oCIS does) if missing.
    pub async fn connect(target: &StreamTarget) -> Result<Self, NatsError> {
        let (_, js) = connect(target).await?;
        ensure_stream(&js, &target.stream, &target.subject).await?;
        Ok(EnvelopeProducer {
            js,
            subject: target.subject.clone(),
        })
    }

    /// Publishes envelopes as they are (bad ones included: they are what dead letters are for),
    /// in order, and returns once JetStream stored every one: sent without waiting, then the
    /// acknowledgements awaited together.
    pub async fn publish_all(&self, envelopes: &[Vec<u8>]) -> Result<(), NatsError> {
        let failed = |e: &dyn std::fmt::Display| NatsError::Publish {
            subject: self.subject.clone(),
            reason: e.to_string(),
        };
        let mut acks = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let ack = self
                .js
                .publish(self.subject.clone(), envelope.clone().into())
                .await
                .map_err(|e| failed(&e))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| failed(&e))?;
        }
        Ok(())
    }
}
