//! The alert relay: publishes outbox alerts (written with the change that caused them) to
//! their Kafka topics, keyed by account, then marks them published. At-least-once: a crash
//! between the broker's acknowledgement and the mark re-sends an alert with the same id,
//! which consumers dedupe.

use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

use rdkafka::error::KafkaError;

use crate::config::{AlertTopics, Config};
use crate::ledger::store::OutboxAlert;
use crate::ledger::{Store, StoreError};
use crate::retry::{Classify, Fault, Halt, Retry};

/// How long a claimed alert is left to this relay: beyond the send timeout, so that another
/// relay takes it over only when this one is gone (or hopelessly slow: then it is sent twice,
/// with the same id and content).
const LEASE: Duration = Duration::from_secs(90);
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes up to `limit` pending alerts; returns how many. No transaction is open while
/// the broker is asked: the alerts are claimed with a lease, sent, then marked published.
pub async fn relay_once(
    store: &mut Store,
    producer: &FutureProducer,
    topics: &AlertTopics,
    limit: i64,
) -> Result<usize, RelayError> {
    let alerts = store.claim_outbox(limit, LEASE).await?;
    if alerts.is_empty() {
        return Ok(0);
    }
    publish(producer, topics, &alerts).await?;
    fail::fail_point!("alerts-after-send", |_| std::process::abort());
    let seqs: Vec<i64> = alerts.iter().map(|a| a.seq).collect();
    store.mark_published(&seqs).await?;
    Ok(alerts.len())
}

async fn publish(
    producer: &FutureProducer,
    topics: &AlertTopics,
    alerts: &[OutboxAlert],
) -> Result<(), KafkaError> {
    let sends = alerts.iter().map(|a| {
        let topic = topics.for_kind(&a.kind).unwrap_or(&topics.low_balance);
        let send = producer.send(
            FutureRecord::to(topic)
                .key(a.account_id.as_str())
                .payload(a.payload.as_str()),
            SEND_TIMEOUT,
        );
        async move { send.await.map_err(|(e, _)| e) }
    });
    try_join_all(sends).await.map(drop)
}

/// Why a relay round failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("alert outbox: {0}")]
    Store(#[from] StoreError),
    #[error("publishing alerts: {0}")]
    Kafka(#[from] KafkaError),
}

impl Classify for RelayError {
    fn fault(&self) -> Fault {
        match self {
            RelayError::Store(e) => e.fault(),
            // An alert is Tally's own message: one the broker refuses is a bug, not input.
            RelayError::Kafka(e) => match e.fault() {
                Fault::Input => Fault::Bug,
                f => f,
            },
        }
    }
}

/// Relays until shutdown: drains the outbox, then waits `alerts.relay_interval_ms`.
/// Transient faults are retried; a bug ends the loop with its error.
pub async fn run(cfg: Arc<Config>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<u64> {
    let producer: FutureProducer = crate::kafka::producer_config(&cfg.kafka).create()?;
    let idle = Duration::from_millis(cfg.alerts.relay_interval_ms);
    let mut retry = Retry::with_policy(cfg.pipeline.retry_policy(), shutdown.clone());
    let mut store: Option<Store> = None;
    let mut published = 0u64;
    loop {
        let attempt = async {
            if store.as_ref().is_none_or(Store::is_closed) {
                store = Some(Store::connect(&cfg.postgres).await?);
            }
            let s = store.as_mut().expect("connected above");
            relay_once(s, &producer, &cfg.alerts.topics, 500).await
        };
        let round = match retry.settle("relay alerts", attempt.await).await {
            Ok(Some(n)) => Ok(n),
            Ok(None) => continue,
            Err(halt) => Err(halt),
        };
        match round {
            Ok(n) => {
                published += n as u64;
                if n > 0 {
                    tracing::info!(alerts = n, "published alerts");
                    continue;
                }
                // Drained: stop now if asked, else wait for more.
                if *shutdown.borrow() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Err(Halt::Shutdown) => break,
            Err(Halt::Failed(e)) => return Err(anyhow::anyhow!("alert relay: {e}")),
        }
    }
    Ok(published)
}
