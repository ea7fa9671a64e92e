//! Threshold alerts: pure detection ([`evaluate`]) over an account's credit state, and the
//! CloudEvents message each alert becomes. Each condition fires once per crossing; when it
//! stops holding (a top-up lifts the balance back above the threshold) it re-arms and a
//! `resolved` message closes the alert (same key, same topic). The recharge request (a plan's
//! `recharge_threshold_credits`) fires once per downward crossing and has no resolution: it
//! asks the payment system for a top-up, it grants nothing. The store writes alerts to an
//! outbox in the same transaction as the change that caused them; the relay
//! (`pipeline::alerts`) publishes them. No IO here.

mod config;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use crate::event::GrantKind;
use crate::ledger::buckets::Account;

pub use config::{AlertTopics, AlertsConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertKind {
    LowBalance,
    AllowanceUsed,
    CreditsExhausted,
    ProjectedExhaustion,
    CreditsExpiring,
    /// Not a threshold alert to close but a request to the payment system: spendable credits
    /// fell below the plan's recharge threshold (on its own topic, never resolved).
    RechargeRequested,
}

impl AlertKind {
    pub const ALL: [AlertKind; 6] = [
        AlertKind::LowBalance,
        AlertKind::AllowanceUsed,
        AlertKind::CreditsExhausted,
        AlertKind::ProjectedExhaustion,
        AlertKind::CreditsExpiring,
        AlertKind::RechargeRequested,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::LowBalance => "low_balance",
            AlertKind::AllowanceUsed => "allowance_used",
            AlertKind::CreditsExhausted => "credits_exhausted",
            AlertKind::ProjectedExhaustion => "projected_exhaustion",
            AlertKind::CreditsExpiring => "credits_expiring",
            AlertKind::RechargeRequested => "recharge_requested",
        }
    }

    /// The kind of an alert key (every key begins with its kind's name).
    pub fn of_key(key: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|k| {
            key.strip_prefix(k.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        })
    }

    /// Whether a fired alert of this kind is closed by a `resolved` message when its
    /// condition stops holding (every kind but the recharge request).
    pub fn resolves(self) -> bool {
        self != AlertKind::RechargeRequested
    }

    /// The CloudEvents `type` of the alert message.
    pub fn event_type(self) -> String {
        format!("tally.alert.{}.v1", self.as_str())
    }

    /// The CloudEvents `type` of the message that closes an alert of this kind.
    pub fn resolved_event_type(self) -> String {
        format!("tally.alert.{}.resolved.v1", self.as_str())
    }
}

/// Whether a message opens an alert (its condition now holds) or closes one (it stopped
/// holding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStatus {
    Fired,
    Resolved,
}

/// Thresholds that apply when the account's plan does not set its own.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertDefaults {
    /// Low balance below this many credits (None: only plans set it).
    pub low_balance_credits: Option<Decimal>,
    pub allowance_percents: Vec<u32>,
    /// Credits-expiring alert this long before a grant expires.
    pub expiring_within: Duration,
}

impl Default for AlertDefaults {
    fn default() -> Self {
        AlertDefaults {
            low_balance_credits: None,
            allowance_percents: vec![50, 80, 100],
            expiring_within: Duration::days(7),
        }
    }
}

/// Per alert key: how many times it fired, and whether it is fired now (not re-armed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyState {
    pub fired_count: i64,
    pub active: bool,
    /// Changed since loaded: the store writes it back.
    pub dirty: bool,
}

/// An account's alert state by key.
pub type AlertState = BTreeMap<String, KeyState>;

/// One alert to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub status: AlertStatus,
    /// Stable: the same crossing always gets the same id (consumers dedupe by it):
    /// `<account>/<key>/<n>` when fired, `<account>/<key>/<n>/resolved` when closed.
    pub alert_id: String,
    pub account_id: String,
    pub at: DateTime<Utc>,
    /// The alert's data object (thresholds, balances, dates), all money as decimal strings.
    pub data: serde_json::Value,
}

impl Alert {
    /// The CloudEvents 1.0 JSON message (schemas/alerts/alert.schema.json).
    pub fn to_cloud_event(&self) -> serde_json::Value {
        json!({
            "specversion": "1.0",
            "type": match self.status {
                AlertStatus::Fired => self.kind.event_type(),
                AlertStatus::Resolved => self.kind.resolved_event_type(),
            },
            "source": "tally",
            "id": self.alert_id,
            "subject": self.account_id,
            "time": ts(self.at),
            "datacontenttype": "application/json",
            "data": self.data,
        })
    }
}

/// Money in alert messages: always 6 decimal places, like the ledger.
fn money(d: Decimal) -> String {
    crate::credits::fixed(d).to_string()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A condition that holds now, under its key.
struct Holding {
    kind: AlertKind,
    key: String,
    data: serde_json::Value,
}

/// Evaluates every alert condition for `account` at `at`. Conditions that no longer hold are
/// re-armed, and each fired alert among them is closed by a `resolved` message (in key
/// order, first); then the conditions that hold and were armed fire (in evaluation order).
pub fn evaluate(
    account: &Account,
    at: DateTime<Utc>,
    defaults: &AlertDefaults,
    state: &mut AlertState,
) -> Vec<Alert> {
    let holding = conditions(account, at, defaults);
    let mut out = Vec::new();
    for (key, s) in state.iter_mut() {
        if s.active && !holding.iter().any(|h| &h.key == key) {
            s.active = false;
            s.dirty = true;
            let Some(kind) = AlertKind::of_key(key).filter(|k| k.resolves()) else {
                continue;
            };
            let fired_id = format!("{}/{key}/{}", account.account_id, s.fired_count);
            let mut data = base_data(account, at);
            data["resolves"] = json!(fired_id);
            out.push(Alert {
                kind,
                status: AlertStatus::Resolved,
                alert_id: format!("{fired_id}/resolved"),
                account_id: account.account_id.clone(),
                at,
                data,
            });
        }
    }
    for h in holding {
        let s = state.entry(h.key.clone()).or_default();
        if s.active {
            continue;
        }
        s.active = true;
        s.fired_count += 1;
        s.dirty = true;
        out.push(Alert {
            kind: h.kind,
            status: AlertStatus::Fired,
            alert_id: format!("{}/{}/{}", account.account_id, h.key, s.fired_count),
            account_id: account.account_id.clone(),
            at,
            data: h.data,
        });
    }
    out
}

/// A live hold's `credits_exhausted` alert, and its state after it: the account's
/// available credits (`view`'s spendable at `at` minus `held`, the credits of its live
/// holds) are at or below zero while the hold `hold_id` (of `hold_credits`) is live, so the
/// platform can prompt a top-up or end that call. Fires once per crossing (`fired` counts
/// them, `active` is true while fired); when the available credits are above zero again it
/// re-arms with a `resolved` message. Key: `credits_exhausted:hold:<hold_id>`.
pub fn hold_exhausted(
    view: &Account,
    at: DateTime<Utc>,
    hold: HoldExhaustion<'_>,
) -> Option<(Alert, i32, bool)> {
    let available = view.spendable(at) - hold.held;
    let exhausted = available <= Decimal::ZERO;
    if exhausted == hold.active {
        // Nothing changes: no payload is built (the batch asks this of every live hold).
        return None;
    }
    let key = format!("credits_exhausted:hold:{}", hold.hold_id);
    let mut data = base_data(view, at);
    data["hold_id"] = json!(hold.hold_id);
    data["credits"] = json!(money(hold.hold_credits));
    data["held"] = json!(money(hold.held));
    data["available"] = json!(money(available));
    match (exhausted, hold.active) {
        (true, false) => {
            let n = hold.fired + 1;
            Some((
                Alert {
                    kind: AlertKind::CreditsExhausted,
                    status: AlertStatus::Fired,
                    alert_id: format!("{}/{key}/{n}", view.account_id),
                    account_id: view.account_id.clone(),
                    at,
                    data,
                },
                n,
                true,
            ))
        }
        (false, true) => {
            let fired_id = format!("{}/{key}/{}", view.account_id, hold.fired);
            data["resolves"] = json!(fired_id);
            Some((
                Alert {
                    kind: AlertKind::CreditsExhausted,
                    status: AlertStatus::Resolved,
                    alert_id: format!("{fired_id}/resolved"),
                    account_id: view.account_id.clone(),
                    at,
                    data,
                },
                hold.fired,
                false,
            ))
        }
        _ => None,
    }
}

/// A live hold as [`hold_exhausted`] sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HoldExhaustion<'a> {
    pub hold_id: &'a str,
    /// The hold's own credits.
    pub hold_credits: Decimal,
    /// The credits of every live hold of the account, this one included.
    pub held: Decimal,
    /// Times its alert fired so far, and whether it is fired now.
    pub fired: i32,
    pub active: bool,
}

/// What every alert message's data holds: the account, its spendable credits and overage at
/// `at`, and its current cycle when it has a plan.
fn base_data(account: &Account, at: DateTime<Utc>) -> serde_json::Value {
    let mut data = json!({
        "account_id": account.account_id,
        "spendable": money(account.spendable(at)),
        "overage": money(account.overage),
    });
    if let Some(c) = &account.cycle {
        data["cycle_start"] = json!(ts(c.start));
        data["cycle_end"] = json!(ts(c.end));
    }
    data
}

fn conditions(account: &Account, at: DateTime<Utc>, defaults: &AlertDefaults) -> Vec<Holding> {
    let spendable = account.spendable(at);
    let overage = account.overage;
    let mut out = Vec::new();
    let base = |extra: serde_json::Value| -> serde_json::Value {
        let mut data = base_data(account, at);
        if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        data
    };
    let plan = account.plan.as_ref();
    let allowance = account.allowance_status();

    // Low balance: an absolute number of credits, or a percent of the cycle allowance.
    if let Some(limit) = plan
        .and_then(|p| p.low_balance_credits)
        .or(defaults.low_balance_credits)
    {
        if spendable < limit {
            out.push(Holding {
                kind: AlertKind::LowBalance,
                key: format!("low_balance:credits:{}", limit.normalize()),
                data: base(json!({"threshold": money(limit), "threshold_unit": "credits"})),
            });
        }
    }
    if let (Some(pct), Some(p)) = (plan.and_then(|p| p.low_balance_percent), plan) {
        let limit = p.monthly_allowance * pct / Decimal::ONE_HUNDRED;
        if spendable < limit {
            out.push(Holding {
                kind: AlertKind::LowBalance,
                key: format!("low_balance:percent:{}", pct.normalize()),
                data: base(json!({
                    "threshold": pct.normalize().to_string(), "threshold_unit": "percent_of_allowance",
                    "threshold_credits": money(limit),
                })),
            });
        }
    }

    // Recharge request: spendable credits below the plan's recharge threshold (once per
    // downward crossing; the payment system answers with a grant, or not).
    if let Some((threshold, credits)) =
        plan.and_then(|p| p.recharge_threshold_credits.zip(p.recharge_credits))
    {
        if spendable < threshold {
            out.push(Holding {
                kind: AlertKind::RechargeRequested,
                key: format!("recharge_requested:{}", threshold.normalize()),
                data: base(json!({
                    "threshold": money(threshold), "threshold_unit": "credits",
                    "recharge_credits": money(credits),
                })),
            });
        }
    }

    // Allowance used: 50/80/100 % of this cycle's allowance (re-armed by the next cycle).
    if let (Some((granted, remaining)), Some(c)) = (allowance, &account.cycle) {
        let used = granted - remaining;
        let percents = plan
            .map(|p| p.allowance_alert_percents.clone())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| defaults.allowance_percents.clone());
        for pct in percents {
            if granted > Decimal::ZERO
                && used * Decimal::ONE_HUNDRED >= granted * Decimal::from(pct)
            {
                out.push(Holding {
                    kind: AlertKind::AllowanceUsed,
                    key: format!("allowance_used:{pct}:{}", c.start.format("%Y-%m-%d")),
                    data: base(json!({
                        "threshold": pct.to_string(), "threshold_unit": "percent_of_allowance",
                        "allowance": money(granted), "allowance_used": money(used),
                    })),
                });
            }
        }
    }

    // Credits exhausted: nothing left to spend (the platform blocks or prompts a top-up).
    if spendable <= Decimal::ZERO && (overage > Decimal::ZERO || account.last_seq > 0) {
        out.push(Holding {
            kind: AlertKind::CreditsExhausted,
            key: "credits_exhausted".into(),
            data: base(json!({})),
        });
    }

    // Projected exhaustion: at this cycle's daily pace the balance runs out before its end.
    if let Some(c) = &account.cycle {
        let elapsed = (at - c.start).num_seconds();
        let left = (c.end - at).num_seconds();
        if elapsed > 0 && left > 0 && c.used > Decimal::ZERO && spendable > Decimal::ZERO {
            // spendable / (used / elapsed) < left  <=>  spendable * elapsed < used * left
            if spendable * Decimal::from(elapsed) < c.used * Decimal::from(left) {
                let secs_to_empty = spendable * Decimal::from(elapsed) / c.used;
                let runs_out =
                    at + Duration::seconds(secs_to_empty.trunc().try_into().unwrap_or(0));
                let per_day = c.used * Decimal::from(86_400) / Decimal::from(elapsed);
                out.push(Holding {
                    kind: AlertKind::ProjectedExhaustion,
                    key: format!("projected_exhaustion:{}", c.start.format("%Y-%m-%d")),
                    data: base(json!({
                        "daily_pace": money(per_day),
                        "projected_exhaustion_at": ts(runs_out),
                    })),
                });
            }
        }
    }

    // Credits expiring within N days (allowances are left out: their reset is expected).
    for g in &account.grants {
        let Some(expires_at) = g.expires_at else {
            continue;
        };
        if g.kind != GrantKind::Allowance
            && g.remaining > Decimal::ZERO
            && expires_at > at
            && expires_at - at <= defaults.expiring_within
        {
            out.push(Holding {
                kind: AlertKind::CreditsExpiring,
                key: format!("credits_expiring:{}:{}", g.grant_id, expires_at.timestamp()),
                data: base(json!({
                    "grant_id": g.grant_id, "grant_kind": g.kind.as_str(),
                    "credits": money(g.remaining), "expires_at": ts(expires_at),
                })),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::OveragePolicy;
    use crate::ledger::buckets::{NewGrant, Plan};
    use chrono::TimeZone;
    use rust_decimal_macros::dec;

    fn t(d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2027, 1, d, h, 0, 0).unwrap()
    }

    fn kinds(alerts: &[Alert]) -> Vec<(AlertKind, String)> {
        alerts
            .iter()
            .map(|a| (a.kind, a.alert_id.clone()))
            .collect()
    }

    fn top_up(id: &str, credits: Decimal) -> NewGrant {
        NewGrant {
            grant_id: id.into(),
            kind: GrantKind::TopUp,
            credits,
            expires_at: None,
            priority: None,
        }
    }

    #[test]
    fn low_balance_and_exhausted_fire_once_and_rearm_after_top_up() {
        let defaults = AlertDefaults {
            low_balance_credits: Some(dec!(10)),
            ..Default::default()
        };
        let mut a = Account::new("a");
        let mut state = AlertState::new();
        let mut out = vec![];
        a.grant(&top_up("t1", dec!(20)), t(1, 0), &mut out);
        assert!(evaluate(&a, t(1, 0), &defaults, &mut state).is_empty());
        a.debit(dec!(12), t(1, 1), false, &mut out);
        assert_eq!(
            kinds(&evaluate(&a, t(1, 1), &defaults, &mut state)),
            vec![(AlertKind::LowBalance, "a/low_balance:credits:10/1".into())]
        );
        a.debit(dec!(1), t(1, 2), false, &mut out);
        assert!(
            evaluate(&a, t(1, 2), &defaults, &mut state).is_empty(),
            "once per crossing"
        );
        a.debit(dec!(9), t(1, 3), false, &mut out);
        assert_eq!(
            kinds(&evaluate(&a, t(1, 3), &defaults, &mut state)),
            vec![(AlertKind::CreditsExhausted, "a/credits_exhausted/1".into())]
        );
        a.grant(&top_up("t2", dec!(50)), t(1, 4), &mut out);
        // Both close (in key order), nothing fires.
        assert_eq!(
            kinds(&evaluate(&a, t(1, 4), &defaults, &mut state)),
            vec![
                (
                    AlertKind::CreditsExhausted,
                    "a/credits_exhausted/1/resolved".into()
                ),
                (
                    AlertKind::LowBalance,
                    "a/low_balance:credits:10/1/resolved".into()
                ),
            ]
        );
        assert!(state.values().all(|s| !s.active), "re-armed: {state:?}");
        a.debit(dec!(45), t(1, 5), false, &mut out);
        assert_eq!(
            kinds(&evaluate(&a, t(1, 5), &defaults, &mut state)),
            vec![(AlertKind::LowBalance, "a/low_balance:credits:10/2".into())]
        );
    }

    #[test]
    fn an_alert_fires_then_resolves_then_fires_again_with_the_next_number() {
        let defaults = AlertDefaults {
            low_balance_credits: Some(dec!(100)),
            ..Default::default()
        };
        let mut a = Account::new("acct-7");
        let mut state = AlertState::new();
        let mut out = vec![];
        // 250 granted; 170 used -> 80 left, below 100: fires.
        a.grant(&top_up("t1", dec!(250)), t(1, 0), &mut out);
        assert!(evaluate(&a, t(1, 0), &defaults, &mut state).is_empty());
        a.debit(dec!(170), t(1, 1), false, &mut out);
        let fired = evaluate(&a, t(1, 1), &defaults, &mut state);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].status, AlertStatus::Fired);
        assert_eq!(
            fired[0].to_cloud_event(),
            json!({"specversion": "1.0", "type": "tally.alert.low_balance.v1", "source": "tally",
                   "id": "acct-7/low_balance:credits:100/1", "subject": "acct-7",
                   "time": "2027-01-01T01:00:00Z", "datacontenttype": "application/json",
                   "data": {"account_id": "acct-7", "spendable": "80.000000",
                            "overage": "0.000000", "threshold": "100.000000",
                            "threshold_unit": "credits"}})
        );
        // Still below (80 - 30 = 50): nothing more.
        a.debit(dec!(30), t(1, 2), false, &mut out);
        assert!(evaluate(&a, t(1, 2), &defaults, &mut state).is_empty());
        // A top-up of 60 -> 110, not below 100: the alert closes, same key, next to it.
        a.grant(&top_up("t2", dec!(60)), t(1, 3), &mut out);
        let resolved = evaluate(&a, t(1, 3), &defaults, &mut state);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].kind, resolved[0].status),
            (AlertKind::LowBalance, AlertStatus::Resolved)
        );
        assert_eq!(
            resolved[0].to_cloud_event(),
            json!({"specversion": "1.0", "type": "tally.alert.low_balance.resolved.v1",
                   "source": "tally", "id": "acct-7/low_balance:credits:100/1/resolved",
                   "subject": "acct-7", "time": "2027-01-01T03:00:00Z",
                   "datacontenttype": "application/json",
                   "data": {"account_id": "acct-7", "spendable": "110.000000",
                            "overage": "0.000000",
                            "resolves": "acct-7/low_balance:credits:100/1"}})
        );
        assert_eq!(
            state["low_balance:credits:100"],
            KeyState {
                fired_count: 1,
                active: false,
                dirty: true
            }
        );
        // Resolved once: the next evaluation above the threshold says nothing.
        assert!(evaluate(&a, t(1, 4), &defaults, &mut state).is_empty());
        // 110 - 20 = 90: the second crossing fires as number 2.
        a.debit(dec!(20), t(1, 5), false, &mut out);
        assert_eq!(
            kinds(&evaluate(&a, t(1, 5), &defaults, &mut state)),
            vec![(
                AlertKind::LowBalance,
                "acct-7/low_balance:credits:100/2".into()
            )]
        );
        // Exactly at the threshold is not below it: 90 + 10 = 100 resolves number 2.
        a.grant(&top_up("t3", dec!(10)), t(1, 6), &mut out);
        assert_eq!(
            kinds(&evaluate(&a, t(1, 6), &defaults, &mut state)),
            vec![(
                AlertKind::LowBalance,
                "acct-7/low_balance:credits:100/2/resolved".into()
            )]
        );
    }

    #[test]
    fn a_recharge_request_goes_once_per_downward_crossing_and_is_never_resolved() {
        let defaults = AlertDefaults::default();
        let mut a = Account::new("acct-r");
        let mut state = AlertState::new();
        let mut out = vec![];
        // A prepaid account: no allowance, a recharge of 500 asked below 100 credits.
        let plan = Plan {
            plan_id: "prepaid".into(),
            monthly_allowance: dec!(0),
            billing_day: 1,
            low_balance_credits: None,
            low_balance_percent: None,
            allowance_alert_percents: vec![],
            recharge_threshold_credits: Some(dec!(100)),
            recharge_credits: Some(dec!(500)),
        };
        a.set_plan(
            plan,
            OveragePolicy::SettleFromNextGrant,
            3,
            t(1, 0),
            t(1, 0),
            &mut out,
        );
        let recharges = |alerts: Vec<Alert>| -> Vec<Alert> {
            alerts
                .into_iter()
                .filter(|a| a.kind == AlertKind::RechargeRequested)
                .collect()
        };
        a.grant(&top_up("t1", dec!(300)), t(1, 0), &mut out);
        assert!(recharges(evaluate(&a, t(1, 0), &defaults, &mut state)).is_empty());
        // 300 - 150 = 150: above.
        a.debit(dec!(150), t(1, 1), false, &mut out);
        assert!(recharges(evaluate(&a, t(1, 1), &defaults, &mut state)).is_empty());
        // 150 - 60 = 90: below 100, the first request.
        a.debit(dec!(60), t(1, 2), false, &mut out);
        let first = recharges(evaluate(&a, t(1, 2), &defaults, &mut state));
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].to_cloud_event(),
            json!({"specversion": "1.0", "type": "tally.alert.recharge_requested.v1",
                   "source": "tally", "id": "acct-r/recharge_requested:100/1",
                   "subject": "acct-r", "time": "2027-01-01T02:00:00Z",
                   "datacontenttype": "application/json",
                   "data": {"account_id": "acct-r", "spendable": "90.000000",
                            "overage": "0.000000", "cycle_start": "2027-01-01T00:00:00Z",
                            "cycle_end": "2027-02-01T00:00:00Z", "threshold": "100.000000",
                            "threshold_unit": "credits", "recharge_credits": "500.000000"}})
        );
        // Still below (90 - 80 = 10), and at zero with overage: no second request.
        a.debit(dec!(80), t(1, 3), false, &mut out);
        assert!(recharges(evaluate(&a, t(1, 3), &defaults, &mut state)).is_empty());
        a.debit(dec!(25), t(1, 4), false, &mut out);
        assert!(recharges(evaluate(&a, t(1, 4), &defaults, &mut state)).is_empty());
        // The payment system's top-up of 500 settles the 15 of overage: 485, above. The
        // request re-arms without any message of its own.
        a.grant(&top_up("t2", dec!(500)), t(1, 5), &mut out);
        let after_top_up = evaluate(&a, t(1, 5), &defaults, &mut state);
        assert!(
            after_top_up
                .iter()
                .all(|x| x.kind != AlertKind::RechargeRequested),
            "{after_top_up:?}"
        );
        assert!(!state["recharge_requested:100"].active);
        // 485 - 400 = 85: the second crossing, the second request.
        a.debit(dec!(400), t(1, 6), false, &mut out);
        let second = recharges(evaluate(&a, t(1, 6), &defaults, &mut state));
        assert_eq!(
            kinds(&second),
            vec![(
                AlertKind::RechargeRequested,
                "acct-r/recharge_requested:100/2".into()
            )]
        );
        assert_eq!(second[0].data["spendable"], "85.000000");
    }

    #[test]
    fn an_alert_key_names_its_kind() {
        assert_eq!(
            AlertKind::of_key("credits_exhausted"),
            Some(AlertKind::CreditsExhausted)
        );
        assert_eq!(
            AlertKind::of_key("low_balance:percent:25"),
            Some(AlertKind::LowBalance)
        );
        assert_eq!(
            AlertKind::of_key("allowance_used:80:2027-01-01"),
            Some(AlertKind::AllowanceUsed)
        );
        assert_eq!(
            AlertKind::of_key("recharge_requested:100"),
            Some(AlertKind::RechargeRequested)
        );
        assert_eq!(AlertKind::of_key("credits_exhaustedx"), None);
        assert_eq!(AlertKind::of_key("other"), None);
    }

    #[test]
    fn allowance_used_and_projection() {
        let defaults = AlertDefaults::default();
        let mut a = Account::new("p");
        let mut state = AlertState::new();
        let mut out = vec![];
        let plan = Plan {
            plan_id: "pro".into(),
            monthly_allowance: dec!(100),
            billing_day: 1,
            low_balance_credits: None,
            low_balance_percent: Some(dec!(25)),
            allowance_alert_percents: vec![50, 80, 100],
            recharge_threshold_credits: None,
            recharge_credits: None,
        };
        a.set_plan(
            plan,
            OveragePolicy::BillOverage,
            3,
            t(1, 0),
            t(1, 0),
            &mut out,
        );
        // Day 2: 60 used in 1 day -> 50 % crossed; pace 60/day runs out before Feb 1.
        a.debit(dec!(60), t(2, 0), false, &mut out);
        let fired = evaluate(&a, t(2, 0), &defaults, &mut state);
        assert_eq!(
            kinds(&fired),
            vec![
                (
                    AlertKind::AllowanceUsed,
                    "p/allowance_used:50:2027-01-01/1".into()
                ),
                (
                    AlertKind::ProjectedExhaustion,
                    "p/projected_exhaustion:2027-01-01/1".into()
                ),
            ]
        );
        assert_eq!(
            fired[1].data["projected_exhaustion_at"],
            "2027-01-02T16:00:00Z"
        );
        a.debit(dec!(25), t(3, 0), false, &mut out);
        let fired = evaluate(&a, t(3, 0), &defaults, &mut state);
        assert_eq!(
            kinds(&fired),
            vec![
                (AlertKind::LowBalance, "p/low_balance:percent:25/1".into()),
                (
                    AlertKind::AllowanceUsed,
                    "p/allowance_used:80:2027-01-01/1".into()
                ),
            ]
        );
        assert_eq!(fired[0].data["threshold_credits"], "25.000000");
        assert_eq!(fired[0].data["spendable"], "15.000000");
    }

    #[test]
    fn expiring_credits_alert_once_per_expiry() {
        let defaults = AlertDefaults::default();
        let mut a = Account::new("e");
        let mut state = AlertState::new();
        let mut out = vec![];
        a.grant(&top_up("t1", dec!(5)), t(1, 0), &mut out); // expires 2027-04-01
        let before = Utc.with_ymd_and_hms(2027, 3, 25, 0, 0, 0).unwrap();
        assert!(evaluate(&a, before - Duration::days(1), &defaults, &mut state).is_empty());
        let fired = evaluate(&a, before, &defaults, &mut state);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].data["expires_at"], "2027-04-01T00:00:00Z");
        assert!(evaluate(&a, before + Duration::days(1), &defaults, &mut state).is_empty());
    }
}
