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
    // Purge at start, which also loads the horizon admission checks; then every
    // `pipeline.dedupe_purge_interval_ms` (an hour by default), and at
    // every batch while a purge has claims left to delete.
    let mut purge_pending = !purge(&mut store, &cfg, clock.now(), &mut admission).await;
    let mut last_purge = Instant::now();
    let purge_interval = std::time::Duration::from_millis(cfg.pipeline.dedupe_purge_interval_ms);
    tracing::info!(group, ?topics, "ledger pipeline started");

    while !*shutdown.borrow() {
        let Some(batch) = consumer.next_batch(&batch_limits, &mut shutdown).await? else {
            break;
        };
        stats.skipped += batch.skipped as u64;
        if batch.records.is_empty() {
            continue;
        }
        let started = Instant::now();
        let now = clock.now();
        let mut prepared = Vec::with_capacity(batch.records.len());
        let mut letters = Vec::new();
        for record in &batch.records {
            let result = prepare(record, &prices, now, &admission);
            match result {
                Ok(p) => prepared.push(p),
                Err(rejection) => letters.push(dead_letter(record, rejection)),
            }
        }
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
                apply(
                    &mut store,
                    &cfg,
                    &group,
                    &items,
                    &batch.next_offsets,
                    &mut retry,
                )
                .await
            }
            Err(halt) => Err(halt.map(Bug::DeadLetters)),
        };
        let (totals, split) = match applied {
            Ok(applied) => applied,
            Err(Halt::Shutdown) => {
                tracing::warn!(
                    records = batch.records.len(),
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
                Ok(()) => store_offsets(&mut store, &cfg, &group, &batch.next_offsets, &mut retry)
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
        consumer.committed(&batch.next_offsets);
        crate::metrics::batch_seconds("ledger", started.elapsed().as_secs_f64());
        letters.extend(refused_letters);

        stats.batches += 1;
        stats.records += batch.records.len() as u64;
        stats.applied += totals.applied as u64;
        stats.duplicates += totals.duplicates as u64;
        crate::metrics::replays(totals.replayed, totals.window_events);
        stats.dead_letters += letters.len() as u64;
        tracing::debug!(
            records = batch.records.len(),
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
        if purge_pending || last_purge.elapsed() > purge_interval {
            purge_pending = !purge(&mut store, &cfg, clock.now(), &mut admission).await;
            last_purge = Instant::now();
        }
    }
    tracing::info!(?stats, "ledger pipeline stopped");
    Ok(stats)
}

/// Claims one purge deletes at most between two batches (in statements of
/// `DEDUPE_PURGE_CHUNK_ROWS`), so a large backlog never stops the ledger for long.
const PURGE_MAX_ROWS: u64 = 100_000;

/// Purges dedupe claims by event time at `now` ([`Store::purge_dedupe`]) and carries the
/// stored horizon into `admission`. True when no claim is left to purge; a failure is
/// logged (the purge runs again later; claiming checks the stored horizon anyway) and
/// counts as done, so it is retried at the next interval, not at every batch.
async fn purge(
    store: &mut Store,
    cfg: &Config,
    now: chrono::DateTime<chrono::Utc>,
    admission: &mut super::Admission,
) -> bool {
    if let Err(e) = reconnect_if_closed(store, cfg).await {
        tracing::warn!(error = %e, "purging dedupe claims failed");
        return true;
    }
    match store
        .purge_dedupe(now, admission.dedupe_window, PURGE_MAX_ROWS)
        .await
    {
        Ok(o) => {
            admission.purged_before = Some(o.horizon);
            if o.deleted > 0 {
                tracing::info!(purged = o.deleted, horizon = %o.horizon, done = o.done, "purged expired dedupe claims");
            }
            o.done
        }
        Err(e) => {
            tracing::warn!(error = %e, "purging dedupe claims failed");
            if let Ok(horizon) = store.dedupe_horizon().await {
                admission.purged_before = horizon;
            }
            true
        }
    }
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
