//! A minimal Server-Sent Events reader over a reqwest response, parsing as a browser does.

use std::time::Duration;

use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(15);

/// A minimal SSE reader over a reqwest response.
pub struct Sse {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

#[derive(Debug, Default, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub comment: Option<String>,
    pub retry: Option<u64>,
}

impl Sse {
    pub async fn open(url: &str, bearer: Option<&str>) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(url);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("sse request")
    }

    pub fn new(resp: reqwest::Response) -> Sse {
        Sse {
            stream: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        ev.comment = Some(c.trim().to_owned());
                    } else if let Some((k, v)) = line.split_once(':') {
                        let v = v.strip_prefix(' ').unwrap_or(v);
                        match k {
                            "id" => ev.id = Some(v.to_owned()),
                            "event" => ev.event = Some(v.to_owned()),
                            "data" => ev.data.push_str(v),
                            "retry" => ev.retry = v.parse().ok(),
                            _ => {}
                        }
                    }
                }
                return Some(ev);
            }
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("no SSE data in time")
            {
                Some(Ok(chunk)) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                _ => return None,
            }
        }
    }

    /// The next event a browser would dispatch, `ready` aside: not a comment.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let e = self.next().await?;
            if (e.event.is_some() || !e.data.is_empty()) && e.event.as_deref() != Some("ready") {
                return Some(e);
            }
        }
    }
}
