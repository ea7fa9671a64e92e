//! `tally accounts set-plan`, `grant`, `void-grant`, `adjust` and `void-usage`: the account
//! commands
//! ([`crate::commands`]) published from the CLI, with what was sent printed for the operator.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::commands::{
    self, AdjustmentCommand, CommandEvent, GrantCommand, PlanCommand, UsageVoidCommand,
    VoidGrantCommand,
};
use crate::config::Config;

/// The event source of what the CLI publishes.
const SOURCE: &str = "//tally/cli";

/// How long the CLI waits for the broker to acknowledge a command.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes the plan event, effective `now`; prints what was sent.
pub async fn set_plan(cfg: &Config, plan: PlanCommand, now: DateTime<Utc>) -> anyhow::Result<()> {
    let producer = crate::kafka::producer_config(&cfg.kafka).create()?;
    let sent =
        commands::publish_command(&producer, cfg, SOURCE, &plan, now, PUBLISH_TIMEOUT).await?;
    print_sent(&sent);
    Ok(())
}

/// Publishes the grant event, effective `now`; prints what was sent.
pub async fn grant(cfg: &Config, grant: GrantCommand, now: DateTime<Utc>) -> anyhow::Result<()> {
    let producer = crate::kafka::producer_config(&cfg.kafka).create()?;
    let sent =
        commands::publish_command(&producer, cfg, SOURCE, &grant, now, PUBLISH_TIMEOUT).await?;
    print_sent(&sent);
    Ok(())
}

/// Publishes the grant's void, effective `now`; prints what was sent.
pub async fn void_grant(
    cfg: &Config,
    void: VoidGrantCommand,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let producer = crate::kafka::producer_config(&cfg.kafka).create()?;
    let sent =
        commands::publish_command(&producer, cfg, SOURCE, &void, now, PUBLISH_TIMEOUT).await?;
    print_sent(&sent);
    Ok(())
}

/// Publishes the manual adjustment, effective `now`; prints what was sent.
pub async fn adjust(
    cfg: &Config,
    adjustment: AdjustmentCommand,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let producer = crate::kafka::producer_config(&cfg.kafka).create()?;
    let sent = commands::publish_command(&producer, cfg, SOURCE, &adjustment, now, PUBLISH_TIMEOUT)
        .await?;
    print_sent(&sent);
    Ok(())
}

/// Publishes the usage event's void, effective `now`; prints what was sent.
pub async fn void_usage(
    cfg: &Config,
    void: UsageVoidCommand,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let producer = crate::kafka::producer_config(&cfg.kafka).create()?;
    let sent =
        commands::publish_command(&producer, cfg, SOURCE, &void, now, PUBLISH_TIMEOUT).await?;
    print_sent(&sent);
    Ok(())
}

fn print_sent(sent: &CommandEvent) {
    println!(
        "sent to {}: {}",
        sent.topic,
        super::shown(&String::from_utf8_lossy(&sent.payload))
    );
}
