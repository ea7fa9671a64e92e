//! `tally accounts set-plan` and `tally accounts grant`: a plan or a grant published as an
//! event on its topic (keyed by account), so the ledger applies it exactly once, in order
//! with usage. Validated here exactly as the pipeline will, so a mistake is reported to the
//! operator instead of dead-lettered.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::config::Config;
use crate::event::{encode, GrantKind, OveragePolicy};

/// The event source of what the CLI publishes.
const SOURCE: &str = "//tally/cli";

/// A plan to give an account (a change takes effect from the next reset).
#[derive(Debug, Clone)]
pub struct SetPlan {
    pub account: String,
    pub plan_id: String,
    pub allowance: Decimal,
    pub billing_day: u8,
    pub overage_policy: OveragePolicy,
    pub top_up_validity_months: Option<u32>,
    pub low_balance_credits: Option<Decimal>,
    pub low_balance_percent: Option<Decimal>,
    pub allowance_alert_percents: Option<Vec<u32>>,
}

/// Credits to add (idempotent by grant id).
#[derive(Debug, Clone)]
pub struct Grant {
    pub account: String,
    pub grant_id: String,
    pub kind: GrantKind,
    pub credits: Decimal,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: Option<i32>,
}

/// Publishes the plan event; prints what was sent.
pub async fn set_plan(cfg: &Config, p: SetPlan, now: DateTime<Utc>) -> anyhow::Result<()> {
    let event_id = format!(
        "plan:{}:{}",
        p.account,
        now.timestamp_nanos_opt().unwrap_or_default()
    );
    let payload = encode::plan(
        SOURCE,
        &event_id,
        &p.account,
        &p.plan_id,
        p.allowance,
        p.billing_day,
        p.overage_policy,
        p.top_up_validity_months,
        p.low_balance_credits,
        p.low_balance_percent,
        p.allowance_alert_percents.as_deref(),
        now,
    );
    publish(cfg, &cfg.kafka.topics.plans, &p.account, &payload, now).await
}

/// Publishes the grant event; prints what was sent.
pub async fn grant(cfg: &Config, g: Grant, now: DateTime<Utc>) -> anyhow::Result<()> {
    let payload = encode::grant(
        SOURCE,
        &g.account,
        &g.grant_id,
        g.kind,
        g.credits,
        g.expires_at,
        g.priority,
        now,
    );
    publish(cfg, &cfg.kafka.topics.grants, &g.account, &payload, now).await
}

async fn publish(
    cfg: &Config,
    topic: &str,
    account: &str,
    payload: &[u8],
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    crate::event::decode(payload, now, &crate::event::DecodeLimits::default())
        .map_err(|r| anyhow::anyhow!("refused: {r}"))?;
    let producer: rdkafka::producer::FutureProducer =
        crate::kafka::producer_config(&cfg.kafka).create()?;
    super::send_all(
        &producer,
        [(topic, Some(account.as_bytes()), payload, None)],
        1,
        0,
        false,
    )
    .await?;
    println!(
        "sent to {topic}: {}",
        super::shown(&String::from_utf8_lossy(payload))
    );
    Ok(())
}
