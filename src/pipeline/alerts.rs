//! The alert relay: publishes outbox alerts (written with the change that caused them) to
//! their Kafka topics, keyed by account, then marks them published. At-least-once: a crash
//! between the broker's acknowledgement and the mark re-sends an alert with the same id,
//! which consumers dedupe.

use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

use super::Backoff;
use crate::config::{AlertTopics, Config};
use crate::ledger::store::OutboxAlert;
use crate::ledger::{Store, StoreError};

/// Publishes up to `limit` pending alerts; returns how many.
pub async fn relay_once(
    store: &mut Store,
    producer: &FutureProducer,
    topics: &AlertTopics,
    limit: i64,
) -> Result<usize, StoreError> {
    store
        .publish_outbox(limit, |alerts: Vec<OutboxAlert>| async move {
            let sends = alerts.iter().map(|a| {
                let topic = topics.for_kind(&a.kind).unwrap_or(&topics.low_balance);
                let send = producer.send(
                    FutureRecord::to(topic)
                        .key(a.account_id.as_str())
                        .payload(a.payload.as_str()),
                    Duration::from_secs(30),
                );
                async move { send.await.map_err(|(e, _)| e.to_string()) }
            });
            let sent = try_join_all(sends).await.map(|_| ());
            fail::fail_point!("alerts-after-send", sent.is_ok(), |_| std::process::abort());
            sent
        })
        .await
}

pub async fn run(cfg: Arc<Config>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<u64> {
    let producer: FutureProducer = crate::kafka::producer_config(&cfg.kafka).create()?;
    let idle = Duration::from_millis(cfg.alerts.relay_interval_ms);
    let mut backoff = Backoff::new(&cfg.pipeline);
    let mut store: Option<Store> = None;
    let mut published = 0u64;
    loop {
        let s = match store.as_mut() {
            Some(s) => s,
            None => match Store::connect(&cfg.postgres).await {
                Ok(s) => store.insert(s),
                Err(e) => {
                    tracing::warn!(error = %e, "alert relay cannot reach PostgreSQL; retrying");
                    backoff.wait().await;
                    continue;
                }
            },
        };
        match relay_once(s, &producer, &cfg.alerts.topics, 500).await {
            Ok(n) => {
                backoff.reset();
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
            Err(e) => {
                tracing::warn!(error = %e, "publishing alerts failed; retrying");
                if s.is_closed() {
                    store = None;
                }
                if *shutdown.borrow() {
                    break;
                }
                backoff.wait().await;
            }
        }
    }
    Ok(published)
}
