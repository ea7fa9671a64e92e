//! The dead-letter producer: rejected records go to the dead-letter topic with their original
//! bytes, key and headers, plus headers saying why and where they came from.

use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::Record;
use crate::config::KafkaConfig;
use crate::event::Reason;

pub const HEADER_REASON: &str = "tally.reason";
pub const HEADER_FIELD: &str = "tally.field";
pub const HEADER_DETAIL: &str = "tally.detail";
pub const HEADER_TOPIC: &str = "tally.source.topic";
pub const HEADER_PARTITION: &str = "tally.source.partition";
pub const HEADER_OFFSET: &str = "tally.source.offset";
pub const HEADER_PIPELINE: &str = "tally.pipeline";

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
}

impl DeadLetterProducer {
    pub fn new(kafka: &KafkaConfig, pipeline: &'static str) -> Result<Self, KafkaError> {
        Ok(DeadLetterProducer {
            producer: super::producer_config(kafka).create()?,
            topic: kafka.topics.dead_letter.clone(),
            pipeline,
        })
    }

    /// Sends every dead letter and waits until the broker acknowledged all of them. The caller
    /// commits the source offsets only after this returns Ok.
    pub async fn send_all(&self, letters: &[DeadLetter<'_>]) -> Result<(), KafkaError> {
        let sends = letters.iter().map(|dl| {
            let r = dl.record;
            let partition = r.partition.to_string();
            let offset = r.offset.to_string();
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 7);
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut extra: Vec<(&str, &str)> = vec![(HEADER_REASON, dl.reason.as_str())];
            if let Some(field) = &dl.field {
                extra.push((HEADER_FIELD, field));
            }
            let detail = truncate(&dl.detail, 1024);
            extra.push((HEADER_DETAIL, &detail));
            extra.push((HEADER_TOPIC, &r.topic));
            extra.push((HEADER_PARTITION, &partition));
            extra.push((HEADER_OFFSET, &offset));
            extra.push((HEADER_PIPELINE, self.pipeline));
            for (key, value) in extra {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record = FutureRecord::to(&self.topic)
                .payload(&r.payload[..])
                .headers(headers);
            if let Some(key) = &r.key {
                record = record.key(&key[..]);
            }
            let send = self.producer.send(record, Duration::from_secs(30));
            async move { send.await.map(|_| ()).map_err(|(e, _)| e) }
        });
        try_join_all(sends).await?;
        Ok(())
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
