//! The `data` object of each event type: its wire shape (serde structs that borrow from the
//! payload) and its value rules (ranges, enums, time ordering). Knows nothing of envelopes.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::scalar::{parse_decimal, parse_rfc3339, StringMap, Text};
use crate::event::{
    AdjustmentEvent, CallUsage, ChatUsage, Direction, GrantEvent, GrantKind, InstanceUsage,
    MeteredUsage, OveragePolicy, Payload, PlanEvent, Reason, Recharge, Rejection, UsageVoidEvent,
    VoidGrantEvent, ADJUSTMENT_GRANT_PREFIX, KIND_CALL, KIND_CHAT, KIND_INSTANCE, MAX_REASON_BYTES,
    RESERVED_GRANT_PREFIX, REVERSAL_GRANT_PREFIX,
};

/// Longest id (`call_id`, `grant_id`...), in bytes.
pub(crate) const MAX_ID_BYTES: usize = 256;
/// Longest attribute value (`model`, `channel`...), in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 128;
/// Longest span a call or an instance period may cover.
pub(crate) const MAX_DURATION_SECONDS: i64 = 31 * 86_400;
/// Most attributes a metered event may carry.
pub(crate) const MAX_ATTRIBUTES: usize = 16;
/// Most allowance alert thresholds a plan may carry.
pub(crate) const MAX_ALERT_PERCENTS: usize = 16;
pub(crate) const MAX_RESPONSES: i64 = 10_000;
pub(crate) const MAX_TOP_UP_VALIDITY_MONTHS: i64 = 120;

pub(crate) type Check<T> = Result<T, Rejection>;

pub(crate) fn invalid(field: &str, detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::InvalidValue, Some(field), detail)
}

// `required`, `id`, `name` and `opt_name` are always inlined: called out of line, the value
// moved in was read back right after being stored, in wider loads than the stores, which
// stalls the CPU (no store-to-load forwarding); about a tenth of the decoder's time.
#[inline(always)]
pub(crate) fn required<T>(value: Option<T>, field: &str) -> Check<T> {
    value.ok_or_else(|| Rejection::new(Reason::MissingField, Some(field), "required"))
}

/// An identifier: 1..=256 bytes, no control character or bidirectional override.
#[inline(always)]
pub(crate) fn id<'a>(value: Text<'a>, field: &str) -> Check<Cow<'a, str>> {
    let len = value.0.len();
    if len == 0 {
        return Err(invalid(field, "empty"));
    }
    if len > MAX_ID_BYTES {
        return Err(invalid(
            field,
            format!("{len} bytes, at most {MAX_ID_BYTES}"),
        ));
    }
    printable(&value.0, field)?;
    Ok(value.0)
}

/// An attribute value rules may match on: 1..=128 bytes, no control character or
/// bidirectional override.
#[inline(always)]
fn name<'a>(value: Text<'a>, field: &str) -> Check<Cow<'a, str>> {
    let len = value.0.len();
    if len == 0 || len > MAX_NAME_BYTES {
        return Err(invalid(
            field,
            format!("{len} bytes, expected 1..={MAX_NAME_BYTES}"),
        ));
    }
    printable(&value.0, field)?;
    Ok(value.0)
}

/// The first character of `s` that no id or attribute value may hold, with its byte offset:
/// a control character (U+0000..=U+001F, U+007F) or a bidirectional override or isolate
/// (U+202A..=U+202E, U+2066..=U+2069). Databases refuse some of them (PostgreSQL: NUL) and
/// terminals and logs obey the others.
pub(crate) fn forbidden_char(s: &str) -> Option<(usize, char)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // The bidirectional ones are E2 80 AA..=AE and E2 81 A6..=A9 in UTF-8.
            0x00..=0x1f | 0x7f => return Some((i, b[i] as char)),
            0xe2 if matches!(
                (b.get(i + 1), b.get(i + 2)),
                (Some(0x80), Some(0xaa..=0xae)) | (Some(0x81), Some(0xa6..=0xa9))
            ) =>
            {
                return s[i..].chars().next().map(|c| (i, c));
            }
            _ => i += 1,
        }
    }
    None
}

/// Refuses a value holding a [`forbidden_char`].
#[inline]
pub(crate) fn printable(s: &str, field: &str) -> Check<()> {
    match forbidden_char(s) {
        None => Ok(()),
        Some((at, c)) => Err(invalid(
            field,
            format!(
                "U+{:04X} at byte {at}: control characters and bidirectional overrides are not allowed",
                c as u32
            ),
        )),
    }
}

#[inline(always)]
fn opt_name<'a>(value: Option<Text<'a>>, field: &str) -> Check<Option<Cow<'a, str>>> {
    value.map(|v| name(v, field)).transpose()
}

/// An optional identifier (`data.hold_id`): null is the same as absent.
fn opt_id<'a>(value: Option<Text<'a>>, field: &str) -> Check<Option<Cow<'a, str>>> {
    value.map(|v| id(v, field)).transpose()
}

pub(crate) fn timestamp(value: &Text<'_>, field: &str) -> Check<DateTime<Utc>> {
    parse_rfc3339(value.as_str()).ok_or_else(|| {
        invalid(
            field,
            format!("not an RFC 3339 date-time: {:?}", clip(value.as_str())),
        )
    })
}

fn decimal(value: &Text<'_>, field: &str) -> Check<Decimal> {
    parse_decimal(value.as_str())
        .map_err(|e| invalid(field, format!("{e}: {:?}", clip(value.as_str()))))
}

fn positive_decimal(value: &Text<'_>, field: &str) -> Check<Decimal> {
    let d = decimal(value, field)?;
    if d.is_zero() {
        return Err(invalid(field, "must be greater than 0"));
    }
    Ok(d)
}

fn int_in(value: i64, min: i64, max: i64, field: &str) -> Check<i64> {
    if value < min || value > max {
        return Err(invalid(field, format!("{value} is outside {min}..={max}")));
    }
    Ok(value)
}

/// The first 64 characters of a value, for details (a rejected value may be huge).
pub(crate) fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Is `s` a metered kind or attribute name: `^[a-z][a-z0-9_]{0,63}$`?
fn is_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallData<'a> {
    #[serde(borrow)]
    pub(super) call_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) direction: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) channel: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) model: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) voice_tier: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) started_at: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) answered_at: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) ended_at: Option<Text<'a>>,
    pub(super) hold_seconds: Option<i64>,
    #[serde(borrow)]
    pub(super) hold_id: Option<Text<'a>>,
}

impl<'a> CallData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let call_id = required(self.call_id.take(), "data.call_id")?;
        let direction = required(self.direction.take(), "data.direction")?;
        let started_at = required(self.started_at.take(), "data.started_at")?;
        let ended_at = required(self.ended_at.take(), "data.ended_at")?;

        let call_id = id(call_id, "data.call_id")?;
        let direction = match direction.as_str() {
            "inbound" => Direction::Inbound,
            "outbound" => Direction::Outbound,
            other => {
                return Err(invalid(
                    "data.direction",
                    format!("{:?} is not inbound or outbound", clip(other)),
                ))
            }
        };
        let channel = opt_name(self.channel.take(), "data.channel")?;
        let model = opt_name(self.model.take(), "data.model")?;
        let voice_tier = opt_name(self.voice_tier.take(), "data.voice_tier")?;
        let started_at = timestamp(&started_at, "data.started_at")?;
        let answered_at = self
            .answered_at
            .take()
            .map(|t| timestamp(&t, "data.answered_at"))
            .transpose()?;
        let ended_at = timestamp(&ended_at, "data.ended_at")?;
        let hold_seconds = self.hold_seconds.take().unwrap_or(0);
        let hold_id = opt_id(self.hold_id.take(), "data.hold_id")?;
        if hold_seconds < 0 {
            return Err(invalid(
                "data.hold_seconds",
                format!("{hold_seconds} is negative"),
            ));
        }

        if let Some(answered) = answered_at {
            if answered < started_at {
                return Err(invalid(
                    "data.answered_at",
                    "answered before the call started",
                ));
            }
        }
        if ended_at < started_at {
            return Err(invalid("data.ended_at", "ended before the call started"));
        }
        if let Some(answered) = answered_at {
            if ended_at < answered {
                return Err(invalid(
                    "data.ended_at",
                    "hung up before the call was answered",
                ));
            }
        }
        if (ended_at - started_at).num_seconds() > MAX_DURATION_SECONDS {
            return Err(invalid("data.ended_at", "the call lasts more than 31 days"));
        }
        let answered_seconds = answered_at.map_or(0, |a| (ended_at - a).num_seconds());
        if hold_seconds > answered_seconds {
            return Err(invalid(
                "data.hold_seconds",
                format!("{hold_seconds} s of hold in {answered_seconds} s of answered time"),
            ));
        }

        Ok(Payload::Call(CallUsage {
            call_id,
            direction,
            channel,
            model,
            voice_tier,
            started_at,
            answered_at,
            ended_at,
            // At most 31 days, checked above.
            hold_seconds: hold_seconds as u32,
            hold_id,
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatData<'a> {
    #[serde(borrow)]
    pub(super) conversation_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) model: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) voice_tier: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) channel: Option<Text<'a>>,
    pub(super) responses: Option<i64>,
    #[serde(borrow)]
    pub(super) hold_id: Option<Text<'a>>,
}

impl<'a> ChatData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let conversation_id = required(self.conversation_id.take(), "data.conversation_id")?;
        let model = required(self.model.take(), "data.model")?;
        let conversation_id = id(conversation_id, "data.conversation_id")?;
        let model = name(model, "data.model")?;
        let voice_tier = opt_name(self.voice_tier.take(), "data.voice_tier")?;
        let channel = opt_name(self.channel.take(), "data.channel")?;
        let responses = match self.responses.take() {
            None => 1,
            Some(n) => int_in(n, 1, MAX_RESPONSES, "data.responses")? as u32,
        };
        let hold_id = opt_id(self.hold_id.take(), "data.hold_id")?;
        Ok(Payload::Chat(ChatUsage {
            conversation_id,
            model,
            voice_tier,
            channel,
            responses,
            hold_id,
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstanceData<'a> {
    #[serde(borrow)]
    pub(super) instance_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) instance_type: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) started_at: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) ended_at: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) hold_id: Option<Text<'a>>,
}

impl<'a> InstanceData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let instance_id = required(self.instance_id.take(), "data.instance_id")?;
        let instance_type = required(self.instance_type.take(), "data.instance_type")?;
        let started_at = required(self.started_at.take(), "data.started_at")?;
        let ended_at = required(self.ended_at.take(), "data.ended_at")?;
        let instance_id = id(instance_id, "data.instance_id")?;
        let instance_type = name(instance_type, "data.instance_type")?;
        let started_at = timestamp(&started_at, "data.started_at")?;
        let ended_at = timestamp(&ended_at, "data.ended_at")?;
        if ended_at < started_at {
            return Err(invalid("data.ended_at", "ended before it started"));
        }
        if (ended_at - started_at).num_seconds() > MAX_DURATION_SECONDS {
            return Err(invalid(
                "data.ended_at",
                "the period lasts more than 31 days",
            ));
        }
        let hold_id = opt_id(self.hold_id.take(), "data.hold_id")?;
        Ok(Payload::Instance(InstanceUsage {
            instance_id,
            instance_type,
            started_at,
            ended_at,
            hold_id,
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MeteredData<'a> {
    #[serde(borrow)]
    pub(super) kind: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) quantity: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) attributes: Option<StringMap<'a>>,
    #[serde(borrow)]
    pub(super) hold_id: Option<Text<'a>>,
}

impl<'a> MeteredData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let kind = required(self.kind.take(), "data.kind")?;
        let quantity = required(self.quantity.take(), "data.quantity")?;
        if !is_identifier(kind.as_str()) {
            return Err(invalid(
                "data.kind",
                format!(
                    "{:?} does not match ^[a-z][a-z0-9_]{{0,63}}$",
                    clip(kind.as_str())
                ),
            ));
        }
        if matches!(kind.as_str(), KIND_CALL | KIND_CHAT | KIND_INSTANCE) {
            return Err(invalid(
                "data.kind",
                format!(
                    "{:?} is a built-in kind: use its own event type",
                    kind.as_str()
                ),
            ));
        }
        let quantity = positive_decimal(&quantity, "data.quantity")?;
        let attributes = self.attributes.take().unwrap_or_default().0;
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(invalid(
                "data.attributes",
                format!("{} attributes, at most {MAX_ATTRIBUTES}", attributes.len()),
            ));
        }
        for (i, (key, value)) in attributes.iter().enumerate() {
            if !is_identifier(key) {
                return Err(invalid(
                    "data.attributes",
                    format!(
                        "name {:?} does not match ^[a-z][a-z0-9_]{{0,63}}$",
                        clip(key)
                    ),
                ));
            }
            if attributes[..i].iter().any(|(k, _)| k == key) {
                return Err(invalid(
                    &format!("data.attributes.{key}"),
                    "duplicate attribute",
                ));
            }
            if value.is_empty() || value.len() > MAX_NAME_BYTES {
                return Err(invalid(
                    &format!("data.attributes.{key}"),
                    format!("{} bytes, expected 1..={MAX_NAME_BYTES}", value.len()),
                ));
            }
            printable(value, &format!("data.attributes.{key}"))?;
        }
        let hold_id = opt_id(self.hold_id.take(), "data.hold_id")?;
        Ok(Payload::Metered(MeteredUsage {
            kind: kind.0,
            quantity,
            attributes,
            hold_id,
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantData<'a> {
    #[serde(borrow)]
    pub(super) grant_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) kind: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) credits: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) expires_at: Option<Text<'a>>,
    pub(super) priority: Option<i64>,
}

impl<'a> GrantData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let grant_id = required(self.grant_id.take(), "data.grant_id")?;
        let kind = required(self.kind.take(), "data.kind")?;
        let credits = required(self.credits.take(), "data.credits")?;
        let grant_id = id(grant_id, "data.grant_id")?;
        if grant_id.starts_with(RESERVED_GRANT_PREFIX) {
            return Err(invalid(
                "data.grant_id",
                format!(
                    "grant ids beginning with {RESERVED_GRANT_PREFIX:?} are reserved for the allowances Tally grants at each cycle reset",
                ),
            ));
        }
        if grant_id.starts_with(ADJUSTMENT_GRANT_PREFIX) {
            return Err(invalid(
                "data.grant_id",
                format!(
                    "grant ids beginning with {ADJUSTMENT_GRANT_PREFIX:?} are reserved for the credits of manual adjustments",
                ),
            ));
        }
        if grant_id.starts_with(REVERSAL_GRANT_PREFIX) {
            return Err(invalid(
                "data.grant_id",
                format!(
                    "grant ids beginning with {REVERSAL_GRANT_PREFIX:?} are reserved for the credits of voided usage",
                ),
            ));
        }
        let kind = GrantKind::parse(kind.as_str()).ok_or_else(|| {
            invalid(
                "data.kind",
                format!(
                    "{:?} is not allowance, package, top_up, promo or manual",
                    clip(kind.as_str())
                ),
            )
        })?;
        let credits = positive_decimal(&credits, "data.credits")?;
        let expires_at = self
            .expires_at
            .take()
            .map(|t| timestamp(&t, "data.expires_at"))
            .transpose()?;
        let priority = self
            .priority
            .take()
            .map(|p| int_in(p, i64::from(i32::MIN), i64::from(i32::MAX), "data.priority"))
            .transpose()?
            .map(|p| p as i32);
        Ok(Payload::Grant(GrantEvent {
            grant_id,
            kind,
            credits,
            expires_at,
            priority,
        }))
    }
}

/// A correction's `reason`: 1..=512 bytes, printable.
fn reason<'a>(value: Text<'a>, field: &str) -> Check<Cow<'a, str>> {
    let len = value.0.len();
    if len == 0 || len > MAX_REASON_BYTES {
        return Err(invalid(
            field,
            format!("{len} bytes, expected 1..={MAX_REASON_BYTES}"),
        ));
    }
    printable(&value.0, field)?;
    Ok(value.0)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct VoidGrantData<'a> {
    #[serde(borrow)]
    pub(super) grant_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) reason: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) actor: Option<Text<'a>>,
}

impl<'a> VoidGrantData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let grant_id = required(self.grant_id.take(), "data.grant_id")?;
        let why = required(self.reason.take(), "data.reason")?;
        let grant_id = id(grant_id, "data.grant_id")?;
        if grant_id.starts_with(RESERVED_GRANT_PREFIX) {
            return Err(invalid(
                "data.grant_id",
                "an allowance is not voided: it follows the plan (change the plan instead)",
            ));
        }
        let reason = reason(why, "data.reason")?;
        let actor = self
            .actor
            .take()
            .map(|a| name(a, "data.actor"))
            .transpose()?;
        Ok(Payload::VoidGrant(VoidGrantEvent {
            grant_id,
            reason,
            actor,
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageVoidData<'a> {
    #[serde(borrow)]
    pub(super) event_source: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) event_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) reason: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) actor: Option<Text<'a>>,
}

impl<'a> UsageVoidData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let source = required(self.event_source.take(), "data.event_source")?;
        let event_id = required(self.event_id.take(), "data.event_id")?;
        let why = required(self.reason.take(), "data.reason")?;
        let event_source = id(source, "data.event_source")?;
        let event_id = id(event_id, "data.event_id")?;
        let reason = reason(why, "data.reason")?;
        let actor = self
            .actor
            .take()
            .map(|a| name(a, "data.actor"))
            .transpose()?;
        Ok(Payload::UsageVoid(UsageVoidEvent {
            event_source,
            event_id,
            reason,
            actor,
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdjustmentData<'a> {
    #[serde(borrow)]
    pub(super) adjustment_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) credits: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) reason: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) actor: Option<Text<'a>>,
}

impl<'a> AdjustmentData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let adjustment_id = required(self.adjustment_id.take(), "data.adjustment_id")?;
        let credits = required(self.credits.take(), "data.credits")?;
        let why = required(self.reason.take(), "data.reason")?;
        let adjustment_id = id(adjustment_id, "data.adjustment_id")?;
        // The bucket's grant id (`adjustment:{id}`) must fit an id too.
        if adjustment_id.len() + ADJUSTMENT_GRANT_PREFIX.len() > MAX_ID_BYTES {
            return Err(invalid(
                "data.adjustment_id",
                format!(
                    "{} bytes, at most {}",
                    adjustment_id.len(),
                    MAX_ID_BYTES - ADJUSTMENT_GRANT_PREFIX.len()
                ),
            ));
        }
        let (negative, magnitude) = match credits.as_str().strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, credits.as_str()),
        };
        let magnitude = parse_decimal(magnitude)
            .map_err(|e| invalid("data.credits", format!("{e}: {:?}", clip(credits.as_str()))))?;
        if magnitude.is_zero() {
            return Err(invalid("data.credits", "must not be 0"));
        }
        let credits = if negative { -magnitude } else { magnitude };
        let reason = reason(why, "data.reason")?;
        let actor = self
            .actor
            .take()
            .map(|a| name(a, "data.actor"))
            .transpose()?;
        Ok(Payload::Adjustment(AdjustmentEvent {
            adjustment_id,
            credits,
            reason,
            actor,
        }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanData<'a> {
    #[serde(borrow)]
    pub(super) plan_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) monthly_allowance: Option<Text<'a>>,
    pub(super) billing_day: Option<i64>,
    #[serde(borrow)]
    pub(super) overage_policy: Option<Text<'a>>,
    pub(super) top_up_validity_months: Option<i64>,
    #[serde(borrow)]
    pub(super) low_balance_credits: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) low_balance_percent: Option<Text<'a>>,
    pub(super) allowance_alert_percents: Option<Vec<i64>>,
    #[serde(borrow)]
    pub(super) recharge_threshold_credits: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) recharge_credits: Option<Text<'a>>,
}

impl<'a> PlanData<'a> {
    pub(crate) fn check(&mut self) -> Check<Payload<'a>> {
        let plan_id = required(self.plan_id.take(), "data.plan_id")?;
        let monthly_allowance = required(self.monthly_allowance.take(), "data.monthly_allowance")?;
        let billing_day = required(self.billing_day.take(), "data.billing_day")?;
        let overage_policy = required(self.overage_policy.take(), "data.overage_policy")?;
        let plan_id = id(plan_id, "data.plan_id")?;
        let monthly_allowance = decimal(&monthly_allowance, "data.monthly_allowance")?;
        let billing_day = int_in(billing_day, 1, 31, "data.billing_day")? as u8;
        let overage_policy = match overage_policy.as_str() {
            "settle_from_next_grant" => OveragePolicy::SettleFromNextGrant,
            "bill_overage" => OveragePolicy::BillOverage,
            other => {
                return Err(invalid(
                    "data.overage_policy",
                    format!(
                        "{:?} is not settle_from_next_grant or bill_overage",
                        clip(other)
                    ),
                ))
            }
        };
        let top_up_validity_months = self
            .top_up_validity_months
            .take()
            .map(|m| {
                int_in(
                    m,
                    1,
                    MAX_TOP_UP_VALIDITY_MONTHS,
                    "data.top_up_validity_months",
                )
            })
            .transpose()?
            .map(|m| m as u32);
        let low_balance_credits = self
            .low_balance_credits
            .take()
            .map(|c| decimal(&c, "data.low_balance_credits"))
            .transpose()?;
        let low_balance_percent = self
            .low_balance_percent
            .take()
            .map(|p| {
                let d = decimal(&p, "data.low_balance_percent")?;
                if d > Decimal::ONE_HUNDRED {
                    return Err(invalid(
                        "data.low_balance_percent",
                        format!("{d} is above 100"),
                    ));
                }
                Ok(d)
            })
            .transpose()?;
        let allowance_alert_percents = match self.allowance_alert_percents.take() {
            None => None,
            Some(list) => {
                if list.len() > MAX_ALERT_PERCENTS {
                    return Err(invalid(
                        "data.allowance_alert_percents",
                        format!("{} thresholds, at most {MAX_ALERT_PERCENTS}", list.len()),
                    ));
                }
                let mut out = Vec::with_capacity(list.len());
                for (i, p) in list.into_iter().enumerate() {
                    if !(1..=100).contains(&p) {
                        let field = format!("data.allowance_alert_percents[{i}]");
                        return Err(invalid(&field, format!("{p} is outside 1..=100")));
                    }
                    out.push(p as u32);
                }
                Some(out)
            }
        };
        // Both or neither: a threshold without an amount asks for nothing.
        let recharge = match (
            self.recharge_threshold_credits.take(),
            self.recharge_credits.take(),
        ) {
            (None, None) => None,
            (Some(t), Some(c)) => Some(Recharge {
                threshold_credits: decimal(&t, "data.recharge_threshold_credits")?,
                credits: positive_decimal(&c, "data.recharge_credits")?,
            }),
            (Some(_), None) => {
                return Err(invalid(
                    "data.recharge_credits",
                    "required with recharge_threshold_credits",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "data.recharge_threshold_credits",
                    "required with recharge_credits",
                ))
            }
        };
        Ok(Payload::Plan(PlanEvent {
            plan_id,
            monthly_allowance,
            billing_day,
            overage_policy,
            top_up_validity_months,
            low_balance_credits,
            low_balance_percent,
            allowance_alert_percents,
            recharge,
        }))
    }
}
