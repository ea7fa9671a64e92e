//! The analytics loop: a batch from Kafka (its own limits, `pipeline.analytics_batch_*`:
//! few, large inserts) -> decode and rate -> the rows, their identities and the roll-up blocks
//! they touch written to ClickHouse (`AnalyticsSink::insert`) -> the batch's positions stored
//! in ClickHouse -> Kafka offset commit. Every step is idempotent: a batch read again after a
//! crash, a retried or timed-out insert, or two instances writing one batch in a rebalance
//! converge to the same rows and roll-ups.
//!
//! Rejected events are counted and logged at warn, not dead-lettered: the ledger loop
//! dead-letters them, and both loops reject the same events (same decoder, price table, dedupe
//! window and column ranges, admission decided at the record's time, not the clock), so the
//! analytics totals match the ledger's whatever the lag. Rows ClickHouse itself refuses for
//! their data are found by splitting the batch and dead-lettered here (`refused_by_store`,
//! header `tally.pipeline: analytics`). While ClickHouse is down the batch in hand is retried
//! with back-off and no new batch is polled (back-pressure); nothing is skipped.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{analytics_limits, limits, prepare, Prepared};
use crate::analytics::{
    admission_rank, AnalyticsError, AnalyticsSink, ChOffsetStore, InsertOutcome, LateRow,
    NumericColumns, OffsetRange, RatedRow, VoidRow,
};
use crate::config::Config;
use crate::event::{Payload, Reason};
use crate::kafka::{BatchConsumer, DeadLetter, DeadLetterProducer, Positions};
use crate::rating::PriceTable;
use crate::retry::{isolate, ApplyPart, Classify, Fault, Halt, Refused, Retry};

/// Running totals of an analytics loop, for logs, metrics and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AnalyticsStats {
    pub batches: u64,
    pub records: u64,
    /// Rows written to `usage_events` (a batch read again writes its rows again: they
    /// collapse by position).
    pub rows: u64,
    /// Rated rows that do not count: another copy of their identity was admitted first.
    pub duplicates: u64,
    /// Grants and plans: nothing to write.
    pub not_usage: u64,
    /// Malformed, unknown, unpriced, too-late or unstorable events (the ledger dead-letters them).
    pub rejected: u64,
    /// Rows ClickHouse refused for their data, dead-lettered by this loop.
    pub refused: u64,
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
    let (_, admission) = limits(&cfg.pipeline);
    let batch_limits = analytics_limits(&cfg.pipeline);
    let dead = DeadLetterProducer::new(&cfg.kafka, cfg.pipeline.max_message_bytes, "analytics")?;
    let mut retry = Retry::with_policy(cfg.pipeline.retry_policy(), shutdown.clone());
    let mut stats = AnalyticsStats::default();
    tracing::info!(
        group,
        ?topics,
        database = sink.database(),
        "analytics pipeline started"
    );

    let resolve_every = Duration::from_millis(cfg.pipeline.analytics_resolve_every_ms);
    let resolve_max = cfg.pipeline.analytics_resolve_max_events;
    let mut pending = Pending::default();
    let mut quiet = false;
    while !*shutdown.borrow() {
        if pending.due(quiet, resolve_every, resolve_max) {
            match resolve(
                &sink,
                &group,
                &consumer,
                &mut pending,
                &mut retry,
                &mut stats,
            )
            .await
            {
                Ok(()) => {}
                Err(Halt::Shutdown) => break,
                Err(Halt::Failed(e)) => return Err(e),
            }
        }
        // With batches pending, a quiet stream (or the resolve interval) ends the wait.
        let idle = pending.since.map(|t| {
            resolve_every
                .saturating_sub(t.elapsed())
                .min(batch_limits.max_wait)
        });
        let Some(batch) = consumer
            .next_batch_within(&batch_limits, idle, &mut shutdown)
            .await?
        else {
            break;
        };
        stats.skipped += batch.skipped as u64;
        quiet = batch.records.is_empty();
        if quiet {
            continue;
        }
        let started = Instant::now();
        let now = Utc::now();
        let mut rows = Vec::with_capacity(batch.records.len());
        let mut rows_of = Vec::with_capacity(batch.records.len());
        let (mut not_usage, mut rejected) = (0u64, 0u64);
        let mut voids: Vec<VoidRow> = Vec::new();
        for record in &batch.records {
            let prepared = match prepare(record, &prices, now, &admission) {
                Ok(p) => p,
                Err(rejection) => {
                    rejected += 1;
                    tracing::warn!(
                        reason = %rejection.reason, field = rejection.field.as_deref(),
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        "rejected (the ledger pipeline dead-letters it)"
                    );
                    continue;
                }
            };
            match rated_row(&prepared, now) {
                Ok(Some(row)) => {
                    rows.push(row);
                    rows_of.push(record);
                }
                Ok(None) => {
                    not_usage += 1;
                    if let Some(v) = void_row(&prepared, now) {
                        voids.push(v);
                    }
                }
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
        // Rows and roll-ups first, then the positions that skip them: a crash in between reads
        // the batch again, which writes the same keys and recomputes the same blocks.
        let write = Instant::now();
        let written = match insert(&sink, &rows, &mut retry).await {
            Ok(written) => written,
            Err(Halt::Shutdown) => {
                tracing::warn!(
                    records = batch.records.len(),
                    "shutdown while ClickHouse is failing: batch left uncommitted (read again at the next start)"
                );
                break;
            }
            Err(Halt::Failed(e)) => {
                return Err(anyhow::anyhow!(
                    "analytics: ClickHouse failed on a batch of {} rows and cannot be retried: {e}",
                    rows.len()
                ))
            }
        };
        fail::fail_point!("analytics-after-insert", |_| std::process::abort());
        // Voided usage leaves the roll-ups (after the rows: an original in this same batch is
        // stored when its blocks are recomputed). Idempotent like the rows.
        if !voids.is_empty() {
            match retry.run("write usage voids", || sink.void(&voids)).await {
                Ok(blocks) => tracing::info!(voids = voids.len(), blocks, "usage voided"),
                Err(Halt::Shutdown) => break,
                Err(Halt::Failed(e)) => {
                    return Err(anyhow::anyhow!("analytics: writing usage voids: {e}"))
                }
            }
        }
        let (outcome, refused) = written;
        // Usage read after the billing grace is marked late (its row keeps its day).
        let late = LateRow::of(&rows, now - cfg.billing.grace(), now);
        if !late.is_empty() {
            match retry
                .run("insert late_usage", || sink.insert_late(&late))
                .await
            {
                Ok(()) => tracing::info!(
                    rows = late.len(),
                    "usage read after the billing grace marked late"
                ),
                Err(Halt::Shutdown) => break,
                Err(Halt::Failed(e)) => {
                    return Err(anyhow::anyhow!("analytics: marking late usage: {e}"))
                }
            }
        }
        let letters: Vec<DeadLetter<'_>> = refused
            .iter()
            .map(|r| DeadLetter {
                record: rows_of[r.index],
                reason: Reason::RefusedByStore,
                field: None,
                detail: r.error.to_string(),
            })
            .collect();
        let stored = async {
            if !letters.is_empty() {
                retry
                    .run("send dead letters", || dead.send_all(&letters))
                    .await
                    .map_err(|h| h.map(anyhow::Error::from))?;
                for l in &letters {
                    crate::metrics::dead_letter(l.reason.as_str());
                    tracing::warn!(
                        reason = %l.reason, topic = %l.record.topic, partition = l.record.partition,
                        offset = l.record.offset, detail = %crate::escape::shown(&l.detail),
                        "dead-lettered (ClickHouse refused the row)"
                    );
                }
            }
            Ok::<(), Halt<anyhow::Error>>(())
        };
        match stored.await {
            Ok(()) => {}
            Err(Halt::Shutdown) => {
                tracing::warn!(
                    records = batch.records.len(),
                    "shutdown while dead-lettering: batch left uncommitted (read again at the next start)"
                );
                pending = Pending::default();
                break;
            }
            Err(Halt::Failed(e)) => return Err(e.context("analytics: dead-lettering")),
        }
        crate::metrics::transaction_seconds("analytics", write.elapsed().as_secs_f64());
        crate::metrics::batch_seconds("analytics", started.elapsed().as_secs_f64());
        pending.add(&rows, &batch.next_offsets, batch.records.len());

        stats.batches += 1;
        stats.records += batch.records.len() as u64;
        stats.rows += outcome.written as u64;
        stats.not_usage += not_usage;
        stats.rejected += rejected;
        stats.refused += letters.len() as u64;
        tracing::debug!(
            records = batch.records.len(),
            rows = outcome.written,
            blocks = outcome.blocks,
            not_usage,
            rejected,
            skipped = batch.skipped,
            partitions = batch.next_offsets.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "analytics batch written"
        );
    }
    // What was written before shutdown is resolved and its positions stored, unless
    // ClickHouse is failing (then it is read again at the next start).
    if pending.since.is_some() {
        match resolve(
            &sink,
            &group,
            &consumer,
            &mut pending,
            &mut retry,
            &mut stats,
        )
        .await
        {
            Ok(()) | Err(Halt::Shutdown) => {}
            Err(Halt::Failed(e)) => return Err(e),
        }
    }
    tracing::info!(?stats, "analytics pipeline stopped");
    Ok(stats)
}

/// The `usage_voids` row of a prepared usage void (None for any other event): the voided
/// usage's identity and account, and who voided it (`data.actor`, else the void's source).
pub fn void_row(p: &Prepared<'_, '_>, inserted_at: DateTime<Utc>) -> Option<VoidRow> {
    let Payload::UsageVoid(v) = &p.event.payload else {
        return None;
    };
    let env = &p.event.envelope;
    let seconds = |t: DateTime<Utc>| u32::try_from(t.timestamp()).unwrap_or(0);
    Some(VoidRow {
        event_source: v.event_source.to_string(),
        event_id: v.event_id.to_string(),
        account_id: env.account_id.to_string(),
        void_source: env.source.to_string(),
        void_id: env.id.to_string(),
        void_time_unix_seconds: seconds(env.time),
        actor: v.actor.as_deref().unwrap_or(&env.source).to_owned(),
        reason: v.reason.to_string(),
        inserted_at_unix_seconds: seconds(inserted_at),
    })
}

/// The `usage_events` row of a prepared event: None for grants and plans (they carry no
/// usage). Its numeric columns were checked by `prepare` (`analytics::numeric_columns`).
pub fn rated_row(
    p: &Prepared<'_, '_>,
    inserted_at: DateTime<Utc>,
) -> Result<Option<RatedRow>, AnalyticsError> {
    let (Some(charge), Some(columns), Some(usage)) = (&p.charge, p.columns, p.event.usage()) else {
        return Ok(None);
    };
    let env = &p.event.envelope;
    let NumericColumns {
        quantity_e6,
        billable_quantity_e6,
        credits_e6,
        event_time_unix_seconds,
        event_date_unix_days,
        ..
    } = columns;
    let attribute = |key: &str| -> String {
        usage
            .attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
            .unwrap_or_default()
    };
    let (mut call_id, mut conversation_id, mut instance_id) =
        (String::new(), String::new(), String::new());
    let (mut answered, mut responses) = (0u8, 0u32);
    match &p.event.payload {
        Payload::Call(c) => {
            call_id = c.call_id.to_string();
            answered = u8::from(c.answered_at.is_some());
        }
        Payload::Chat(c) => {
            conversation_id = c.conversation_id.to_string();
            responses = c.responses;
        }
        Payload::Instance(i) => instance_id = i.instance_id.to_string(),
        Payload::Metered(_)
        | Payload::Grant(_)
        | Payload::Plan(_)
        | Payload::VoidGrant(_)
        | Payload::Adjustment(_)
        | Payload::UsageVoid(_) => {}
    }
    let inserted_at_unix_seconds =
        u32::try_from(inserted_at.timestamp()).map_err(|_| AnalyticsError::OutOfRange {
            source_id: env.source.to_string(),
            event_id: env.id.to_string(),
            field: "inserted_at",
            value: inserted_at.to_rfc3339(),
        })?;
    Ok(Some(RatedRow {
        event_source: env.source.to_string(),
        event_id: env.id.to_string(),
        account_id: env.account_id.to_string(),
        kind: usage.kind.to_owned(),
        event_time_unix_seconds,
        event_date_unix_days,
        model: attribute("model"),
        voice_tier: attribute("voice_tier"),
        channel: attribute("channel"),
        direction: attribute("direction"),
        instance_type: attribute("instance_type"),
        call_id,
        conversation_id,
        instance_id,
        answered,
        responses,
        quantity_e6,
        billable_seconds: charge.billable_seconds,
        billable_quantity_e6,
        unit: charge.unit.as_str().to_owned(),
        credits_e6,
        price_version: charge.price_version.to_owned(),
        rule_id: charge.rule_id.to_owned(),
        topic: p.record.topic.to_string(),
        partition: u32::try_from(p.record.partition).unwrap_or_default(),
        offset: u64::try_from(p.record.offset).unwrap_or_default(),
        inserted_at_unix_seconds,
        admission: admission_rank(
            p.record
                .timestamp_ms
                .unwrap_or_else(|| env.time.timestamp_millis()),
            p.record.offset,
        ),
    }))
}

/// Batches written (rows, identities, their own roll-up blocks) whose identities are not
/// resolved yet and whose positions are not stored yet.
#[derive(Debug, Default)]
struct Pending {
    /// First and last offset written per partition.
    ranges: BTreeMap<(String, u32), (u64, u64)>,
    /// The positions to store once resolved (largest next offset per partition).
    next_offsets: Positions,
    records: usize,
    /// When the first pending batch was written.
    since: Option<Instant>,
}

impl Pending {
    fn add(&mut self, rows: &[RatedRow], next_offsets: &Positions, records: usize) {
        for r in rows {
            let e = self
                .ranges
                .entry((r.topic.clone(), r.partition))
                .or_insert((r.offset, r.offset));
            e.0 = e.0.min(r.offset);
            e.1 = e.1.max(r.offset);
        }
        for (key, &next) in next_offsets {
            let e = self.next_offsets.entry(key.clone()).or_insert(next);
            *e = (*e).max(next);
        }
        self.records += records;
        self.since.get_or_insert_with(Instant::now);
    }

    /// Whether to resolve now: something is pending and the stream is quiet (the last wait
    /// ended without a record), or `max` events are pending, or the first has waited `every`.
    fn due(&self, quiet: bool, every: Duration, max: usize) -> bool {
        self.since
            .is_some_and(|t| quiet || self.records >= max || t.elapsed() >= every)
    }

    fn ranges(&self) -> Vec<OffsetRange> {
        self.ranges
            .iter()
            .map(|((topic, partition), &(first, last))| OffsetRange {
                topic: topic.clone(),
                partition: *partition,
                first,
                last,
            })
            .collect()
    }
}

/// Resolves the identities of the pending batches, then stores their positions and commits
/// them: only now may a restart skip them. Empties `pending` when done.
async fn resolve(
    sink: &AnalyticsSink,
    group: &str,
    consumer: &BatchConsumer,
    pending: &mut Pending,
    retry: &mut Retry,
    stats: &mut AnalyticsStats,
) -> Result<(), Halt<anyhow::Error>> {
    let started = Instant::now();
    let ranges = pending.ranges();
    let resolved = retry
        .run("resolve identities", || sink.resolve(&ranges))
        .await
        .map_err(|h| h.map(anyhow::Error::from));
    let resolved = match resolved {
        Err(Halt::Failed(e)) => {
            return Err(Halt::Failed(e.context("analytics: resolving identities")))
        }
        other => other?,
    };
    fail::fail_point!("analytics-after-resolve", |_| std::process::abort());
    let stored = retry
        .run("store positions", || {
            sink.store_positions(group, &pending.next_offsets)
        })
        .await
        .map_err(|h| h.map(anyhow::Error::from));
    match stored {
        Err(Halt::Failed(e)) => {
            return Err(Halt::Failed(e.context("analytics: storing positions")))
        }
        other => other?,
    }
    consumer.committed(&pending.next_offsets);
    crate::metrics::resolve_seconds(started.elapsed().as_secs_f64());
    stats.duplicates += resolved.duplicates as u64;
    tracing::debug!(
        records = pending.records,
        partitions = pending.next_offsets.len(),
        duplicates = resolved.duplicates,
        blocks = resolved.blocks,
        lookup_ms = resolved.timings.lookup.as_millis() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "analytics identities resolved, positions stored"
    );
    *pending = Pending::default();
    Ok(())
}

/// Parts of a batch inserted each on its own ([`isolate`]).
struct Parts<'a> {
    sink: &'a AnalyticsSink,
    rows: &'a [RatedRow],
    total: InsertOutcome,
}

impl ApplyPart for Parts<'_> {
    type Error = AnalyticsError;

    async fn apply(&mut self, part: Range<usize>) -> Result<(), AnalyticsError> {
        let o = self.sink.write(&self.rows[part]).await?;
        self.total.written += o.written;
        self.total.duplicates += o.duplicates;
        self.total.blocks += o.blocks;
        self.total.timings += o.timings;
        Ok(())
    }
}

/// Inserts the batch's rows: one INSERT when ClickHouse takes them all (the common path),
/// else, when it refuses some for their data, the batch is split until the refused rows stand
/// alone ([`isolate`]; writing a part again is harmless: every step is idempotent). Transient faults are retried; returns what was written and the refused rows.
async fn insert(
    sink: &AnalyticsSink,
    rows: &[RatedRow],
    retry: &mut Retry,
) -> Result<(InsertOutcome, Vec<Refused<AnalyticsError>>), Halt<AnalyticsError>> {
    let refused_whole = match retry.run("insert usage_events", || sink.write(rows)).await {
        Ok(outcome) => return Ok((outcome, Vec::new())),
        Err(Halt::Failed(e)) if e.fault() == Fault::Input => e,
        Err(halt) => return Err(halt),
    };
    tracing::warn!(
        error = %refused_whole, rows = rows.len(),
        "ClickHouse refused the batch; splitting it to find the rows at fault"
    );
    let mut parts = Parts {
        sink,
        rows,
        total: InsertOutcome::default(),
    };
    let refused = isolate(rows.len(), retry, "insert usage_events", &mut parts)
        .await
        .map_err(|h| h.map(|bug| bug.error))?;
    Ok((parts.total, refused))
}
