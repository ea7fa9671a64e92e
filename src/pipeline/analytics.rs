//! The analytics loop: a batch from Kafka -> decode and rate -> one ClickHouse INSERT of the
//! rated rows whose identity is not stored yet -> the batch's positions stored in ClickHouse
//! -> Kafka offset commit. Writing each identity once keeps the roll-ups' materialized views
//! exact (they see every inserted block): a producer retry read at a new offset, or a batch
//! read again, writes nothing.
//!
//! Rejected events are counted, not dead-lettered: the ledger loop owns dead letters, and
//! both loops reject the same events (same decoder, price table and dedupe window), so the
//! analytics totals match the ledger's. While ClickHouse is down the batch in hand is retried
//! with back-off and no new batch is polled (back-pressure); nothing is skipped.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tokio::sync::watch;

use super::{limits, prepare, Backoff};
use crate::analytics::{rated_row, AnalyticsError, AnalyticsSink, ChOffsetStore};
use crate::config::Config;
use crate::kafka::BatchConsumer;
use crate::rating::PriceTable;

/// A failure ClickHouse is not expected to recover from by itself (unknown table, bad
/// credentials, a row the server cannot parse) is retried this many times — a migration or a
/// restart may be under way — and then ends the loop with the error: fail loudly, commit
/// nothing, and the batch is read again at the next start.
const MAX_PERMANENT_ATTEMPTS: u32 = 5;

/// Running totals of an analytics loop, for logs, metrics and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AnalyticsStats {
    pub batches: u64,
    pub records: u64,
    /// Rows written to `rated_events`: identities not stored before.
    pub rows: u64,
    /// Rated rows not written: the identity was already stored (a producer retry, a batch
    /// read again) or came earlier in the same batch.
    pub duplicates: u64,
    /// Grants and plans: nothing to write.
    pub not_usage: u64,
    /// Malformed, unknown, unpriced, too-late or unstorable events (the ledger dead-letters them).
    pub rejected: u64,
    /// Records below the stored position (redeliveries), dropped by the consumer.
    pub skipped: u64,
}

/// Runs until `shutdown` turns true: then finishes the batch in hand, stores it, commits and
/// returns. If ClickHouse is failing when shutdown comes, the batch in hand is abandoned
/// uncommitted instead of being retried forever (it is read again at the next start, and rows
/// it already wrote collapse on replay).
pub async fn run(
    cfg: Arc<Config>,
    prices: Arc<PriceTable>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<AnalyticsStats> {
    let group = cfg.kafka.analytics_group.clone();
    let topics = cfg.kafka.topics.inputs();
    let sink = AnalyticsSink::new(&cfg.clickhouse);
    let offsets = Arc::new(ChOffsetStore {
        config: cfg.clickhouse.clone(),
        group_id: group.clone(),
    });
    let consumer = BatchConsumer::new(&cfg.kafka, &group, "analytics", &topics, offsets)?;
    let (batch_limits, admission) = limits(&cfg.pipeline);
    let mut backoff = Backoff::new(&cfg.pipeline);
    let mut stats = AnalyticsStats::default();
    tracing::info!(
        group,
        ?topics,
        database = sink.database(),
        "analytics pipeline started"
    );

    while !*shutdown.borrow() {
        let Some(batch) = consumer.next_batch(&batch_limits, &mut shutdown).await? else {
            break;
        };
        stats.skipped += batch.skipped as u64;
        if batch.records.is_empty() {
            continue;
        }
        let started = Instant::now();
        let now = Utc::now();
        let mut rows = Vec::with_capacity(batch.records.len());
        let (mut not_usage, mut rejected) = (0u64, 0u64);
        for record in &batch.records {
            let prepared = match prepare(record, &prices, now, &admission) {
                Ok(p) => p,
                Err(rejection) => {
                    rejected += 1;
                    tracing::debug!(
                        reason = %rejection.reason, field = rejection.field.as_deref(),
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        "rejected (the ledger pipeline dead-letters it)"
                    );
                    continue;
                }
            };
            match rated_row(&prepared, now) {
                Ok(Some(row)) => rows.push(row),
                Ok(None) => not_usage += 1,
                Err(e) => {
                    // Not a dead letter the ledger knows about: say it loudly.
                    rejected += 1;
                    tracing::error!(
                        error = %e, account_id = %prepared.event.envelope.account_id,
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        "rated event cannot be stored in ClickHouse; not written"
                    );
                }
            }
        }

        crate::metrics::events("analytics", rows.iter().map(|r| r.kind.as_str()));
        // Rows first, then the positions that skip them: a crash in between re-reads nothing
        // already stored (the positions also derive from the highest stored offset).
        let write = Instant::now();
        let inserted = persist("insert rated_events", &mut backoff, &mut shutdown, || {
            sink.insert(&rows)
        })
        .await?;
        fail::fail_point!("analytics-after-insert", |_| std::process::abort());
        let stored = match inserted {
            Some(_) => persist("store positions", &mut backoff, &mut shutdown, || {
                sink.store_positions(&group, &batch.next_offsets)
            })
            .await?
            .is_some(),
            None => false,
        };
        let Some(outcome) = inserted.filter(|_| stored) else {
            tracing::warn!(
                records = batch.records.len(),
                "shutdown while ClickHouse is failing: batch left uncommitted (read again at the next start)"
            );
            break;
        };
        crate::metrics::transaction_seconds("analytics", write.elapsed().as_secs_f64());
        consumer.committed(&batch.next_offsets);
        crate::metrics::batch_seconds("analytics", started.elapsed().as_secs_f64());

        stats.batches += 1;
        stats.records += batch.records.len() as u64;
        stats.rows += outcome.written as u64;
        stats.duplicates += (outcome.already_stored + outcome.repeated) as u64;
        stats.not_usage += not_usage;
        stats.rejected += rejected;
        tracing::debug!(
            records = batch.records.len(),
            rows = outcome.written,
            duplicates = outcome.already_stored + outcome.repeated,
            not_usage,
            rejected,
            skipped = batch.skipped,
            partitions = batch.next_offsets.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "analytics batch committed"
        );
    }
    tracing::info!(?stats, "analytics pipeline stopped");
    Ok(stats)
}

/// Runs `op` until it succeeds, waiting with back-off between attempts, and returns its
/// value. Transient failures (ClickHouse down or overloaded) are retried for as long as it
/// takes; others [`MAX_PERMANENT_ATTEMPTS`] times, then returned. Returns `Ok(None)` when
/// shutdown is signalled while failing.
async fn persist<T, F, Fut>(
    what: &'static str,
    backoff: &mut Backoff,
    shutdown: &mut watch::Receiver<bool>,
    mut op: F,
) -> Result<Option<T>, AnalyticsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AnalyticsError>>,
{
    let (mut attempt, mut permanent) = (0u32, 0u32);
    loop {
        let error = match op().await {
            Ok(value) => {
                if attempt > 0 {
                    tracing::info!(what, attempt, "ClickHouse recovered");
                }
                backoff.reset();
                return Ok(Some(value));
            }
            Err(e) => e,
        };
        attempt += 1;
        let transient = error.is_transient();
        if !transient {
            permanent += 1;
            if permanent >= MAX_PERMANENT_ATTEMPTS {
                tracing::error!(what, attempt, error = %error, "ClickHouse failure is not transient; stopping");
                return Err(error);
            }
        }
        tracing::warn!(what, attempt, transient, error = %error, "ClickHouse failed; retrying");
        if *shutdown.borrow() {
            return Ok(None);
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = shutdown.changed() => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn backoff() -> Backoff {
        Backoff::new(&PipelineConfig {
            retry_initial_ms: 1,
            retry_max_ms: 2,
            ..PipelineConfig::default()
        })
    }

    fn down() -> AnalyticsError {
        AnalyticsError::ClickHouse {
            op: "insert rated_events",
            source: clickhouse::error::Error::Network("connection refused".into()),
        }
    }

    fn broken() -> AnalyticsError {
        AnalyticsError::ClickHouse {
            op: "insert rated_events",
            source: clickhouse::error::Error::BadResponse(
                "Code: 60, e.displayText() = DB::Exception: Table x.rated_events doesn't exist."
                    .into(),
            ),
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_until_success() {
        let (_tx, mut rx) = watch::channel(false);
        let calls = AtomicU32::new(0);
        let ok = persist("t", &mut backoff(), &mut rx, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 20 {
                    Err(down())
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(ok, Some(20));
        assert_eq!(calls.load(Ordering::SeqCst), 21);
    }

    #[tokio::test]
    async fn gives_up_on_permanent_failures() {
        let (_tx, mut rx) = watch::channel(false);
        let calls = AtomicU32::new(0);
        let err = persist("t", &mut backoff(), &mut rx, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(broken()) }
        })
        .await
        .unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), MAX_PERMANENT_ATTEMPTS);
    }

    #[tokio::test]
    async fn shutdown_interrupts_an_outage() {
        let (tx, mut rx) = watch::channel(false);
        let calls = AtomicU32::new(0);
        let stopped = persist("t", &mut backoff(), &mut rx, || {
            if calls.fetch_add(1, Ordering::SeqCst) == 3 {
                tx.send(true).unwrap();
            }
            async { Err::<(), _>(down()) }
        })
        .await
        .unwrap();
        assert!(stopped.is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
