//! The ledger loop: a batch from Kafka -> decode and rate -> dead letters (acknowledged) ->
//! one PostgreSQL transaction (claims, effects, entries, offsets) -> Kafka offset commit.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::{limits, prepare, retry, Backoff};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::event::{Payload, Rejection};
use crate::kafka::{self, BatchConsumer, DeadLetter, DeadLetterProducer, Record};

use crate::ledger::buckets::Plan;
use crate::ledger::{Action, BatchOutcome, DebitInfo, Item, NewGrant, PgOffsetStore, Store};
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
    let dead = DeadLetterProducer::for_config(&cfg, "ledger")?;
    let (batch_limits, admission) = limits(&cfg.pipeline);
    let mut backoff = Backoff::new(&cfg.pipeline);
    let mut store = retry(&mut backoff, "connect to PostgreSQL", || {
        Store::connect(&cfg.postgres)
    })
    .await;
    store.alert_defaults = cfg.alerts.defaults();
    let mut stats = LedgerStats::default();
    let mut last_purge = Instant::now();
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
            }),
        );
        // Dead letters are acknowledged before the offsets that skip them are stored.
        if !letters.is_empty() {
            retry(&mut backoff, "send dead letters", || {
                dead.send_all(&letters)
            })
            .await;
            fail::fail_point!("ledger-after-dead-letters", |_| std::process::abort());
            for l in &letters {
                crate::metrics::dead_letter(l.reason.as_str());
                tracing::warn!(
                    reason = %l.reason, field = l.field.as_deref(), topic = %l.record.topic,
                    partition = l.record.partition, offset = l.record.offset, detail = %l.detail,
                    "dead-lettered"
                );
            }
        }
        let transaction = Instant::now();
        let outcome = apply(
            &mut store,
            &cfg,
            &group,
            &items,
            &batch.next_offsets,
            &mut backoff,
        )
        .await;
        crate::metrics::transaction_seconds("ledger", transaction.elapsed().as_secs_f64());
        fail::fail_point!("ledger-after-commit", |_| std::process::abort());
        consumer.committed(&batch.next_offsets);
        crate::metrics::batch_seconds("ledger", started.elapsed().as_secs_f64());

        stats.batches += 1;
        stats.records += batch.records.len() as u64;
        stats.applied += outcome.applied as u64;
        stats.duplicates += outcome.duplicates as u64;
        stats.dead_letters += letters.len() as u64;
        tracing::debug!(
            records = batch.records.len(),
            applied = outcome.applied,
            duplicates = outcome.duplicates,
            dead_letters = letters.len(),
            entries = outcome.entries,
            accounts = outcome.accounts,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ledger batch committed"
        );
        if last_purge.elapsed() > std::time::Duration::from_secs(3600) {
            match store.purge_dedupe(cfg.pipeline.dedupe_window_days).await {
                Ok(n) => tracing::info!(purged = n, "purged expired dedupe claims"),
                Err(e) => tracing::warn!(error = %e, "purging dedupe claims failed"),
            }
            last_purge = Instant::now();
        }
    }
    tracing::info!(?stats, "ledger pipeline stopped");
    Ok(stats)
}

/// Applies the batch, retrying transient failures (reconnecting when the connection died).
/// A non-transient error is a bug or a broken schema: fail loudly rather than skip money.
async fn apply(
    store: &mut Store,
    cfg: &Config,
    group: &str,
    items: &[Item<'_>],
    next_offsets: &kafka::Positions,
    backoff: &mut Backoff,
) -> BatchOutcome {
    loop {
        match store.apply_batch(group, items, next_offsets).await {
            Ok(outcome) => {
                backoff.reset();
                return outcome;
            }
            Err(e) => {
                tracing::warn!(error = %e, transient = e.is_transient(), "ledger transaction failed; retrying");
                backoff.wait().await;
                if store.is_closed() || e.is_closed() {
                    if let Ok(mut s) = Store::connect(&cfg.postgres).await {
                        s.alert_defaults = cfg.alerts.defaults();
                        *store = s;
                    }
                }
            }
        }
    }
}

/// The ledger's view of a prepared event, borrowing from it.
fn to_item<'a>(p: &'a super::Prepared<'_, 'a>) -> Item<'a> {
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
            },
            overage_policy: plan.overage_policy,
            top_up_validity_months: plan
                .top_up_validity_months
                .unwrap_or(crate::ledger::buckets::DEFAULT_TOP_UP_VALIDITY_MONTHS),
        },
        (payload, Some(charge)) => Action::Debit(DebitInfo {
            credits: charge.credits,
            usage_kind: usage_kind(payload),
            price_version: charge.price_version,
            rule_id: charge.rule_id,
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

fn usage_kind<'a>(payload: &'a Payload<'_>) -> &'a str {
    match payload {
        Payload::Call(_) => crate::event::KIND_CALL,
        Payload::Chat(_) => crate::event::KIND_CHAT,
        Payload::Instance(_) => crate::event::KIND_INSTANCE,
        Payload::Metered(m) => &m.kind,
        Payload::Grant(_) | Payload::Plan(_) => "",
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
