//! Typed settings from a TOML file plus `TALLY_*` environment overrides, validated once at
//! start. [`Config`] composes the components' own settings, each kept beside its logic and
//! validating its own section (`kafka::KafkaConfig`, `event::Topics`,
//! `ledger::{PostgresConfig, BillingConfig}`, `analytics::ClickHouseConfig`,
//! `alerts::AlertsConfig`, `rating::PricesConfig`: re-exported here), with the two sections
//! defined here: the pipelines' (`[pipeline]`) and the API's (`[api]`, an entry point above
//! this module). Owns loading, and the checks that span sections (topic names unique across
//! kafka and alerts, dead-letter size against librdkafka's limit, the grace against the
//! dedupe window); never logs secrets (see [`Secret`]).
//!
//! Environment overrides use `__` between sections and keys:
//! `TALLY_KAFKA__BROKERS=host:9092`, `TALLY_PIPELINE__BATCH_MAX_EVENTS=2000`,
//! `TALLY_POSTGRES__URL=...`. librdkafka properties pass through from `[kafka.properties]`
//! (or `TALLY_KAFKA__PROPERTIES__SASL.MECHANISM=...` — keys are lower-cased).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use crate::alerts::{AlertTopics, AlertsConfig};
pub use crate::analytics::ClickHouseConfig;
pub use crate::event::Topics;
pub use crate::kafka::KafkaConfig;
pub use crate::ledger::{conninfo, redact_url, BillingConfig, PostgresConfig};
use crate::names::valid_topic;
pub use crate::names::{valid_account_id, valid_identifier};
pub use crate::rating::PricesConfig;
use crate::secret::redact_properties;
pub use crate::secret::Secret;
use crate::settings::Invalid;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub postgres: PostgresConfig,
    pub clickhouse: ClickHouseConfig,
    pub pipeline: PipelineConfig,
    pub prices: PricesConfig,
    pub alerts: AlertsConfig,
    pub api: ApiConfig,
    pub billing: BillingConfig,
}

/// The HTTP API and dashboard served by `tally run` (see `src/api`). Kept here, not in
/// `api/`: the API is an entry point above this module, and arrows only point down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the API from `tally run` (false: pipelines only).
    pub enabled: bool,
    /// Address to listen on, e.g. "127.0.0.1:8080" or "0.0.0.0:8080" (port 0: any free port).
    pub listen: String,
    /// Larger request bodies are refused with 413 (`POST /v1/events`: `ingest_max_bytes`).
    pub max_body_bytes: usize,
    /// `POST /v1/events`: most events in one batch (more: 400)...
    pub ingest_max_events: usize,
    /// ... and largest body (larger: 413).
    pub ingest_max_bytes: usize,
    /// Bearer tokens, stored as SHA-256 hashes: `printf %s "$TOKEN" | sha256sum`.
    pub tokens: Vec<ApiToken>,
    /// A connection must send a request's whole header within this time, else it is closed
    /// (slow-header clients; also bounds how long an idle keep-alive connection is kept).
    pub header_read_timeout_ms: u64,
    /// A request (body read and handler) must be answered within this time, else 503.
    pub request_timeout_ms: u64,
    /// Connections served at once; further ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// `/readyz` and `/metrics` reuse their dependency probes (PostgreSQL, ClickHouse, Kafka)
    /// for this long, and concurrent requests share one probe: a flood cannot reach them.
    pub probe_cache_ms: u64,
}

/// One API bearer token: its SHA-256 (hex, never the token itself) and what it may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// A label for logs (the token and its hash are never logged).
    #[serde(default)]
    pub name: Option<String>,
    /// Hex SHA-256 of the token (64 hex digits).
    pub sha256: Secret,
    pub role: ApiRole,
    /// The one account an `account` token may read (required for, and only for, that role).
    #[serde(default)]
    pub account_id: Option<String>,
    /// An `ingest` token may publish events of these CloudEvents `source`s only (absent: any
    /// source). Only for that role.
    #[serde(default)]
    pub sources: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiRole {
    /// Reads every account, writes grants and plans.
    Admin,
    /// Reads its own account only.
    Account,
    /// Publishes usage events (`POST /v1/events`), of its `sources` when listed; reads nothing.
    Ingest,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 16 * 1024,
            ingest_max_events: 1_000,
            ingest_max_bytes: 1024 * 1024,
            tokens: Vec::new(),
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_connections: 1024,
            probe_cache_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Ledger consumers this process runs in the ledger group, each with its own PostgreSQL
    /// connection: the group splits the partitions between them as between instances, and
    /// every event of an account is in the same partition number of each topic, so they
    /// apply disjoint accounts at the same time (docs/scaling.md).
    pub ledger_workers: usize,
    /// A batch closes at whichever limit comes first: events, bytes, or time.
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub batch_max_wait_ms: u64,
    /// The analytics pipeline's own batch limits: fewer, larger ClickHouse inserts (each
    /// batch is a few statements whatever its size).
    pub analytics_batch_max_events: usize,
    pub analytics_batch_max_bytes: usize,
    pub analytics_batch_max_wait_ms: u64,
    /// Analytics resolves the identities of the batches it wrote (one lookup whose time
    /// grows with the stored identities, not with the batches: docs/analytics.md) and only
    /// then stores their positions: at the latest this long after the first of them, when
    /// this many events are pending, or when the stream is quiet for
    /// `analytics_batch_max_wait_ms`. Until then a re-sent event counts twice in the roll-ups;
    /// a crash reads the pending batches again.
    pub analytics_resolve_every_ms: u64,
    pub analytics_resolve_max_events: usize,
    /// Larger messages are dead-lettered as too_large.
    pub max_message_bytes: usize,
    /// Event times further ahead than this are invalid.
    pub max_future_seconds: i64,
    /// Events dated (event time) more than this before now are dead-lettered as too_late;
    /// dedupe claims are kept this long plus `ledger::DEDUPE_PURGE_MARGIN`. Enlarging it
    /// never re-admits an event whose claim was purged (the stored dedupe horizon).
    pub dedupe_window_days: i64,
    /// How often the purge task (`pipeline::purge`, beside the ledger consumers) deletes the
    /// dedupe claims older than the window, 10,000 a statement until none is left.
    pub dedupe_purge_interval_ms: u64,
    /// Back-off bounds when PostgreSQL or ClickHouse is unavailable.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How often the scheduler inside `tally run` resets cycles and expires grants.
    pub scheduler_interval_ms: u64,
    /// On SIGTERM/SIGINT `tally run` gives its pipelines this long to finish the batch in
    /// hand; whatever is still running then is named in the log and the process exits
    /// non-zero (the store of record has everything committed before; the rest is read again
    /// at the next start).
    pub shutdown_timeout_ms: u64,
}

impl PipelineConfig {
    /// The back-off of every retried store and broker call (`retry_initial_ms`, `retry_max_ms`).
    pub fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy::from_millis(self.retry_initial_ms, self.retry_max_ms)
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            ledger_workers: 1,
            batch_max_events: 5_000,
            batch_max_bytes: 8 * 1024 * 1024,
            batch_max_wait_ms: 100,
            analytics_batch_max_events: 50_000,
            analytics_batch_max_bytes: 64 * 1024 * 1024,
            analytics_batch_max_wait_ms: 1_000,
            analytics_resolve_every_ms: 5_000,
            analytics_resolve_max_events: 250_000,
            max_message_bytes: 64 * 1024,
            max_future_seconds: 300,
            dedupe_window_days: 35,
            dedupe_purge_interval_ms: 3_600_000,
            retry_initial_ms: crate::retry::RetryPolicy::DEFAULT.initial.as_millis() as u64,
            retry_max_ms: crate::retry::RetryPolicy::DEFAULT.max.as_millis() as u64,
            scheduler_interval_ms: 10_000,
            shutdown_timeout_ms: 30_000,
        }
    }
}

/// Most `pipeline.ledger_workers` in one process (more instances scale further).
pub const MAX_LEDGER_WORKERS: usize = 8;

/// Largest `pipeline.max_message_bytes` accepted (16 MiB).
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 16 * 1024 * 1024;

/// A configuration error, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl From<Invalid> for ConfigError {
    fn from(e: Invalid) -> Self {
        ConfigError::Invalid {
            key: e.key,
            message: e.message,
        }
    }
}

impl Config {
    /// Defaults, then the file (when given; it must exist), then `TALLY_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        // Only SECTION__KEY variables are settings: TALLY_CONFIG, TALLY_LOG_FORMAT and the
        // tests' TALLY_TEST_* variables are not.
        let env = Env::prefixed("TALLY_")
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        Self::load_from(file, env)
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if let Err(source) = std::fs::metadata(path) {
                return Err(ConfigError::File {
                    path: path.to_owned(),
                    source,
                });
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Parse(figment_error(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value once, so the rest of the program can trust them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        self.kafka.validate()?;
        self.postgres.validate()?;
        self.clickhouse.validate()?;
        self.alerts.validate()?;
        self.billing.validate()?;
        let mut topics = self.kafka.topics.all();
        topics.extend(self.alerts.topics.all());
        for (i, t) in topics.iter().enumerate() {
            if !valid_topic(t) {
                return Err(invalid(
                    "kafka.topics",
                    format!("`{t}` is not a valid topic name ([A-Za-z0-9._-]{{1,249}})"),
                ));
            }
            if topics[..i].contains(t) {
                return Err(invalid("kafka.topics", format!("`{t}` is used twice")));
            }
        }
        let p = &self.pipeline;
        if !(1..=100_000).contains(&p.batch_max_events) {
            return Err(invalid("pipeline.batch_max_events", "must be 1..=100000"));
        }
        if p.batch_max_bytes < p.max_message_bytes {
            return Err(invalid(
                "pipeline.batch_max_bytes",
                "must be at least pipeline.max_message_bytes",
            ));
        }
        if !(1..=60_000).contains(&p.batch_max_wait_ms) {
            return Err(invalid("pipeline.batch_max_wait_ms", "must be 1..=60000"));
        }
        if !(1..=500_000).contains(&p.analytics_batch_max_events) {
            return Err(invalid(
                "pipeline.analytics_batch_max_events",
                "must be 1..=500000",
            ));
        }
        if p.analytics_batch_max_bytes < p.max_message_bytes {
            return Err(invalid(
                "pipeline.analytics_batch_max_bytes",
                "must be at least pipeline.max_message_bytes",
            ));
        }
        if !(1..=60_000).contains(&p.analytics_batch_max_wait_ms) {
            return Err(invalid(
                "pipeline.analytics_batch_max_wait_ms",
                "must be 1..=60000",
            ));
        }
        if !(1..=600_000).contains(&p.analytics_resolve_every_ms) {
            return Err(invalid(
                "pipeline.analytics_resolve_every_ms",
                "must be 1..=600000",
            ));
        }
        if !(1..=10_000_000).contains(&p.analytics_resolve_max_events) {
            return Err(invalid(
                "pipeline.analytics_resolve_max_events",
                "must be 1..=10000000",
            ));
        }
        if !(256..=MAX_MESSAGE_BYTES_LIMIT).contains(&p.max_message_bytes) {
            return Err(invalid(
                "pipeline.max_message_bytes",
                "must be 256..=16777216",
            ));
        }
        // Dead letters carry up to max_message_bytes of payload plus bounded headers: the
        // dead-letter producer's message.max.bytes must be allowed to be that large.
        let dead_letter_bytes = crate::kafka::DeadLetterProducer::max_bytes(p.max_message_bytes);
        if let Some(set) = self.kafka.properties.get("message.max.bytes") {
            match set.trim().parse::<usize>() {
                Ok(limit) if limit >= dead_letter_bytes => {}
                _ => {
                    return Err(invalid(
                        "pipeline.max_message_bytes",
                        format!(
                            "dead letters need message.max.bytes >= {dead_letter_bytes} ({} of payload + {} of headers), but kafka.properties sets it to `{set}`: lower pipeline.max_message_bytes or raise the property",
                            crate::kafka::DeadLetterProducer::payload_capacity(p.max_message_bytes),
                            crate::kafka::DeadLetterProducer::OVERHEAD_BYTES
                        ),
                    ))
                }
            }
        }
        if p.max_future_seconds < 0 {
            return Err(invalid("pipeline.max_future_seconds", "must be >= 0"));
        }
        if !(1..=3650).contains(&p.dedupe_window_days) {
            return Err(invalid("pipeline.dedupe_window_days", "must be 1..=3650"));
        }
        let grace = self.billing.grace;
        if grace.as_secs() >= p.dedupe_window_days as u64 * 86_400 {
            return Err(invalid(
                "billing.grace",
                "must be shorter than pipeline.dedupe_window_days",
            ));
        }
        if p.retry_initial_ms == 0 || p.retry_max_ms < p.retry_initial_ms {
            return Err(invalid(
                "pipeline.retry_max_ms",
                "retry_initial_ms must be > 0 and <= retry_max_ms",
            ));
        }
        if !(100..=3_600_000).contains(&p.shutdown_timeout_ms) {
            return Err(invalid(
                "pipeline.shutdown_timeout_ms",
                "must be 100..=3600000 (0.1 s to an hour)",
            ));
        }
        if !(1_000..=86_400_000).contains(&p.dedupe_purge_interval_ms) {
            return Err(invalid(
                "pipeline.dedupe_purge_interval_ms",
                "must be 1000..=86400000 (a second to a day)",
            ));
        }
        if !(1..=MAX_LEDGER_WORKERS).contains(&p.ledger_workers) {
            return Err(invalid(
                "pipeline.ledger_workers",
                format!("must be 1..={MAX_LEDGER_WORKERS}"),
            ));
        }
        if p.ledger_workers > self.kafka.topic_partitions as usize {
            return Err(invalid(
                "pipeline.ledger_workers",
                "must be at most kafka.topic_partitions (a worker without a partition idles)",
            ));
        }
        if !(1..=3_600_000).contains(&p.scheduler_interval_ms) {
            return Err(invalid(
                "pipeline.scheduler_interval_ms",
                "must be 1..=3600000",
            ));
        }
        self.validate_api()
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let api = &self.api;
        if api.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "api.listen",
                format!("`{}` is not an IP:port address", api.listen),
            ));
        }
        if !(256..=16 * 1024 * 1024).contains(&api.max_body_bytes) {
            return Err(invalid("api.max_body_bytes", "must be 256..=16777216"));
        }
        if !(1..=600_000).contains(&api.header_read_timeout_ms) {
            return Err(invalid("api.header_read_timeout_ms", "must be 1..=600000"));
        }
        if !(1..=3_600_000).contains(&api.request_timeout_ms) {
            return Err(invalid("api.request_timeout_ms", "must be 1..=3600000"));
        }
        if !(1..=100_000).contains(&api.max_connections) {
            return Err(invalid("api.max_connections", "must be 1..=100000"));
        }
        if api.probe_cache_ms > 60_000 {
            return Err(invalid("api.probe_cache_ms", "must be 0..=60000"));
        }
        for (i, t) in api.tokens.iter().enumerate() {
            // Never echo the hash: name the token by position and label.
            let which = format!(
                "token #{} ({})",
                i + 1,
                t.name.as_deref().unwrap_or("unnamed")
            );
            let hash = t.sha256.expose();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    "api.tokens.sha256",
                    format!("{which}: must be 64 hex digits (the SHA-256 of the token)"),
                ));
            }
            let same = |o: &ApiToken| o.sha256.expose().eq_ignore_ascii_case(hash);
            if api.tokens[..i].iter().any(same) {
                return Err(invalid(
                    "api.tokens.sha256",
                    format!("{which}: the same token is configured twice"),
                ));
            }
            match (t.role, t.account_id.as_deref()) {
                (ApiRole::Account, Some(id)) if valid_account_id(id) => {}
                (ApiRole::Account, _) => {
                    return Err(invalid(
                        "api.tokens.account_id",
                        format!("{which}: an account token needs an account_id matching ^[A-Za-z0-9._:-]{{1,128}}$"),
                    ))
                }
                (ApiRole::Admin, Some(_)) => {
                    return Err(invalid(
                        "api.tokens.account_id",
                        format!("{which}: an admin token reads every account; remove account_id"),
                    ))
                }
                (ApiRole::Admin, None) => {}
                (ApiRole::Ingest, Some(_)) => {
                    return Err(invalid(
                        "api.tokens.account_id",
                        format!("{which}: an ingest token publishes events of any account; remove account_id (limit it with sources)"),
                    ))
                }
                (ApiRole::Ingest, None) => {}
            }
            match &t.sources {
                Some(_) if t.role != ApiRole::Ingest => {
                    return Err(invalid(
                        "api.tokens.sources",
                        format!("{which}: only an ingest token takes sources"),
                    ))
                }
                Some(sources) if sources.is_empty() || sources.iter().any(|s| s.is_empty()) => {
                    return Err(invalid(
                        "api.tokens.sources",
                        format!(
                            "{which}: list at least one source, none empty (omit sources for any)"
                        ),
                    ))
                }
                _ => {}
            }
        }
        if !(1..=100_000).contains(&api.ingest_max_events) {
            return Err(invalid("api.ingest_max_events", "must be 1..=100000"));
        }
        if !(256..=64 * 1024 * 1024).contains(&api.ingest_max_bytes) {
            return Err(invalid("api.ingest_max_bytes", "must be 256..=67108864"));
        }
        Ok(())
    }

    /// Every topic Tally creates: inputs, dead letters, alert topics.
    pub fn all_topics(&self) -> Vec<&str> {
        let mut topics = self.kafka.topics.all();
        topics.extend(self.alerts.topics.all());
        topics
    }

    /// librdkafka properties for display: secrets replaced by `***`.
    pub fn kafka_properties_redacted(&self) -> BTreeMap<String, String> {
        redact_properties(&self.kafka.properties)
    }
}

fn figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            if key.is_empty() {
                e.kind.to_string()
            } else {
                format!("key `{key}`: {}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(vars: &[(&str, &str)]) -> Env {
        // figment reads the process environment; tests use a unique prefix to stay isolated.
        let prefix = format!("TALLYTEST{}_", vars.len() + std::process::id() as usize);
        for (k, v) in vars {
            std::env::set_var(format!("{prefix}{k}"), v);
        }
        Env::prefixed(&prefix).split("__")
    }

    #[test]
    fn dead_letters_must_fit_a_configured_message_max_bytes() {
        let mut cfg = Config::default();
        // 1 MiB (1048576) + 13824 = 1062400 by hand: exactly that is enough, one byte less
        // is not.
        cfg.kafka
            .properties
            .insert("message.max.bytes".into(), "1062400".into());
        cfg.validate().unwrap();
        cfg.kafka
            .properties
            .insert("message.max.bytes".into(), "1062399".into());
        match cfg.validate() {
            Err(ConfigError::Invalid { key, message }) => {
                assert_eq!(key, "pipeline.max_message_bytes");
                assert!(message.contains("1062400"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        cfg.kafka
            .properties
            .insert("message.max.bytes".into(), "lots".into());
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                key: "pipeline.max_message_bytes",
                ..
            })
        ));
    }

    #[test]
    fn api_limits_are_validated() {
        let base = Config::default();
        assert_eq!(base.api.header_read_timeout_ms, 10_000);
        assert_eq!(base.api.request_timeout_ms, 30_000);
        assert_eq!(base.api.max_connections, 1024);
        assert_eq!(base.api.probe_cache_ms, 1_000);
        let key = |f: fn(&mut ApiConfig)| {
            let mut cfg = base.clone();
            f(&mut cfg.api);
            match cfg.validate() {
                Err(ConfigError::Invalid { key, .. }) => key,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            key(|a| a.header_read_timeout_ms = 0),
            "api.header_read_timeout_ms"
        );
        assert_eq!(key(|a| a.request_timeout_ms = 0), "api.request_timeout_ms");
        assert_eq!(key(|a| a.max_connections = 0), "api.max_connections");
        assert_eq!(key(|a| a.probe_cache_ms = 60_001), "api.probe_cache_ms");
    }

    #[test]
    fn the_dedupe_purge_interval_is_an_hour_and_validated() {
        let base = Config::default();
        assert_eq!(base.pipeline.dedupe_purge_interval_ms, 3_600_000);
        for (value, ok) in [
            (999, false),
            (1_000, true),
            (86_400_000, true),
            (86_400_001, false),
        ] {
            let mut cfg = base.clone();
            cfg.pipeline.dedupe_purge_interval_ms = value;
            match cfg.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(ConfigError::Invalid { key, .. }) => {
                    assert!(!ok, "{value} refused");
                    assert_eq!(key, "pipeline.dedupe_purge_interval_ms");
                }
                Err(other) => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn ledger_workers_are_one_to_eight() {
        assert_eq!(Config::default().pipeline.ledger_workers, 1);
        for (value, partitions, ok) in [
            (0, 64, false),
            (1, 64, true),
            (8, 64, true),
            (9, 64, false),
            (3, 3, true),
            (4, 3, false),
        ] {
            let mut cfg = Config::default();
            cfg.pipeline.ledger_workers = value;
            cfg.kafka.topic_partitions = partitions;
            match cfg.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(ConfigError::Invalid { key, .. }) => {
                    assert!(!ok, "{value} refused");
                    assert_eq!(key, "pipeline.ledger_workers");
                }
                Err(other) => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn liveness_settings_are_validated() {
        let base = Config::default();
        assert_eq!(base.kafka.unassigned_alert_ms, 30_000);
        assert_eq!(base.pipeline.shutdown_timeout_ms, 30_000);
        let key = |f: fn(&mut Config)| {
            let mut cfg = base.clone();
            f(&mut cfg);
            match cfg.validate() {
                Err(ConfigError::Invalid { key, .. }) => key,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            key(|c| c.kafka.unassigned_alert_ms = 99),
            "kafka.unassigned_alert_ms"
        );
        assert_eq!(
            key(|c| c.kafka.unassigned_alert_ms = 86_400_001),
            "kafka.unassigned_alert_ms"
        );
        assert_eq!(
            key(|c| c.pipeline.shutdown_timeout_ms = 0),
            "pipeline.shutdown_timeout_ms"
        );
        assert_eq!(
            key(|c| c.pipeline.shutdown_timeout_ms = 3_600_001),
            "pipeline.shutdown_timeout_ms"
        );
        let mut ok = base.clone();
        ok.kafka.unassigned_alert_ms = 100;
        ok.pipeline.shutdown_timeout_ms = 100;
        ok.validate().unwrap();
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_then_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.toml");
        std::fs::write(
            &path,
            "[kafka]\nbrokers = \"file:9092\"\n[pipeline]\nbatch_max_events = 10\n[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n",
        )
        .unwrap();
        let cfg =
            Config::load_from(Some(&path), env_with(&[("KAFKA__BROKERS", "env:9092")])).unwrap();
        assert_eq!(cfg.kafka.brokers, "env:9092");
        assert_eq!(cfg.pipeline.batch_max_events, 10);
        assert_eq!(cfg.kafka_properties_redacted()["sasl.password"], "***");
        assert_eq!(cfg.kafka.properties["sasl.password"], "hunter2");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.toml");
        std::fs::write(&path, "[pipeline]\nbatch_max_events = \"many\"\n").unwrap();
        let err = Config::load_from(Some(&path), Env::prefixed("TALLY_NOTHING_")).unwrap_err();
        assert!(
            err.to_string().contains("pipeline.batch_max_events"),
            "{err}"
        );

        std::fs::write(&path, "[pipeline]\nbatch_max_events = 0\n").unwrap();
        let err = Config::load_from(Some(&path), Env::prefixed("TALLY_NOTHING_")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration key `pipeline.batch_max_events`: must be 1..=100000"
        );

        std::fs::write(&path, "[pipeline]\nbatch_size = 3\n").unwrap();
        let err = Config::load_from(Some(&path), Env::prefixed("TALLY_NOTHING_")).unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load_from(
            Some(Path::new("/nonexistent/tally.toml")),
            Env::prefixed("X_"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tally.toml"));
    }

    #[test]
    fn secrets_are_redacted() {
        let mut cfg = Config::default();
        cfg.postgres.url = Secret::new("postgres://tally:s3cret@db/tally");
        cfg.clickhouse.password = Secret::new("chpass");
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("chpass"),
            "{shown}"
        );
        assert!(shown.contains("postgres://tally:***@db/tally"));
        assert_eq!(
            redact_url("host=db user=t password=x"),
            "host=db user=t password=***"
        );
    }

    #[test]
    fn api_settings_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.toml");
        let hash = "ab".repeat(32);
        std::fs::write(
            &path,
            format!(
                "[api]\nlisten = \"127.0.0.1:0\"\n[[api.tokens]]\nsha256 = \"{hash}\"\nrole = \"admin\"\n\
                 [[api.tokens]]\nname = \"acme\"\nsha256 = \"{}\"\nrole = \"account\"\naccount_id = \"acct-1\"\n",
                "CD".repeat(32)
            ),
        )
        .unwrap();
        let cfg = Config::load_from(Some(&path), Env::prefixed("TALLY_NOTHING_")).unwrap();
        assert_eq!(cfg.api.tokens.len(), 2);
        assert_eq!(cfg.api.tokens[1].role, ApiRole::Account);
        assert!(!format!("{cfg:?}").contains(&hash), "hashes are not shown");

        let check = |edit: &dyn Fn(&mut Config)| {
            let mut c = cfg.clone();
            edit(&mut c);
            c.validate().unwrap_err().to_string()
        };
        let err = check(&|c| c.api.listen = "localhost".into());
        assert!(err.contains("api.listen"), "{err}");
        let err = check(&|c| c.api.tokens[0].sha256 = Secret::new("secret-token"));
        assert!(
            err.contains("api.tokens.sha256") && !err.contains("secret-token"),
            "{err}"
        );
        let err = check(&|c| c.api.tokens[1].sha256 = Secret::new(hash.to_uppercase()));
        assert!(err.contains("twice"), "{err}");
        let err = check(&|c| c.api.tokens[1].account_id = None);
        assert!(err.contains("api.tokens.account_id"), "{err}");
        let err = check(&|c| c.api.tokens[0].account_id = Some("acct-1".into()));
        assert!(err.contains("api.tokens.account_id"), "{err}");
        let err = check(&|c| c.api.tokens[1].account_id = Some("a/b".into()));
        assert!(err.contains("api.tokens.account_id"), "{err}");
        let err = check(&|c| c.api.max_body_bytes = 10);
        assert!(err.contains("api.max_body_bytes"), "{err}");
    }
}
