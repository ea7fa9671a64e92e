//! The dead-letter producer: rejected records go to the dead-letter topic with their original
//! bytes, key and headers, plus headers saying why and where they came from.
//!
//! Always deliverable: every dead letter fits the producer's `message.max.bytes`, which is
//! set to [`DeadLetterProducer::max_bytes`] = the payload capacity
//! ([`DeadLetterProducer::payload_capacity`]: the larger of `pipeline.max_message_bytes` and
//! [`SOURCE_RECORD_BYTES`], the largest record a topic with Kafka's default
//! `max.message.bytes` holds) + [`DeadLetterProducer::OVERHEAD_BYTES`] (13,824 bytes). The overhead is the sum of
//! ceilings, each enforced when the dead letter is built:
//! - the source key, at most [`MAX_KEY_BYTES`] (1 KiB);
//! - the source headers, names, values and framing, at most [`MAX_SOURCE_HEADER_BYTES`]
//!   (8 KiB) — those past it are left out, in order;
//! - Tally's own headers, at most [`MAX_TALLY_HEADER_BYTES`] (4 KiB: detail cut to 1 KiB,
//!   field to 256 bytes);
//! - librdkafka's per-record framing, [`FRAMING_BYTES`] (512).
//!
//! So a `too_large` record (over `max_message_bytes`) that its topic held is carried whole and
//! can be replayed once the limit is raised. Only a payload beyond the capacity (a source
//! topic configured for larger records) is cut: then `tally.truncated` lists what was cut and
//! `tally.source.bytes` gives the payload's full length; the whole record stays in the source
//! topic at `tally.source.partition` / `tally.source.offset`. Whatever is cut is said, never
//! silent. The dead-letter topic must accept messages of `max_bytes` (set its
//! `max.message.bytes` to at least 1,062,400 for the default capacity).

use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::KafkaConfig;
use super::Record;
use crate::event::Reason;

pub const HEADER_REASON: &str = "tally.reason";
pub const HEADER_FIELD: &str = "tally.field";
pub const HEADER_DETAIL: &str = "tally.detail";
pub const HEADER_TOPIC: &str = "tally.source.topic";
pub const HEADER_PARTITION: &str = "tally.source.partition";
pub const HEADER_OFFSET: &str = "tally.source.offset";
pub const HEADER_PIPELINE: &str = "tally.pipeline";
/// What was cut to fit the bound: a comma-separated subset of `payload`, `key`, `headers`.
pub const HEADER_TRUNCATED: &str = "tally.truncated";
/// The source payload's full length in bytes, when it was cut.
pub const HEADER_SOURCE_BYTES: &str = "tally.source.bytes";

/// The largest record a topic with Apache Kafka's default `max.message.bytes` holds (1 MiB):
/// a dead letter carries at least this much of its source payload.
pub const SOURCE_RECORD_BYTES: usize = 1024 * 1024;
/// Longest source key carried; a longer one is cut.
pub const MAX_KEY_BYTES: usize = 1024;
/// Room for the source headers (names, values and 10 bytes of framing each).
pub const MAX_SOURCE_HEADER_BYTES: usize = 8 * 1024;
/// Room for Tally's headers (their worst case is 1,900 bytes, checked by a test).
pub const MAX_TALLY_HEADER_BYTES: usize = 4 * 1024;
/// Per-record framing librdkafka counts beyond key, value and headers.
pub const FRAMING_BYTES: usize = 512;
/// Longest `tally.detail` value (before the ellipsis).
const MAX_DETAIL_BYTES: usize = 1024;
/// Longest `tally.field` value.
const MAX_FIELD_BYTES: usize = 256;
/// Framing counted per header (two varints, generously).
const HEADER_FRAMING_BYTES: usize = 10;

/// A record to dead-letter, with its machine-readable reason.
#[derive(Debug, Clone)]
pub struct DeadLetter<'r> {
    pub record: &'r Record,
    pub reason: Reason,
    pub field: Option<String>,
    pub detail: String,
}

pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
    pipeline: &'static str,
    /// Payloads up to this size are carried whole ([`DeadLetterProducer::payload_capacity`]).
    max_message_bytes: usize,
}

impl DeadLetterProducer {
    /// What a dead letter may add to the source payload: see the module documentation.
    pub const OVERHEAD_BYTES: usize =
        MAX_KEY_BYTES + MAX_SOURCE_HEADER_BYTES + MAX_TALLY_HEADER_BYTES + FRAMING_BYTES;

    /// Source payloads up to this size are carried whole: the larger of the pipeline's
    /// `max_message_bytes` and [`SOURCE_RECORD_BYTES`].
    pub const fn payload_capacity(max_message_bytes: usize) -> usize {
        if max_message_bytes > SOURCE_RECORD_BYTES {
            max_message_bytes
        } else {
            SOURCE_RECORD_BYTES
        }
    }

    /// The producer's `message.max.bytes` for a pipeline whose `max_message_bytes` is given.
    pub const fn max_bytes(max_message_bytes: usize) -> usize {
        Self::payload_capacity(max_message_bytes) + Self::OVERHEAD_BYTES
    }

    /// A producer for `pipeline` whose dead letters carry payloads of up to the capacity for
    /// `max_message_bytes` (`pipeline.max_message_bytes`) whole.
    pub fn new(
        kafka: &KafkaConfig,
        max_message_bytes: usize,
        pipeline: &'static str,
    ) -> Result<Self, KafkaError> {
        let mut cc = super::producer_config(kafka);
        cc.set(
            "message.max.bytes",
            Self::max_bytes(max_message_bytes).to_string(),
        );
        Ok(DeadLetterProducer {
            producer: cc.create()?,
            topic: kafka.topics.dead_letter.clone(),
            pipeline,
            max_message_bytes: Self::payload_capacity(max_message_bytes),
        })
    }

    /// Sends every dead letter and waits until the broker acknowledged all of them. The caller
    /// commits the source offsets only after this returns Ok.
    pub async fn send_all(&self, letters: &[DeadLetter<'_>]) -> Result<(), KafkaError> {
        let sends = letters.iter().map(|dl| {
            let fitted = Fitted::new(dl, self.pipeline, self.max_message_bytes);
            let mut headers = OwnedHeaders::new_with_capacity(fitted.headers.len());
            for (key, value) in &fitted.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_ref()),
                });
            }
            let mut record = FutureRecord::to(&self.topic)
                .payload(fitted.payload)
                .headers(headers);
            if let Some(key) = fitted.key {
                record = record.key(key);
            }
            debug_assert!(
                fitted.size() + FRAMING_BYTES <= self.max_message_bytes + Self::OVERHEAD_BYTES
            );
            let send = self.producer.send(record, Duration::from_secs(30));
            async move { send.await.map(|_| ()).map_err(|(e, _)| e) }
        });
        try_join_all(sends).await?;
        Ok(())
    }
}

/// A dead letter cut to the bound: payload, key and headers (source ones first, then Tally's).
struct Fitted<'r> {
    payload: &'r [u8],
    key: Option<&'r [u8]>,
    headers: Vec<(&'r str, std::borrow::Cow<'r, [u8]>)>,
}

impl<'r> Fitted<'r> {
    fn new(dl: &'r DeadLetter<'r>, pipeline: &'static str, max_message_bytes: usize) -> Self {
        let r = dl.record;
        let mut truncated: Vec<&str> = Vec::new();
        let payload = if r.payload.len() > max_message_bytes {
            truncated.push("payload");
            &r.payload[..max_message_bytes]
        } else {
            &r.payload[..]
        };
        let key = r.key.as_deref().map(|k| {
            if k.len() > MAX_KEY_BYTES {
                truncated.push("key");
                &k[..MAX_KEY_BYTES]
            } else {
                k
            }
        });
        let mut headers: Vec<(&str, std::borrow::Cow<[u8]>)> = Vec::new();
        let mut room = MAX_SOURCE_HEADER_BYTES;
        for (k, v) in &r.headers {
            let size = k.len() + v.len() + HEADER_FRAMING_BYTES;
            if size > room {
                // Left out, and the ones after it too: order is kept.
                truncated.push("headers");
                break;
            }
            room -= size;
            headers.push((k, std::borrow::Cow::Borrowed(&v[..])));
        }
        let owned = |s: String| std::borrow::Cow::Owned(s.into_bytes());
        headers.push((HEADER_REASON, owned(dl.reason.as_str().to_owned())));
        if let Some(field) = &dl.field {
            headers.push((HEADER_FIELD, owned(truncate(field, MAX_FIELD_BYTES))));
        }
        headers.push((HEADER_DETAIL, owned(truncate(&dl.detail, MAX_DETAIL_BYTES))));
        headers.push((HEADER_TOPIC, owned(r.topic.to_string())));
        headers.push((HEADER_PARTITION, owned(r.partition.to_string())));
        headers.push((HEADER_OFFSET, owned(r.offset.to_string())));
        headers.push((HEADER_PIPELINE, owned(pipeline.to_owned())));
        if !truncated.is_empty() {
            if truncated.contains(&"payload") {
                headers.push((HEADER_SOURCE_BYTES, owned(r.payload.len().to_string())));
            }
            headers.push((HEADER_TRUNCATED, owned(truncated.join(","))));
        }
        Fitted {
            payload,
            key,
            headers,
        }
    }

    /// Bytes librdkafka counts against `message.max.bytes`, less the record framing.
    fn size(&self) -> usize {
        self.payload.len()
            + self.key.map_or(0, <[u8]>::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + HEADER_FRAMING_BYTES)
                .sum::<usize>()
    }
}

fn truncate(s: &str, max_bytes: usize) -> String {
    if s.len() <= max_bytes {
        return s.to_owned();
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn record(payload_bytes: usize, key_bytes: usize, headers: Vec<(String, Vec<u8>)>) -> Record {
        Record {
            // The longest topic name Kafka allows.
            topic: Arc::from("t".repeat(249)),
            partition: i32::MIN,
            offset: i64::MIN,
            key: Some(vec![b'k'; key_bytes]),
            payload: vec![b'p'; payload_bytes],
            headers,
            timestamp_ms: None,
        }
    }

    fn header<'a>(fitted: &'a Fitted<'_>, name: &str) -> Option<&'a [u8]> {
        fitted
            .headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn the_bound_is_the_payload_capacity_plus_13824() {
        // 1024 (key) + 8192 (source headers) + 4096 (Tally's) + 512 (framing), by hand.
        assert_eq!(DeadLetterProducer::OVERHEAD_BYTES, 13_824);
        // A 1 MiB record (1,048,576) is carried whole whatever max_message_bytes is below it.
        assert_eq!(DeadLetterProducer::max_bytes(65_536), 1_062_400);
        assert_eq!(DeadLetterProducer::max_bytes(1_000_000), 1_062_400);
        assert_eq!(DeadLetterProducer::max_bytes(2_000_000), 2_013_824);
    }

    #[test]
    fn tally_headers_fit_their_room_in_the_worst_case() {
        // Names 141 bytes; values: reason <= 32, field 256 + "…" (3), detail 1024 + 3,
        // topic 249, partition 11, offset 20, pipeline <= 32, source bytes <= 20,
        // "payload,key,headers" 19: 1669; framing 9 x 10 = 90. 1900 in all.
        let names = [
            HEADER_REASON,
            HEADER_FIELD,
            HEADER_DETAIL,
            HEADER_TOPIC,
            HEADER_PARTITION,
            HEADER_OFFSET,
            HEADER_PIPELINE,
            HEADER_SOURCE_BYTES,
            HEADER_TRUNCATED,
        ];
        assert_eq!(names.iter().map(|n| n.len()).sum::<usize>(), 141);
        const { assert!(141 + 1669 + 90 <= MAX_TALLY_HEADER_BYTES) };

        // Every source part over its room, and the longest field and detail.
        let big_headers: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| (format!("h{i}"), vec![b'v'; 1000]))
            .collect();
        let r = record(70_000, 5_000, big_headers);
        let dl = DeadLetter {
            record: &r,
            reason: Reason::TooLarge,
            field: Some("f".repeat(10_000)),
            detail: "d".repeat(10_000),
        };
        let fitted = Fitted::new(&dl, "analytics", 65_536);
        let source_headers = 8; // 1012 bytes each with framing: 8 fit in 8192, not 9
        let tally: usize = fitted.headers[source_headers..]
            .iter()
            .map(|(k, v)| k.len() + v.len() + HEADER_FRAMING_BYTES)
            .sum();
        assert!(tally <= 1900, "{tally}");
        assert_eq!(fitted.headers[source_headers - 1].0, "h7");
        assert_eq!(fitted.headers[source_headers].0, HEADER_REASON);
        assert_eq!(fitted.payload.len(), 65_536);
        assert_eq!(fitted.key.unwrap().len(), 1024);
        assert_eq!(header(&fitted, HEADER_SOURCE_BYTES), Some(&b"70000"[..]));
        assert_eq!(
            header(&fitted, HEADER_TRUNCATED),
            Some(&b"payload,key,headers"[..])
        );
        assert_eq!(header(&fitted, HEADER_FIELD).unwrap().len(), 256 + 3);
        assert_eq!(header(&fitted, HEADER_DETAIL).unwrap().len(), 1024 + 3);
        assert!(fitted.size() + FRAMING_BYTES <= DeadLetterProducer::max_bytes(65_536));
    }

    #[test]
    fn a_record_within_the_limits_is_carried_whole() {
        // Payload exactly max_message_bytes, key 1024, source headers 8192 with framing.
        let headers = vec![
            ("a".to_owned(), vec![b'1'; 4096 - 1 - 10]),
            ("b".to_owned(), vec![b'2'; 4096 - 1 - 10]),
        ];
        let r = record(65_536, 1024, headers.clone());
        let dl = DeadLetter {
            record: &r,
            reason: Reason::InvalidValue,
            field: Some("data.model".into()),
            detail: "x".into(),
        };
        let fitted = Fitted::new(&dl, "ledger", 65_536);
        assert_eq!(fitted.payload, &r.payload[..]);
        assert_eq!(fitted.key, r.key.as_deref());
        assert_eq!(fitted.headers[0].0, "a");
        assert_eq!(fitted.headers[1].0, "b");
        assert_eq!(fitted.headers[1].1.as_ref(), &headers[1].1[..]);
        assert_eq!(header(&fitted, HEADER_TRUNCATED), None);
        assert_eq!(header(&fitted, HEADER_SOURCE_BYTES), None);
        assert_eq!(header(&fitted, HEADER_REASON), Some(&b"invalid_value"[..]));
        assert_eq!(header(&fitted, HEADER_FIELD), Some(&b"data.model"[..]));
        assert_eq!(header(&fitted, HEADER_PARTITION), Some(&b"-2147483648"[..]));
        assert_eq!(
            header(&fitted, HEADER_OFFSET),
            Some(&b"-9223372036854775808"[..])
        );
        assert_eq!(header(&fitted, HEADER_PIPELINE), Some(&b"ledger"[..]));
        assert!(fitted.size() + FRAMING_BYTES <= DeadLetterProducer::max_bytes(65_536));
    }
}
