//! Unit tests of the decoder: one per rule, plus precedence and borrowing.

use super::*;
use chrono::TimeZone;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::str::FromStr;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 15, 12, 0, 0).unwrap()
}

fn envelope(event_type: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": "evt-1",
        "source": "//voice.example/calls",
        "type": event_type,
        "subject": "acct-0001",
        "time": "2025-06-15T11:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    })
}

fn call() -> Value {
    envelope(
        types::CALL,
        json!({
            "call_id": "call-1",
            "direction": "inbound",
            "channel": "phone",
            "model": "gpt-4o",
            "voice_tier": "standard",
            "started_at": "2025-06-15T10:00:00Z",
            "answered_at": "2025-06-15T10:00:10Z",
            "ended_at": "2025-06-15T10:05:10Z",
            "hold_seconds": 30
        }),
    )
}

fn chat() -> Value {
    envelope(
        types::CHAT_RESPONSE,
        json!({"conversation_id": "conv-1", "model": "gpt-4o-mini", "voice_tier": "premium",
               "channel": "voice", "responses": 3}),
    )
}

fn instance() -> Value {
    envelope(
        types::INSTANCE_HOURS,
        json!({"instance_id": "i-1", "instance_type": "gpu.a10",
               "started_at": "2025-06-15T08:00:00Z", "ended_at": "2025-06-15T10:30:00Z"}),
    )
}

fn metered() -> Value {
    envelope(
        types::METERED,
        json!({"kind": "ai_analysis", "quantity": "2.5", "attributes": {"model": "gpt-4o"}}),
    )
}

fn grant() -> Value {
    envelope(
        types::GRANT,
        json!({"grant_id": "g-1", "kind": "top_up", "credits": "2000.5",
               "expires_at": "2025-09-15T00:00:00Z", "priority": 10}),
    )
}

fn plan() -> Value {
    envelope(
        types::PLAN,
        json!({"plan_id": "pro", "monthly_allowance": "5000", "billing_day": 31,
               "overage_policy": "bill_overage", "top_up_validity_months": 3,
               "low_balance_credits": "100", "low_balance_percent": "25",
               "allowance_alert_percents": [50, 80, 100]}),
    )
}

/// Serializes with the attributes in the usual order, `type` before `data` (serde_json's
/// `Map` would sort them, putting `data` first), so the decoder's one-pass path is the one
/// exercised; [`data_first`] gives the other order.
fn bytes(v: &Value) -> Vec<u8> {
    let Some(map) = v.as_object() else {
        return serde_json::to_vec(v).unwrap();
    };
    let order = [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
    ];
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| order.iter().position(|o| o == k).unwrap_or(order.len()));
    let mut out = b"{".to_vec();
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend(serde_json::to_vec(k).unwrap());
        out.push(b':');
        out.extend(serde_json::to_vec(&map[k]).unwrap());
    }
    out.push(b'}');
    out
}

fn ok(v: &Value) -> Event<'static> {
    let b: &'static [u8] = Box::leak(bytes(v).into_boxed_slice());
    decode(b, now(), &DecodeLimits::default()).unwrap_or_else(|r| panic!("{r}: {v}"))
}

fn reject_bytes(b: &[u8]) -> (Reason, Option<String>) {
    match decode(b, now(), &DecodeLimits::default()) {
        Ok(e) => panic!("accepted: {e:?}"),
        Err(r) => {
            assert!(!r.detail.is_empty());
            (r.reason, r.field)
        }
    }
}

fn reject(v: &Value) -> (Reason, Option<String>) {
    reject_bytes(&bytes(v))
}

fn set(mut v: Value, pointer: &str, value: Value) -> Value {
    *v.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} not found")) = value;
    v
}

fn insert(mut v: Value, pointer: &str, key: &str, value: Value) -> Value {
    v.pointer_mut(pointer)
        .and_then(Value::as_object_mut)
        .unwrap()
        .insert(key.to_owned(), value);
    v
}

fn remove(mut v: Value, pointer: &str, key: &str) -> Value {
    v.pointer_mut(pointer)
        .and_then(Value::as_object_mut)
        .unwrap()
        .remove(key);
    v
}

fn is(reason: Reason, field: &str) -> (Reason, Option<String>) {
    (reason, Some(field.to_owned()))
}

use Reason::*;

#[test]
fn decodes_a_call() {
    let e = ok(&call());
    assert_eq!(e.envelope.id, "evt-1");
    assert_eq!(e.envelope.source, "//voice.example/calls");
    assert_eq!(e.envelope.event_type, types::CALL);
    assert_eq!(e.envelope.account_id, "acct-0001");
    assert_eq!(
        e.envelope.time,
        Utc.with_ymd_and_hms(2025, 6, 15, 11, 0, 0).unwrap()
    );
    let Payload::Call(c) = &e.payload else {
        panic!("{e:?}")
    };
    assert_eq!(c.call_id, "call-1");
    assert_eq!(c.direction, Direction::Inbound);
    assert_eq!(c.channel.as_deref(), Some("phone"));
    assert_eq!(c.hold_seconds, 30);
    assert_eq!(c.billable_seconds(), 270);
    let usage = e.usage().unwrap();
    assert_eq!(usage.kind, "call");
    assert_eq!(usage.quantity, Quantity::Seconds(270));
}

#[test]
fn decodes_an_unanswered_call_with_defaults() {
    let v = set(call(), "/data/answered_at", Value::Null);
    let v = remove(v, "/data", "hold_seconds");
    let v = remove(v, "/data", "channel");
    let e = ok(&v);
    let Payload::Call(c) = &e.payload else {
        panic!()
    };
    assert_eq!(c.answered_at, None);
    assert_eq!(c.hold_seconds, 0);
    assert_eq!(c.channel, None);
    assert_eq!(c.billable_seconds(), 0);
    let v = remove(call(), "/data", "answered_at");
    let v = set(v, "/data/hold_seconds", json!(0));
    assert!(matches!(
        ok(&v).payload,
        Payload::Call(CallUsage {
            answered_at: None,
            ..
        })
    ));
}

#[test]
fn decodes_every_type() {
    let Payload::Chat(c) = ok(&chat()).payload else {
        panic!()
    };
    assert_eq!((c.model.as_ref(), c.responses), ("gpt-4o-mini", 3));
    let Payload::Chat(c) = ok(&remove(chat(), "/data", "responses")).payload else {
        panic!()
    };
    assert_eq!(c.responses, 1);

    let Payload::Instance(i) = ok(&instance()).payload else {
        panic!()
    };
    assert_eq!(i.instance_type, "gpu.a10");
    assert_eq!(
        ok(&instance()).usage().unwrap().quantity,
        Quantity::Seconds(9000)
    );

    let Payload::Metered(m) = ok(&metered()).payload else {
        panic!()
    };
    assert_eq!(m.kind, "ai_analysis");
    assert_eq!(m.quantity, Decimal::from_str("2.5").unwrap());
    assert_eq!(
        m.attributes,
        vec![(Cow::Borrowed("model"), Cow::Borrowed("gpt-4o"))]
    );

    let Payload::Grant(g) = ok(&grant()).payload else {
        panic!()
    };
    assert_eq!(g.kind, GrantKind::TopUp);
    assert_eq!(g.credits, Decimal::from_str("2000.5").unwrap());
    assert_eq!(g.priority, Some(10));
    assert!(g.expires_at.is_some());

    let Payload::Plan(p) = ok(&plan()).payload else {
        panic!()
    };
    assert_eq!(p.billing_day, 31);
    assert_eq!(p.overage_policy, OveragePolicy::BillOverage);
    assert_eq!(p.allowance_alert_percents, Some(vec![50, 80, 100]));
    assert_eq!(p.low_balance_percent, Some(Decimal::from(25)));
}

#[test]
fn strings_borrow_from_the_payload() {
    let b = bytes(&call());
    let e = decode(&b, now(), &DecodeLimits::default()).unwrap();
    assert!(matches!(e.envelope.id, Cow::Borrowed(_)));
    assert!(matches!(e.envelope.account_id, Cow::Borrowed(_)));
    let Payload::Call(c) = &e.payload else {
        panic!()
    };
    assert!(matches!(c.call_id, Cow::Borrowed(_)));
    assert!(matches!(c.model, Some(Cow::Borrowed(_))));
    // An escaped string is decoded (owned).
    let v = set(call(), "/id", json!("evt-\"quoted\""));
    assert_eq!(ok(&v).envelope.id, "evt-\"quoted\"");
}

#[test]
fn extensions_are_ignored_and_attribute_order_is_free() {
    let v = insert(call(), "", "traceparent", json!("00-abc"));
    let v = insert(v, "", "ext", json!({"nested": [1, 2, {"x": null}]}));
    ok(&v);
    let v = remove(call(), "", "datacontenttype");
    ok(&v);
    let raw = br#"{"data":{"kind":"ai_analysis","quantity":"1"},"time":"2025-06-15T11:00:00Z",
        "subject":"a","type":"tally.usage.metered.v1","source":"s","id":"i","specversion":"1.0"}"#;
    decode(raw, now(), &DecodeLimits::default()).unwrap();
    let v = set(
        call(),
        "/datacontenttype",
        json!("application/json; charset=utf-8"),
    );
    ok(&v);
}

#[test]
fn too_large_is_checked_before_parsing() {
    let limits = DecodeLimits {
        max_message_bytes: 10,
        ..DecodeLimits::default()
    };
    let r = decode(b"not json at all", now(), &limits).unwrap_err();
    assert_eq!((r.reason, r.field), (TooLarge, None));
    assert!(decode(b"{}", now(), &limits).is_err_and(|r| r.reason == MissingField));
    assert_eq!(DecodeLimits::default().max_message_bytes, 65_536);
    assert_eq!(DecodeLimits::default().max_future_seconds, 300);
}

#[test]
fn malformed_json() {
    let good = bytes(&call());
    let cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"   ".to_vec(),
        b"not json".to_vec(),
        good[..good.len() / 2].to_vec(),
        good[..good.len() - 1].to_vec(),
        [good.as_slice(), b" garbage"].concat(),
        [good.as_slice(), b"{}"].concat(),
        b"[1,2,3]".to_vec(),
        br#"["1.0","evt-1","//s","tally.usage.call.v1","acct","2025-06-15T11:00:00Z",{}]"#.to_vec(),
        b"\"a string\"".to_vec(),
        b"42".to_vec(),
        b"null".to_vec(),
        br#"{"id": "a" "source": "b"}"#.to_vec(),
        br#"{"id": 'single'}"#.to_vec(),
        br#"{"id": "a",}"#.to_vec(),
        // Invalid UTF-8 in an attribute, in data, in an extension, in a key.
        b"{\"specversion\":\"1.0\",\"id\":\"\xff\xfe\"}".to_vec(),
        String::from_utf8_lossy(&good)
            .replace("call-1", "call-\u{1}")
            .into_bytes(),
        [&good[..good.len() - 2], b",\"x\":\"\xc3\x28\"}}".as_slice()].concat(),
        [
            &good[..good.len() - 1],
            b",\"ext\":\"\xe2\x82\"}".as_slice(),
        ]
        .concat(),
        [b"{\"\xff\":1,".as_slice(), &good[1..]].concat(),
    ];
    for (i, case) in cases.iter().enumerate() {
        let r =
            decode(case, now(), &DecodeLimits::default()).expect_err(&format!("case {i} accepted"));
        assert_eq!(
            (r.reason, r.field.as_deref()),
            (MalformedJson, None),
            "case {i}: {}",
            String::from_utf8_lossy(case)
        );
    }
}

#[test]
fn nesting_too_deep_is_malformed_wherever_it_is() {
    let deep = |n: usize| -> Value {
        let mut v = json!(1);
        for _ in 0..n {
            v = json!([v]);
        }
        v
    };
    // serde_json's Value serializer has no depth limit; its parser does.
    let too_deep = deep(200);
    let at = |v: Value| reject(&v);
    assert_eq!(
        at(insert(call(), "", "ext", too_deep.clone())),
        (MalformedJson, None)
    );
    assert_eq!(
        at(insert(call(), "/data", "x", too_deep.clone())),
        (MalformedJson, None)
    );
    assert_eq!(
        at(set(call(), "/data/call_id", too_deep.clone())),
        (MalformedJson, None)
    );
    assert_eq!(
        at(set(call(), "/type", json!("nope")).pipe_insert("/data", "x", too_deep.clone())),
        (MalformedJson, None)
    );
    assert_eq!(
        at(insert(metered(), "/data/attributes", "x", too_deep)),
        (MalformedJson, None)
    );
    // Moderate nesting in an extension is fine.
    ok(&insert(call(), "", "ext", deep(50)));
}

trait PipeInsert {
    fn pipe_insert(self, pointer: &str, key: &str, value: Value) -> Value;
}

impl PipeInsert for Value {
    fn pipe_insert(self, pointer: &str, key: &str, value: Value) -> Value {
        insert(self, pointer, key, value)
    }
}

#[test]
fn missing_envelope_fields() {
    for field in [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "data",
    ] {
        assert_eq!(reject(&remove(call(), "", field)), is(MissingField, field));
        assert_eq!(
            reject(&set(call(), &format!("/{field}"), Value::Null)),
            is(MissingField, field)
        );
    }
}

#[test]
fn wrong_envelope_types() {
    for field in [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
    ] {
        for value in [
            json!(1),
            json!(true),
            json!(["x"]),
            json!({"a": "b"}),
            json!(1.5),
        ] {
            assert_eq!(
                reject(&set(call(), &format!("/{field}"), value.clone())),
                is(WrongType, field),
                "{field} = {value}"
            );
        }
    }
    for value in [json!("x"), json!(1), json!([1]), json!(true)] {
        assert_eq!(reject(&set(call(), "/data", value)), is(WrongType, "data"));
    }
}

#[test]
fn unknown_type() {
    for t in [
        "tally.usage.call.v2",
        "tally.usage.sms.v1",
        "",
        "TALLY.USAGE.CALL.V1",
    ] {
        assert_eq!(
            reject(&set(call(), "/type", json!(t))),
            is(UnknownType, "type")
        );
    }
}

#[test]
fn envelope_invalid_values() {
    let cases = [
        ("/specversion", json!("0.3"), "specversion"),
        ("/specversion", json!("1"), "specversion"),
        ("/datacontenttype", json!("text/plain"), "datacontenttype"),
        (
            "/datacontenttype",
            json!("application/jsonx"),
            "datacontenttype",
        ),
        ("/id", json!(""), "id"),
        ("/id", json!("x".repeat(257)), "id"),
        ("/source", json!(""), "source"),
        ("/source", json!("s".repeat(300)), "source"),
        ("/subject", json!(""), "subject"),
        ("/subject", json!("acct 1"), "subject"),
        ("/subject", json!("acct/1"), "subject"),
        ("/subject", json!("compte-é"), "subject"),
        ("/subject", json!("a".repeat(129)), "subject"),
        ("/time", json!("2025-06-15"), "time"),
        ("/time", json!("2025-06-15 11:00:00Z"), "time"),
        ("/time", json!("2025-06-15T11:00:00"), "time"),
        ("/time", json!("2025-02-30T11:00:00Z"), "time"),
        ("/time", json!("1718452800"), "time"),
        // More than 300 s ahead of now.
        ("/time", json!("2025-06-15T12:05:01Z"), "time"),
        ("/time", json!("2025-06-15T14:05:01+02:00"), "time"),
    ];
    for (pointer, value, field) in cases {
        assert_eq!(
            reject(&set(call(), pointer, value.clone())),
            is(InvalidValue, field),
            "{pointer} = {value}"
        );
    }
    // Limits are inclusive.
    ok(&set(call(), "/time", json!("2025-06-15T12:05:00Z")));
    ok(&set(call(), "/id", json!("x".repeat(256))));
    ok(&set(call(), "/subject", json!("a".repeat(128))));
    ok(&set(call(), "/subject", json!("Org.1:team_a-B")));
    // The future limit is the caller's.
    let b = bytes(&set(call(), "/time", json!("2025-06-15T13:00:00Z")));
    let lenient = DecodeLimits {
        max_future_seconds: 3600,
        ..DecodeLimits::default()
    };
    decode(&b, now(), &lenient).unwrap();
}

#[test]
fn duplicate_attributes_are_invalid() {
    let raw = String::from_utf8(bytes(&call())).unwrap();
    let dup = raw.replacen("{", r#"{"id":"evt-0","#, 1);
    assert_eq!(reject_bytes(dup.as_bytes()), is(InvalidValue, "id"));
    let dup = raw.replacen(r#""call_id""#, r#""call_id":"c-0","call_id""#, 1);
    assert_eq!(
        reject_bytes(dup.as_bytes()),
        is(InvalidValue, "data.call_id")
    );
    // Duplicated extensions are not ours to judge.
    let dup = raw.replacen("{", r#"{"ext":1,"ext":2,"#, 1);
    decode(dup.as_bytes(), now(), &DecodeLimits::default()).unwrap();
}

#[test]
fn data_missing_fields() {
    let cases = [
        (call(), "call_id"),
        (call(), "direction"),
        (call(), "started_at"),
        (call(), "ended_at"),
        (chat(), "conversation_id"),
        (chat(), "model"),
        (instance(), "instance_id"),
        (instance(), "instance_type"),
        (instance(), "started_at"),
        (instance(), "ended_at"),
        (metered(), "kind"),
        (metered(), "quantity"),
        (grant(), "grant_id"),
        (grant(), "kind"),
        (grant(), "credits"),
        (plan(), "plan_id"),
        (plan(), "monthly_allowance"),
        (plan(), "billing_day"),
        (plan(), "overage_policy"),
    ];
    for (event, field) in cases {
        let path = format!("data.{field}");
        assert_eq!(
            reject(&remove(event.clone(), "/data", field)),
            is(MissingField, &path)
        );
        assert_eq!(
            reject(&set(event, &format!("/data/{field}"), Value::Null)),
            is(MissingField, &path)
        );
    }
    // Optional fields may be absent or null.
    for (event, field) in [
        (call(), "channel"),
        (call(), "model"),
        (call(), "voice_tier"),
        (call(), "hold_seconds"),
        (chat(), "voice_tier"),
        (chat(), "channel"),
        (chat(), "responses"),
        (metered(), "attributes"),
        (grant(), "expires_at"),
        (grant(), "priority"),
        (plan(), "top_up_validity_months"),
        (plan(), "low_balance_credits"),
        (plan(), "low_balance_percent"),
        (plan(), "allowance_alert_percents"),
    ] {
        ok(&remove(event.clone(), "/data", field));
        ok(&set(event, &format!("/data/{field}"), Value::Null));
    }
}

#[test]
fn data_wrong_types() {
    let cases = [
        (call(), "/data/call_id", json!(12), "data.call_id"),
        (call(), "/data/direction", json!(true), "data.direction"),
        (
            call(),
            "/data/started_at",
            json!(1718452800),
            "data.started_at",
        ),
        (
            call(),
            "/data/hold_seconds",
            json!("30"),
            "data.hold_seconds",
        ),
        (
            call(),
            "/data/hold_seconds",
            json!(1.5),
            "data.hold_seconds",
        ),
        (call(), "/data/channel", json!(["phone"]), "data.channel"),
        (chat(), "/data/responses", json!("3"), "data.responses"),
        (chat(), "/data/model", json!({"name": "x"}), "data.model"),
        (instance(), "/data/ended_at", json!(false), "data.ended_at"),
        (metered(), "/data/quantity", json!(2.5), "data.quantity"),
        (metered(), "/data/quantity", json!(3), "data.quantity"),
        (
            metered(),
            "/data/attributes",
            json!(["model"]),
            "data.attributes",
        ),
        (
            metered(),
            "/data/attributes",
            json!("model"),
            "data.attributes",
        ),
        (
            metered(),
            "/data/attributes/model",
            json!(4),
            "data.attributes.model",
        ),
        (
            metered(),
            "/data/attributes/model",
            Value::Null,
            "data.attributes.model",
        ),
        (grant(), "/data/credits", json!(100), "data.credits"),
        (grant(), "/data/priority", json!("1"), "data.priority"),
        (plan(), "/data/billing_day", json!("1"), "data.billing_day"),
        (
            plan(),
            "/data/allowance_alert_percents",
            json!(50),
            "data.allowance_alert_percents",
        ),
        (
            plan(),
            "/data/allowance_alert_percents/1",
            json!("80"),
            "data.allowance_alert_percents[1]",
        ),
    ];
    for (event, pointer, value, field) in cases {
        assert_eq!(
            reject(&set(event, pointer, value.clone())),
            is(WrongType, field),
            "{pointer} = {value}"
        );
    }
}

#[test]
fn data_unknown_fields_are_invalid() {
    assert_eq!(
        reject(&insert(call(), "/data", "billable_seconds", json!(3))),
        is(InvalidValue, "data.billable_seconds")
    );
    assert_eq!(
        reject(&insert(plan(), "/data", "currency", json!("EUR"))),
        is(InvalidValue, "data.currency")
    );
}

#[test]
fn call_rules() {
    let cases = [
        // Ids.
        (set(call(), "/data/call_id", json!("")), "data.call_id"),
        (
            set(call(), "/data/call_id", json!("c".repeat(257))),
            "data.call_id",
        ),
        // Enums and names.
        (
            set(call(), "/data/direction", json!("sideways")),
            "data.direction",
        ),
        (
            set(call(), "/data/direction", json!("Inbound")),
            "data.direction",
        ),
        (set(call(), "/data/channel", json!("")), "data.channel"),
        (
            set(call(), "/data/model", json!("m".repeat(129))),
            "data.model",
        ),
        // Times.
        (
            set(call(), "/data/started_at", json!("10:00")),
            "data.started_at",
        ),
        (
            set(call(), "/data/answered_at", json!("soon")),
            "data.answered_at",
        ),
        (
            set(call(), "/data/ended_at", json!("2025-06-15T10:05:10")),
            "data.ended_at",
        ),
        // Answered before started.
        (
            set(call(), "/data/answered_at", json!("2025-06-15T09:59:59Z")),
            "data.answered_at",
        ),
        // Hung up before answer.
        (
            set(call(), "/data/ended_at", json!("2025-06-15T10:00:09Z")),
            "data.ended_at",
        ),
        // Ended before started (unanswered).
        (
            set(call(), "/data/answered_at", Value::Null)
                .pipe_set("/data/hold_seconds", json!(0))
                .pipe_set("/data/ended_at", json!("2025-06-15T09:00:00Z")),
            "data.ended_at",
        ),
        // Over 31 days.
        (
            set(call(), "/data/started_at", json!("2025-05-15T10:00:00Z")),
            "data.ended_at",
        ),
        // Hold.
        (
            set(call(), "/data/hold_seconds", json!(-1)),
            "data.hold_seconds",
        ),
        (
            set(call(), "/data/hold_seconds", json!(301)),
            "data.hold_seconds",
        ),
        (
            set(call(), "/data/answered_at", Value::Null),
            "data.hold_seconds",
        ),
        (
            set(call(), "/data/hold_seconds", json!(u64::MAX)),
            "data.hold_seconds",
        ),
    ];
    for (v, field) in cases {
        assert_eq!(reject(&v), is(InvalidValue, field), "{}", v["data"]);
    }
    // Boundaries that are fine: hold == answered time, exactly 31 days, zero-length call.
    ok(&set(call(), "/data/hold_seconds", json!(300)));
    ok(
        &set(call(), "/data/started_at", json!("2025-05-15T10:05:10Z"))
            .pipe_set("/data/answered_at", json!("2025-05-15T10:05:10Z")),
    );
    ok(
        &set(call(), "/data/ended_at", json!("2025-06-15T10:00:10Z"))
            .pipe_set("/data/hold_seconds", json!(0)),
    );
    // Offsets are honoured in the ordering.
    ok(&set(
        call(),
        "/data/answered_at",
        json!("2025-06-15T12:00:10+02:00"),
    ));
}

trait PipeSet {
    fn pipe_set(self, pointer: &str, value: Value) -> Value;
}

impl PipeSet for Value {
    fn pipe_set(self, pointer: &str, value: Value) -> Value {
        set(self, pointer, value)
    }
}

#[test]
fn chat_rules() {
    for (pointer, value, field) in [
        ("/data/conversation_id", json!(""), "data.conversation_id"),
        ("/data/model", json!(""), "data.model"),
        ("/data/responses", json!(0), "data.responses"),
        ("/data/responses", json!(-2), "data.responses"),
        ("/data/responses", json!(10_001), "data.responses"),
        ("/data/voice_tier", json!(""), "data.voice_tier"),
    ] {
        assert_eq!(
            reject(&set(chat(), pointer, value.clone())),
            is(InvalidValue, field),
            "{pointer} = {value}"
        );
    }
    ok(&set(chat(), "/data/responses", json!(10_000)));
}

#[test]
fn instance_rules() {
    for (pointer, value, field) in [
        ("/data/instance_id", json!(""), "data.instance_id"),
        ("/data/instance_type", json!(""), "data.instance_type"),
        ("/data/started_at", json!("x"), "data.started_at"),
        (
            "/data/ended_at",
            json!("2025-06-15T07:59:59Z"),
            "data.ended_at",
        ),
        (
            "/data/started_at",
            json!("2025-05-01T00:00:00Z"),
            "data.ended_at",
        ),
    ] {
        assert_eq!(
            reject(&set(instance(), pointer, value.clone())),
            is(InvalidValue, field),
            "{pointer} = {value}"
        );
    }
}

#[test]
fn metered_rules() {
    for (pointer, value, field) in [
        ("/data/kind", json!("AI_analysis"), "data.kind"),
        ("/data/kind", json!("9lives"), "data.kind"),
        ("/data/kind", json!("ai-analysis"), "data.kind"),
        ("/data/kind", json!(""), "data.kind"),
        ("/data/kind", json!("k".repeat(65)), "data.kind"),
        ("/data/kind", json!("call"), "data.kind"),
        ("/data/kind", json!("chat_response"), "data.kind"),
        ("/data/kind", json!("instance_hours"), "data.kind"),
        ("/data/quantity", json!("0"), "data.quantity"),
        ("/data/quantity", json!("0.000"), "data.quantity"),
        ("/data/quantity", json!("-1"), "data.quantity"),
        ("/data/quantity", json!("1e3"), "data.quantity"),
        ("/data/quantity", json!("abc"), "data.quantity"),
        ("/data/quantity", json!(""), "data.quantity"),
        ("/data/attributes/model", json!(""), "data.attributes.model"),
        ("/data/attributes", json!({"Model": "x"}), "data.attributes"),
    ] {
        assert_eq!(
            reject(&set(metered(), pointer, value.clone())),
            is(InvalidValue, field),
            "{pointer} = {value}"
        );
    }
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("a{i}"), json!("v"))).collect();
    assert_eq!(
        reject(&set(
            metered(),
            "/data/attributes",
            Value::Object(many.clone())
        )),
        is(InvalidValue, "data.attributes")
    );
    let sixteen: serde_json::Map<String, Value> = many.into_iter().take(16).collect();
    ok(&set(metered(), "/data/attributes", Value::Object(sixteen)));
    let raw = String::from_utf8(bytes(&metered())).unwrap();
    let dup = raw.replace(r#""model":"gpt-4o""#, r#""model":"a","model":"b""#);
    assert_eq!(
        reject_bytes(dup.as_bytes()),
        is(InvalidValue, "data.attributes.model")
    );
}

#[test]
fn grant_rules() {
    for (pointer, value, field) in [
        (
            "/data/grant_id",
            json!("allowance:2026-12-20"),
            "data.grant_id",
        ),
        ("/data/grant_id", json!(""), "data.grant_id"),
        ("/data/kind", json!("gift"), "data.kind"),
        ("/data/kind", json!("TopUp"), "data.kind"),
        ("/data/credits", json!("0"), "data.credits"),
        ("/data/credits", json!("-5"), "data.credits"),
        ("/data/credits", json!("1.0000001"), "data.credits"),
        ("/data/credits", json!("1,000"), "data.credits"),
        ("/data/credits", json!("1000000000000"), "data.credits"),
        ("/data/credits", json!("0x10"), "data.credits"),
        ("/data/expires_at", json!("next month"), "data.expires_at"),
        ("/data/priority", json!(1i64 << 31), "data.priority"),
    ] {
        assert_eq!(
            reject(&set(grant(), pointer, value.clone())),
            is(InvalidValue, field),
            "{pointer} = {value}"
        );
    }
    ok(&set(grant(), "/data/credits", json!("0.000001")));
    ok(&set(grant(), "/data/priority", json!(-5)));
    for kind in ["allowance", "package", "top_up", "promo", "manual"] {
        ok(&set(grant(), "/data/kind", json!(kind)));
    }
}

#[test]
fn plan_rules() {
    for (pointer, value, field) in [
        ("/data/plan_id", json!(""), "data.plan_id"),
        (
            "/data/monthly_allowance",
            json!("-1"),
            "data.monthly_allowance",
        ),
        (
            "/data/monthly_allowance",
            json!("lots"),
            "data.monthly_allowance",
        ),
        ("/data/billing_day", json!(0), "data.billing_day"),
        ("/data/billing_day", json!(32), "data.billing_day"),
        ("/data/overage_policy", json!("free"), "data.overage_policy"),
        (
            "/data/top_up_validity_months",
            json!(0),
            "data.top_up_validity_months",
        ),
        (
            "/data/top_up_validity_months",
            json!(121),
            "data.top_up_validity_months",
        ),
        (
            "/data/low_balance_credits",
            json!("-1"),
            "data.low_balance_credits",
        ),
        (
            "/data/low_balance_percent",
            json!("100.5"),
            "data.low_balance_percent",
        ),
        (
            "/data/low_balance_percent",
            json!("25%"),
            "data.low_balance_percent",
        ),
        (
            "/data/allowance_alert_percents/2",
            json!(101),
            "data.allowance_alert_percents[2]",
        ),
        (
            "/data/allowance_alert_percents/0",
            json!(0),
            "data.allowance_alert_percents[0]",
        ),
        (
            "/data/allowance_alert_percents",
            json!([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]),
            "data.allowance_alert_percents",
        ),
    ] {
        assert_eq!(
            reject(&set(plan(), pointer, value.clone())),
            is(InvalidValue, field),
            "{pointer} = {value}"
        );
    }
    ok(&set(plan(), "/data/monthly_allowance", json!("0")));
    ok(&set(plan(), "/data/low_balance_percent", json!("100")));
    ok(&set(
        plan(),
        "/data/overage_policy",
        json!("settle_from_next_grant"),
    ));
    ok(&set(plan(), "/data/allowance_alert_percents", json!([])));
}

#[test]
fn precedence() {
    let limits = DecodeLimits {
        max_message_bytes: 100,
        ..DecodeLimits::default()
    };
    // too_large beats everything, even malformed JSON.
    let r = decode(&[b'{'; 101], now(), &limits).unwrap_err();
    assert_eq!(r.reason, TooLarge);

    // malformed_json beats a wrong type seen before the syntax error.
    let b = bytes(&set(call(), "/id", json!(5)));
    assert_eq!(reject_bytes(&b[..b.len() - 3]), (MalformedJson, None));

    // Envelope missing / wrong type beat unknown_type.
    let v = set(call(), "/type", json!("nope"));
    assert_eq!(
        reject(&remove(v.clone(), "", "subject")),
        is(MissingField, "subject")
    );
    assert_eq!(
        reject(&set(v.clone(), "/time", json!(5))),
        is(WrongType, "time")
    );
    assert_eq!(
        reject(&set(v.clone(), "/data", json!(5))),
        is(WrongType, "data")
    );

    // unknown_type beats envelope invalid values and anything in data.
    assert_eq!(
        reject(&set(v.clone(), "/specversion", json!("2.0"))),
        is(UnknownType, "type")
    );
    assert_eq!(
        reject(&set(v.clone(), "/time", json!("nope"))),
        is(UnknownType, "type")
    );
    assert_eq!(reject(&set(v, "/data", json!({}))), is(UnknownType, "type"));

    // Envelope invalid values beat data errors.
    let v = set(call(), "/data/call_id", json!(1));
    assert_eq!(
        reject(&set(v, "/subject", json!("a b"))),
        is(InvalidValue, "subject")
    );

    // In data: wrong type, then missing, then invalid.
    let v = set(call(), "/data/hold_seconds", json!(-1));
    let v = remove(v, "/data", "call_id");
    assert_eq!(reject(&v), is(MissingField, "data.call_id"));
    assert_eq!(
        reject(&set(v, "/data/direction", json!(1))),
        is(WrongType, "data.direction")
    );
}

#[test]
fn display_names_reason_and_field() {
    let r = decode(
        &bytes(&set(call(), "/data/hold_seconds", json!(-1))),
        now(),
        &DecodeLimits::default(),
    )
    .unwrap_err();
    let shown = r.to_string();
    assert!(
        shown.starts_with("invalid_value (data.hold_seconds): "),
        "{shown}"
    );
}

#[test]
fn a_huge_future_limit_is_no_limit() {
    let b = bytes(&set(call(), "/time", json!("9999-12-31T23:59:59Z")));
    let limits = DecodeLimits {
        max_future_seconds: i64::MAX,
        ..DecodeLimits::default()
    };
    decode(&b, now(), &limits).unwrap();
}

/// Moves `data` before `type`, so the decoder cannot read it typed in the first pass.
fn data_first(v: &Value) -> Vec<u8> {
    let mut out = serde_json::Map::new();
    out.insert("data".to_owned(), v["data"].clone());
    for (k, val) in v.as_object().unwrap() {
        if k != "data" {
            out.insert(k.clone(), val.clone());
        }
    }
    let b = serde_json::to_vec(&Value::Object(out)).unwrap();
    assert!(b.starts_with(b"{\"data\""));
    b
}

#[test]
fn attribute_order_does_not_change_the_outcome() {
    let valid = [call(), chat(), instance(), metered(), grant(), plan()];
    for v in &valid {
        let b = data_first(v);
        assert_eq!(
            decode(&b, now(), &DecodeLimits::default()).unwrap(),
            ok(v),
            "{v}"
        );
    }
    let invalid = [
        set(call(), "/data/hold_seconds", json!(-1)),
        set(call(), "/data/hold_seconds", json!("1")),
        remove(call(), "/data", "call_id"),
        insert(call(), "/data", "extra", json!(1)),
        set(call(), "/data", json!([1, 2])),
        set(metered(), "/data/attributes/model", json!(1)),
        set(plan(), "/data/allowance_alert_percents/1", json!(0)),
        set(
            set(call(), "/data/hold_seconds", json!("1")),
            "/subject",
            json!("a b"),
        ),
        set(set(call(), "/data/call_id", json!(1)), "/type", json!("x")),
        remove(set(grant(), "/data/credits", json!(5)), "", "time"),
    ];
    for v in &invalid {
        assert_eq!(reject_bytes(&data_first(v)), reject(v), "{v}");
    }
}

#[test]
fn the_api_source_namespace_holds_only_what_the_api_publishes() {
    let api = |v: Value, id: &str| {
        set(
            set(v, "/source", json!("//tally/api/accounts/acct-0001")),
            "/id",
            json!(id),
        )
    };
    // What the API publishes: a grant with its derived id, a plan with a `plan:` id.
    ok(&api(grant(), "grant:acct-0001:g-1"));
    ok(&api(plan(), "plan:1750000000000000000-0000abcd"));
    // The same shapes outside the namespace, with any id, are a producer's business.
    ok(&set(grant(), "/id", json!("grant:acct-0001:g-1")));
    ok(&set(grant(), "/source", json!("//tally/cli")));
    // A grant whose id is not the one the API derives from (account, grant id): a producer
    // could otherwise take the identity of an API grant with other terms.
    assert_eq!(
        reject(&api(grant(), "grant:acct-0001:g-2")),
        is(InvalidValue, "id")
    );
    assert_eq!(reject(&api(grant(), "evt-1")), is(InvalidValue, "id"));
    assert_eq!(reject(&api(plan(), "evt-1")), is(InvalidValue, "id"));
    // Another account's source, or a source under the prefix the API never uses.
    assert_eq!(
        reject(&set(
            api(grant(), "grant:acct-0001:g-1"),
            "/source",
            json!("//tally/api/accounts/acct-0002")
        )),
        is(InvalidValue, "source")
    );
    assert_eq!(
        reject(&set(
            api(grant(), "grant:acct-0001:g-1"),
            "/source",
            json!("//tally/api/other")
        )),
        is(InvalidValue, "source")
    );
    // The API publishes no usage.
    for usage in [call(), chat(), instance(), metered()] {
        assert_eq!(
            reject(&api(usage, "grant:acct-0001:g-1")),
            is(InvalidValue, "source")
        );
    }
}
