//! The read routes of one account: balance (ledger), usage series and totals (ClickHouse),
//! summary (cycle, peaks, trend, projection) and the ledger's lines. Every figure comes from
//! `ledger::Store` or `analytics::queries`; this module only checks parameters, joins and
//! shapes JSON. Money is always a decimal string.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::ApiError;
use super::input::{Params, RawQuery};
use super::{pg, AppState};
use crate::analytics::queries::{self, Cycle, DailyUsage, DateRange, Projection};
use crate::credits::cut;
use crate::ledger::BalanceView;
use crate::ledger::LedgerLine;
use crate::rating::PriceVersion;

/// Longest range `/usage` serves (three years and a day).
pub const MAX_USAGE_DAYS: i64 = 1_096;
/// Default `/usage` range: the last 30 days.
const DEFAULT_USAGE_DAYS: u64 = 30;
/// Ledger page size: default and maximum.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

/// Grants that can still be spent at `now` (an expiry the scheduler has not written yet
/// already counts), in consumption order.
async fn view(api: &AppState, id: &str, now: DateTime<Utc>) -> Result<BalanceView, ApiError> {
    let store = api.store().await?;
    pg(store.balance_view(id, now))
        .await?
        .ok_or(ApiError::AccountNotFound)
}

/// The account exists in the ledger (it has had at least one event applied).
async fn exists(api: &AppState, id: &str) -> Result<(), ApiError> {
    let store = api.store().await?;
    pg(store.balance(id))
        .await?
        .map(|_| ())
        .ok_or(ApiError::AccountNotFound)
}

/// GET /v1/accounts/{id}/balance
pub async fn balance(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = who.read(&id)?;
    let now = Utc::now();
    let view = view(&api, id, now).await?;
    let store = api.store().await?;
    let (held, holds) = pg(store.held(id, now)).await?;
    let mut doc = balance_document(&view, api.prices.version_at(now), now);
    // Credits reserved by live holds, and what is left for new usage (may be negative when
    // usage debited after a hold was placed).
    doc["held"] = json!(held);
    doc["live_holds"] = json!(holds);
    doc["available"] = json!(crate::credits::fixed(view.spendable - held));
    Ok(Json(doc))
}

/// The billing view as JSON: the body of GET /balance, and `tally balance --json`.
/// `prices` is the price-table version in force at `now` (its model prices are shown).
pub fn balance_document(
    view: &BalanceView,
    prices: Option<&PriceVersion>,
    now: DateTime<Utc>,
) -> Value {
    let next_expiry = view
        .next_expiry
        .as_ref()
        .map(|(at, credits, grant_id)| json!({"at": at, "credits": credits, "grant_id": grant_id}));
    let allowance = view.allowance.map(|(granted, used)| {
        json!({
            "granted": granted,
            "used": used,
            "remaining": granted - used,
            "used_percent": (!granted.is_zero()).then(|| cut(used * Decimal::ONE_HUNDRED / granted, 2)),
        })
    });
    json!({
        "account_id": view.account_id,
        "as_of": now,
        "spendable": view.spendable,
        "overage": view.overage,
        "grants": view.grants.iter().map(|g| json!({
            "grant_id": g.grant_id,
            "kind": g.kind.as_str(),
            "priority": g.priority,
            "granted": g.granted,
            "remaining": g.remaining,
            "granted_at": g.granted_at,
            "expires_at": g.expires_at,
        })).collect::<Vec<_>>(),
        "next_expiry": next_expiry,
        "plan": view.plan.as_ref().map(|p| json!({
            "plan_id": p.plan_id,
            "monthly_allowance": p.monthly_allowance,
            "billing_day": p.billing_day,
            "recharge_threshold_credits": p.recharge_threshold_credits,
            "recharge_credits": p.recharge_credits,
        })),
        "cycle": view.cycle.as_ref().map(|c| json!({
            "start": c.start,
            "end": c.end,
            "used": c.used,
            "overage": c.overage,
        })),
        "allowance": allowance,
        "days_until_reset": view.days_until_reset,
        "purchased": {
            "remaining": view.spendable,
            "total": view.total_granted,
            "grants": view.active_grants,
        },
        "prices": prices.map(model_prices_document),
    })
}

/// The model prices of a price-table version, as the balance document shows them.
pub fn model_prices_document(version: &PriceVersion) -> Value {
    json!({
        "version": version.id(),
        "models": version.model_prices().iter().map(|p| json!({
            "model": p.model,
            "kind": p.kind,
            "match": p.other_conditions.iter().copied().collect::<BTreeMap<_, _>>(),
            "unit": p.unit.as_str(),
            "credits_per_unit": p.credits_per_unit,
            "rule_id": p.rule_id,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Granularity {
    Day,
    Week,
    Month,
}

impl Granularity {
    /// The first day of the bucket holding `day`.
    fn bucket(self, day: NaiveDate) -> NaiveDate {
        match self {
            Granularity::Day => day,
            Granularity::Week => queries::monday(day),
            Granularity::Month => day.with_day(1).unwrap_or(day),
        }
    }

    /// The last day of the bucket starting at `start`.
    fn last_day(self, start: NaiveDate) -> NaiveDate {
        let next = match self {
            Granularity::Day => start.succ_opt(),
            Granularity::Week => start.checked_add_days(chrono::Days::new(7)),
            Granularity::Month => start.checked_add_months(Months::new(1)),
        };
        next.and_then(|d| d.pred_opt()).unwrap_or(start)
    }
}

/// Usage of one (kind, model) summed over some days.
#[derive(Debug, Default, Clone)]
struct Sums {
    credits: Decimal,
    quantity: Decimal,
    billable_seconds: u64,
    events: u64,
}

impl Sums {
    fn add(&mut self, credits: Decimal, quantity: Decimal, billable_seconds: u64, events: u64) {
        self.credits += credits;
        self.quantity += quantity;
        self.billable_seconds += billable_seconds;
        self.events += events;
    }
}

/// Sums by (kind, model).
type ByKindModel = BTreeMap<(String, String), Sums>;

fn kind_model_json(map: &ByKindModel) -> Vec<Value> {
    map.iter()
        .map(|((kind, model), s)| {
            json!({
                "kind": kind, "model": model, "credits": cut(s.credits, 6), "quantity": cut(s.quantity, 6),
                "billable_seconds": s.billable_seconds, "events": s.events,
            })
        })
        .collect()
}

/// The daily series regrouped by `granularity`, each bucket clipped to the range, and the
/// totals by kind and by (kind, model).
fn series(
    daily: &[DailyUsage],
    range: &DateRange,
    granularity: Granularity,
) -> (Vec<Value>, Value) {
    let mut buckets: BTreeMap<NaiveDate, (Sums, ByKindModel)> = BTreeMap::new();
    let mut by_kind_model = ByKindModel::new();
    let mut total = Sums::default();
    for d in daily {
        let (sums, split) = buckets.entry(granularity.bucket(d.day)).or_default();
        sums.add(d.credits, Decimal::ZERO, 0, d.events);
        for u in &d.by_kind_model {
            let key = (u.kind.clone(), u.model.clone());
            split.entry(key.clone()).or_default().add(
                u.credits,
                u.quantity,
                u.billable_seconds,
                u.events,
            );
            by_kind_model.entry(key).or_default().add(
                u.credits,
                u.quantity,
                u.billable_seconds,
                u.events,
            );
            total.add(u.credits, Decimal::ZERO, u.billable_seconds, u.events);
        }
    }
    let points = buckets
        .iter()
        .map(|(start, (sums, split))| {
            json!({
                "start": start.max(&range.from),
                "end": granularity.last_day(*start).min(range.to),
                "credits": cut(sums.credits, 6),
                "events": sums.events,
                "by_kind_model": kind_model_json(split),
            })
        })
        .collect();
    let mut by_kind: BTreeMap<&str, Sums> = BTreeMap::new();
    for ((kind, _), s) in &by_kind_model {
        by_kind
            .entry(kind)
            .or_default()
            .add(s.credits, s.quantity, s.billable_seconds, s.events);
    }
    let totals = json!({
        "credits": cut(total.credits, 6),
        "events": total.events,
        "by_kind": by_kind.iter().map(|(kind, s)| json!({
            "kind": kind, "credits": cut(s.credits, 6), "quantity": cut(s.quantity, 6),
            "billable_seconds": s.billable_seconds, "events": s.events,
        })).collect::<Vec<_>>(),
        "by_kind_model": kind_model_json(&by_kind_model),
    });
    (points, totals)
}

/// GET /v1/accounts/{id}/usage?from&to&granularity
pub async fn usage(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    query: RawQuery,
) -> Result<Json<Value>, ApiError> {
    let id = who.read(&id)?;
    let params = Params::parse(query, &["from", "to", "granularity"])?;
    let today = Utc::now().date_naive();
    let to = params.date("to")?.unwrap_or(today);
    let from = match params.date("from")? {
        Some(from) => from,
        None => to
            .checked_sub_days(chrono::Days::new(DEFAULT_USAGE_DAYS - 1))
            .unwrap_or(to)
            .max(NaiveDate::default()),
    };
    let granularity = match params.choice("granularity", &["day", "week", "month"])? {
        None | Some("day") => Granularity::Day,
        Some("week") => Granularity::Week,
        Some(_) => Granularity::Month,
    };
    if from > to {
        return Err(ApiError::invalid("from", "must not be after `to`"));
    }
    if (to - from).num_days() >= MAX_USAGE_DAYS {
        return Err(ApiError::invalid(
            "to",
            format!("the range is at most {MAX_USAGE_DAYS} days"),
        ));
    }
    let range = DateRange::new(from, to).map_err(|e| ApiError::invalid("from", e.to_string()))?;
    exists(&api, id).await?;
    let daily = api
        .usage
        .daily(id, &range)
        .await
        .map_err(ApiError::from_analytics)?;
    let counts = api
        .usage
        .counts(id, &range)
        .await
        .map_err(ApiError::from_analytics)?;
    let (points, totals) = series(&daily, &range, granularity);
    Ok(Json(json!({
        "account_id": id,
        "from": from,
        "to": to,
        "granularity": match granularity {
            Granularity::Day => "day",
            Granularity::Week => "week",
            Granularity::Month => "month",
        },
        "series": points,
        "totals": totals,
        "counts": counts,
    })))
}

/// GET /v1/accounts/{id}/summary?top
pub async fn summary(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    query: RawQuery,
) -> Result<Json<Value>, ApiError> {
    let id = who.read(&id)?;
    let params = Params::parse(query, &["top"])?;
    let top = params
        .integer("top", 1..=31)?
        .unwrap_or(i64::from(queries::DEFAULT_TOP));
    let now = Utc::now();
    let today = now.date_naive();
    let view = view(&api, id, now).await?;
    let spendable = view.spendable;
    let cycle = Cycle::for_plan(view.plan.as_ref(), now);
    let analytics = ApiError::from_analytics;
    let this_cycle = api
        .usage
        .cycle(id, &cycle, today)
        .await
        .map_err(analytics)?;
    let projection = Projection::compute(&cycle, today, this_cycle.used, Some(spendable));
    let trend = api.usage.trend(id, today).await.map_err(analytics)?;
    let peak_range = DateRange::new(trend.from, today).map_err(analytics)?;
    let peak_days = api
        .usage
        .peak_days(
            id,
            &peak_range,
            u32::try_from(top).unwrap_or(queries::DEFAULT_TOP),
        )
        .await
        .map_err(analytics)?;
    Ok(Json(json!({
        "account_id": id,
        "as_of": today,
        "spendable": spendable,
        "average_daily": this_cycle.average_daily,
        "cycle": this_cycle,
        "peak_days": {"from": peak_range.from, "to": peak_range.to, "days": peak_days},
        "trend": trend,
        "projection": projection,
    })))
}

/// GET /v1/accounts/{id}/ledger?cursor&limit — newest first; `next_cursor` continues.
pub async fn ledger(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    query: RawQuery,
) -> Result<Json<Value>, ApiError> {
    let id = who.read(&id)?;
    let params = Params::parse(query, &["cursor", "limit"])?;
    let cursor = params.integer("cursor", 1..=i64::MAX)?;
    let limit = params
        .integer("limit", 1..=MAX_LIMIT)?
        .unwrap_or(DEFAULT_LIMIT);
    exists(&api, id).await?;
    let store = api.store().await?;
    let mut lines = pg(store.entries_before(id, cursor, limit + 1)).await?;
    let more = lines.len() as i64 > limit;
    lines.truncate(limit as usize);
    let next_cursor = if more {
        lines.last().map(|l| l.entry_id)
    } else {
        None
    };
    Ok(Json(json!({
        "account_id": id,
        "entries": lines.iter().map(ledger_line_document).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

/// A ledger line as JSON: GET /ledger, and `tally balance --json`.
pub fn ledger_line_document(l: &LedgerLine) -> Value {
    json!({
        "entry_id": l.entry_id,
        "kind": l.kind,
        "corrects": l.corrects,
        "late": l.late,
        "grant_id": l.grant_id,
        "amount": l.amount,
        "balance_after": l.balance_after,
        "overage_after": l.overage_after,
        "effective_at": l.effective_at,
        "event_source": l.event_source,
        "event_id": l.event_id,
        "rule_id": l.rule_id,
        "actor": l.actor,
        "reason": l.reason,
        "reverses": l.reverses_source.as_ref().map(|s| json!({
            "event_source": s, "event_id": l.reverses_id,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::queries::KindModelUsage;
    use rust_decimal_macros::dec;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn day(s: &str, credits: Decimal, kind: &str, model: &str) -> DailyUsage {
        DailyUsage {
            day: d(s),
            credits,
            events: 1,
            by_kind_model: vec![KindModelUsage {
                kind: kind.into(),
                model: model.into(),
                credits,
                quantity: dec!(60),
                billable_seconds: 60,
                events: 1,
            }],
        }
    }

    #[test]
    fn weekly_buckets_are_clipped_and_totalled() {
        let range = DateRange::new(d("2025-06-04"), d("2025-06-16")).unwrap();
        let daily = vec![
            day("2025-06-04", dec!(1.5), "call", ""),
            day("2025-06-08", dec!(2), "chat_response", "gpt-4o"),
            day("2025-06-09", dec!(3), "call", ""),
            day("2025-06-16", dec!(0.25), "call", ""),
        ];
        let (points, totals) = series(&daily, &range, Granularity::Week);
        assert_eq!(points.len(), 3);
        assert_eq!(points[0]["start"], "2025-06-04");
        assert_eq!(points[0]["end"], "2025-06-08");
        assert_eq!(points[0]["credits"], "3.500000");
        assert_eq!(points[2]["start"], "2025-06-16");
        assert_eq!(points[2]["end"], "2025-06-16");
        assert_eq!(totals["credits"], "6.750000");
        assert_eq!(totals["events"], 4);
        assert_eq!(totals["by_kind"][0]["kind"], "call");
        assert_eq!(totals["by_kind"][0]["credits"], "4.750000");
        assert_eq!(totals["by_kind_model"][1]["model"], "gpt-4o");
        let (months, _) = series(&daily, &range, Granularity::Month);
        assert_eq!(months.len(), 1);
        assert_eq!(
            (months[0]["start"].as_str(), months[0]["end"].as_str()),
            (Some("2025-06-04"), Some("2025-06-16"))
        );
    }
}
