//! The hold routes: credits reserved for live usage (a call, a conversation) so it never runs
//! past the credits that pay for it. Unlike grants and plans, a hold is written to the
//! ledger of record (PostgreSQL) at once, under the account's hold lock
//! (`ledger::store::HoldPool`): the answer must come now, and must count against what the
//! ledger's debits spend. Admin and ingest tokens place, extend and release holds (the
//! platform that produces the usage); an account token reads its own holds.
//!
//! ```text
//! POST   /v1/accounts/{id}/holds                       201 held | 200 same hold_id | 402 nothing available
//! GET    /v1/accounts/{id}/holds/{hold_id}             the hold as it is
//! POST   /v1/accounts/{id}/holds/{hold_id}/heartbeat   extend a live hold (409 when it ended)
//! DELETE /v1/accounts/{id}/holds/{hold_id}             release it (200 as it is when it ended)
//! ```
//! A usage event whose `data.hold_id` names the hold settles it in the ledger's transaction.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::ApiError;
use super::input::{json_body, JsonInt};
use super::{pg, AppState};
use crate::ledger::holds::{Ask, Hold, HoldRequest, DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS};
use crate::ledger::{HoldAnswer, HoldFigures, HoldMissing, HoldRefused};
use crate::rating::MAX_COVER_SECONDS;

/// Longest hold id.
const MAX_HOLD_ID_CHARS: usize = 128;
/// Most attributes a hold's usage may name.
const MAX_ATTRIBUTES: usize = 16;
/// Longest attribute value, in characters.
const MAX_VALUE_CHARS: usize = 128;

/// POST /v1/accounts/{id}/holds body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    /// The idempotency key: a retry with the same id and terms answers the same hold.
    hold_id: String,
    /// The usage kind the price table rates (`call`, `chat_response`, a metered kind).
    kind: String,
    /// The attributes rules match on (`direction`, `channel`, `voice_tier`, `model`...).
    #[serde(default)]
    attributes: Option<BTreeMap<String, String>>,
    /// Credits to hold (decimal string > 0, at most 6 places)...
    #[serde(default)]
    credits: Option<String>,
    /// ...or the seconds of usage to hold credits for (time units).
    #[serde(default)]
    seconds: Option<JsonInt>,
    /// Seconds until the hold expires unless a heartbeat extends it.
    #[serde(default)]
    ttl_seconds: Option<JsonInt>,
    /// When fewer credits are available than asked: hold them (true, the default) or
    /// refuse with 402 (false).
    #[serde(default)]
    partial: Option<bool>,
}

/// POST .../heartbeat body (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    #[serde(default)]
    ttl_seconds: Option<JsonInt>,
}

fn identifier(value: &str, field: &'static str) -> Result<(), ApiError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._~@+=/-:".contains(&b);
    if value.is_empty() || value.len() > MAX_HOLD_ID_CHARS || !value.bytes().all(allowed) {
        return Err(ApiError::invalid(
            field,
            format!("must match ^[A-Za-z0-9._~@+=/:-]{{1,{MAX_HOLD_ID_CHARS}}}$"),
        ));
    }
    Ok(())
}

/// `^[a-z][a-z0-9_]{0,63}$`: usage kinds and attribute names, as price rules write them.
fn name(value: &str, field: &str) -> Result<(), ApiError> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "must match ^[a-z][a-z0-9_]{0,63}$",
        ))
    }
}

/// `(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?`: the openapi document's `Credits` (above 0 is
/// checked on the value).
fn credits_text(c: &str) -> bool {
    let (int, frac) = match c.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (c, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let int_ok = int == "0" || (digits(int) && int.len() <= 12 && !int.starts_with('0'));
    int_ok && frac.is_none_or(|f| digits(f) && f.len() <= 6)
}

fn ttl(value: Option<JsonInt>) -> Result<Option<u32>, ApiError> {
    value
        .map(|JsonInt(t)| {
            u32::try_from(t)
                .ok()
                .filter(|t| (1..=MAX_TTL_SECONDS).contains(t))
                .ok_or_else(|| {
                    ApiError::invalid("ttl_seconds", format!("must be 1 to {MAX_TTL_SECONDS}"))
                })
        })
        .transpose()
}

impl HoldBody {
    fn check(self) -> Result<HoldRequest, ApiError> {
        identifier(&self.hold_id, "hold_id")?;
        name(&self.kind, "kind")?;
        let attributes = self.attributes.unwrap_or_default();
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(ApiError::invalid(
                "attributes",
                format!("at most {MAX_ATTRIBUTES} attributes"),
            ));
        }
        for (k, v) in &attributes {
            name(k, "attributes")?;
            let field = format!("attributes.{k}");
            let chars = v.chars().count();
            if chars == 0 || chars > MAX_VALUE_CHARS || v.chars().any(char::is_control) {
                return Err(ApiError::invalid(
                    field,
                    format!("1 to {MAX_VALUE_CHARS} characters, no control character"),
                ));
            }
        }
        let ask = match (self.credits, self.seconds) {
            (Some(c), None) => {
                let credits: Decimal = Some(&c)
                    .filter(|c| credits_text(c))
                    .and_then(|c| c.parse().ok())
                    .filter(|d: &Decimal| *d > Decimal::ZERO)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "credits",
                            "must be a decimal string above 0, at most 12 digits before the point and 6 after",
                        )
                    })?;
                Ask::Credits(credits)
            }
            (None, Some(JsonInt(s))) => Ask::Seconds(
                u64::try_from(s)
                    .ok()
                    .filter(|s| (1..=MAX_COVER_SECONDS).contains(s))
                    .ok_or_else(|| {
                        ApiError::invalid("seconds", format!("must be 1 to {MAX_COVER_SECONDS}"))
                    })?,
            ),
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "seconds",
                    "give either credits or seconds, not both",
                ))
            }
            (None, None) => return Err(ApiError::invalid("credits", "give credits or seconds")),
        };
        Ok(HoldRequest {
            hold_id: self.hold_id,
            usage_kind: self.kind,
            attributes,
            ask,
            partial: self.partial.unwrap_or(true),
            ttl_seconds: ttl(self.ttl_seconds)?.unwrap_or(DEFAULT_TTL_SECONDS),
        })
    }
}

/// A hold as JSON (`figures`: the account's spendable, held and available credits, when the
/// route computed them).
pub fn hold_document(h: &Hold, now: DateTime<Utc>, figures: Option<&HoldFigures>) -> Value {
    let mut doc = json!({
        "account_id": h.account_id,
        "hold_id": h.hold_id,
        "status": h.state_at(now).as_str(),
        "kind": h.usage_kind,
        "attributes": h.attributes,
        "credits": h.credits,
        "seconds": h.covers_seconds,
        "units": h.covers_units,
        "unit": h.unit,
        "price_version": h.price_version,
        "rule_id": h.rule_id,
        "requested_credits": h.requested_credits,
        "requested_seconds": h.requested_seconds,
        "partial": h.partial,
        "ttl_seconds": h.ttl_seconds,
        "created_at": h.created_at,
        "expires_at": h.expires_at,
        "heartbeats": h.heartbeats,
        "ended_at": h.ended_at,
        "settled_by": h.settled_by.as_ref().map(|(source, id)| json!({"source": source, "id": id})),
    });
    if let Some(f) = figures {
        doc["spendable"] = json!(f.spendable);
        doc["held"] = json!(f.held);
        doc["available"] = json!(f.available);
    }
    doc
}

/// POST /v1/accounts/{id}/holds
pub async fn create(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = who.hold(&id)?;
    let body: HoldBody = json_body(&headers, body, api.cfg.api.max_body_bytes)?;
    let req = body.check()?;
    let now = Utc::now();
    match pg(api.holds.create(&api.prices, id, &req, now)).await? {
        Ok(HoldAnswer::Created(f)) => {
            tracing::info!(account_id = id, hold_id = %f.hold.hold_id, credits = %f.hold.credits, by = who.name(), "hold placed");
            Ok((
                StatusCode::CREATED,
                Json(hold_document(&f.hold, now, Some(&f))),
            ))
        }
        Ok(HoldAnswer::Existing(f)) => {
            Ok((StatusCode::OK, Json(hold_document(&f.hold, now, Some(&f)))))
        }
        Err(HoldRefused::Insufficient {
            available,
            spendable,
            held,
        }) => Err(ApiError::PaymentRequired {
            available,
            spendable,
            held,
        }),
        Err(HoldRefused::Conflict(h)) => Err(ApiError::Conflict {
            field: "hold_id",
            message: format!(
                "hold `{}` exists with other terms (kind {}, {} credits asked)",
                h.hold_id, h.usage_kind, h.requested_credits
            ),
        }),
        Err(HoldRefused::TooMany(n)) => Err(ApiError::Conflict {
            field: "hold_id",
            message: format!("the account has {n} live holds, the most it may have"),
        }),
        Err(HoldRefused::Unpriced(why)) => Err(ApiError::invalid("kind", why)),
        Err(HoldRefused::Free) => Err(ApiError::invalid(
            "kind",
            "this usage costs nothing: it needs no hold",
        )),
    }
}

/// GET /v1/accounts/{id}/holds/{hold_id}
pub async fn get(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((id, hold_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = who.read_holds(&id)?;
    identifier(&hold_id, "hold_id")?;
    let now = Utc::now();
    match pg(api.holds.get(id, &hold_id)).await? {
        Some(h) => Ok(Json(hold_document(&h, now, None))),
        None => Err(ApiError::HoldNotFound),
    }
}

/// POST /v1/accounts/{id}/holds/{hold_id}/heartbeat
pub async fn heartbeat(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((id, hold_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = who.hold(&id)?;
    identifier(&hold_id, "hold_id")?;
    let empty = body
        .as_ref()
        .is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace));
    let body: HeartbeatBody = if empty {
        HeartbeatBody::default()
    } else {
        json_body(&headers, body, api.cfg.api.max_body_bytes)?
    };
    let ttl = ttl(body.ttl_seconds)?;
    let now = Utc::now();
    match pg(api.holds.heartbeat(id, &hold_id, ttl, now)).await? {
        Ok(h) => Ok(Json(hold_document(&h, now, None))),
        Err(HoldMissing::Unknown) => Err(ApiError::HoldNotFound),
        Err(HoldMissing::Ended(h)) => Err(ApiError::Conflict {
            field: "hold_id",
            message: format!(
                "hold `{}` is {}: it can no longer be extended",
                h.hold_id,
                h.state_at(now).as_str()
            ),
        }),
    }
}

/// DELETE /v1/accounts/{id}/holds/{hold_id}
pub async fn release(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((id, hold_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = who.hold(&id)?;
    identifier(&hold_id, "hold_id")?;
    let now = Utc::now();
    match pg(api.holds.release(id, &hold_id, now)).await? {
        Ok(h) => {
            tracing::info!(account_id = id, hold_id = %h.hold_id, by = who.name(), "hold released");
            Ok(Json(hold_document(&h, now, None)))
        }
        // Ended already (released, settled, expired): nothing to do, answered as it is.
        Err(HoldMissing::Ended(h)) => Ok(Json(hold_document(&h, now, None))),
        Err(HoldMissing::Unknown) => Err(ApiError::HoldNotFound),
    }
}
