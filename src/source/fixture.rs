//! Events from a JSONL fixture file (one event per line) or from standard input (`-`).
//!
//! In a loop (the embedded demo) every pass after the first gives events fresh ids (so
//! de-duplication does not silence them) and every pass gives them the current time (so the
//! demo shows live mtimes). Lines that are not JSON objects pass through untouched, to be
//! rejected downstream like any bad input.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use super::{Ack, EventSource, RawEvent, SourceError, SourceEvent};

/// How many times to read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// Once, events exactly as written.
    Once,
    /// `n` passes (0 = forever), each with fresh ids and times.
    Loop(u64),
}

/// A file is one lane (lane 0): its events are handled in the order they are written. Nothing
/// is acknowledged to a file; a rejected line is counted and logged with its position.
pub struct FixtureSource {
    reading: tokio::sync::Mutex<Reading>,
}

struct Reading {
    path: PathBuf,
    passes: Passes,
    pass: u64,
    line: u64,
    reader: Box<dyn AsyncBufRead + Send + Unpin>,
    /// Bytes of a line kept at most; the rest of a longer line is skipped unread into memory,
    /// and what is kept (one byte over the limit) is rejected downstream as `too-large`.
    max_line: usize,
}

impl FixtureSource {
    pub async fn open(path: &Path, passes: Passes) -> Result<Self, SourceError> {
        let reader = open_reader(path).await?;
        Ok(FixtureSource {
            reading: tokio::sync::Mutex::new(Reading {
                path: path.to_owned(),
                passes,
                pass: 1,
                line: 0,
                reader,
                max_line: crate::event::DEFAULT_MAX_EVENT_BYTES,
            }),
        })
    }

    /// Lines longer than `bytes` are cut to `bytes + 1` (so the pipeline's size check rejects
    /// them) without reading the rest into memory.
    pub fn with_max_line(mut self, bytes: usize) -> Self {
        self.reading.get_mut().max_line = bytes;
        self
    }

    /// The next line as a raw event (what `replay --to-kafka` produces).
    pub async fn next_raw(&self) -> Result<Option<RawEvent>, SourceError> {
        self.reading.lock().await.next_raw().await
    }

    fn is_stdin(path: &Path) -> bool {
        path.as_os_str() == "-"
    }
}

async fn open_reader(path: &Path) -> Result<Box<dyn AsyncBufRead + Send + Unpin>, SourceError> {
    if FixtureSource::is_stdin(path) {
        return Ok(Box::new(BufReader::new(tokio::io::stdin())));
    }
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|source| SourceError::Io {
            path: path.display().to_string(),
            source,
        })?;
    Ok(Box::new(BufReader::with_capacity(256 * 1024, file)))
}

#[async_trait]
impl EventSource for FixtureSource {
    async fn next(&self) -> Result<Option<SourceEvent>, SourceError> {
        Ok(self.next_raw().await?.map(|raw| SourceEvent {
            raw,
            lane: 0,
            ack: Ack::none(),
        }))
    }
}

impl Reading {
    async fn next_raw(&mut self) -> Result<Option<RawEvent>, SourceError> {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let (n, cut) = read_line_capped(&mut self.reader, &mut buf, self.max_line + 1)
                .await
                .map_err(|source| SourceError::Io {
                    path: self.path.display().to_string(),
                    source,
                })?;
            if n == 0 {
                let again = match self.passes {
                    Passes::Once => false,
                    Passes::Loop(0) => true,
                    Passes::Loop(n) => self.pass < n,
                };
                // Stdin cannot be read twice, and an empty file would loop without end.
                if !again || FixtureSource::is_stdin(&self.path) || self.line == 0 {
                    return Ok(None);
                }
                self.pass += 1;
                self.line = 0;
                self.reader = open_reader(&self.path).await?;
                continue;
            }
            self.line += 1;
            let line = if cut { &buf[..] } else { buf.trim_ascii() };
            if line.is_empty() {
                continue;
            }
            let bytes = match self.passes {
                Passes::Loop(_) if !cut => refresh(line, self.pass),
                _ => line.to_vec(),
            };
            let shown = if FixtureSource::is_stdin(&self.path) {
                "stdin".to_owned()
            } else {
                self.path.display().to_string()
            };
            let position = match self.passes {
                Passes::Loop(_) if self.pass > 1 => {
                    format!("{shown}:{} (pass {})", self.line, self.pass)
                }
                _ => format!("{shown}:{}", self.line),
            };
            return Ok(Some(RawEvent::new(bytes, position)));
        }
    }
}

/// Reads one line (through its `\n`) and keeps at most `cap` bytes of it in `buf`. Returns the
/// bytes consumed (0 at the end of the input) and whether the line was cut.
async fn read_line_capped<R: AsyncBufRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<(usize, bool)> {
    let mut consumed = 0;
    let mut cut = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok((consumed, cut));
        }
        let (chunk, ends) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = cap.saturating_sub(buf.len());
        cut |= chunk.len() > room;
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let n = chunk.len();
        reader.consume(n);
        consumed += n;
        if ends {
            return Ok((consumed, cut));
        }
    }
}

/// Gives a looped event the current time and, after the first pass, a fresh id.
fn refresh(line: &[u8], pass: u64) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut event)) = serde_json::from_slice(line) else {
        return line.to_vec();
    };
    if pass > 1
        && let Some(serde_json::Value::String(id)) = event.get("id")
    {
        let fresh = format!("{id}.p{pass}");
        event.insert("id".into(), fresh.into());
    }
    if event.contains_key("time") {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        event.insert("time".into(), now.into());
    }
    serde_json::to_vec(&event).unwrap_or_else(|_| line.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn long_lines_are_cut_one_byte_over_the_limit_and_reading_goes_on() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "{}", "x".repeat(1_000_000)).unwrap();
        writeln!(f, r#"{{"id":"after"}}"#).unwrap();
        write!(f, "{}", "y".repeat(50)).unwrap(); // no final newline
        let source = FixtureSource::open(f.path(), Passes::Once)
            .await
            .unwrap()
            .with_max_line(100);
        let long = source.next_raw().await.unwrap().unwrap();
        assert_eq!(long.bytes.len(), 101, "cut, not read whole");
        assert!(long.position.ends_with(":1"));
        let next = source.next_raw().await.unwrap().unwrap();
        assert_eq!(&next.bytes[..], br#"{"id":"after"}"#);
        assert!(next.position.ends_with(":2"));
        let last = source.next_raw().await.unwrap().unwrap();
        assert_eq!(last.bytes.len(), 50);
        assert!(source.next_raw().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reads_lines_with_positions_and_loops_with_fresh_ids() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, r#"{{"id":"a","time":"2020-01-01T00:00:00Z"}}"#).unwrap();
        writeln!(f).unwrap();
        writeln!(f, "not json").unwrap();
        let once = FixtureSource::open(f.path(), Passes::Once).await.unwrap();
        let first = once.next_raw().await.unwrap().unwrap();
        assert!(first.position.ends_with(":1"));
        assert_eq!(first.bytes, br#"{"id":"a","time":"2020-01-01T00:00:00Z"}"#);
        let second = once.next().await.unwrap().unwrap().raw;
        assert!(
            second.position.ends_with(":3"),
            "blank lines are skipped but counted"
        );
        assert!(once.next().await.unwrap().is_none());

        let looped = FixtureSource::open(f.path(), Passes::Loop(2))
            .await
            .unwrap();
        let mut ids = Vec::new();
        while let Some(e) = looped.next_raw().await.unwrap() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.bytes) {
                assert_ne!(v["time"], "2020-01-01T00:00:00Z", "times are refreshed");
                ids.push(v["id"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(ids, ["a", "a.p2"]);
    }
}
