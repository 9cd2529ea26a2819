//! Just enough RESP3 for a subscriber: frames cut from the read buffer by their header lines,
//! read in place (a message's parts are borrowed from its frame, not copied).
//!
//! Why not redis-rs's codec: it builds every frame through `combine` parser combinators and a
//! `Vec<u8>` per string, about 1 µs per pushed message (8–10 % of the gateway's CPU in
//! `bench fanout`). A subscriber's traffic is a handful of shapes (`>3` pushes of bulk
//! strings, a `+PONG`, an error, the `HELLO` map once): [`frame_len`] finds where a frame ends
//! by reading only its header lines (bulk bodies are skipped by length), and [`Reply`] reads
//! the one frame it was given.

/// The input is not RESP: the connection is out of step and must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not RESP: {0}")]
pub struct ProtocolError(pub &'static str);

/// Aggregates nest no deeper than this (a subscriber's frames are two levels deep at most).
const MAX_DEPTH: usize = 16;
/// A header line (type byte, length or number, CRLF) is short; a longer one is not RESP.
const MAX_LINE: usize = 128;

/// A header line: its type byte, its text, and where the next part starts.
type Line<'a> = (u8, &'a [u8], usize);

/// The header line at `at`; `None` while it is not complete.
fn line(buf: &[u8], at: usize) -> Result<Option<Line<'_>>, ProtocolError> {
    let Some(rest) = buf.get(at..) else {
        return Ok(None);
    };
    let window = &rest[..rest.len().min(MAX_LINE)];
    match window.iter().position(|b| *b == b'\r') {
        Some(cr) if cr + 1 < rest.len() => {
            if rest[cr + 1] != b'\n' || cr == 0 {
                return Err(ProtocolError("a line does not end in CRLF"));
            }
            Ok(Some((rest[0], &rest[1..cr], at + cr + 2)))
        }
        Some(_) => Ok(None),
        None if rest.len() >= MAX_LINE => Err(ProtocolError("a header line is too long")),
        None => Ok(None),
    }
}

fn number(text: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError("a length or number is not an integer"))
}

/// The length of the frame at the start of `buf`, or `None` while it is incomplete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    end_of(buf, 0, 0)
}

fn end_of(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError("aggregates nest too deep"));
    }
    let Some((kind, text, next)) = line(buf, at)? else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Ok(Some(next)),
        b'$' | b'!' | b'=' => {
            let len = number(text)?;
            if len < 0 {
                return Ok(Some(next)); // a RESP2 null bulk string
            }
            let end = next
                .checked_add(len as usize)
                .and_then(|e| e.checked_add(2))
                .ok_or(ProtocolError("a length overflows"))?;
            if buf.len() < end {
                return Ok(None);
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(ProtocolError("a bulk string does not end in CRLF"));
            }
            Ok(Some(end))
        }
        b'*' | b'>' | b'~' | b'%' | b'|' => {
            let count = number(text)?;
            if count < 0 {
                return Ok(Some(next)); // a RESP2 null array
            }
            let items = if matches!(kind, b'%' | b'|') {
                (count as usize).saturating_mul(2)
            } else {
                count as usize
            };
            let mut at = next;
            for _ in 0..items {
                match end_of(buf, at, depth + 1)? {
                    Some(end) => at = end,
                    None => return Ok(None),
                }
            }
            // An attribute precedes the reply it describes: the frame goes on to its end.
            if kind == b'|' {
                return end_of(buf, at, depth + 1);
            }
            Ok(Some(at))
        }
        _ => Err(ProtocolError("an unknown type byte")),
    }
}

/// What one whole frame from a subscribed connection says, borrowing the frame: a message's
/// parts are not copied here (the subscriber slices its read buffer; see `deliver_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `message` / `smessage`: a channel's message.
    Message {
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// A `subscribe`, `unsubscribe`, `ssubscribe` or `sunsubscribe` push (a confirmation, or
    /// the server dropping a channel).
    Subscription { kind: &'a [u8], channel: &'a [u8] },
    /// `+PONG`, or RESP2's `["pong", ""]`.
    Pong,
    /// An error reply (`-…` or `!…`).
    Error(String),
    /// Anything else (the `HELLO` map, other pushes): nothing a subscriber acts on.
    Other,
}

impl<'a> Reply<'a> {
    /// Reads one whole frame (as cut by [`frame_len`]).
    pub fn of(frame: &'a [u8]) -> Result<Reply<'a>, ProtocolError> {
        let Some((kind, text, next)) = line(frame, 0)? else {
            return Err(ProtocolError("an incomplete frame"));
        };
        match kind {
            b'+' if text.eq_ignore_ascii_case(b"PONG") => Ok(Reply::Pong),
            b'-' => Ok(Reply::Error(String::from_utf8_lossy(text).into_owned())),
            b'!' => {
                let end = frame.len().saturating_sub(2);
                Ok(Reply::Error(
                    String::from_utf8_lossy(frame.get(next..end).unwrap_or_default()).into_owned(),
                ))
            }
            b'>' | b'*' => Self::push(frame, number(text)?, next),
            _ => Ok(Reply::Other),
        }
    }

    fn push(frame: &'a [u8], count: i64, mut at: usize) -> Result<Reply<'a>, ProtocolError> {
        let mut parts: [&'a [u8]; 3] = [&[]; 3];
        let mut got = 0;
        while got < count.clamp(0, 3) as usize {
            let Some((kind, text, next)) = line(frame, at)? else {
                return Err(ProtocolError("an incomplete frame"));
            };
            match kind {
                b'$' | b'+' => {
                    let (body, end) = if kind == b'+' {
                        (text, next)
                    } else {
                        let len = number(text)?.max(0) as usize;
                        let end = next + len;
                        (
                            frame
                                .get(next..end)
                                .ok_or(ProtocolError("a bulk string is cut"))?,
                            end + 2,
                        )
                    };
                    parts[got] = body;
                    at = end;
                }
                // A count (`:n`) ends a subscription push; nothing else is read after it.
                b':' => {
                    parts[got] = text;
                    at = next;
                }
                _ => return Ok(Reply::Other),
            }
            got += 1;
        }
        let [kind, first, second] = parts;
        Ok(match kind {
            b"message" | b"smessage" if count == 3 => Reply::Message {
                channel: first,
                payload: second,
            },
            b"subscribe" | b"unsubscribe" | b"ssubscribe" | b"sunsubscribe" if count == 3 => {
                Reply::Subscription {
                    kind,
                    channel: first,
                }
            }
            b"pong" => Reply::Pong,
            _ => Reply::Other,
        })
    }
}

/// A command as RESP: an array of bulk strings.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = format!(">{}\r\n", parts.len()).into_bytes();
        for p in parts {
            out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn a_message_push_is_cut_and_read() {
        let frame = push(&[b"message", b"fc:{alice}:live", b"1-0 5\nhello\r\nmore"]);
        let mut stream = frame.clone();
        stream.extend_from_slice(b"+PONG\r\n");
        assert_eq!(frame_len(&stream), Ok(Some(frame.len())));
        assert_eq!(
            Reply::of(&frame),
            Ok(Reply::Message {
                channel: b"fc:{alice}:live",
                payload: b"1-0 5\nhello\r\nmore",
            })
        );
        assert_eq!(frame_len(&stream[frame.len()..]), Ok(Some(7)));
        assert_eq!(Reply::of(b"+PONG\r\n"), Ok(Reply::Pong));
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete_not_an_error() {
        let frame = push(&[b"smessage", b"chan", b"payload with \r\n inside"]);
        for cut in 0..frame.len() {
            assert_eq!(frame_len(&frame[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(frame_len(&frame), Ok(Some(frame.len())));
    }

    #[test]
    fn subscription_pushes_end_in_a_count() {
        let frame = b">3\r\n$9\r\nsubscribe\r\n$4\r\nchan\r\n:1\r\n";
        assert_eq!(frame_len(frame), Ok(Some(frame.len())));
        assert_eq!(
            Reply::of(frame),
            Ok(Reply::Subscription {
                kind: b"subscribe",
                channel: b"chan",
            })
        );
    }

    #[test]
    fn the_hello_map_and_errors_are_read() {
        let hello = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n";
        assert_eq!(frame_len(hello), Ok(Some(hello.len())));
        assert_eq!(Reply::of(hello), Ok(Reply::Other));
        let error = b"-NOAUTH Authentication required.\r\n";
        assert_eq!(frame_len(error), Ok(Some(error.len())));
        assert_eq!(
            Reply::of(error),
            Ok(Reply::Error("NOAUTH Authentication required.".into()))
        );
        assert_eq!(
            Reply::of(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
            Ok(Reply::Pong)
        );
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(frame_len(b"hello\r\n").is_err());
        assert!(frame_len(b"$3\r\nabcde\r\n").is_err());
        assert!(frame_len(b"$x\r\n").is_err());
        assert!(frame_len(&[b'+'; 200]).is_err());
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, &[b"SUBSCRIBE", b"a b"]);
        assert_eq!(out, b"*2\r\n$9\r\nSUBSCRIBE\r\n$3\r\na b\r\n");
    }

    proptest::proptest! {
        /// Any stream of pushes, cut anywhere, reads back as the same messages.
        #[test]
        fn pushes_survive_any_cut(
            payloads in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 1..6),
            cut in 0usize..400,
        ) {
            let mut stream = Vec::new();
            for p in &payloads {
                stream.extend(push(&[b"message", b"c", p]));
            }
            let cut = cut.min(stream.len());
            let mut buf = stream[..cut].to_vec();
            let mut read = Vec::new();
            let mut rest = &stream[cut..];
            loop {
                while let Some(len) = frame_len(&buf).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))? {
                    match Reply::of(&buf[..len]) {
                        Ok(Reply::Message { payload, .. }) => read.push(payload.to_vec()),
                        other => proptest::prop_assert!(false, "{:?}", other),
                    }
                    buf.drain(..len);
                }
                if rest.is_empty() { break; }
                let n = rest.len().min(7);
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            proptest::prop_assert_eq!(read, payloads);
        }
    }
}
