//! The go-micro envelope every oCIS event travels in.
//!
//! ```json
//! {"Timestamp":"2026-08-14T09:37:56.123456789+02:00",
//!  "Metadata":{"eventtype":"events.UploadReady","eventid":"<uuid>","initiatorid":"<id>"},
//!  "ID":"<uuid>","Topic":"main-queue","Payload":"<standard base64 of the event JSON>"}
//! ```
//!
//! Go field names, no JSON tags; `Payload` is a `[]byte`, hence base64. `eventid` is fresh per
//! publish and is the id foldercast de-duplicates on (the envelope `ID` is another uuid, used
//! only when `eventid` is missing). `Timestamp` was seen `null`; `initiatorid` is empty unless
//! the client sent an `Initiator-ID` header.

use base64::Engine;
use serde::Deserialize;

use crate::event::Rejection;

/// An opened envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Go's type name: `events.ContainerCreated`.
    pub event_type: String,
    /// `Metadata.eventid`, or the envelope `ID` when that is missing.
    pub event_id: String,
    /// The client's initiator id, when it sent one.
    pub initiator_id: Option<String>,
    /// The envelope's `Timestamp` as sent (RFC 3339), if any.
    pub timestamp: Option<String>,
    /// The decoded `Payload`: the reva event's JSON.
    pub payload: Vec<u8>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "Timestamp")]
    timestamp: Option<String>,
    #[serde(rename = "Metadata", default)]
    metadata: Option<Metadata>,
    #[serde(rename = "ID")]
    id: Option<String>,
    #[serde(rename = "Payload")]
    payload: Option<String>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    eventtype: Option<String>,
    eventid: Option<String>,
    initiatorid: Option<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// Opens an envelope; a [`Rejection`] (with the pipeline's codes) when it is not one.
pub fn open(bytes: &[u8]) -> Result<Envelope, Rejection> {
    let wire: Wire = serde_json::from_slice(bytes)
        .map_err(|e| Rejection::new("invalid-json", format!("not a go-micro envelope: {e}")))?;
    let metadata = wire.metadata.unwrap_or_default();
    let event_type = non_empty(metadata.eventtype)
        .ok_or_else(|| Rejection::new("missing-field", "Metadata.eventtype is missing"))?;
    let event_id = non_empty(metadata.eventid)
        .or(non_empty(wire.id))
        .ok_or_else(|| Rejection::new("missing-field", "neither Metadata.eventid nor ID"))?;
    let encoded = wire
        .payload
        .ok_or_else(|| Rejection::new("missing-field", "Payload is missing"))?;
    // Go writes standard base64 with padding; accept it without, too.
    let payload = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded.trim()))
        .map_err(|e| Rejection::new("invalid-field", format!("Payload is not base64: {e}")))?;
    Ok(Envelope {
        event_type,
        event_id,
        initiator_id: non_empty(metadata.initiatorid),
        timestamp: non_empty(wire.timestamp),
        payload,
    })
}

#[cfg(test)]
pub(crate) fn seal(event_type: &str, event_id: &str, initiator: &str, payload: &str) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
    serde_json::json!({
        "Timestamp": "2026-08-14T09:37:56.123456789+02:00",
        "Metadata": {"eventtype": event_type, "eventid": event_id, "initiatorid": initiator,
                     "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "ID": "9b1d8c2e-envelope",
        "Topic": "main-queue",
        "Payload": encoded,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_opens_to_its_type_ids_and_payload() {
        let bytes = seal("events.ContainerCreated", "ev-1", "tab-7", r#"{"a":1}"#);
        let e = open(&bytes).unwrap();
        assert_eq!(e.event_type, "events.ContainerCreated");
        assert_eq!(e.event_id, "ev-1");
        assert_eq!(e.initiator_id.as_deref(), Some("tab-7"));
        assert_eq!(e.payload, br#"{"a":1}"#);
        assert!(e.timestamp.unwrap().starts_with("2026-08-14T09:37:56"));
    }

    #[test]
    fn quirks_are_tolerated() {
        // A null timestamp, no initiator, no eventid (the envelope ID stands in), no padding.
        let payload = base64::engine::general_purpose::STANDARD_NO_PAD.encode(r#"{"b":2}"#);
        let bytes = format!(
            r#"{{"Timestamp":null,"Metadata":{{"eventtype":"events.FileTouched","initiatorid":""}},"ID":"env-9","Topic":"main-queue","Payload":"{payload}"}}"#
        );
        let e = open(bytes.as_bytes()).unwrap();
        assert_eq!(
            (e.event_id.as_str(), e.initiator_id, e.timestamp),
            ("env-9", None, None)
        );
        assert_eq!(e.payload, br#"{"b":2}"#);
    }

    #[test]
    fn what_is_not_an_envelope_is_refused_with_a_code() {
        let cases: [(&[u8], &str); 4] = [
            (b"not json", "invalid-json"),
            (
                br#"{"Metadata":{"eventid":"x"},"Payload":"e30="}"#,
                "missing-field",
            ),
            (
                br#"{"Metadata":{"eventtype":"events.X","eventid":"x"}}"#,
                "missing-field",
            ),
            (
                br#"{"Metadata":{"eventtype":"events.X","eventid":"x"},"Payload":"%%%"}"#,
                "invalid-field",
            ),
        ];
        for (bytes, code) in cases {
            assert_eq!(
                open(bytes).unwrap_err().code,
                code,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
