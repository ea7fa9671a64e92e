//! Kafka client set-up: configuration pass-through, topic administration, the batching
//! consumer with externally stored offsets, and the dead-letter producer.
//! Owns every rdkafka call; knows nothing of prices, ledgers or ClickHouse.

mod consumer;
mod dead_letter;
pub mod groups;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

pub use consumer::{
    Batch, BatchConsumer, BatchLimits, ConsumeError, LoadError, OffsetStore, Positions, Record,
    TopicPartition,
};
pub use dead_letter::{
    DeadLetter, DeadLetterProducer, HEADER_DETAIL, HEADER_FIELD, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_PIPELINE, HEADER_REASON, HEADER_TOPIC,
};

/// Whose fault a Kafka error is: a message the broker refuses for its size or format is the
/// input's; authorization, authentication and configuration failures are a broken
/// deployment; the rest (broker down, timeouts, leader changes, queue full) is transient.
impl crate::fault::Classify for KafkaError {
    fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        use RDKafkaErrorCode as C;
        match self {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => Fault::Bug,
            _ => match self.rdkafka_error_code() {
                Some(
                    C::MessageSizeTooLarge
                    | C::InvalidMessageSize
                    | C::InvalidMessage
                    | C::InvalidRecord
                    | C::MessageBatchTooLarge,
                ) => Fault::Input,
                Some(
                    C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::TransactionalIdAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::Authentication
                    | C::UnsupportedSASLMechanism
                    | C::InvalidConfig,
                ) => Fault::Bug,
                _ => Fault::Transient,
            },
        }
    }
}

/// Whether stored positions reach every partition's end (high watermark); empty partitions
/// count as reached.
pub fn reached(ends: &Positions, stored: &Positions) -> bool {
    ends.iter()
        .all(|(k, &high)| high == 0 || stored.get(k).copied().unwrap_or(0) >= high)
}

/// Base client configuration: brokers plus every pass-through librdkafka property.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        cc.set(k, v);
    }
    cc
}

/// A producer configuration: idempotent, all replicas acknowledge.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut cc = client_config(kafka);
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    cc
}

/// Creates the topics that do not exist yet (the broker may not auto-create them).
/// Existing topics are left untouched.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                partitions,
                TopicReplication::Fixed(kafka.replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(new.iter(), &opts).await? {
        match result {
            Ok(topic) => tracing::info!(topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic, error = %code, "could not create topic");
                })
            }
        }
    }
    Ok(())
}
