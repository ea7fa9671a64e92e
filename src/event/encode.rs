//! Typed -> bytes: the one CloudEvents encoder of the events Tally itself writes as inputs
//! (grants and plans from `tally accounts` and the HTTP API, the demo stream of `tally
//! produce`). The decoder accepts everything written here.

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;

use super::{
    types, AdjustmentEvent, GrantEvent, OveragePolicy, PlanEvent, UsageVoidEvent, VoidGrantEvent,
};

/// An RFC 3339 time in UTC with microseconds (as the ledger stores times): events published
/// one after the other keep their order in event time instead of tying on the second (a tie
/// is broken by source and id, which need not be the order they were sent in).
pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn decimal(d: Decimal) -> String {
    d.normalize().to_string()
}

/// A CloudEvents 1.0 structured-mode message with JSON `data`. `subject` (the account) is left
/// out when None (the demo's broken records).
pub fn structured(
    event_type: &str,
    source: &str,
    id: &str,
    subject: Option<&str>,
    at: DateTime<Utc>,
    data: &impl Serialize,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Envelope<'a, D> {
        specversion: &'static str,
        id: &'a str,
        source: &'a str,
        #[serde(rename = "type")]
        event_type: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        subject: Option<&'a str>,
        time: String,
        datacontenttype: &'static str,
        data: &'a D,
    }
    serde_json::to_vec(&Envelope {
        specversion: "1.0",
        id,
        source,
        event_type,
        subject,
        time: time(at),
        datacontenttype: "application/json",
        data,
    })
    .expect("JSON values serialize")
}

/// A CloudEvents 1.0 structured-mode message with `data`, for `account_id`.
pub fn envelope(
    event_type: &str,
    source: &str,
    id: &str,
    account_id: &str,
    at: DateTime<Utc>,
    data: serde_json::Value,
) -> Vec<u8> {
    structured(event_type, source, id, Some(account_id), at, &data)
}

/// The event id of a grant: a purchase sent twice is the same event, and two accounts may
/// use the same grant id.
pub fn grant_event_id(account_id: &str, grant_id: &str) -> String {
    format!("grant:{account_id}:{grant_id}")
}

/// A grant. The event id is derived from the account and grant id, so re-sending the same
/// purchase is a duplicate the ledger ignores (and the grant id itself is idempotent too).
pub fn grant(source: &str, account_id: &str, g: &GrantEvent<'_>, time: DateTime<Utc>) -> Vec<u8> {
    let mut data = json!({
        "grant_id": g.grant_id, "kind": g.kind.as_str(), "credits": decimal(g.credits),
    });
    if let Some(e) = g.expires_at {
        data["expires_at"] = json!(self::time(e));
    }
    if let Some(p) = g.priority {
        data["priority"] = json!(p);
    }
    envelope(
        types::GRANT,
        source,
        &grant_event_id(account_id, &g.grant_id),
        account_id,
        time,
        data,
    )
}

/// The event id of a grant's void: a grant is voided once, so a retried void is the same
/// event.
pub fn void_event_id(account_id: &str, grant_id: &str) -> String {
    format!("void:{account_id}:{grant_id}")
}

/// The event id of a manual adjustment: the adjustment id is its idempotency key.
pub fn adjustment_event_id(account_id: &str, adjustment_id: &str) -> String {
    format!("adjustment:{account_id}:{adjustment_id}")
}

/// A grant's void (event id [`void_event_id`]).
pub fn void_grant(
    source: &str,
    account_id: &str,
    v: &VoidGrantEvent<'_>,
    time: DateTime<Utc>,
) -> Vec<u8> {
    let mut data = json!({"grant_id": v.grant_id, "reason": v.reason});
    if let Some(a) = &v.actor {
        data["actor"] = json!(a);
    }
    envelope(
        types::GRANT_VOID,
        source,
        &void_event_id(account_id, &v.grant_id),
        account_id,
        time,
        data,
    )
}

/// A manual adjustment (event id [`adjustment_event_id`]); `credits` signed.
pub fn adjustment(
    source: &str,
    account_id: &str,
    a: &AdjustmentEvent<'_>,
    time: DateTime<Utc>,
) -> Vec<u8> {
    let mut data = json!({
        "adjustment_id": a.adjustment_id, "credits": decimal(a.credits), "reason": a.reason,
    });
    if let Some(who) = &a.actor {
        data["actor"] = json!(who);
    }
    envelope(
        types::ADJUSTMENT,
        source,
        &adjustment_event_id(account_id, &a.adjustment_id),
        account_id,
        time,
        data,
    )
}

/// The event id of a usage event's void: `usage-void:{account}:{h}`, `h` the first 128 bits
/// (hex) of SHA-256 over the original's `source`, a NUL and its `id` (both may be 256 bytes:
/// the id stays short). A usage event is voided once, so a retried void is the same event.
pub fn usage_void_event_id(account_id: &str, event_source: &str, event_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(event_source.as_bytes());
    h.update([0u8]);
    h.update(event_id.as_bytes());
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("usage-void:{account_id}:{hex}")
}

/// A usage event's void (event id [`usage_void_event_id`]).
pub fn usage_void(
    source: &str,
    account_id: &str,
    v: &UsageVoidEvent<'_>,
    time: DateTime<Utc>,
) -> Vec<u8> {
    let mut data = json!({
        "event_source": v.event_source, "event_id": v.event_id, "reason": v.reason,
    });
    if let Some(a) = &v.actor {
        data["actor"] = json!(a);
    }
    envelope(
        types::USAGE_VOID,
        source,
        &usage_void_event_id(account_id, &v.event_source, &v.event_id),
        account_id,
        time,
        data,
    )
}

/// A plan. `event_id` must be unique per change (a plan change is not idempotent by content).
pub fn plan(
    source: &str,
    event_id: &str,
    account_id: &str,
    p: &PlanEvent<'_>,
    time: DateTime<Utc>,
) -> Vec<u8> {
    let policy = match p.overage_policy {
        OveragePolicy::SettleFromNextGrant => "settle_from_next_grant",
        OveragePolicy::BillOverage => "bill_overage",
    };
    let mut data = json!({
        "plan_id": p.plan_id, "monthly_allowance": decimal(p.monthly_allowance),
        "billing_day": p.billing_day, "overage_policy": policy,
    });
    if let Some(m) = p.top_up_validity_months {
        data["top_up_validity_months"] = json!(m);
    }
    if let Some(c) = p.low_balance_credits {
        data["low_balance_credits"] = json!(decimal(c));
    }
    if let Some(c) = p.low_balance_percent {
        data["low_balance_percent"] = json!(decimal(c));
    }
    if let Some(a) = &p.allowance_alert_percents {
        data["allowance_alert_percents"] = json!(a);
    }
    if let Some(r) = &p.recharge {
        data["recharge_threshold_credits"] = json!(decimal(r.threshold_credits));
        data["recharge_credits"] = json!(decimal(r.credits));
    }
    envelope(types::PLAN, source, event_id, account_id, time, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{decode, DecodeLimits, GrantKind, Payload};
    use rust_decimal_macros::dec;

    #[test]
    fn encoded_events_decode_back() {
        let now = Utc::now();
        let g = grant(
            "//tally/cli",
            "acct-1",
            &GrantEvent {
                grant_id: "g-1".into(),
                kind: GrantKind::TopUp,
                credits: dec!(12.50),
                expires_at: None,
                priority: Some(5),
            },
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
            &PlanEvent {
                plan_id: "pro".into(),
                monthly_allowance: dec!(1000),
                billing_day: 31,
                overage_policy: OveragePolicy::BillOverage,
                top_up_validity_months: Some(3),
                low_balance_credits: Some(dec!(50)),
                low_balance_percent: None,
                allowance_alert_percents: Some(vec![50, 100]),
                recharge: Some(crate::event::Recharge {
                    threshold_credits: dec!(100),
                    credits: dec!(2000.5),
                }),
            },
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
        assert_eq!(
            pl.recharge.map(|r| (r.threshold_credits, r.credits)),
            Some((dec!(100), dec!(2000.5)))
        );

        let source = crate::event::api_source("acct-1");
        let v = void_grant(
            &source,
            "acct-1",
            &VoidGrantEvent {
                grant_id: "g-1".into(),
                reason: "charged back".into(),
                actor: Some("ops".into()),
            },
            now,
        );
        let e = decode(&v, now, &DecodeLimits::default()).unwrap();
        assert_eq!(e.envelope.id, "void:acct-1:g-1");
        let Payload::VoidGrant(vo) = e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(
            (
                vo.grant_id.as_ref(),
                vo.reason.as_ref(),
                vo.actor.as_deref()
            ),
            ("g-1", "charged back", Some("ops"))
        );
        for credits in [dec!(-12.5), dec!(3)] {
            let a = adjustment(
                &source,
                "acct-1",
                &AdjustmentEvent {
                    adjustment_id: "adj-1".into(),
                    credits,
                    reason: "goodwill".into(),
                    actor: None,
                },
                now,
            );
            let e = decode(&a, now, &DecodeLimits::default()).unwrap();
            assert_eq!(e.envelope.id, "adjustment:acct-1:adj-1");
            let Payload::Adjustment(ad) = e.payload else {
                panic!("{e:?}")
            };
            assert_eq!((ad.credits, ad.actor), (credits, None));
        }
        let u = usage_void(
            &source,
            "acct-1",
            &UsageVoidEvent {
                event_source: "//voice.example/calls".into(),
                event_id: "call-9".into(),
                reason: "test call".into(),
                actor: Some("ops".into()),
            },
            now,
        );
        let e = decode(&u, now, &DecodeLimits::default()).unwrap();
        assert_eq!(
            e.envelope.id,
            usage_void_event_id("acct-1", "//voice.example/calls", "call-9")
        );
        assert!(e.envelope.id.starts_with("usage-void:acct-1:"));
        assert_eq!(e.envelope.id.len(), "usage-void:acct-1:".len() + 32);
        let Payload::UsageVoid(uv) = e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(
            (
                uv.event_source.as_ref(),
                uv.event_id.as_ref(),
                uv.reason.as_ref(),
                uv.actor.as_deref()
            ),
            ("//voice.example/calls", "call-9", "test call", Some("ops"))
        );
    }
}
