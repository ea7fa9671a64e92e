//! Kafka client set-up: configuration pass-through (the client and producer configs every
//! rdkafka client of the crate is built from), topic administration, the one reader of
//! partitions' watermarks, the batching consumer with externally stored offsets (the
//! [`OffsetStore`] the ledger and analytics implement), consumer-group health, and the
//! dead-letter producer. The pipelines consume only through it; the API's readiness probe and
//! the CLI's dead-letter replay make plain consumers on [`client_config`], and the publishers
//! (the alert relay, `commands`, the API's ingest, the CLI) send with rdkafka's
//! `FutureProducer` on [`producer_config`]. Knows nothing of prices, ledgers or ClickHouse.

mod config;
mod consumer;
mod dead_letter;
pub mod groups;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

pub use config::KafkaConfig;
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

/// (low, high) watermarks by partition.
pub type Watermarks = std::collections::BTreeMap<TopicPartition, (i64, i64)>;

/// The (low, high) watermarks of every partition of `topics`, as the broker's metadata lists
/// them: the one place Tally reads them (the API's lag metric, idle exit, dead-letter replay).
/// Blocking: each call waits at most `timeout` for the broker.
pub fn watermarks<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topics: &[&str],
    timeout: Duration,
) -> Result<Watermarks, KafkaError> {
    let mut out = Watermarks::new();
    for &topic in topics {
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics() {
            for p in t.partitions() {
                let marks = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                out.insert((topic.to_owned(), p.id()), marks);
            }
        }
    }
    Ok(out)
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

/// A client context that keeps librdkafka's last client-level error (connection refused, TLS
/// handshake failed, SASL authentication failed...): an admin call that times out is then
/// reported with the cause, not only "timed out".
#[derive(Default)]
pub struct LastError(std::sync::Mutex<Option<String>>);

impl LastError {
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok()?.clone()
    }
}

impl ConsumerContext for LastError {}

impl ClientContext for LastError {
    /// librdkafka's log lines as rdkafka's default context logs them; an error or warning line
    /// (a connection or TLS handshake failure is logged as one, before any error callback) is
    /// also kept.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
                if matches!(level, L::Warning) {
                    tracing::warn!(facility = fac, "librdkafka: {log_message}");
                } else {
                    tracing::error!(facility = fac, "librdkafka: {log_message}");
                }
                if let Ok(mut last) = self.0.lock() {
                    *last = Some(log_message.to_owned());
                }
            }
            L::Notice | L::Info => tracing::info!(facility = fac, "librdkafka: {log_message}"),
            L::Debug => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(error = %error, reason, "librdkafka error");
        if let Ok(mut last) = self.0.lock() {
            *last = Some(reason.to_owned());
        }
    }
}

/// Why [`ensure_topics`] failed: the admin call's error and the client's last error.
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", .last_client_error.as_ref().map(|e| format!(" (last client error: {e})")).unwrap_or_default())]
pub struct TopicsError {
    #[source]
    pub error: KafkaError,
    pub last_client_error: Option<String>,
}

/// How long [`ensure_topics`]' probe of a failure waits for metadata: longer than
/// librdkafka's default `socket.connection.setup.timeout.ms` (30 s), so a connection that
/// cannot be set up (a TLS handshake with a plaintext listener that never answers) is
/// reported with its cause.
const METADATA_TIMEOUT: Duration = Duration::from_secs(40);

/// Creates the topics that do not exist yet (the broker may not auto-create them).
/// Existing topics are left untouched. When it fails, the error carries librdkafka's last
/// logged cause (a TLS handshake with a plaintext listener, a refused connection...), read by
/// a metadata probe: the admin client's own log lines are not served to the caller.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), TopicsError> {
    let admin: AdminClient<LastError> = client_config(kafka)
        .set_log_level(RDKafkaLogLevel::Warning)
        .create_with_context(LastError::default())
        .map_err(|error| TopicsError {
            error,
            last_client_error: None,
        })?;
    let Err(error) = create_topics(&admin, kafka, topics, partitions).await else {
        return Ok(());
    };
    let last_client_error = match topics.first() {
        Some(topic) => probe_cause(kafka, topic).await,
        None => None,
    };
    Err(TopicsError {
        error,
        last_client_error: last_client_error.or_else(|| admin.inner().context().get()),
    })
}

/// librdkafka's last warning or error while asking for `topic`'s metadata (None when the
/// broker answers).
async fn probe_cause(kafka: &KafkaConfig, topic: &str) -> Option<String> {
    // rdkafka sets librdkafka's log level from the `log` crate's, which Tally (tracing) leaves
    // off: warnings and errors are asked for, so the context sees them.
    let probe: BaseConsumer<LastError> = client_config(kafka)
        .set_log_level(RDKafkaLogLevel::Warning)
        .create_with_context(LastError::default())
        .ok()?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let answered = probe.fetch_metadata(Some(&topic), METADATA_TIMEOUT).is_ok();
        // librdkafka queues its log lines for the client's poll: serve them.
        for _ in 0..1_000 {
            if probe.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        if answered {
            None
        } else {
            probe.context().get()
        }
    })
    .await
    .ok()
    .flatten()
}

async fn create_topics(
    admin: &AdminClient<LastError>,
    kafka: &KafkaConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
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
