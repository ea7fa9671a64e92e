//! The ledger loop: a batch from Kafka -> decode and rate -> dead letters (acknowledged) ->
//! one PostgreSQL transaction (claims, effects, entries, offsets) -> Kafka offset commit.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::{limits, prepare};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::event::{Payload, Reason, Rejection};
use crate::retry::{isolate, ApplyPart, BugAt, Halt, Refused, Retry};
use rdkafka::error::KafkaError;

use crate::kafka::{self, BatchConsumer, DeadLetter, DeadLetterProducer, Record};

use crate::ledger::buckets::Plan;
use crate::ledger::{
    Action, BatchOutcome, Correction, DebitInfo, Item, NewGrant, PgOffsetStore, Store, StoreError,
};
use crate::rating::PriceTable;

/// Running totals of a ledger loop, for logs, metrics and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LedgerStats {
    pub batches: u64,
    pub records: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    pub skipped: u64,
}

impl LedgerStats {
    /// Adds another ledger consumer's totals (`pipeline.ledger_workers`).
    pub fn add(&mut self, other: &LedgerStats) {
        self.batches += other.batches;
        self.records += other.records;
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.dead_letters += other.dead_letters;
        self.skipped += other.skipped;
    }
}

/// Runs until `shutdown` turns true: then finishes the batch in hand, commits, returns.
pub async fn run(
    cfg: Arc<Config>,
    prices: Arc<PriceTable>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<LedgerStats> {
    run_with_clock(cfg, prices, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with the clock that decides "now" (future-time and dedupe-window checks).
///
/// Errors are handled by their [`Fault`](crate::fault::Fault): transient ones (PostgreSQL or
/// the broker unreachable, a deadlock) are retried with back-off until shutdown; a batch
/// PostgreSQL refuses for its data is split until the refused records are found, which are
/// dead-lettered `refused_by_store` while the rest is applied; a bug (an unknown table, bad
/// credentials, a broken invariant) ends the loop with an error naming the record.
pub async fn run_with_clock(
    cfg: Arc<Config>,
    prices: Arc<PriceTable>,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<LedgerStats> {
    let group = cfg.kafka.ledger_group.clone();
    let topics = cfg.kafka.topics.inputs();
    let offsets = Arc::new(PgOffsetStore {
        config: cfg.postgres.clone(),
        group_id: group.clone(),
    });
    let consumer = BatchConsumer::new(&cfg.kafka, &group, "ledger", &topics, offsets)?;
    let dead = DeadLetterProducer::new(&cfg.kafka, cfg.pipeline.max_message_bytes, "ledger")?;
    let (batch_limits, mut admission) = limits(&cfg.pipeline);
    let mut retry = Retry::with_policy(cfg.pipeline.retry_policy(), shutdown.clone());
    let mut stats = LedgerStats::default();
    let mut store = match retry.run("connect to PostgreSQL", || connect(&cfg)).await {
        Ok(store) => store,
        Err(Halt::Shutdown) => {
            tracing::warn!("shutdown while PostgreSQL is unreachable: ledger pipeline stopped before its first batch");
            return Ok(stats);
        }
        Err(Halt::Failed(e)) => return Err(anyhow::anyhow!("ledger: connect to PostgreSQL: {e}")),
    };
    // The stored dedupe horizon for admission (the purge task moves it, `super::purge`);
    // then every batch's claims bring the latest. Admission is a first filter: claiming
    // checks the stored horizon again, so a stale one here never admits anything twice.
    match store.dedupe_horizon().await {
        Ok(horizon) => admission.purged_before = horizon,
        Err(e) => {
            tracing::warn!(error = %e, "reading the dedupe horizon failed: the first batch's claims read it")
        }
    }
    tracing::info!(group, ?topics, "ledger pipeline started");

    // Records held back by the event-time alignment ([`hold_back`]), applied with the next
    // batch; their partitions' stored positions stay at the first of them.
    let mut carried: Vec<Record> = Vec::new();
    while !*shutdown.borrow() {
        // With records held back, a quiet stream (nothing within the batch wait) applies them.
        let idle = (!carried.is_empty()).then_some(batch_limits.max_wait);
        let Some(batch) = consumer
            .next_batch_within(&batch_limits, idle, &mut shutdown)
            .await?
        else {
            break;
        };
        stats.skipped += batch.skipped as u64;
        let quiet = batch.records.is_empty();
        let mut records = std::mem::take(&mut carried);
        if !records.is_empty() {
            // A partition revoked meanwhile is read again by its new owner.
            let assigned: std::collections::HashSet<_> =
                consumer.assignment().into_iter().collect();
            records.retain(|r| assigned.contains(&(r.topic.to_string(), r.partition)));
        }
        records.extend(batch.records);
        if records.is_empty() {
            continue;
        }
        let started = Instant::now();
        let now = clock.now();
        let results: Vec<_> = records
            .iter()
            .map(|record| prepare(record, &prices, now, &admission))
            .collect();
        let mut held = if quiet {
            Holds::default()
        } else {
            hold_back(
                &records,
                results
                    .iter()
                    .map(|r| r.as_ref().ok().map(|p| to_item(p).time)),
            )
        };
        if held.records > batch_limits.max_events {
            // The partitions stay too far apart: apply everything rather than hold more.
            held = Holds::default();
        }
        let next_offsets = held.next_offsets(&records);
        let mut prepared = Vec::with_capacity(records.len());
        let mut letters = Vec::new();
        for (record, result) in records.iter().zip(results) {
            if held.holds(record) {
                continue;
            }
            match result {
                Ok(p) => prepared.push(p),
                Err(rejection) => letters.push(dead_letter(record, rejection)),
            }
        }
        let carry: Vec<Record> = records.iter().filter(|r| held.holds(r)).cloned().collect();
        let items: Vec<Item<'_>> = prepared.iter().map(to_item).collect();
        crate::metrics::events(
            "ledger",
            items.iter().map(|i| match &i.action {
                Action::Debit(d) => d.usage_kind,
                Action::Grant(_) => "grant",
                Action::Plan { .. } => "plan",
                Action::VoidGrant { .. } => "grant_void",
                Action::Adjust { .. } => "adjustment",
                Action::VoidUsage { .. } => "usage_void",
            }),
        );
        // Dead letters are acknowledged before the offsets that skip them are stored.
        let transaction = Instant::now();
        let applied = match send_letters(&dead, &letters, &mut retry).await {
            Ok(()) => {
                if !letters.is_empty() {
                    fail::fail_point!("ledger-after-dead-letters", |_| std::process::abort());
                }
                apply(&mut store, &cfg, &group, &items, &next_offsets, &mut retry).await
            }
            Err(halt) => Err(halt.map(Bug::DeadLetters)),
        };
        let (totals, split) = match applied {
            Ok(applied) => applied,
            Err(Halt::Shutdown) => {
                tracing::warn!(
                    records = records.len(),
                    "shutdown while retrying: batch left uncommitted (read again at the next start)"
                );
                break;
            }
            Err(Halt::Failed(bug)) => return Err(bug.named(&prepared)),
        };
        // A split batch: the records PostgreSQL refused are dead-lettered first, then the
        // offsets that pass them are stored.
        let refused_letters: Vec<DeadLetter<'_>> = split
            .iter()
            .flatten()
            .map(|r| {
                let record = prepared[r.index].record;
                let (reason, field) = match r.error {
                    // Admission's rule, checked again by the store with the latest horizon.
                    StoreError::BeforeHorizon { .. } => (Reason::TooLate, Some("time")),
                    _ => (Reason::RefusedByStore, None),
                };
                dead_letter(record, Rejection::new(reason, field, r.error.to_string()))
            })
            .collect();
        if split.is_some() {
            let committed = match send_letters(&dead, &refused_letters, &mut retry).await {
                Ok(()) => store_offsets(&mut store, &cfg, &group, &next_offsets, &mut retry)
                    .await
                    .map_err(|h| h.map(Bug::Store)),
                Err(halt) => Err(halt.map(Bug::DeadLetters)),
            };
            match committed {
                Ok(()) => {}
                Err(Halt::Shutdown) => {
                    tracing::warn!("shutdown while storing offsets: the batch's records are claimed and will be read again as duplicates");
                    break;
                }
                Err(Halt::Failed(bug)) => return Err(bug.named(&prepared)),
            }
        }
        crate::metrics::transaction_seconds("ledger", transaction.elapsed().as_secs_f64());
        fail::fail_point!("ledger-after-commit", |_| std::process::abort());
        consumer.committed(&next_offsets);
        crate::metrics::batch_seconds("ledger", started.elapsed().as_secs_f64());
        letters.extend(refused_letters);

        stats.batches += 1;
        stats.records += (records.len() - carry.len()) as u64;
        stats.applied += totals.applied as u64;
        stats.duplicates += totals.duplicates as u64;
        crate::metrics::replays(totals.replayed, totals.window_events);
        stats.dead_letters += letters.len() as u64;
        tracing::debug!(
            records = records.len() - carry.len(),
            held_back = carry.len(),
            applied = totals.applied,
            duplicates = totals.duplicates,
            dead_letters = letters.len(),
            entries = totals.entries,
            accounts = totals.accounts,
            replayed = totals.replayed,
            window_events = totals.window_events,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ledger batch committed"
        );
        carried = carry;
        if totals.horizon.is_some() {
            admission.purged_before = totals.horizon;
        }
    }
    tracing::info!(?stats, "ledger pipeline stopped");
    Ok(stats)
}

/// A fault that stops the ledger loop.
enum Bug {
    DeadLetters(KafkaError),
    Store(StoreError),
    /// A record that fails alone with a fault that is not the input's.
    Record(BugAt<StoreError>),
}

impl Bug {
    /// The error to end the loop with, naming the record when one is at fault.
    fn named(self, prepared: &[super::Prepared<'_, '_>]) -> anyhow::Error {
        match self {
            Bug::DeadLetters(e) => {
                anyhow::anyhow!("ledger: sending dead letters failed and cannot be retried: {e}")
            }
            Bug::Store(e) => {
                anyhow::anyhow!("ledger: PostgreSQL failed and cannot be retried: {e}")
            }
            Bug::Record(BugAt { index, error }) => {
                let p = &prepared[index];
                anyhow::anyhow!(
                    "ledger: PostgreSQL failed on the record at {}/{}/{} (source {}, id {}) and cannot be retried: {error}",
                    p.record.topic,
                    p.record.partition,
                    p.record.offset,
                    crate::escape::shown(&p.event.envelope.source),
                    crate::escape::shown(&p.event.envelope.id),
                )
            }
        }
    }
}

/// Sends dead letters and waits for the broker's acknowledgement, retrying transient faults.
async fn send_letters(
    dead: &DeadLetterProducer,
    letters: &[DeadLetter<'_>],
    retry: &mut Retry,
) -> Result<(), Halt<KafkaError>> {
    if letters.is_empty() {
        return Ok(());
    }
    retry
        .run("send dead letters", || dead.send_all(letters))
        .await?;
    for l in letters {
        crate::metrics::dead_letter(l.reason.as_str());
        tracing::warn!(
            reason = %l.reason, field = l.field.as_deref(), topic = %l.record.topic,
            partition = l.record.partition, offset = l.record.offset,
            detail = %crate::escape::shown(&l.detail),
            "dead-lettered"
        );
    }
    Ok(())
}

/// A connected store: reconnects when the connection died.
async fn connect(cfg: &Config) -> Result<Store, StoreError> {
    let mut store = Store::connect(&cfg.postgres).await?;
    store.alert_defaults = cfg.alerts.defaults();
    store.grace = cfg.billing.grace();
    Ok(store)
}

async fn reconnect_if_closed(store: &mut Store, cfg: &Config) -> Result<(), StoreError> {
    if store.is_closed() {
        *store = connect(cfg).await?;
    }
    Ok(())
}

/// Applies the batch: one transaction with its offsets when PostgreSQL accepts it (the common
/// path: `None`), else the batch is split until the refused records stand alone
/// ([`isolate`]); everything else is applied, in order, without the offsets, and the refused
/// records are returned (`Some`) for the dead-letter topic. Transient faults are retried.
async fn apply(
    store: &mut Store,
    cfg: &Config,
    group: &str,
    items: &[Item<'_>],
    next_offsets: &kafka::Positions,
    retry: &mut Retry,
) -> Result<(BatchOutcome, Option<Vec<Refused<StoreError>>>), Halt<Bug>> {
    let refused_whole = loop {
        let attempt = async {
            reconnect_if_closed(store, cfg).await?;
            store.apply_batch(group, items, next_offsets).await
        };
        match retry.settle("ledger transaction", attempt.await).await {
            Ok(Some(totals)) => return Ok((totals, None)),
            Ok(None) => continue,
            Err(Halt::Shutdown) => return Err(Halt::Shutdown),
            Err(Halt::Failed(e)) => break e,
        }
    };
    tracing::warn!(
        error = %refused_whole, events = items.len(),
        "PostgreSQL refused the batch; splitting it to find the records at fault"
    );
    let mut parts = Parts {
        store,
        cfg,
        group,
        items,
        totals: BatchOutcome::default(),
    };
    let refused = isolate(items.len(), retry, "ledger transaction", &mut parts)
        .await
        .map_err(|h| h.map(Bug::Record))?;
    Ok((parts.totals, Some(refused)))
}

/// Parts of a batch applied each in its own transaction, without offsets ([`isolate`]).
struct Parts<'s, 'i, 'a> {
    store: &'s mut Store,
    cfg: &'s Config,
    group: &'s str,
    items: &'i [Item<'a>],
    totals: BatchOutcome,
}

impl ApplyPart for Parts<'_, '_, '_> {
    type Error = StoreError;

    async fn apply(&mut self, part: Range<usize>) -> Result<(), StoreError> {
        reconnect_if_closed(self.store, self.cfg).await?;
        let no_offsets = kafka::Positions::new();
        let o = self
            .store
            .apply_batch(self.group, &self.items[part], &no_offsets)
            .await?;
        self.totals.applied += o.applied;
        self.totals.duplicates += o.duplicates;
        self.totals.entries += o.entries;
        self.totals.alerts += o.alerts;
        self.totals.accounts += o.accounts;
        self.totals.replayed += o.replayed;
        self.totals.window_events += o.window_events;
        self.totals.horizon = self.totals.horizon.max(o.horizon);
        Ok(())
    }
}

/// Stores the batch's offsets alone (after a split batch's dead letters were acknowledged).
async fn store_offsets(
    store: &mut Store,
    cfg: &Config,
    group: &str,
    next_offsets: &kafka::Positions,
    retry: &mut Retry,
) -> Result<(), Halt<StoreError>> {
    loop {
        let attempt = async {
            reconnect_if_closed(store, cfg).await?;
            store.apply_batch(group, &[], next_offsets).await
        };
        if retry
            .settle("store ledger offsets", attempt.await)
            .await?
            .is_some()
        {
            return Ok(());
        }
    }
}

/// The ledger's view of a prepared event, borrowing from it.
pub fn to_item<'a>(p: &'a super::Prepared<'_, 'a>) -> Item<'a> {
    let env = &p.event.envelope;
    let action = match (&p.event.payload, &p.charge) {
        (Payload::Grant(g), _) => Action::Grant(NewGrant {
            grant_id: g.grant_id.to_string(),
            kind: g.kind,
            credits: g.credits,
            expires_at: g.expires_at,
            priority: g.priority,
        }),
        (Payload::Plan(plan), _) => Action::Plan {
            plan: Plan {
                plan_id: plan.plan_id.to_string(),
                monthly_allowance: plan.monthly_allowance,
                billing_day: plan.billing_day,
                low_balance_credits: plan.low_balance_credits,
                low_balance_percent: plan.low_balance_percent,
                allowance_alert_percents: plan.allowance_alert_percents.clone().unwrap_or_default(),
                recharge_threshold_credits: plan.recharge.map(|r| r.threshold_credits),
                recharge_credits: plan.recharge.map(|r| r.credits),
            },
            overage_policy: plan.overage_policy,
            top_up_validity_months: plan
                .top_up_validity_months
                .unwrap_or(crate::ledger::buckets::DEFAULT_TOP_UP_VALIDITY_MONTHS),
        },
        (Payload::VoidGrant(v), _) => Action::VoidGrant {
            grant_id: v.grant_id.to_string(),
            why: Correction {
                actor: v.actor.as_deref().unwrap_or(&env.source),
                reason: &v.reason,
            },
        },
        (Payload::UsageVoid(v), _) => Action::VoidUsage {
            event_source: &v.event_source,
            event_id: &v.event_id,
            why: Correction {
                actor: v.actor.as_deref().unwrap_or(&env.source),
                reason: &v.reason,
            },
        },
        (Payload::Adjustment(a), _) => Action::Adjust {
            adjustment_id: a.adjustment_id.to_string(),
            credits: a.credits,
            why: Correction {
                actor: a.actor.as_deref().unwrap_or(&env.source),
                reason: &a.reason,
            },
        },
        (payload, Some(charge)) => Action::Debit(DebitInfo {
            credits: charge.credits,
            usage_kind: payload.usage_kind().unwrap_or_default(),
            price_version: charge.price_version,
            rule_id: charge.rule_id,
            hold_id: payload.hold_id(),
        }),
        (_, None) => unreachable!("prepare() rates every usage event"),
    };
    Item {
        source: &env.source,
        id: &env.id,
        account_id: &env.account_id,
        time: env.time,
        action,
    }
}

fn dead_letter(record: &Record, rejection: Rejection) -> DeadLetter<'_> {
    DeadLetter {
        record,
        reason: rejection.reason,
        field: rejection.field,
        detail: rejection.detail,
    }
}

/// What the event-time alignment holds back of a batch: per partition, the records from
/// the first one dated after the batch's watermark.
#[derive(Debug, Default, PartialEq)]
pub struct Holds {
    /// Partition -> the offset of its first record held back.
    pub from: std::collections::HashMap<(Arc<str>, i32), i64>,
    /// How many records are held back.
    pub records: usize,
}

impl Holds {
    pub fn holds(&self, record: &Record) -> bool {
        self.from
            .get(&(record.topic.clone(), record.partition))
            .is_some_and(|&from| record.offset >= from)
    }

    /// The positions to store with the batch: past each partition's last record applied,
    /// never past a record held back.
    pub fn next_offsets(&self, records: &[Record]) -> crate::kafka::Positions {
        let mut next = crate::kafka::Positions::new();
        for r in records {
            let key = (r.topic.to_string(), r.partition);
            let end = match self.from.get(&(r.topic.clone(), r.partition)) {
                Some(&from) => from,
                None => r.offset + 1,
            };
            let e = next.entry(key).or_insert(end);
            *e = (*e).max(end);
        }
        next
    }
}

/// Event-time alignment. An account's events come from several topics (calls, chat, ...)
/// whose partitions the consumer reads at slightly different paces, so a batch may hold
/// one topic's events up to 10:05 and another's only up to 10:01; the next batch then
/// brings the second topic's 10:01-10:05, out of order for every account in both, and each
/// of those accounts is replayed. The watermark is the earliest of the partitions' latest
/// event times in the batch (`times`: each record's event time, None for a record rejected
/// at decoding); every partition's records from its first one dated after the watermark
/// wait for the next batch, which brings the slower partitions' events up to them. A
/// partition with no record in the batch does not hold the others back (it may be caught
/// up), and an event late for good is still replayed in order by the ledger.
pub fn hold_back(
    records: &[Record],
    times: impl Iterator<Item = Option<chrono::DateTime<chrono::Utc>>>,
) -> Holds {
    let times: Vec<_> = times.collect();
    let mut latest: std::collections::HashMap<(Arc<str>, i32), chrono::DateTime<chrono::Utc>> =
        std::collections::HashMap::new();
    for (r, t) in records.iter().zip(&times) {
        if let Some(t) = t {
            let e = latest.entry((r.topic.clone(), r.partition)).or_insert(*t);
            *e = (*e).max(*t);
        }
    }
    let Some(watermark) = latest.values().min().copied() else {
        return Holds::default();
    };
    let mut holds = Holds::default();
    for (r, t) in records.iter().zip(&times) {
        match holds.from.entry((r.topic.clone(), r.partition)) {
            std::collections::hash_map::Entry::Occupied(_) => holds.records += 1,
            std::collections::hash_map::Entry::Vacant(v) => {
                if t.is_some_and(|t| t > watermark) {
                    v.insert(r.offset);
                    holds.records += 1;
                }
            }
        }
    }
    holds
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};

    fn record(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            topic: Arc::from(topic),
            partition,
            offset,
            key: None,
            payload: Vec::new(),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    fn at(minute: u32) -> Option<DateTime<Utc>> {
        Some(Utc.with_ymd_and_hms(2027, 1, 1, 10, minute, 0).unwrap())
    }

    #[test]
    fn the_partitions_ahead_wait_for_the_slowest_ones_latest_event() {
        // calls/0 runs to 10:05, chat/1 only to 10:02, a rejected record among the calls.
        let records = [
            record("calls", 0, 10),
            record("chat", 1, 40),
            record("calls", 0, 11),
            record("calls", 0, 12),
            record("chat", 1, 41),
            record("calls", 0, 13),
            record("calls", 0, 14),
        ];
        let times = [at(1), at(1), at(2), at(3), at(2), None, at(5)];
        let held = hold_back(&records, times.into_iter());
        // The watermark is 10:02: calls from offset 12 (10:03) on wait, the rejected one too.
        assert_eq!(held.records, 3);
        assert_eq!(
            held.from.into_iter().collect::<Vec<_>>(),
            vec![((Arc::from("calls"), 0), 12)]
        );
        let held = hold_back(&records, times.into_iter());
        let kept: Vec<i64> = records
            .iter()
            .filter(|r| !held.holds(r))
            .map(|r| r.offset)
            .collect();
        assert_eq!(kept, [10, 40, 11, 41]);
        let mut next: Vec<_> = held.next_offsets(&records).into_iter().collect();
        next.sort();
        assert_eq!(
            next,
            [(("calls".to_owned(), 0), 12), (("chat".to_owned(), 1), 42)]
        );
    }

    #[test]
    fn one_partition_or_none_dated_holds_nothing_back() {
        let records = [record("calls", 0, 1), record("calls", 0, 2)];
        assert_eq!(
            hold_back(&records, [at(9), at(1)].into_iter()),
            Holds::default()
        );
        let records = [record("calls", 0, 1), record("chat", 0, 2)];
        assert_eq!(
            hold_back(&records, [None, None].into_iter()),
            Holds::default()
        );
    }
}
