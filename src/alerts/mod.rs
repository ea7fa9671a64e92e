//! Threshold alerts: pure detection ([`evaluate`]) over an account's credit state, and the
//! CloudEvents message each alert becomes. Each condition fires once per crossing and re-arms
//! when it stops holding (a top-up lifts the balance back above the threshold). The store
//! writes alerts to an outbox in the same transaction as the change that caused them; the
//! relay (`pipeline::alerts`) publishes them. No IO here.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use crate::event::GrantKind;
use crate::ledger::buckets::Account;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertKind {
    LowBalance,
    AllowanceUsed,
    CreditsExhausted,
    ProjectedExhaustion,
    CreditsExpiring,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::LowBalance,
        AlertKind::AllowanceUsed,
        AlertKind::CreditsExhausted,
        AlertKind::ProjectedExhaustion,
        AlertKind::CreditsExpiring,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::LowBalance => "low_balance",
            AlertKind::AllowanceUsed => "allowance_used",
            AlertKind::CreditsExhausted => "credits_exhausted",
            AlertKind::ProjectedExhaustion => "projected_exhaustion",
            AlertKind::CreditsExpiring => "credits_expiring",
        }
    }

    /// The CloudEvents `type` of the alert message.
    pub fn event_type(self) -> String {
        format!("tally.alert.{}.v1", self.as_str())
    }
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
    /// Stable: the same crossing always gets the same id (consumers dedupe by it).
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
            "type": self.kind.event_type(),
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

/// Evaluates every alert condition for `account` at `at`; returns the alerts that fire now
/// (conditions that hold and were armed) and re-arms conditions that no longer hold.
pub fn evaluate(
    account: &Account,
    at: DateTime<Utc>,
    defaults: &AlertDefaults,
    state: &mut AlertState,
) -> Vec<Alert> {
    let holding = conditions(account, at, defaults);
    let mut fired = Vec::new();
    for (key, s) in state.iter_mut() {
        if s.active && !holding.iter().any(|h| &h.key == key) {
            s.active = false;
            s.dirty = true;
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
        fired.push(Alert {
            kind: h.kind,
            alert_id: format!("{}/{}/{}", account.account_id, h.key, s.fired_count),
            account_id: account.account_id.clone(),
            at,
            data: h.data,
        });
    }
    fired
}

fn conditions(account: &Account, at: DateTime<Utc>, defaults: &AlertDefaults) -> Vec<Holding> {
    let spendable = account.spendable(at);
    let overage = account.overage;
    let mut out = Vec::new();
    let base = |extra: serde_json::Value| -> serde_json::Value {
        let mut data = json!({
            "account_id": account.account_id,
            "spendable": money(spendable),
            "overage": money(overage),
        });
        if let Some(c) = &account.cycle {
            data["cycle_start"] = json!(ts(c.start));
            data["cycle_end"] = json!(ts(c.end));
        }
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
        assert!(evaluate(&a, t(1, 4), &defaults, &mut state).is_empty());
        assert!(state.values().all(|s| !s.active), "re-armed: {state:?}");
        a.debit(dec!(45), t(1, 5), false, &mut out);
        assert_eq!(
            kinds(&evaluate(&a, t(1, 5), &defaults, &mut state)),
            vec![(AlertKind::LowBalance, "a/low_balance:credits:10/2".into())]
        );
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
