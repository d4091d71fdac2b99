//! etcd v3's JSON gateway on the wire: the answers we read (protobuf's JSON mapping with the
//! fields' original names: 64-bit integers as strings, bytes as base64, fields at their default
//! value left out) and their translation into the store's types. Nothing here panics on a
//! malformed answer: every decoding error names the field that was wrong.

use std::fmt;

use aloft_store::{EventKind, KeyValue, LeaseId, Revision, WatchBatch, WatchEvent};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

/// Bytes as the gateway wants them: base64.
pub(crate) fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes one JSON answer; what was wrong (with the field's path) otherwise.
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })?;
    de.end()
        .map_err(|e| format!("trailing data after the answer: {e}"))?;
    Ok(value)
}

/// An int64: a JSON string of digits (protobuf's mapping) or a number.
fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Int;
    impl Visitor<'_> for Int {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a 64-bit integer (as a string or a number)")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
            v.parse()
                .map_err(|_| E::custom(format!("{v:?} is not a 64-bit integer")))
        }
    }
    d.deserialize_any(Int)
}

/// Bytes: a base64 string.
fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    STANDARD
        .decode(s.as_bytes())
        .map_err(|e| de::Error::custom(format!("not base64: {e}")))
}

/// Every answer's header; only the revision matters here.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Header {
    #[serde(deserialize_with = "int")]
    pub(crate) revision: i64,
}

impl Header {
    /// The store's revision the answer was made at; an error if it is missing.
    pub(crate) fn revision(&self) -> Result<Revision, String> {
        if self.revision > 0 {
            Ok(Revision(self.revision))
        } else {
            Err("header.revision is missing".to_owned())
        }
    }
}

/// `mvccpb.KeyValue`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Kv {
    #[serde(deserialize_with = "bytes")]
    pub(crate) key: Vec<u8>,
    #[serde(deserialize_with = "bytes")]
    pub(crate) value: Vec<u8>,
    #[serde(deserialize_with = "int")]
    pub(crate) create_revision: i64,
    #[serde(deserialize_with = "int")]
    pub(crate) mod_revision: i64,
    #[serde(deserialize_with = "int")]
    pub(crate) version: i64,
    #[serde(deserialize_with = "int")]
    pub(crate) lease: i64,
}

impl Kv {
    /// The store's key-value; keys that are not UTF-8 (written by another client) are refused.
    pub(crate) fn into_key_value(self) -> Result<KeyValue, String> {
        let key = String::from_utf8(self.key).map_err(|e| {
            format!(
                "key {:?} is not UTF-8 (written by another etcd client?)",
                e.as_bytes()
            )
        })?;
        if self.mod_revision <= 0 {
            return Err(format!("key {key:?} has no mod_revision"));
        }
        Ok(KeyValue {
            key,
            value: self.value,
            create_revision: Revision(self.create_revision),
            mod_revision: Revision(self.mod_revision),
            version: self.version,
            lease: (self.lease != 0).then_some(LeaseId(self.lease)),
        })
    }
}

/// `RangeResponse`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RangeResponse {
    pub(crate) header: Header,
    pub(crate) kvs: Vec<Kv>,
    pub(crate) more: bool,
}

/// `PutResponse` (asked with `prev_kv`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct PutResponse {
    pub(crate) prev_kv: Option<Kv>,
}

/// `DeleteRangeResponse`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct DeleteRangeResponse {
    #[serde(deserialize_with = "int")]
    pub(crate) deleted: i64,
}

/// `TxnResponse`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TxnResponse {
    pub(crate) header: Header,
    pub(crate) succeeded: bool,
    pub(crate) responses: Vec<ResponseOp>,
}

/// `ResponseOp`: one of its fields is set.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ResponseOp {
    pub(crate) response_range: Option<RangeResponse>,
    pub(crate) response_put: Option<PutResponse>,
    pub(crate) response_delete_range: Option<DeleteRangeResponse>,
    pub(crate) response_txn: Option<TxnResponse>,
}

/// `LeaseGrantResponse`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LeaseGrantResponse {
    #[serde(rename = "ID", deserialize_with = "int")]
    pub(crate) id: i64,
    #[serde(rename = "TTL", deserialize_with = "int")]
    pub(crate) ttl: i64,
    pub(crate) error: String,
}

/// `LeaseKeepAliveResponse`: `TTL` 0 (left out) when the lease is gone.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LeaseKeepAliveResponse {
    #[serde(rename = "TTL", deserialize_with = "int")]
    pub(crate) ttl: i64,
}

/// `StatusResponse`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StatusResponse {
    pub(crate) header: Header,
    pub(crate) version: String,
}

/// The gateway's error answer (`{"error": …, "code": N, "message": …}`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
    pub(crate) message: String,
    #[serde(deserialize_with = "int")]
    pub(crate) code: i64,
}

/// One message of a streamed answer: a result, or an error that ends the stream.
#[derive(Debug, Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
pub(crate) struct Streamed<T> {
    #[serde(default)]
    pub(crate) result: Option<T>,
    #[serde(default)]
    pub(crate) error: Option<StreamError>,
}

/// The error of a streamed answer.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StreamError {
    pub(crate) message: String,
    #[serde(deserialize_with = "int")]
    pub(crate) grpc_code: i64,
}

/// `WatchResponse`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WatchResponse {
    pub(crate) header: Header,
    pub(crate) created: bool,
    pub(crate) canceled: bool,
    #[serde(deserialize_with = "int")]
    pub(crate) compact_revision: i64,
    pub(crate) cancel_reason: String,
    pub(crate) events: Vec<Event>,
}

/// `mvccpb.Event`: a put leaves `type` out.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Event {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) kv: Kv,
}

/// Splits a watch answer's events into one batch per revision, in order.
pub(crate) fn batches(events: Vec<Event>) -> Result<Vec<WatchBatch>, String> {
    let mut out: Vec<WatchBatch> = Vec::new();
    for (i, e) in events.into_iter().enumerate() {
        let kind = match e.kind.as_str() {
            "" | "PUT" => EventKind::Put,
            "DELETE" => EventKind::Delete,
            other => return Err(format!("events[{i}].type: unknown event type {other:?}")),
        };
        let mut kv =
            e.kv.into_key_value()
                .map_err(|d| format!("events[{i}].kv: {d}"))?;
        if kind == EventKind::Delete {
            kv.value.clear();
            kv.version = 0;
            kv.lease = None;
        }
        let revision = kv.mod_revision;
        let event = WatchEvent { kind, kv };
        match out.last_mut() {
            Some(b) if b.revision == revision => b.events.push(event),
            Some(b) if b.revision > revision => {
                return Err(format!(
                    "events[{i}]: revision {revision} after revision {}",
                    b.revision
                ));
            }
            _ => out.push(WatchBatch {
                revision,
                events: vec![event],
            }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    #[test]
    fn answers_decode_with_strings_for_int64s_and_defaults_left_out() {
        let r: RangeResponse = decode(
            br#"{"header":{"cluster_id":"1","revision":"8"},"kvs":[{"key":"L2E=","create_revision":"2","mod_revision":"3","version":"2","value":"Mg=="}],"count":"1"}"#,
        )
        .unwrap();
        assert_eq!(r.header.revision().unwrap(), Revision(8));
        let kv = r.kvs.into_iter().next().unwrap().into_key_value().unwrap();
        assert_eq!(
            (kv.key.as_str(), kv.value.as_slice(), kv.version, kv.lease),
            ("/a", b"2".as_slice(), 2, None)
        );
        let empty: RangeResponse = decode(br#"{"header":{"revision":"1"}}"#).unwrap();
        assert!(empty.kvs.is_empty() && !empty.more);
        let g: LeaseGrantResponse = decode(br#"{"ID":"2324035814251458837","TTL":2}"#).unwrap();
        assert_eq!((g.id, g.ttl), (2_324_035_814_251_458_837, 2));
    }

    #[test]
    fn malformed_answers_are_errors_naming_the_field() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"header":{"revision":"x8"}}"#, "header.revision"),
            (br#"{"header":{"revision":"8"},"kvs":[{"key":"%%%"}]}"#, "kvs[0].key"),
            (br#"{"header":{"revision":"8"},"kvs":[{"key":"L2E=","mod_revision":"9999999999999999999999"}]}"#, "kvs[0].mod_revision"),
            (br#"{"header":{"revision":"8"},"kvs":"#, "EOF"),
            (br#"<html>not found</html>"#, "expected value"),
            (br#"{"header":{"revision":"8"}} {}"#, "trailing"),
        ];
        for (body, want) in cases {
            let err = decode::<RangeResponse>(body).unwrap_err();
            assert!(err.contains(want), "{}: {err}", String::from_utf8_lossy(body));
        }
        assert!(Header::default().revision().is_err());
        let no_rev = Kv {
            key: b"/a".to_vec(),
            ..Kv::default()
        };
        assert!(no_rev.into_key_value().unwrap_err().contains("mod_revision"));
        let not_utf8 = Kv {
            key: vec![0xff],
            mod_revision: 1,
            ..Kv::default()
        };
        assert!(not_utf8.into_key_value().unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn watch_events_split_into_one_batch_per_revision() {
        let w: Streamed<WatchResponse> = decode(
            br#"{"result":{"header":{"revision":"8"},"events":[{"kv":{"key":"L3cvYQ==","create_revision":"4","mod_revision":"6","version":"3","value":"djM="}},{"kv":{"key":"L3cvYg==","create_revision":"6","mod_revision":"6","version":"1","lease":"7"}},{"type":"DELETE","kv":{"key":"L3cvYQ==","mod_revision":"8"}}]}}"#,
        )
        .unwrap();
        let batches = batches(w.result.unwrap().events).unwrap();
        assert_eq!(batches.len(), 2);
        assert_eq!((batches[0].revision, batches[0].events.len()), (Revision(6), 2));
        assert_eq!(batches[0].events[1].kv.lease, Some(LeaseId(7)));
        let del = &batches[1].events[0];
        assert_eq!(
            (del.kind, del.kv.key.as_str(), del.kv.mod_revision),
            (EventKind::Delete, "/w/a", Revision(8))
        );
        let bad = vec![Event {
            kind: "EXPLODE".into(),
            kv: Kv::default(),
        }];
        assert!(super::batches(bad).unwrap_err().contains("unknown event type"));
    }
}
