//! The typed events the decoder produces. Strings borrow from the message payload where
//! they can (`Cow`), so decoding a batch allocates little.

use std::borrow::Cow;
use std::fmt;

use super::EventKind;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// Why a message was rejected. Serialized as the snake_case name in dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not JSON, invalid UTF-8, truncated, nested too deep.
    MalformedJson,
    /// A required attribute or data field is absent (or null).
    MissingField,
    /// A field has the wrong JSON type (a number where a string belongs, ...).
    WrongType,
    /// The CloudEvents `type` is not one Tally knows.
    UnknownType,
    /// Well-typed but not acceptable: hang-up before answer, negative hold, time far in the future...
    InvalidValue,
    /// Larger than the configured maximum message size.
    TooLarge,
    /// No price rule matches the event (rating).
    Unpriced,
    /// Event time older than the dedupe window: exactly-once cannot be guaranteed (ledger).
    TooLate,
    /// Valid to the decoder but refused by a store of record for its data (PostgreSQL or
    /// ClickHouse: a constraint, a value out of a column's range); the detail carries the
    /// database's message.
    RefusedByStore,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::MalformedJson,
        Reason::MissingField,
        Reason::WrongType,
        Reason::UnknownType,
        Reason::InvalidValue,
        Reason::TooLarge,
        Reason::Unpriced,
        Reason::TooLate,
        Reason::RefusedByStore,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::UnknownType => "unknown_type",
            Reason::InvalidValue => "invalid_value",
            Reason::TooLarge => "too_large",
            Reason::Unpriced => "unpriced",
            Reason::TooLate => "too_late",
            Reason::RefusedByStore => "refused_by_store",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected message: the reason, the field at fault (a JSON path such as `data.hold_seconds`)
/// when there is one, and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub field: Option<String>,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, field: Option<&str>, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            field: field.map(str::to_owned),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({}): {}", self.reason, field, self.detail),
            None => write!(f, "{}: {}", self.reason, self.detail),
        }
    }
}

impl std::error::Error for Rejection {}

/// CloudEvents `type` values Tally understands.
pub mod types {
    pub const CALL: &str = "tally.usage.call.v1";
    pub const CHAT_RESPONSE: &str = "tally.usage.chat_response.v1";
    pub const INSTANCE_HOURS: &str = "tally.usage.instance_hours.v1";
    /// Any other metered usage (AI analysis, media generation...): priced purely by rules.
    pub const METERED: &str = "tally.usage.metered.v1";
    pub const GRANT: &str = "tally.credit.grant.v1";
    pub const PLAN: &str = "tally.account.plan.v1";
    /// A grant voided: its remaining credits removed (a correction, never an edit).
    pub const GRANT_VOID: &str = "tally.credit.void.v1";
    /// A manual adjustment of an account's credits, plus or minus, with a reason.
    pub const ADJUSTMENT: &str = "tally.credit.adjustment.v1";
    /// A usage event voided: the credits it was charged given back (a reversal).
    pub const USAGE_VOID: &str = "tally.usage.void.v1";
}

/// The CloudEvents attributes Tally uses. (`source`, `id`) is the event's identity;
/// `subject` is the account id; `time` the event time (rating and cycles use it).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<'a> {
    pub id: Cow<'a, str>,
    pub source: Cow<'a, str>,
    pub event_type: Cow<'a, str>,
    pub account_id: Cow<'a, str>,
    pub time: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// A finished call. Billable time is hang-up − answer − hold (computed by `Usage`).
#[derive(Debug, Clone, PartialEq)]
pub struct CallUsage<'a> {
    pub call_id: Cow<'a, str>,
    pub direction: Direction,
    /// e.g. "phone", "web", "whatsapp"; optional, rules may match on it.
    pub channel: Option<Cow<'a, str>>,
    pub model: Option<Cow<'a, str>>,
    pub voice_tier: Option<Cow<'a, str>>,
    pub started_at: DateTime<Utc>,
    /// None: the call was never answered (costs nothing, still counts as a call).
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: DateTime<Utc>,
    pub hold_seconds: u32,
    /// The credit hold this usage settles (`POST /v1/accounts/{id}/holds`), if any.
    pub hold_id: Option<Cow<'a, str>>,
}

/// One or more AI responses (text reply, or spoken response in a voice call).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatUsage<'a> {
    pub conversation_id: Cow<'a, str>,
    pub model: Cow<'a, str>,
    pub voice_tier: Option<Cow<'a, str>>,
    pub channel: Option<Cow<'a, str>>,
    /// Number of responses in this event (default 1).
    pub responses: u32,
    /// The credit hold this usage settles, if any.
    pub hold_id: Option<Cow<'a, str>>,
}

/// A rented instance over a period.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceUsage<'a> {
    pub instance_id: Cow<'a, str>,
    pub instance_type: Cow<'a, str>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// The credit hold this usage settles, if any.
    pub hold_id: Option<Cow<'a, str>>,
}

/// Any other usage kind, priced only by rules (`kind` is what rules match as the event type).
#[derive(Debug, Clone, PartialEq)]
pub struct MeteredUsage<'a> {
    pub kind: Cow<'a, str>,
    pub quantity: Decimal,
    /// Attribute name/value pairs rules can match on (model, channel...).
    pub attributes: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The credit hold this usage settles, if any.
    pub hold_id: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    Allowance,
    Package,
    TopUp,
    Promo,
    Manual,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Allowance => "allowance",
            GrantKind::Package => "package",
            GrantKind::TopUp => "top_up",
            GrantKind::Promo => "promo",
            GrantKind::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<GrantKind> {
        [
            GrantKind::Allowance,
            GrantKind::Package,
            GrantKind::TopUp,
            GrantKind::Promo,
            GrantKind::Manual,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Credits added to an account. Idempotent by `grant_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantEvent<'a> {
    pub grant_id: Cow<'a, str>,
    pub kind: GrantKind,
    /// Positive, at most 6 decimal places.
    pub credits: Decimal,
    /// Explicit expiry; None means the kind's default (top-up validity, cycle end, never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Lower is consumed first; None means the kind's default.
    pub priority: Option<i32>,
}

/// Longest `reason` of a correction, in bytes.
pub const MAX_REASON_BYTES: usize = 512;

/// A grant voided (`tally.credit.void.v1`): its remaining credits are removed at the event's
/// time. Idempotent: a grant is voided once.
#[derive(Debug, Clone, PartialEq)]
pub struct VoidGrantEvent<'a> {
    pub grant_id: Cow<'a, str>,
    /// Why (1..=512 bytes, printable).
    pub reason: Cow<'a, str>,
    /// Who asked for it (the API token's name); absent: the event's `source` is.
    pub actor: Option<Cow<'a, str>>,
}

/// A manual adjustment (`tally.credit.adjustment.v1`): credits added or taken, with a reason.
#[derive(Debug, Clone, PartialEq)]
pub struct AdjustmentEvent<'a> {
    /// The idempotency key (with the account: its event id and its bucket's grant id).
    pub adjustment_id: Cow<'a, str>,
    /// Not zero, at most 6 decimal places: positive adds, negative takes.
    pub credits: Decimal,
    pub reason: Cow<'a, str>,
    /// Who asked for it (the API token's name); absent: the event's `source` is.
    pub actor: Option<Cow<'a, str>>,
}

/// A usage event voided (`tally.usage.void.v1`): the credits the original (its `source` and
/// `id`, of the same account) was charged are given back at the void's time, and analytics
/// leaves the original out. Idempotent per original: a usage event is voided once. It may
/// arrive before the original: the ledger keeps it until the original is charged.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageVoidEvent<'a> {
    /// The original usage event's CloudEvents `source`.
    pub event_source: Cow<'a, str>,
    /// The original usage event's CloudEvents `id`.
    pub event_id: Cow<'a, str>,
    pub reason: Cow<'a, str>,
    /// Who asked for it (the API token's name); absent: the event's `source` is.
    pub actor: Option<Cow<'a, str>>,
}

/// What happens to usage once an account's grants are spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OveragePolicy {
    /// Prepaid: overage is settled from the next grant first.
    SettleFromNextGrant,
    /// Plans: overage is reported as billable for the cycle.
    BillOverage,
}

/// An account's plan. An account without one is prepaid.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanEvent<'a> {
    pub plan_id: Cow<'a, str>,
    /// Credits granted each cycle; unused allowance expires at the reset (no carry-over).
    pub monthly_allowance: Decimal,
    /// 1..=31; 29-31 fall on the last day of shorter months.
    pub billing_day: u8,
    pub overage_policy: OveragePolicy,
    /// Validity of top-ups in months (default 3).
    pub top_up_validity_months: Option<u32>,
    /// Low-balance alert below this many spendable credits.
    pub low_balance_credits: Option<Decimal>,
    /// Low-balance alert below this percent of the cycle allowance.
    pub low_balance_percent: Option<Decimal>,
    /// Allowance-used alert thresholds in percent (default 50, 80, 100).
    pub allowance_alert_percents: Option<Vec<u32>>,
    /// The optional recharge request (`recharge_threshold_credits` and `recharge_credits`).
    pub recharge: Option<Recharge>,
}

/// A plan's recharge request: when spendable credits fall below `threshold_credits`, Tally
/// publishes one `recharge_requested` message per crossing asking the payment system for
/// `credits` (Tally grants nothing itself: the grant event does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recharge {
    pub threshold_credits: Decimal,
    /// More than 0.
    pub credits: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload<'a> {
    Call(CallUsage<'a>),
    Chat(ChatUsage<'a>),
    Instance(InstanceUsage<'a>),
    Metered(MeteredUsage<'a>),
    Grant(GrantEvent<'a>),
    Plan(PlanEvent<'a>),
    VoidGrant(VoidGrantEvent<'a>),
    Adjustment(AdjustmentEvent<'a>),
    UsageVoid(UsageVoidEvent<'a>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub envelope: Envelope<'a>,
    pub payload: Payload<'a>,
}

/// What rating needs from a usage event, whatever its kind: the kind name rules match,
/// attribute values, and the measured quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage<'e> {
    /// "call", "chat_response", "instance_hours", or a metered kind ("ai_analysis"...).
    pub kind: &'e str,
    pub time: DateTime<Utc>,
    pub attributes: Vec<(&'e str, &'e str)>,
    pub quantity: Quantity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// A duration in whole seconds (calls: hang-up − answer − hold; instances: end − start).
    Seconds(u64),
    /// A count or amount (responses, analyses, images...).
    Units(Decimal),
}

/// Grant ids Tally generates itself (each cycle's allowance, `allowance:2026-12-20`): a
/// producer's grant may not use them, so a generated grant can never collide with one.
pub const RESERVED_GRANT_PREFIX: &str = "allowance:";

/// Grant ids of the buckets positive adjustments credit (`adjustment:{adjustment_id}`): a
/// producer's grant may not use them either.
pub const ADJUSTMENT_GRANT_PREFIX: &str = "adjustment:";

/// Grant ids of the buckets a voided usage event's credits come back into
/// (`reversal:{source}:{id}` of the original): a producer's grant may not use them either.
pub const REVERSAL_GRANT_PREFIX: &str = "reversal:";

/// Sources Tally's HTTP API publishes under: only `//tally/api/accounts/{account}`, with
/// grants (event id [`grant_event_id`](crate::event::encode::grant_event_id)) and plans
/// (event id `plan:...`). An event under this prefix of any other shape is refused, so
/// whoever writes here can only write what the API itself would.
pub const API_SOURCE_PREFIX: &str = "//tally/api/";

/// The source of the events the API publishes for `account_id`.
pub fn api_source(account_id: &str) -> String {
    format!("{API_SOURCE_PREFIX}accounts/{account_id}")
}

/// The prefix of the event ids of the plans the API publishes.
pub const API_PLAN_ID_PREFIX: &str = "plan:";

pub const KIND_CALL: &str = "call";
pub const KIND_CHAT: &str = "chat_response";
pub const KIND_INSTANCE: &str = "instance_hours";

impl Payload<'_> {
    /// Its kind in the registry ([`EventKind`]).
    pub fn kind(&self) -> EventKind {
        match self {
            Payload::Call(_) => EventKind::Call,
            Payload::Chat(_) => EventKind::ChatResponse,
            Payload::Instance(_) => EventKind::InstanceHours,
            Payload::Metered(_) => EventKind::Metered,
            Payload::Grant(_) => EventKind::Grant,
            Payload::Plan(_) => EventKind::Plan,
            Payload::VoidGrant(_) => EventKind::GrantVoid,
            Payload::Adjustment(_) => EventKind::Adjustment,
            Payload::UsageVoid(_) => EventKind::UsageVoid,
        }
    }

    /// The usage kind it is rated and stored as: the registry's, or the one a metered event
    /// names; None for grants and plans.
    pub fn usage_kind(&self) -> Option<&str> {
        match self {
            Payload::Metered(m) => Some(&m.kind),
            other => other.kind().usage_kind(),
        }
    }

    /// The credit hold a usage event settles (`data.hold_id`); None for the other events.
    pub fn hold_id(&self) -> Option<&str> {
        match self {
            Payload::Call(c) => c.hold_id.as_deref(),
            Payload::Chat(c) => c.hold_id.as_deref(),
            Payload::Instance(i) => i.hold_id.as_deref(),
            Payload::Metered(m) => m.hold_id.as_deref(),
            Payload::Grant(_)
            | Payload::Plan(_)
            | Payload::VoidGrant(_)
            | Payload::Adjustment(_)
            | Payload::UsageVoid(_) => None,
        }
    }
}

impl<'a> Event<'a> {
    /// The usage view of this event, or None for grants and plans.
    pub fn usage(&self) -> Option<Usage<'_>> {
        let time = self.envelope.time;
        let kind = self.payload.usage_kind()?;
        match &self.payload {
            Payload::Call(c) => {
                let mut attributes = Vec::with_capacity(4);
                attributes.push(("direction", c.direction.as_str()));
                push_opt(&mut attributes, "channel", &c.channel);
                push_opt(&mut attributes, "model", &c.model);
                push_opt(&mut attributes, "voice_tier", &c.voice_tier);
                Some(Usage {
                    kind,
                    time,
                    attributes,
                    quantity: Quantity::Seconds(c.billable_seconds()),
                })
            }
            Payload::Chat(c) => {
                let mut attributes = Vec::with_capacity(3);
                attributes.push(("model", c.model.as_ref()));
                push_opt(&mut attributes, "voice_tier", &c.voice_tier);
                push_opt(&mut attributes, "channel", &c.channel);
                Some(Usage {
                    kind,
                    time,
                    attributes,
                    quantity: Quantity::Units(Decimal::from(c.responses)),
                })
            }
            Payload::Instance(i) => Some(Usage {
                kind,
                time,
                attributes: vec![("instance_type", i.instance_type.as_ref())],
                quantity: Quantity::Seconds((i.ended_at - i.started_at).num_seconds().max(0) as u64),
            }),
            Payload::Metered(m) => Some(Usage {
                kind,
                time,
                attributes: m
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.as_ref(), v.as_ref()))
                    .collect(),
                quantity: Quantity::Units(m.quantity),
            }),
            Payload::Grant(_)
            | Payload::Plan(_)
            | Payload::VoidGrant(_)
            | Payload::Adjustment(_)
            | Payload::UsageVoid(_) => None,
        }
    }
}

fn push_opt<'e>(out: &mut Vec<(&'e str, &'e str)>, key: &'e str, value: &'e Option<Cow<'_, str>>) {
    if let Some(v) = value {
        out.push((key, v.as_ref()));
    }
}

impl CallUsage<'_> {
    /// Hang-up − answer − hold, in whole seconds; 0 for an unanswered call.
    pub fn billable_seconds(&self) -> u64 {
        match self.answered_at {
            None => 0,
            Some(answered) => {
                let talk = (self.ended_at - answered).num_seconds();
                (talk - i64::from(self.hold_seconds)).max(0) as u64
            }
        }
    }
}
