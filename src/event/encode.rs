//! Typed -> bytes for the messages Tally itself publishes as inputs (grants and plans from
//! `tally accounts` and the HTTP API). The decoder accepts everything written here.

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::{types, GrantKind, OveragePolicy};

/// Microseconds (as the ledger stores times): events published one after the other keep
/// their order in event time instead of tying on the second (a tie is broken by source and
/// id, which need not be the order they were sent in).
fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn decimal(d: Decimal) -> String {
    d.normalize().to_string()
}

/// A CloudEvents 1.0 structured-mode message with `data`.
pub fn envelope(
    event_type: &str,
    source: &str,
    id: &str,
    account_id: &str,
    time: DateTime<Utc>,
    data: serde_json::Value,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "type": event_type, "source": source, "id": id,
        "subject": account_id, "time": ts(time), "datacontenttype": "application/json",
        "data": data,
    }))
    .expect("JSON values serialize")
}

/// The event id of a grant: a purchase sent twice is the same event, and two accounts may
/// use the same grant id.
pub fn grant_event_id(account_id: &str, grant_id: &str) -> String {
    format!("grant:{account_id}:{grant_id}")
}

/// A grant. The event id is derived from the account and grant id, so re-sending the same
/// purchase is a duplicate the ledger ignores (and the grant id itself is idempotent too).
#[allow(clippy::too_many_arguments)]
pub fn grant(
    source: &str,
    account_id: &str,
    grant_id: &str,
    kind: GrantKind,
    credits: Decimal,
    expires_at: Option<DateTime<Utc>>,
    priority: Option<i32>,
    time: DateTime<Utc>,
) -> Vec<u8> {
    let mut data =
        json!({"grant_id": grant_id, "kind": kind.as_str(), "credits": decimal(credits)});
    if let Some(e) = expires_at {
        data["expires_at"] = json!(ts(e));
    }
    if let Some(p) = priority {
        data["priority"] = json!(p);
    }
    envelope(
        types::GRANT,
        source,
        &grant_event_id(account_id, grant_id),
        account_id,
        time,
        data,
    )
}

/// A plan. `event_id` must be unique per change (a plan change is not idempotent by content).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    source: &str,
    event_id: &str,
    account_id: &str,
    plan_id: &str,
    monthly_allowance: Decimal,
    billing_day: u8,
    overage_policy: OveragePolicy,
    top_up_validity_months: Option<u32>,
    low_balance_credits: Option<Decimal>,
    low_balance_percent: Option<Decimal>,
    allowance_alert_percents: Option<&[u32]>,
    time: DateTime<Utc>,
) -> Vec<u8> {
    let policy = match overage_policy {
        OveragePolicy::SettleFromNextGrant => "settle_from_next_grant",
        OveragePolicy::BillOverage => "bill_overage",
    };
    let mut data = json!({
        "plan_id": plan_id, "monthly_allowance": decimal(monthly_allowance),
        "billing_day": billing_day, "overage_policy": policy,
    });
    if let Some(m) = top_up_validity_months {
        data["top_up_validity_months"] = json!(m);
    }
    if let Some(c) = low_balance_credits {
        data["low_balance_credits"] = json!(decimal(c));
    }
    if let Some(p) = low_balance_percent {
        data["low_balance_percent"] = json!(decimal(p));
    }
    if let Some(p) = allowance_alert_percents {
        data["allowance_alert_percents"] = json!(p);
    }
    envelope(types::PLAN, source, event_id, account_id, time, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{decode, DecodeLimits, Payload};
    use rust_decimal_macros::dec;

    #[test]
    fn encoded_events_decode_back() {
        let now = Utc::now();
        let g = grant(
            "//tally/cli",
            "acct-1",
            "g-1",
            GrantKind::TopUp,
            dec!(12.50),
            None,
            Some(5),
            now,
        );
        let e = decode(&g, now, &DecodeLimits::default()).unwrap();
        assert_eq!(e.envelope.id, "grant:acct-1:g-1");
        let Payload::Grant(gr) = e.payload else {
            panic!("{e:?}")
        };
        assert_eq!((gr.credits, gr.priority), (dec!(12.5), Some(5)));

        let p = plan(
            "//tally/cli",
            "p-1",
            "acct-1",
            "pro",
            dec!(1000),
            31,
            OveragePolicy::BillOverage,
            Some(3),
            Some(dec!(50)),
            None,
            Some(&[50, 100]),
            now,
        );
        let e = decode(&p, now, &DecodeLimits::default()).unwrap();
        let Payload::Plan(pl) = e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(
            (pl.billing_day, pl.allowance_alert_percents),
            (31, Some(vec![50, 100]))
        );
    }
}
