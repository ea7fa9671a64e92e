//! The write routes (admin tokens only): grants, plans, and the corrections — a grant's void
//! and a manual adjustment. None touches the ledger: each becomes a CloudEvent on its Kafka
//! topic (`tally.credit.grant.v1`, `tally.credit.void.v1` and `tally.credit.adjustment.v1` on
//! the grants topic, `tally.account.plan.v1` on the plans topic), keyed by account, so the
//! ledger pipeline
//! applies it exactly once and in order with the account's usage — the same path as grants
//! from a billing system. The request is first checked by the very decoder the pipeline
//! uses, so what the API accepts is never dead-lettered; the event is written by the shared
//! encoder (`event::encode`).
//!
//! Idempotency: a grant's event id derives from the account and grant id
//! (`grant:{account}:{grant_id}`, `event::encode::grant_event_id`), and its
//! source names the account (`//tally/api/accounts/{account}`), so a retried POST is the same
//! event identity, which the ledger claims once (and the ledger ignores a grant id it already
//! has, whatever its source). Before publishing, a grant id the ledger already holds answers
//! at once: 200 when the terms match (a retry of an applied grant), 409 when they differ.
//! A void's event id is `void:{account}:{grant_id}` (a grant is voided once), an adjustment's
//! `adjustment:{account}:{adjustment_id}`; both carry the token's name as `actor`, written
//! on the ledger lines they cause with their `reason`.
//! A plan is not idempotent by content (A, B, A again must end at A): each PUT is a new
//! event; repeating one re-applies the same plan, which changes nothing.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::ApiError;
use super::input::{json_body, JsonInt};
use super::{pg, AppState};
use crate::commands::{
    self, AdjustmentCommand, CommandError, GrantCommand, PlanCommand, UsageVoidCommand,
    VoidGrantCommand,
};
use crate::event::{
    self, encode, types, AdjustmentEvent, DecodeLimits, Event, GrantEvent, GrantKind, Payload,
    PlanEvent, Rejection, UsageVoidEvent, VoidGrantEvent,
};

/// How long the API waits for Kafka to acknowledge an event before answering 503.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest grant id: `grant:{account}:{grant_id}` must fit the 256-byte event id with the
/// longest account id (128).
const MAX_GRANT_ID_CHARS: usize = 120;
/// Longest plan id.
const MAX_PLAN_ID_CHARS: usize = 128;

/// The ids a caller chooses through the API (grant and plan ids), as `schemas/openapi.yaml`
/// states them: `^[A-Za-z0-9._~@+=/-]{1,max}$`. Narrower than what events on Kafka may carry
/// (any printable text up to 256 bytes), so the contract can say exactly what is accepted.
fn identifier(value: &str, max: usize, field: &'static str) -> Result<(), ApiError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._~@+=/-".contains(&b);
    if value.is_empty() || value.len() > max || !value.bytes().all(allowed) {
        return Err(ApiError::invalid(
            field,
            format!("must match ^[A-Za-z0-9._~@+=/-]{{1,{max}}}$"),
        ));
    }
    Ok(())
}

/// POST /v1/accounts/{id}/grants body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// The idempotency key: the same grant id is granted once.
    grant_id: String,
    kind: WritableGrantKind,
    /// Decimal string > 0, at most 6 decimal places.
    credits: String,
    /// RFC 3339, in the future; absent: the kind's default (top-up validity, or never).
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    priority: Option<JsonInt>,
    /// RFC 3339: when the grant takes effect (its event time); absent: now. At most
    /// `billing.grace` in the past (older would be charged late).
    #[serde(default)]
    effective_at: Option<String>,
}

/// The grants the API may write (allowances come from plans; manual grants from operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WritableGrantKind {
    TopUp,
    Package,
    Promo,
}

impl WritableGrantKind {
    fn kind(self) -> GrantKind {
        match self {
            WritableGrantKind::TopUp => GrantKind::TopUp,
            WritableGrantKind::Package => GrantKind::Package,
            WritableGrantKind::Promo => GrantKind::Promo,
        }
    }
}

/// POST /v1/accounts/{id}/grants/{grant_id}/void body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {
    /// Why (1..=512 bytes), written on the ledger line.
    reason: String,
    /// RFC 3339: when the void takes effect (its event time); absent: now.
    #[serde(default)]
    effective_at: Option<String>,
}

/// POST /v1/accounts/{id}/usage/void body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageVoidRequest {
    /// The original usage event's CloudEvents `source` and `id`.
    event_source: String,
    event_id: String,
    /// Why (1..=512 bytes), written on the ledger lines.
    reason: String,
    /// RFC 3339: when the credits come back (the void's event time); absent: now.
    #[serde(default)]
    effective_at: Option<String>,
}

/// POST /v1/accounts/{id}/adjustments body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    /// The idempotency key: the same adjustment id is applied once.
    adjustment_id: String,
    /// Decimal string, not 0, `-` for a deduction; at most 6 decimal places.
    credits: String,
    /// Why (1..=512 bytes), written on the ledger lines.
    reason: String,
    /// RFC 3339: when the adjustment takes effect (its event time); absent: now.
    #[serde(default)]
    effective_at: Option<String>,
}

/// Longest adjustment id (as a grant id: `adjustment:{account}:{id}` fits the 256-byte
/// event id with the longest account id).
const MAX_ADJUSTMENT_ID_CHARS: usize = 110;

/// PUT /v1/accounts/{id}/plan body: the fields of `tally.account.plan.v1`'s data.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    plan_id: String,
    monthly_allowance: String,
    billing_day: JsonInt,
    overage_policy: String,
    #[serde(default)]
    top_up_validity_months: Option<JsonInt>,
    #[serde(default)]
    low_balance_credits: Option<String>,
    #[serde(default)]
    low_balance_percent: Option<String>,
    #[serde(default)]
    allowance_alert_percents: Option<Vec<JsonInt>>,
    #[serde(default)]
    recharge_threshold_credits: Option<String>,
    #[serde(default)]
    recharge_credits: Option<String>,
    /// RFC 3339: when the plan takes effect (its event time); absent: now.
    #[serde(default)]
    effective_at: Option<String>,
}

/// The event time of a write: `effective_at` when given (not in the future, at most
/// `billing.grace` ago: an older event would be billed late, at the account's current time),
/// else now.
fn effective_time(
    effective_at: Option<&str>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Result<DateTime<Utc>, ApiError> {
    let Some(text) = effective_at else {
        return Ok(now);
    };
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|e| ApiError::invalid("effective_at", format!("not an RFC 3339 time: {e}")))?
        .with_timezone(&Utc);
    if at > now {
        return Err(ApiError::invalid(
            "effective_at",
            "must not be in the future",
        ));
    }
    if at < now - grace {
        return Err(ApiError::invalid(
            "effective_at",
            format!(
                "is more than billing.grace ({} h) ago: it would be billed late, at the account's current time",
                grace.num_hours()
            ),
        ));
    }
    Ok(at)
}

/// The source of the events the API publishes for `account_id`.
pub fn source_for(account_id: &str) -> String {
    crate::event::api_source(account_id)
}

/// Checks a request's fields exactly as the pipeline will: the event built from them as
/// given goes through the decoder; a rejection names the request field.
fn check<'a>(
    raw: &'a [u8],
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Result<Event<'a>, ApiError> {
    event::decode(raw, now, limits).map_err(rejection)
}

/// A decoder's rejection as a 400 naming the request field.
fn rejection(r: Rejection) -> ApiError {
    let field = match r.field.as_deref() {
        Some(f) => f.strip_prefix("data.").unwrap_or(f).to_owned(),
        None => "body".to_owned(),
    };
    ApiError::invalid(field, r.detail)
}

/// Publishes a command's event from `source` at `time` (checked again by `commands`, as the
/// CLI's are), answering 503 when the broker does not acknowledge it in time.
async fn publish<C: commands::Command>(
    api: &AppState,
    source: &str,
    command: &C,
    time: DateTime<Utc>,
) -> Result<commands::CommandEvent, ApiError> {
    commands::publish_command(
        &api.producer,
        &api.cfg,
        source,
        command,
        time,
        PUBLISH_TIMEOUT,
    )
    .await
    .map_err(command_error)
}

/// A command error as the API answers it.
fn command_error(e: CommandError) -> ApiError {
    match e {
        CommandError::Invalid(r) => rejection(r),
        CommandError::Unavailable { topic, detail } => ApiError::Unavailable {
            dependency: "Kafka",
            detail: format!("publishing to {topic}: {detail}"),
        },
    }
}

fn limits(api: &AppState) -> DecodeLimits {
    crate::pipeline::limits(&api.cfg.pipeline).1.decode
}

/// POST /v1/accounts/{id}/grants
pub async fn grant(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = who.write(&id, "write grants")?;
    let req: GrantRequest = json_body(&headers, body, api.cfg.api.max_body_bytes)?;
    identifier(&req.grant_id, MAX_GRANT_ID_CHARS, "grant_id")?;
    let now = Utc::now();
    let time = effective_time(req.effective_at.as_deref(), now, api.cfg.billing.grace())?;
    let source = source_for(id);
    let event_id = encode::grant_event_id(id, &req.grant_id);
    let mut data = json!({
        "grant_id": req.grant_id, "kind": GrantKind::as_str(req.kind.kind()), "credits": req.credits,
    });
    if let Some(e) = &req.expires_at {
        data["expires_at"] = json!(e);
    }
    if let Some(p) = req.priority {
        data["priority"] = json!(p);
    }
    let raw = encode::envelope(types::GRANT, &source, &event_id, id, time, data);
    let Payload::Grant(g) = check(&raw, now, &limits(&api))?.payload else {
        return Err(ApiError::Internal("a grant decoded as another type".into()));
    };
    if g.expires_at.is_some_and(|e| e <= now) {
        return Err(ApiError::invalid("expires_at", "must be in the future"));
    }
    let store = api.store().await?;
    let answer = |status: &str| {
        json!({
            "account_id": id, "grant_id": g.grant_id, "status": status,
            "event": {"type": types::GRANT, "source": source, "id": event_id},
        })
    };
    if let Some(existing) = pg(store.grant(id, &g.grant_id)).await? {
        if existing.kind == g.kind && existing.granted == g.credits {
            return Ok((StatusCode::OK, Json(answer("applied"))));
        }
        return Err(ApiError::Conflict {
            field: "grant_id",
            message: format!(
                "grant `{}` was already applied with kind {} and {} credits",
                g.grant_id,
                existing.kind.as_str(),
                existing.granted
            ),
        });
    }
    let command = GrantCommand {
        account: id.to_owned(),
        grant: GrantEvent {
            grant_id: g.grant_id.to_string().into(),
            kind: g.kind,
            credits: g.credits,
            expires_at: g.expires_at,
            priority: g.priority,
        },
    };
    publish(&api, &source, &command, time).await?;
    tracing::info!(account_id = id, grant_id = %g.grant_id, kind = g.kind.as_str(), credits = %g.credits, by = who.name(), "grant published");
    Ok((StatusCode::ACCEPTED, Json(answer("accepted"))))
}

/// PUT /v1/accounts/{id}/plan
pub async fn plan(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = who.write(&id, "change plans")?;
    let req: PlanRequest = json_body(&headers, body, api.cfg.api.max_body_bytes)?;
    identifier(&req.plan_id, MAX_PLAN_ID_CHARS, "plan_id")?;
    let now = Utc::now();
    let time = effective_time(req.effective_at.as_deref(), now, api.cfg.billing.grace())?;
    let source = source_for(id);
    let event_id = commands::plan_event_id(now);
    let mut data = json!({
        "plan_id": req.plan_id, "monthly_allowance": req.monthly_allowance,
        "billing_day": req.billing_day, "overage_policy": req.overage_policy,
    });
    if let Some(v) = req.top_up_validity_months {
        data["top_up_validity_months"] = json!(v);
    }
    if let Some(v) = &req.low_balance_credits {
        data["low_balance_credits"] = json!(v);
    }
    if let Some(v) = &req.low_balance_percent {
        data["low_balance_percent"] = json!(v);
    }
    if let Some(v) = &req.allowance_alert_percents {
        data["allowance_alert_percents"] = json!(v);
    }
    if let Some(v) = &req.recharge_threshold_credits {
        data["recharge_threshold_credits"] = json!(v);
    }
    if let Some(v) = &req.recharge_credits {
        data["recharge_credits"] = json!(v);
    }
    let raw = encode::envelope(types::PLAN, &source, &event_id, id, time, data);
    let Payload::Plan(p) = check(&raw, now, &limits(&api))?.payload else {
        return Err(ApiError::Internal("a plan decoded as another type".into()));
    };
    let command = PlanCommand {
        account: id.to_owned(),
        plan: PlanEvent {
            plan_id: p.plan_id.to_string().into(),
            monthly_allowance: p.monthly_allowance,
            billing_day: p.billing_day,
            overage_policy: p.overage_policy,
            top_up_validity_months: p.top_up_validity_months,
            low_balance_credits: p.low_balance_credits,
            low_balance_percent: p.low_balance_percent,
            allowance_alert_percents: p.allowance_alert_percents.clone(),
            recharge: p.recharge,
        },
    };
    let sent = publish(&api, &source, &command, time).await?;
    tracing::info!(account_id = id, plan_id = %p.plan_id, by = who.name(), "plan published");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "account_id": id, "plan_id": p.plan_id, "status": "accepted",
            "event": {"type": sent.event_type, "source": sent.source, "id": sent.id},
        })),
    ))
}

/// POST /v1/accounts/{id}/grants/{grant_id}/void
pub async fn void_grant(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((id, grant_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = who.write(&id, "void grants")?;
    let req: VoidRequest = json_body(&headers, body, api.cfg.api.max_body_bytes)?;
    identifier(&grant_id, MAX_GRANT_ID_CHARS, "grant_id")?;
    let now = Utc::now();
    let time = effective_time(req.effective_at.as_deref(), now, api.cfg.billing.grace())?;
    let source = source_for(id);
    let event_id = encode::void_event_id(id, &grant_id);
    let data = json!({"grant_id": grant_id, "reason": req.reason, "actor": who.name()});
    let raw = encode::envelope(types::GRANT_VOID, &source, &event_id, id, time, data);
    let Payload::VoidGrant(v) = check(&raw, now, &limits(&api))?.payload else {
        return Err(ApiError::Internal("a void decoded as another type".into()));
    };
    let answer = |status: &str| {
        json!({
            "account_id": id, "grant_id": grant_id, "status": status,
            "event": {"type": types::GRANT_VOID, "source": source, "id": event_id},
        })
    };
    let store = api.store().await?;
    match pg(store.grant(id, &grant_id)).await? {
        None => return Err(ApiError::GrantNotFound(grant_id.clone())),
        Some(g) if g.voided_at.is_some() => return Ok((StatusCode::OK, Json(answer("applied")))),
        Some(_) => {}
    }
    let command = VoidGrantCommand {
        account: id.to_owned(),
        void: VoidGrantEvent {
            grant_id: v.grant_id.to_string().into(),
            reason: v.reason.to_string().into(),
            actor: Some(who.name().to_owned().into()),
        },
    };
    publish(&api, &source, &command, time).await?;
    tracing::info!(account_id = id, grant_id = %grant_id, by = who.name(), "grant void published");
    Ok((StatusCode::ACCEPTED, Json(answer("accepted"))))
}

/// POST /v1/accounts/{id}/adjustments
pub async fn adjustment(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = who.write(&id, "adjust credits")?;
    let req: AdjustmentRequest = json_body(&headers, body, api.cfg.api.max_body_bytes)?;
    identifier(&req.adjustment_id, MAX_ADJUSTMENT_ID_CHARS, "adjustment_id")?;
    let now = Utc::now();
    let time = effective_time(req.effective_at.as_deref(), now, api.cfg.billing.grace())?;
    let source = source_for(id);
    let event_id = encode::adjustment_event_id(id, &req.adjustment_id);
    let data = json!({
        "adjustment_id": req.adjustment_id, "credits": req.credits, "reason": req.reason,
        "actor": who.name(),
    });
    let raw = encode::envelope(types::ADJUSTMENT, &source, &event_id, id, time, data);
    let Payload::Adjustment(a) = check(&raw, now, &limits(&api))?.payload else {
        return Err(ApiError::Internal(
            "an adjustment decoded as another type".into(),
        ));
    };
    let answer = |status: &str| {
        json!({
            "account_id": id, "adjustment_id": req.adjustment_id, "credits": a.credits,
            "status": status,
            "event": {"type": types::ADJUSTMENT, "source": source, "id": event_id},
        })
    };
    let store = api.store().await?;
    if let Some(moved) = pg(store.adjustment_applied(id, &source, &event_id)).await? {
        if moved == a.credits {
            return Ok((StatusCode::OK, Json(answer("applied"))));
        }
        return Err(ApiError::Conflict {
            field: "adjustment_id",
            message: format!(
                "adjustment `{}` was already applied with {} credits",
                req.adjustment_id, moved
            ),
        });
    }
    let command = AdjustmentCommand {
        account: id.to_owned(),
        adjustment: AdjustmentEvent {
            adjustment_id: a.adjustment_id.to_string().into(),
            credits: a.credits,
            reason: a.reason.to_string().into(),
            actor: Some(who.name().to_owned().into()),
        },
    };
    publish(&api, &source, &command, time).await?;
    tracing::info!(account_id = id, adjustment_id = %req.adjustment_id, credits = %a.credits, by = who.name(), "adjustment published");
    Ok((StatusCode::ACCEPTED, Json(answer("accepted"))))
}

/// POST /v1/accounts/{id}/usage/void
pub async fn void_usage(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = who.write(&id, "void usage")?;
    let req: UsageVoidRequest = json_body(&headers, body, api.cfg.api.max_body_bytes)?;
    let now = Utc::now();
    let time = effective_time(req.effective_at.as_deref(), now, api.cfg.billing.grace())?;
    let source = source_for(id);
    let event_id = encode::usage_void_event_id(id, &req.event_source, &req.event_id);
    let data = json!({
        "event_source": req.event_source, "event_id": req.event_id, "reason": req.reason,
        "actor": who.name(),
    });
    let raw = encode::envelope(types::USAGE_VOID, &source, &event_id, id, time, data);
    let Payload::UsageVoid(v) = check(&raw, now, &limits(&api))?.payload else {
        return Err(ApiError::Internal(
            "a usage void decoded as another type".into(),
        ));
    };
    let answer = |status: &str| {
        json!({
            "account_id": id, "event_source": req.event_source, "event_id": req.event_id,
            "status": status,
            "event": {"type": types::USAGE_VOID, "source": source, "id": event_id},
        })
    };
    let store = api.store().await?;
    match pg(store.usage_void_state(id, &req.event_source, &req.event_id)).await? {
        None => {
            return Err(ApiError::UsageNotFound(
                req.event_source.clone(),
                req.event_id.clone(),
            ))
        }
        Some(s) if s.voided => return Ok((StatusCode::OK, Json(answer("applied")))),
        Some(_) => {}
    }
    let command = UsageVoidCommand {
        account: id.to_owned(),
        void: UsageVoidEvent {
            event_source: v.event_source.to_string().into(),
            event_id: v.event_id.to_string().into(),
            reason: v.reason.to_string().into(),
            actor: Some(who.name().to_owned().into()),
        },
    };
    publish(&api, &source, &command, time).await?;
    tracing::info!(account_id = id, event_source = %req.event_source, event_id = %req.event_id, by = who.name(), "usage void published");
    Ok((StatusCode::ACCEPTED, Json(answer("accepted"))))
}
