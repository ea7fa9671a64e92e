//! The Kafka clients' settings (`[kafka]`): brokers, consumer groups, topic creation, static
//! membership, group health and librdkafka properties passed through. The topics of each event
//! kind are the registry's ([`Topics`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::Topics;
use crate::names::valid_topic;
use crate::secret::redact_properties;
use crate::settings::{invalid, Invalid};

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// bootstrap.servers
    pub brokers: String,
    pub ledger_group: String,
    pub analytics_group: String,
    /// Partitions for topics Tally creates (existing topics are left as they are). Events are
    /// keyed by account, and a partition is consumed by one instance of a group at a time,
    /// so this caps how many instances can share the work (docs/scaling.md): 64 by default.
    pub topic_partitions: i32,
    pub replication_factor: i32,
    /// A stable name for this process (e.g. the host name): when set, the consumers use static
    /// group membership (`group.instance.id` = `<instance_id>-ledger` / `-analytics`), so on
    /// Apache Kafka a process restarted after a crash takes the dead member's place at once.
    /// A clean exit leaves the group either way (see `kafka::consumer`). Every running
    /// process needs its own. Not advised on Tansu 0.6.0 (README, Operations).
    pub instance_id: Option<String>,
    /// A consumer group of this process (ledger or analytics) that has had no partitions
    /// assigned for longer than this is reported: a warning in the log, 503 from `/readyz`
    /// naming the group. Rebalances leave a group without partitions for a moment; this is
    /// how long that may last before it counts as a fault.
    pub unassigned_alert_ms: u64,
    pub topics: Topics,
    /// librdkafka properties passed through verbatim (security.protocol, sasl.*, ssl.*...).
    /// Values of keys containing "password", "secret" or "key" are never logged.
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("ledger_group", &self.ledger_group)
            .field("analytics_group", &self.analytics_group)
            .field("topic_partitions", &self.topic_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("instance_id", &self.instance_id)
            .field("unassigned_alert_ms", &self.unassigned_alert_ms)
            .field("topics", &self.topics)
            .field("properties", &redact_properties(&self.properties))
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            ledger_group: "tally-ledger".into(),
            analytics_group: "tally-analytics".into(),
            topic_partitions: 64,
            replication_factor: 1,
            instance_id: None,
            unassigned_alert_ms: 30_000,
            topics: Topics::default(),
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// Checks the section's own values (topic names across sections are `config`'s).
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.brokers.trim().is_empty() {
            return invalid("kafka.brokers", "must not be empty");
        }
        if self.ledger_group.is_empty() || self.analytics_group.is_empty() {
            return invalid("kafka.ledger_group", "group ids must not be empty");
        }
        if self.ledger_group == self.analytics_group {
            return invalid(
                "kafka.analytics_group",
                "must differ from kafka.ledger_group (the pipelines track offsets separately)",
            );
        }
        if !(1..=1024).contains(&self.topic_partitions) {
            return invalid("kafka.topic_partitions", "must be 1..=1024");
        }
        if let Some(id) = &self.instance_id {
            if id.is_empty() || !valid_topic(id) {
                return invalid(
                    "kafka.instance_id",
                    "must be 1..249 characters of [A-Za-z0-9._-]",
                );
            }
        }
        if !(100..=86_400_000).contains(&self.unassigned_alert_ms) {
            return invalid(
                "kafka.unassigned_alert_ms",
                "must be 100..=86400000 (0.1 s to a day)",
            );
        }
        if self.replication_factor < 1 {
            return invalid("kafka.replication_factor", "must be >= 1");
        }
        Ok(())
    }
}
