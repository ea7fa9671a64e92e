//! Account commands: a plan, a grant, a grant's void, a manual adjustment or a usage
//! event's void, typed, turned
//! into the one event the ledger applies (on its topic, keyed by account, so it is applied
//! exactly once and in order with usage). `tally accounts set-plan|grant|void-grant|adjust`
//! and `PUT /v1/accounts/{id}/plan`, `POST /v1/accounts/{id}/grants`,
//! `POST /v1/accounts/{id}/grants/{grant_id}/void`, `POST /v1/accounts/{id}/adjustments`,
//! `tally accounts void-usage` and `POST /v1/accounts/{id}/usage/void` all come here: one encoding, one event-id scheme, one
//! check (the decoder the pipeline runs, so a mistake is reported to the caller instead of
//! dead-lettered), one publish with a bound on the broker's acknowledgement.
//!
//! Owns: building and publishing these events. Does not touch the stores: what the ledger
//! does with an event is the ledger's.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::Config;
use crate::event::{
    self, encode, types, AdjustmentEvent, DecodeLimits, GrantEvent, PlanEvent, Rejection,
    UsageVoidEvent, VoidGrantEvent,
};

/// A plan to give an account (a change takes effect from the next reset).
#[derive(Debug, Clone)]
pub struct PlanCommand {
    pub account: String,
    pub plan: PlanEvent<'static>,
}

/// Credits to add (idempotent by grant id: its event id is derived from account and grant id).
#[derive(Debug, Clone)]
pub struct GrantCommand {
    pub account: String,
    pub grant: GrantEvent<'static>,
}

/// A grant to void (idempotent: its event id is derived from account and grant id).
#[derive(Debug, Clone)]
pub struct VoidGrantCommand {
    pub account: String,
    pub void: VoidGrantEvent<'static>,
}

/// A manual adjustment (idempotent by adjustment id: its event id is derived from it).
#[derive(Debug, Clone)]
pub struct AdjustmentCommand {
    pub account: String,
    pub adjustment: AdjustmentEvent<'static>,
}

/// A usage event to void (idempotent: its event id is derived from the account and the
/// original's source and id, and the ledger voids an original once).
#[derive(Debug, Clone)]
pub struct UsageVoidCommand {
    pub account: String,
    pub void: UsageVoidEvent<'static>,
}

/// An event built from a command, checked, ready to publish (and, once published, what the
/// caller reports: type, source, id).
#[derive(Debug, Clone)]
pub struct CommandEvent {
    pub topic: String,
    pub key: String,
    pub event_type: &'static str,
    pub source: String,
    pub id: String,
    pub payload: Vec<u8>,
}

/// Why a command was not published.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The event would be refused by the pipeline (the decoder's reason and field).
    #[error("refused: {0}")]
    Invalid(Rejection),
    /// The broker did not acknowledge it (nothing is known to be published).
    #[error("publishing to {topic}: {detail}")]
    Unavailable { topic: String, detail: String },
}

/// The event id of a plan change: unique per change (a plan is not idempotent by content),
/// in the form the decoder requires under the API's sources (`plan:` then the time in
/// nanoseconds and a random suffix).
pub fn plan_event_id(now: DateTime<Utc>) -> String {
    format!(
        "{}{}-{:08x}",
        event::API_PLAN_ID_PREFIX,
        now.timestamp_nanos_opt().unwrap_or_default(),
        rand::random::<u32>()
    )
}

/// What each command is: its topic and type, its event id, its payload. The rest — the
/// check and the publish — is one implementation for all ([`Command::event`],
/// [`publish_command`]).
pub trait Command {
    /// The account the event is keyed by.
    fn account(&self) -> &str;
    /// Its topic (the grants topic for grants, voids and adjustments, the plans topic for
    /// plans).
    fn topic(cfg: &Config) -> &str;
    /// Its CloudEvents type.
    const TYPE: &'static str;
    /// Its event id at `now`: derived from the command's own id where the command is
    /// idempotent (grant, void, adjustment), unique per change for a plan.
    fn event_id(&self, now: DateTime<Utc>) -> String;
    /// The structured CloudEvent.
    fn payload(&self, source: &str, id: &str, time: DateTime<Utc>) -> Vec<u8>;

    /// The event from `source`, effective at `time`, checked as the pipeline will check it at
    /// `now`.
    fn event(
        &self,
        cfg: &Config,
        source: &str,
        time: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<CommandEvent, CommandError> {
        let id = self.event_id(now);
        let payload = self.payload(source, &id, time);
        checked(
            cfg,
            now,
            CommandEvent {
                topic: Self::topic(cfg).to_owned(),
                key: self.account().to_owned(),
                event_type: Self::TYPE,
                source: source.to_owned(),
                id,
                payload,
            },
        )
    }
}

impl Command for PlanCommand {
    const TYPE: &'static str = types::PLAN;
    fn account(&self) -> &str {
        &self.account
    }
    fn topic(cfg: &Config) -> &str {
        &cfg.kafka.topics.plans
    }
    fn event_id(&self, now: DateTime<Utc>) -> String {
        plan_event_id(now)
    }
    fn payload(&self, source: &str, id: &str, time: DateTime<Utc>) -> Vec<u8> {
        encode::plan(source, id, &self.account, &self.plan, time)
    }
}

impl Command for GrantCommand {
    const TYPE: &'static str = types::GRANT;
    fn account(&self) -> &str {
        &self.account
    }
    fn topic(cfg: &Config) -> &str {
        &cfg.kafka.topics.grants
    }
    fn event_id(&self, _: DateTime<Utc>) -> String {
        encode::grant_event_id(&self.account, &self.grant.grant_id)
    }
    fn payload(&self, source: &str, _: &str, time: DateTime<Utc>) -> Vec<u8> {
        encode::grant(source, &self.account, &self.grant, time)
    }
}

impl Command for VoidGrantCommand {
    const TYPE: &'static str = types::GRANT_VOID;
    fn account(&self) -> &str {
        &self.account
    }
    fn topic(cfg: &Config) -> &str {
        &cfg.kafka.topics.grants
    }
    fn event_id(&self, _: DateTime<Utc>) -> String {
        encode::void_event_id(&self.account, &self.void.grant_id)
    }
    fn payload(&self, source: &str, _: &str, time: DateTime<Utc>) -> Vec<u8> {
        encode::void_grant(source, &self.account, &self.void, time)
    }
}

impl Command for AdjustmentCommand {
    const TYPE: &'static str = types::ADJUSTMENT;
    fn account(&self) -> &str {
        &self.account
    }
    fn topic(cfg: &Config) -> &str {
        &cfg.kafka.topics.grants
    }
    fn event_id(&self, _: DateTime<Utc>) -> String {
        encode::adjustment_event_id(&self.account, &self.adjustment.adjustment_id)
    }
    fn payload(&self, source: &str, _: &str, time: DateTime<Utc>) -> Vec<u8> {
        encode::adjustment(source, &self.account, &self.adjustment, time)
    }
}

impl Command for UsageVoidCommand {
    // It rides the grants topic, with the other corrections.
    const TYPE: &'static str = types::USAGE_VOID;
    fn account(&self) -> &str {
        &self.account
    }
    fn topic(cfg: &Config) -> &str {
        &cfg.kafka.topics.grants
    }
    fn event_id(&self, _: DateTime<Utc>) -> String {
        encode::usage_void_event_id(&self.account, &self.void.event_source, &self.void.event_id)
    }
    fn payload(&self, source: &str, _: &str, time: DateTime<Utc>) -> Vec<u8> {
        encode::usage_void(source, &self.account, &self.void, time)
    }
}

/// The decoder's verdict on the event, with the pipeline's limits.
fn checked(
    cfg: &Config,
    now: DateTime<Utc>,
    built: CommandEvent,
) -> Result<CommandEvent, CommandError> {
    let limits = DecodeLimits {
        max_message_bytes: cfg.pipeline.max_message_bytes,
        max_future_seconds: cfg.pipeline.max_future_seconds,
    };
    event::decode(&built.payload, now, &limits).map_err(CommandError::Invalid)?;
    Ok(built)
}

/// Publishes the event and waits for the broker's acknowledgement, at most `timeout`.
pub async fn publish(
    producer: &FutureProducer,
    event: &CommandEvent,
    timeout: Duration,
) -> Result<(), CommandError> {
    let unavailable = |detail: String| CommandError::Unavailable {
        topic: event.topic.clone(),
        detail,
    };
    let send = producer.send(
        FutureRecord::to(&event.topic)
            .key(&event.key)
            .payload(&event.payload),
        timeout,
    );
    match tokio::time::timeout(timeout, send).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable(format!(
            "no acknowledgement within {} s",
            timeout.as_secs()
        ))),
    }
}

/// Builds, checks and publishes a command (a plan, a grant, a void, an adjustment, a usage
/// void); the
/// event, once the broker acknowledged it.
pub async fn publish_command<C: Command>(
    producer: &FutureProducer,
    cfg: &Config,
    source: &str,
    command: &C,
    time: DateTime<Utc>,
    timeout: Duration,
) -> Result<CommandEvent, CommandError> {
    published(
        producer,
        command.event(cfg, source, time, Utc::now()),
        timeout,
    )
    .await
}

/// Publishes an event that was built and checked; the event, once acknowledged.
async fn published(
    producer: &FutureProducer,
    built: Result<CommandEvent, CommandError>,
    timeout: Duration,
) -> Result<CommandEvent, CommandError> {
    let event = built?;
    publish(producer, &event, timeout).await?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{GrantKind, OveragePolicy};
    use rust_decimal::Decimal;
    use rust_decimal_macros::dec;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn grant(credits: Decimal) -> GrantCommand {
        GrantCommand {
            account: "acme".into(),
            grant: GrantEvent {
                grant_id: "order-7".into(),
                kind: GrantKind::TopUp,
                credits,
                expires_at: None,
                priority: Some(3),
            },
        }
    }

    #[test]
    fn a_grant_is_one_event_whose_id_the_account_and_grant_id_fix() {
        let cfg = Config::default();
        let now = at("2026-03-01T10:00:00Z");
        let e = grant(dec!(250.5))
            .event(&cfg, "//billing", now, now)
            .unwrap();
        assert_eq!(
            (e.topic.as_str(), e.key.as_str(), e.event_type),
            ("credit.grants", "acme", "tally.credit.grant.v1")
        );
        assert_eq!(
            (e.source.as_str(), e.id.as_str()),
            ("//billing", "grant:acme:order-7")
        );
        let json: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(json["id"], "grant:acme:order-7");
        assert_eq!(json["subject"], "acme");
        assert_eq!(json["time"], "2026-03-01T10:00:00.000000Z");
        assert_eq!(
            json["data"],
            serde_json::json!({"grant_id": "order-7", "kind": "top_up", "credits": "250.5", "priority": 3})
        );
    }

    #[test]
    fn a_command_the_pipeline_would_refuse_is_refused_naming_the_field() {
        let cfg = Config::default();
        let now = at("2026-03-01T10:00:00Z");
        let Err(CommandError::Invalid(r)) = grant(dec!(0)).event(&cfg, "//billing", now, now)
        else {
            panic!("a grant of 0 credits was accepted");
        };
        assert_eq!(r.field.as_deref(), Some("data.credits"), "{r}");
    }

    #[test]
    fn voids_and_adjustments_ride_the_grants_topic_with_ids_their_keys_fix() {
        let cfg = Config::default();
        let now = at("2026-03-01T10:00:00Z");
        let source = event::api_source("acme");
        let v = VoidGrantCommand {
            account: "acme".into(),
            void: VoidGrantEvent {
                grant_id: "order-7".into(),
                reason: "charged back".into(),
                actor: Some("billing-backend".into()),
            },
        }
        .event(&cfg, &source, now, now)
        .unwrap();
        assert_eq!(
            (v.topic.as_str(), v.event_type, v.id.as_str()),
            ("credit.grants", "tally.credit.void.v1", "void:acme:order-7")
        );
        let json: serde_json::Value = serde_json::from_slice(&v.payload).unwrap();
        assert_eq!(
            json["data"],
            serde_json::json!({"grant_id": "order-7", "reason": "charged back", "actor": "billing-backend"})
        );
        let a = AdjustmentCommand {
            account: "acme".into(),
            adjustment: AdjustmentEvent {
                adjustment_id: "t-1".into(),
                credits: dec!(-20.50),
                reason: "double count".into(),
                actor: None,
            },
        };
        let e = a.event(&cfg, &source, now, now).unwrap();
        assert_eq!(
            (e.topic.as_str(), e.event_type, e.id.as_str()),
            (
                "credit.grants",
                "tally.credit.adjustment.v1",
                "adjustment:acme:t-1"
            )
        );
        let json: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(json["data"]["credits"], "-20.5");
        let mut empty = a.clone();
        empty.adjustment.reason = "".into();
        let Err(CommandError::Invalid(r)) = empty.event(&cfg, &source, now, now) else {
            panic!("an adjustment without a reason was accepted");
        };
        assert_eq!(r.field.as_deref(), Some("data.reason"), "{r}");
    }

    #[test]
    fn each_plan_change_is_a_new_event_in_the_api_form() {
        let cfg = Config::default();
        let now = at("2026-03-01T10:00:00Z");
        let plan = PlanCommand {
            account: "acme".into(),
            plan: PlanEvent {
                plan_id: "pro".into(),
                monthly_allowance: dec!(1000),
                billing_day: 5,
                overage_policy: OveragePolicy::BillOverage,
                top_up_validity_months: None,
                low_balance_credits: None,
                low_balance_percent: None,
                allowance_alert_percents: Some(vec![50, 100]),
                recharge: None,
            },
        };
        let source = event::api_source("acme");
        let (a, b) = (
            plan.event(&cfg, &source, now, now).unwrap(),
            plan.event(&cfg, &source, now, now).unwrap(),
        );
        assert_ne!(a.id, b.id);
        assert!(a.id.starts_with("plan:1772359200000000000-"), "{}", a.id);
        assert_eq!(
            (a.topic.as_str(), a.event_type),
            ("account.plans", "tally.account.plan.v1")
        );
        let json: serde_json::Value = serde_json::from_slice(&a.payload).unwrap();
        assert_eq!(json["data"]["monthly_allowance"], "1000");
        assert_eq!(
            json["data"]["allowance_alert_percents"],
            serde_json::json!([50, 100])
        );
    }
}
