//! Dead letters are always deliverable, against the real broker: a record whose payload is
//! exactly `max_message_bytes`, with a full key and full source headers, reaches the
//! dead-letter topic whole; so does a `too_large` one of 900 KB (its topic held it, so it can
//! be replayed); one beyond the payload capacity (1 MiB) reaches it cut, saying so. With `max_message_bytes`
//! at 1,000,000 the first is beyond librdkafka's default `message.max.bytes` (1,000,000), which
//! a plain producer shows by refusing it. Needs Kafka only.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use tally::config::Config;
use tally::event::Reason;
use tally::kafka::{DeadLetter, DeadLetterProducer, Record};

/// (key, payload, headers) of every record of `topic`'s partition 0.
type Seen = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

fn read_all(cfg: &Config, topic: &str, expected: usize) -> Vec<Seen> {
    let mut cc = tally::kafka::client_config(&cfg.kafka);
    cc.set("group.id", common::unique("dlq-reader"));
    let consumer: BaseConsumer = cc.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    while out.len() < expected && started.elapsed() < Duration::from_secs(60) {
        if let Some(m) = consumer.poll(Duration::from_millis(500)) {
            let m = m.unwrap();
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.key().map(<[u8]>::to_vec),
                m.payload().unwrap_or_default().to_vec(),
                headers,
            ));
        }
    }
    out
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a [u8]> {
    seen.2
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

/// A configuration with `max_message_bytes` and its one-partition dead-letter topic created.
async fn dead_letter_config(
    name: &str,
    max_message_bytes: usize,
) -> (tally::config::Config, String) {
    let mut cfg = common::test_config(name);
    cfg.kafka.topic_partitions = 1;
    cfg.pipeline.max_message_bytes = max_message_bytes;
    cfg.validate().unwrap();
    let topic = cfg.kafka.topics.dead_letter.clone();
    tally::kafka::ensure_topics(&cfg.kafka, &[topic.as_str()], 1)
        .await
        .expect("Kafka is up (run scripts/services up)");
    (cfg, topic)
}

/// A payload of `n` bytes that is not all the same byte (a cut would show).
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_record_of_max_message_bytes_plus_headers_is_dead_lettered_whole() {
    let (cfg, topic) = dead_letter_config("dlq_size", 1_000_000).await;

    // Source headers: 7 of 1,160 bytes with framing (8,120 of the 8,192 allowed).
    let headers: Vec<(String, Vec<u8>)> = (0..7)
        .map(|i| (format!("source-{i}"), vec![b'0' + i as u8; 1_142]))
        .collect();
    let record = Record {
        topic: Arc::from(cfg.kafka.topics.calls.as_str()),
        partition: 3,
        offset: 123_456,
        key: Some(vec![b'k'; 1024]),
        payload: payload(1_000_000),
        headers: headers.clone(),
        timestamp_ms: None,
    };
    let letter = DeadLetter {
        record: &record,
        reason: Reason::InvalidValue,
        field: Some("data.model".into()),
        detail: "é".repeat(600), // 1,200 bytes: cut to 1,024 + "…"
    };

    // What the issue saw: a producer with librdkafka's default size refuses it.
    let plain: FutureProducer = tally::kafka::producer_config(&cfg.kafka).create().unwrap();
    let mut plain_record = FutureRecord::to(&topic)
        .payload(&record.payload[..])
        .key(&record.key.as_ref().unwrap()[..]);
    let mut plain_headers = rdkafka::message::OwnedHeaders::new();
    for (k, v) in &headers {
        plain_headers = plain_headers.insert(rdkafka::message::Header {
            key: k,
            value: Some(v),
        });
    }
    plain_record = plain_record.headers(plain_headers);
    let refused = plain.send(plain_record, Duration::from_secs(30)).await;
    match refused {
        Err((rdkafka::error::KafkaError::MessageProduction(code), _)) => {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
        }
        other => panic!("expected MessageSizeTooLarge, got {other:?}"),
    }

    let producer =
        DeadLetterProducer::new(&cfg.kafka, cfg.pipeline.max_message_bytes, "ledger").unwrap();
    producer.send_all(&[letter]).await.expect("delivered");

    let seen = read_all(&cfg, &topic, 1);
    assert_eq!(seen.len(), 1);
    let dl = &seen[0];
    assert_eq!(dl.0.as_deref(), Some(&[b'k'; 1024][..]));
    assert_eq!(dl.1.len(), 1_000_000);
    assert!(dl.1 == record.payload, "the payload came back changed");
    assert_eq!(&dl.2[..7], &headers[..]);
    assert_eq!(header(dl, "tally.reason"), Some(&b"invalid_value"[..]));
    assert_eq!(header(dl, "tally.field"), Some(&b"data.model"[..]));
    let detail = String::from_utf8(header(dl, "tally.detail").unwrap().to_vec()).unwrap();
    assert_eq!(detail, format!("{}…", "é".repeat(512)));
    assert_eq!(
        header(dl, "tally.source.topic"),
        Some(cfg.kafka.topics.calls.as_bytes())
    );
    assert_eq!(header(dl, "tally.source.partition"), Some(&b"3"[..]));
    assert_eq!(header(dl, "tally.source.offset"), Some(&b"123456"[..]));
    assert_eq!(header(dl, "tally.pipeline"), Some(&b"ledger"[..]));
    assert_eq!(header(dl, "tally.truncated"), None);
    assert_eq!(header(dl, "tally.source.bytes"), None);
}

/// A `too_large` record and its dead letter as read back.
async fn dead_letter_of(
    name: &str,
    bytes: usize,
) -> (Record, (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>)) {
    let (cfg, topic) = dead_letter_config(name, 65_536).await;
    let record = Record {
        topic: Arc::from(cfg.kafka.topics.chat_responses.as_str()),
        partition: 0,
        offset: 7,
        key: Some(b"acct-1".to_vec()),
        payload: payload(bytes),
        headers: vec![("traceparent".into(), b"00-abc-def-01".to_vec())],
        timestamp_ms: None,
    };
    let letter = DeadLetter {
        record: &record,
        reason: Reason::TooLarge,
        field: None,
        detail: format!("{bytes} bytes, at most 65536"),
    };
    let producer =
        DeadLetterProducer::new(&cfg.kafka, cfg.pipeline.max_message_bytes, "ledger").unwrap();
    producer.send_all(&[letter]).await.expect("delivered");
    let mut seen = read_all(&cfg, &topic, 1);
    assert_eq!(seen.len(), 1);
    (record, seen.remove(0))
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_too_large_record_its_topic_held_is_dead_lettered_whole() {
    // 900 KB: accepted by the input topic, far over max_message_bytes (too_large).
    let (record, dl) = dead_letter_of("dlq_whole", 900_000).await;
    let dl = &dl;
    assert_eq!(dl.0.as_deref(), Some(&b"acct-1"[..]));
    assert!(dl.1 == record.payload, "the original bytes, whole");
    assert_eq!(header(dl, "tally.reason"), Some(&b"too_large"[..]));
    assert_eq!(header(dl, "tally.truncated"), None);
    assert_eq!(header(dl, "tally.source.bytes"), None);
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_record_beyond_the_capacity_is_dead_lettered_cut_and_says_so() {
    // 1,100,000 bytes: beyond the 1 MiB (1,048,576) carried whole.
    let (record, dl) = dead_letter_of("dlq_cut", 1_100_000).await;
    let dl = &dl;
    assert_eq!(dl.0.as_deref(), Some(&b"acct-1"[..]));
    assert_eq!(dl.1.len(), 1_048_576);
    assert!(dl.1[..] == record.payload[..1_048_576]);
    assert_eq!(
        dl.2[0],
        ("traceparent".to_owned(), b"00-abc-def-01".to_vec())
    );
    assert_eq!(header(dl, "tally.reason"), Some(&b"too_large"[..]));
    assert_eq!(header(dl, "tally.truncated"), Some(&b"payload"[..]));
    assert_eq!(header(dl, "tally.source.bytes"), Some(&b"1100000"[..]));
    assert_eq!(header(dl, "tally.source.offset"), Some(&b"7"[..]));
}
