//! Rating tests: exact charges for each kind of rule, the default table against the shared
//! vocabulary, and properties (determinism, increments, minimums, scale, versions, monotony).

use std::sync::OnceLock;

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;
use crate::event::{Quantity, Usage};

const DEFAULT_TABLE: &str = include_str!("../../prices/default.toml");

fn table(source: &str) -> PriceTable {
    match check(source) {
        Ok(table) => table,
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("test table does not check:\n{}", lines.join("\n"));
        }
    }
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn usage<'a>(
    kind: &'a str,
    time: &str,
    attributes: &[(&'a str, &'a str)],
    quantity: Quantity,
) -> Usage<'a> {
    Usage {
        kind,
        time: at(time),
        attributes: attributes.to_vec(),
        quantity,
    }
}

const SECONDS: fn(u64) -> Quantity = Quantity::Seconds;

fn units(s: &str) -> Quantity {
    Quantity::Units(dec(s))
}

/// One rule per way of billing, plus specificity and outbound cases.
const EXAMPLES: &str = r#"
[[version]]
id = "v1"
effective_from = 2025-01-01T00:00:00Z

[[version.rule]]
id = "per-second"
kind = "call"
match = { channel = "sip" }
unit = "second"
credits_per_unit = "0.02"

[[version.rule]]
id = "per-started-minute"
kind = "call"
match = { channel = "phone" }
unit = "minute"
credits_per_unit = "1"
increment = 60

[[version.rule]]
id = "six-seconds"
kind = "call"
match = { channel = "web" }
unit = "minute"
credits_per_unit = "1"
increment = 6

[[version.rule]]
id = "six-seconds-min-30"
kind = "call"
match = { channel = "web", voice_tier = "premium" }
unit = "minute"
credits_per_unit = "1.5"
increment = 6
minimum = 30

[[version.rule]]
id = "outbound-whatsapp"
kind = "call"
match = { direction = "outbound", channel = "whatsapp" }
unit = "minute"
credits_per_unit = "0.5"
increment = 60

[[version.rule]]
id = "any-inbound"
kind = "call"
unit = "minute"
credits_per_unit = "3"
increment = 60

[[version.rule]]
id = "gpu-started-hour"
kind = "instance_hours"
match = { instance_type = "gpu.h100" }
unit = "hour"
credits_per_unit = "120"
increment = 3600

[[version.rule]]
id = "cpu-minute-pro-rata"
kind = "instance_hours"
match = { instance_type = "cpu.standard" }
unit = "hour"
credits_per_unit = "2"
increment = 60

[[version.rule]]
id = "chat"
kind = "chat_response"
match = { model = "gpt-4o-mini" }
unit = "response"
credits_per_unit = "1"

[[version.rule]]
id = "chat-premium"
kind = "chat_response"
match = { model = "gpt-4o-mini", voice_tier = "premium" }
unit = "response"
credits_per_unit = "1.5"

[[version.rule]]
id = "chat-gpt-4o"
kind = "chat_response"
match = { model = "gpt-4o" }
unit = "response"
credits_per_unit = "2"

[[version.rule]]
id = "analysis"
kind = "ai_analysis"
match = { model = "gemini-3-flash" }
unit = "analysis"
credits_per_unit = "0.5"

[[version.rule]]
id = "storage-half-units"
kind = "storage"
unit = "unit"
credits_per_unit = "0.1"
increment = "0.5"
minimum = "1"

[[version.rule]]
id = "tiny"
kind = "tiny"
match = { size = "half" }
unit = "unit"
credits_per_unit = "0.0000005"

[[version.rule]]
id = "tiny-below-half"
kind = "tiny"
match = { size = "less" }
unit = "unit"
credits_per_unit = "0.00000049"

[[version]]
id = "v2"
effective_from = 2026-07-01T00:00:00Z
effective_until = 2027-01-01T00:00:00Z

[[version.rule]]
id = "any-inbound"
kind = "call"
unit = "minute"
credits_per_unit = "4"
increment = 60

[[version.rule]]
id = "gpu-started-hour"
kind = "instance_hours"
match = { instance_type = "gpu.h100" }
unit = "hour"
credits_per_unit = "100"
increment = 3600

[[version.rule]]
id = "cpu-minute-pro-rata"
kind = "instance_hours"
match = { instance_type = "cpu.standard" }
unit = "hour"
credits_per_unit = "2"
increment = 60

[[version.rule]]
id = "chat"
kind = "chat_response"
unit = "response"
credits_per_unit = "1"

[[version.rule]]
id = "analysis"
kind = "ai_analysis"
unit = "analysis"
credits_per_unit = "0.5"

[[version.rule]]
id = "storage-half-units"
kind = "storage"
unit = "unit"
credits_per_unit = "0.1"

[[version.rule]]
id = "tiny"
kind = "tiny"
unit = "unit"
credits_per_unit = "0"
"#;

struct Case {
    name: &'static str,
    kind: &'static str,
    time: &'static str,
    attributes: &'static [(&'static str, &'static str)],
    quantity: Quantity,
    rule: &'static str,
    version: &'static str,
    credits: &'static str,
    billable_quantity: &'static str,
    billable_seconds: u64,
    unit: Unit,
}

const T1: &str = "2025-03-01T12:00:00Z";
const T2: &str = "2026-08-01T12:00:00Z";
const IN: (&str, &str) = ("direction", "inbound");
const OUT: (&str, &str) = ("direction", "outbound");

fn cases() -> Vec<Case> {
    let case = |name,
                kind,
                time,
                attributes,
                quantity,
                (rule, version),
                (credits, billable_quantity, billable_seconds),
                unit| Case {
        name,
        kind,
        time,
        attributes,
        quantity,
        rule,
        version,
        credits,
        billable_quantity,
        billable_seconds,
        unit,
    };
    vec![
        case(
            "per second",
            "call",
            T1,
            &[IN, ("channel", "sip")],
            SECONDS(61),
            ("per-second", "v1"),
            ("1.220000", "61.000000", 61),
            Unit::Second,
        ),
        case(
            "per started minute: 61 s is 2 minutes",
            "call",
            T1,
            &[IN, ("channel", "phone")],
            SECONDS(61),
            ("per-started-minute", "v1"),
            ("2.000000", "2.000000", 120),
            Unit::Minute,
        ),
        case(
            "per started minute: 60 s is 1 minute",
            "call",
            T1,
            &[IN, ("channel", "phone")],
            SECONDS(60),
            ("per-started-minute", "v1"),
            ("1.000000", "1.000000", 60),
            Unit::Minute,
        ),
        case(
            "per started minute: 1 s is 1 minute",
            "call",
            T1,
            &[IN, ("channel", "phone")],
            SECONDS(1),
            ("per-started-minute", "v1"),
            ("1.000000", "1.000000", 60),
            Unit::Minute,
        ),
        case(
            "6-second increments: 61 s bills 66 s = 1.1 minute",
            "call",
            T1,
            &[IN, ("channel", "web")],
            SECONDS(61),
            ("six-seconds", "v1"),
            ("1.100000", "1.100000", 66),
            Unit::Minute,
        ),
        case(
            "6-second increments, minimum 30 s: 5 s bills 30 s",
            "call",
            T1,
            &[IN, ("channel", "web"), ("voice_tier", "premium")],
            SECONDS(5),
            ("six-seconds-min-30", "v1"),
            ("0.750000", "0.500000", 30),
            Unit::Minute,
        ),
        case(
            "6-second increments, minimum 30 s: 31 s bills 36 s",
            "call",
            T1,
            &[IN, ("channel", "web"), ("voice_tier", "premium")],
            SECONDS(31),
            ("six-seconds-min-30", "v1"),
            ("0.900000", "0.600000", 36),
            Unit::Minute,
        ),
        case(
            "unanswered call: 0 s costs 0, no minimum",
            "call",
            T1,
            &[IN, ("channel", "web"), ("voice_tier", "premium")],
            SECONDS(0),
            ("six-seconds-min-30", "v1"),
            ("0.000000", "0.000000", 0),
            Unit::Minute,
        ),
        case(
            "catch-all inbound rule, other attributes ignored",
            "call",
            T1,
            &[IN, ("model", "x")],
            SECONDS(120),
            ("any-inbound", "v1"),
            ("6.000000", "2.000000", 120),
            Unit::Minute,
        ),
        case(
            "outbound call without an outbound rule is free",
            "call",
            T1,
            &[OUT, ("channel", "phone")],
            SECONDS(600),
            ("builtin:outbound-free", "v1"),
            ("0.000000", "0.000000", 0),
            Unit::Second,
        ),
        case(
            "outbound call ignores the catch-all rule",
            "call",
            T2,
            &[OUT],
            SECONDS(600),
            ("builtin:outbound-free", "v2"),
            ("0.000000", "0.000000", 0),
            Unit::Second,
        ),
        case(
            "outbound whatsapp is priced by an explicit rule",
            "call",
            T1,
            &[OUT, ("channel", "whatsapp")],
            SECONDS(61),
            ("outbound-whatsapp", "v1"),
            ("1.000000", "2.000000", 120),
            Unit::Minute,
        ),
        case(
            "instance per started hour",
            "instance_hours",
            T1,
            &[("instance_type", "gpu.h100")],
            SECONDS(3601),
            ("gpu-started-hour", "v1"),
            ("240.000000", "2.000000", 7200),
            Unit::Hour,
        ),
        case(
            "instance per started hour, new price in v2",
            "instance_hours",
            T2,
            &[("instance_type", "gpu.h100")],
            SECONDS(3600),
            ("gpu-started-hour", "v2"),
            ("100.000000", "1.000000", 3600),
            Unit::Hour,
        ),
        case(
            "instance per minute pro rata: 61 s bills 2 min",
            "instance_hours",
            T1,
            &[("instance_type", "cpu.standard")],
            SECONDS(61),
            ("cpu-minute-pro-rata", "v1"),
            ("0.066667", "0.033333", 120),
            Unit::Hour,
        ),
        case(
            "instance per minute pro rata: 90 min",
            "instance_hours",
            T1,
            &[("instance_type", "cpu.standard")],
            SECONDS(5400),
            ("cpu-minute-pro-rata", "v1"),
            ("3.000000", "1.500000", 5400),
            Unit::Hour,
        ),
        case(
            "chat: 1 credit per response",
            "chat_response",
            T1,
            &[("model", "gpt-4o-mini")],
            units("1"),
            ("chat", "v1"),
            ("1.000000", "1.000000", 0),
            Unit::Response,
        ),
        case(
            "chat: 3 responses",
            "chat_response",
            T1,
            &[("model", "gpt-4o-mini"), ("channel", "text")],
            units("3"),
            ("chat", "v1"),
            ("3.000000", "3.000000", 0),
            Unit::Response,
        ),
        case(
            "chat: premium voice 1.5",
            "chat_response",
            T1,
            &[
                ("model", "gpt-4o-mini"),
                ("voice_tier", "premium"),
                ("channel", "voice"),
            ],
            units("1"),
            ("chat-premium", "v1"),
            ("1.500000", "1.000000", 0),
            Unit::Response,
        ),
        case(
            "chat: gpt-4o 2",
            "chat_response",
            T1,
            &[("model", "gpt-4o")],
            units("2"),
            ("chat-gpt-4o", "v1"),
            ("4.000000", "2.000000", 0),
            Unit::Response,
        ),
        case(
            "metered kind priced by rules alone",
            "ai_analysis",
            T1,
            &[("model", "gemini-3-flash")],
            units("3"),
            ("analysis", "v1"),
            ("1.500000", "3.000000", 0),
            Unit::Analysis,
        ),
        case(
            "count increment 1 rounds 2.5 up to 3",
            "ai_analysis",
            T1,
            &[("model", "gemini-3-flash")],
            units("2.5"),
            ("analysis", "v1"),
            ("1.500000", "3.000000", 0),
            Unit::Analysis,
        ),
        case(
            "count increment 0.5: 2.3 bills 2.5",
            "storage",
            T1,
            &[],
            units("2.3"),
            ("storage-half-units", "v1"),
            ("0.250000", "2.500000", 0),
            Unit::Unit,
        ),
        case(
            "count minimum 1: 0.2 bills 1",
            "storage",
            T1,
            &[],
            units("0.2"),
            ("storage-half-units", "v1"),
            ("0.100000", "1.000000", 0),
            Unit::Unit,
        ),
        case(
            "count zero costs 0, no minimum",
            "storage",
            T1,
            &[],
            units("0"),
            ("storage-half-units", "v1"),
            ("0.000000", "0.000000", 0),
            Unit::Unit,
        ),
        case(
            "rounding: half a micro-credit rounds away from zero",
            "tiny",
            T1,
            &[("size", "half")],
            units("1"),
            ("tiny", "v1"),
            ("0.000001", "1.000000", 0),
            Unit::Unit,
        ),
        case(
            "rounding: below half a micro-credit rounds to zero",
            "tiny",
            T1,
            &[("size", "less")],
            units("1"),
            ("tiny-below-half", "v1"),
            ("0.000000", "1.000000", 0),
            Unit::Unit,
        ),
        case(
            "version boundary: first instant of v2",
            "call",
            "2026-07-01T00:00:00Z",
            &[IN],
            SECONDS(60),
            ("any-inbound", "v2"),
            ("4.000000", "1.000000", 60),
            Unit::Minute,
        ),
        case(
            "version boundary: last instant of v1",
            "call",
            "2026-06-30T23:59:59.999Z",
            &[IN],
            SECONDS(60),
            ("any-inbound", "v1"),
            ("3.000000", "1.000000", 60),
            Unit::Minute,
        ),
    ]
}

#[test]
fn exact_charges() {
    let table = table(EXAMPLES);
    for case in cases() {
        let usage = usage(case.kind, case.time, case.attributes, case.quantity);
        let charge = table
            .rate(&usage)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected = Charge {
            credits: dec(case.credits),
            billable_quantity: dec(case.billable_quantity),
            billable_seconds: case.billable_seconds,
            unit: case.unit,
            price_version: case.version,
            rule_id: case.rule,
        };
        assert_eq!(charge, expected, "{}", case.name);
        assert_eq!(charge.credits.to_string(), case.credits, "{}", case.name);
        assert_eq!(charge.credits.scale(), 6, "{}", case.name);
        assert_eq!(charge.billable_quantity.scale(), 6, "{}", case.name);
    }
}

#[test]
fn unpriced_usage() {
    let table = table(EXAMPLES);
    let cases: Vec<(Usage<'_>, UnpricedWhy)> = vec![
        (
            usage("call", "2024-12-31T23:59:59Z", &[IN], SECONDS(60)),
            UnpricedWhy::NoVersion,
        ),
        (
            usage("call", "2027-01-01T00:00:00Z", &[IN], SECONDS(60)),
            UnpricedWhy::NoVersion,
        ),
        (
            usage("call", "2024-12-31T23:59:59Z", &[OUT], SECONDS(60)),
            UnpricedWhy::NoVersion,
        ),
        (
            usage(
                "instance_hours",
                T1,
                &[("instance_type", "gpu.a10")],
                SECONDS(60),
            ),
            UnpricedWhy::NoRule {
                version: "v1".into(),
            },
        ),
        (
            usage("unknown_kind", T1, &[], units("1")),
            UnpricedWhy::NoRule {
                version: "v1".into(),
            },
        ),
        (
            usage(
                "chat_response",
                T1,
                &[("model", "gpt-4o-mini")],
                SECONDS(60),
            ),
            UnpricedWhy::WrongQuantity {
                version: "v1".into(),
                rule_id: "chat".into(),
                unit: Unit::Response,
            },
        ),
        (
            usage("call", T1, &[IN], units("1")),
            UnpricedWhy::WrongQuantity {
                version: "v1".into(),
                rule_id: "any-inbound".into(),
                unit: Unit::Minute,
            },
        ),
        (
            usage("storage", T1, &[], units("-1")),
            UnpricedWhy::NegativeQuantity {
                quantity: dec("-1"),
            },
        ),
    ];
    for (usage, why) in cases {
        let err = table.rate(&usage).unwrap_err();
        assert_eq!(err.why, why, "{usage:?}");
        assert_eq!(err.kind, usage.kind);
        assert_eq!(err.time, usage.time);
        assert_eq!(err.attributes.len(), usage.attributes.len());
    }
    let err = table
        .rate(&usage(
            "instance_hours",
            T1,
            &[("instance_type", "gpu.a10")],
            SECONDS(60),
        ))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unpriced instance_hours usage at 2025-03-01T12:00:00+00:00 with attributes \
         {instance_type = \"gpu.a10\"}: no rule of version `v1` matches"
    );
}

#[test]
fn overflow_is_unpriced_not_a_panic() {
    let table = table(
        r#"
[[version]]
id = "v"
effective_from = 2025-01-01T00:00:00Z
[[version.rule]]
id = "dear"
kind = "call"
unit = "second"
credits_per_unit = "10000000000000000000000"
increment = 7
"#,
    );
    let err = table
        .rate(&usage("call", T1, &[IN], SECONDS(u64::MAX)))
        .unwrap_err();
    assert!(matches!(err.why, UnpricedWhy::Overflow { .. }), "{err}");
    let err = table
        .rate(&usage("call", T1, &[IN], SECONDS(u64::MAX / 2)))
        .unwrap_err();
    assert!(matches!(err.why, UnpricedWhy::Overflow { .. }), "{err}");
}

#[test]
fn most_specific_rule_wins_whatever_the_file_order() {
    let source = |first: &str, second: &str| {
        format!(
            "[[version]]\nid = \"v\"\neffective_from = 2025-01-01T00:00:00Z\n{first}\n{second}\n"
        )
    };
    let general = "[[version.rule]]\nid = \"general\"\nkind = \"chat_response\"\nunit = \"response\"\ncredits_per_unit = \"1\"";
    let specific = "[[version.rule]]\nid = \"specific\"\nkind = \"chat_response\"\nmatch = { model = \"gpt-4o\", voice_tier = \"premium\" }\nunit = \"response\"\ncredits_per_unit = \"3\"";
    for source in [source(general, specific), source(specific, general)] {
        let table = table(&source);
        let premium = usage(
            "chat_response",
            T1,
            &[("voice_tier", "premium"), ("model", "gpt-4o")],
            units("1"),
        );
        assert_eq!(table.rate(&premium).unwrap().rule_id, "specific");
        let standard = usage("chat_response", T1, &[("model", "gpt-4o")], units("1"));
        assert_eq!(table.rate(&standard).unwrap().rule_id, "general");
    }
}

// ---------------------------------------------------------------------------------------
// The default table.

#[test]
fn default_table_checks_clean() {
    let table = table(DEFAULT_TABLE);
    let ids: Vec<&str> = table.versions().iter().map(PriceVersion::id).collect();
    assert_eq!(ids, ["2025-01", "2026-07"]);
}

#[test]
fn model_prices_of_the_shipped_table_in_force_from_july_2026() {
    let table = table(DEFAULT_TABLE);
    let v = table.version_at(at("2026-12-01T00:00:00Z")).unwrap();
    assert_eq!(v.id(), "2026-07");
    type Line<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str, Decimal);
    let got: Vec<Line<'_>> = v
        .model_prices()
        .into_iter()
        .map(|p| {
            (
                p.model,
                p.kind,
                p.other_conditions,
                p.unit.as_str(),
                p.credits_per_unit,
            )
        })
        .collect();
    let premium = || vec![("voice_tier", "premium")];
    // Read off prices/default.toml's 2026-07 version: every rule matching a model.
    assert_eq!(
        got,
        vec![
            (
                "claude-sonnet",
                "chat_response",
                vec![],
                "response",
                dec("1")
            ),
            (
                "claude-sonnet",
                "chat_response",
                premium(),
                "response",
                dec("1.5")
            ),
            (
                "gemini-3-flash",
                "ai_analysis",
                vec![],
                "analysis",
                dec("0.4")
            ),
            ("gpt-4o", "ai_analysis", vec![], "analysis", dec("2")),
            ("gpt-4o", "chat_response", vec![], "response", dec("1.8")),
            ("gpt-4o", "chat_response", premium(), "response", dec("2.3")),
            ("gpt-4o-mini", "chat_response", vec![], "response", dec("1")),
            (
                "gpt-4o-mini",
                "chat_response",
                premium(),
                "response",
                dec("1.5")
            ),
            ("image-v2", "media_generation", vec![], "image", dec("4")),
        ]
    );
    // Before July 2026 the first version's: Gemini analyses cost 0.5.
    let first = table.version_at(at("2026-06-30T23:59:59Z")).unwrap();
    let gemini = first
        .model_prices()
        .into_iter()
        .find(|p| p.model == "gemini-3-flash")
        .unwrap();
    assert_eq!(
        (gemini.credits_per_unit, gemini.unit, gemini.rule_id),
        (dec("0.5"), Unit::Analysis, "ai_analysis.gemini-3-flash")
    );
}

/// Every usage the shared vocabulary can produce, as (kind, attributes, quantity).
type Attributes = Vec<(&'static str, &'static str)>;

fn vocabulary() -> Vec<(&'static str, Attributes, Quantity)> {
    let mut out = Vec::new();
    for direction in ["inbound", "outbound"] {
        for channel in [None, Some("phone"), Some("web"), Some("whatsapp")] {
            for model in [None, Some("gpt-4o-mini")] {
                for voice_tier in [None, Some("standard"), Some("premium")] {
                    let mut attributes = vec![("direction", direction)];
                    attributes.extend(channel.map(|c| ("channel", c)));
                    attributes.extend(model.map(|m| ("model", m)));
                    attributes.extend(voice_tier.map(|v| ("voice_tier", v)));
                    for seconds in [0, 1, 59, 61, 3600] {
                        out.push(("call", attributes.clone(), Quantity::Seconds(seconds)));
                    }
                }
            }
        }
    }
    for model in ["gpt-4o-mini", "gpt-4o", "claude-sonnet"] {
        for voice_tier in [None, Some("standard"), Some("premium")] {
            for channel in [None, Some("text"), Some("voice")] {
                let mut attributes = vec![("model", model)];
                attributes.extend(voice_tier.map(|v| ("voice_tier", v)));
                attributes.extend(channel.map(|c| ("channel", c)));
                for responses in ["1", "2", "10000"] {
                    out.push(("chat_response", attributes.clone(), units(responses)));
                }
            }
        }
    }
    for instance_type in ["cpu.standard", "gpu.a10", "gpu.h100"] {
        for seconds in [0, 1, 3599, 3601, 86_400] {
            out.push((
                "instance_hours",
                vec![("instance_type", instance_type)],
                Quantity::Seconds(seconds),
            ));
        }
    }
    for model in ["gemini-3-flash", "gpt-4o"] {
        out.push(("ai_analysis", vec![("model", model)], units("1")));
        out.push(("ai_analysis", vec![("model", model)], units("2.5")));
    }
    out.push(("media_generation", vec![("model", "image-v2")], units("4")));
    out
}

#[test]
fn default_table_prices_the_whole_vocabulary() {
    let table = table(DEFAULT_TABLE);
    for time in [
        "2025-01-01T00:00:00Z",
        "2026-06-30T23:59:59Z",
        "2026-07-01T00:00:00Z",
        "2030-01-01T00:00:00Z",
    ] {
        for (kind, attributes, quantity) in vocabulary() {
            let usage = usage(kind, time, &attributes, quantity);
            let charge = table
                .rate(&usage)
                .unwrap_or_else(|e| panic!("default table: {e}"));
            assert!(charge.credits >= Decimal::ZERO);
            let outbound = attributes.contains(&("direction", "outbound"));
            if charge.rule_id == OUTBOUND_FREE_RULE_ID {
                assert!(outbound, "{usage:?}");
            }
            if !outbound && quantity != Quantity::Seconds(0) {
                assert!(
                    charge.credits > Decimal::ZERO,
                    "{usage:?} is free: {charge:?}"
                );
            }
        }
    }
}

#[test]
fn default_table_prices() {
    let table = table(DEFAULT_TABLE);
    // kind, time, attributes, quantity, rule, credits
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Quantity,
        &'a str,
        &'a str,
    );
    let cases: &[Case<'_>] = &[
        (
            "call",
            T1,
            &[IN, ("channel", "phone")],
            SECONDS(61),
            "call.inbound.phone",
            "2.000000",
        ),
        (
            "call",
            T2,
            &[IN, ("channel", "phone")],
            SECONDS(61),
            "call.inbound.phone",
            "2.400000",
        ),
        (
            "call",
            T1,
            &[IN, ("channel", "web")],
            SECONDS(61),
            "call.inbound.web",
            "0.880000",
        ),
        (
            "call",
            T1,
            &[IN, ("channel", "web")],
            SECONDS(10),
            "call.inbound.web",
            "0.400000",
        ),
        (
            "call",
            T1,
            &[IN, ("channel", "whatsapp")],
            SECONDS(61),
            "call.inbound.whatsapp",
            "0.813333",
        ),
        (
            "call",
            T1,
            &[IN, ("channel", "phone"), ("voice_tier", "premium")],
            SECONDS(30),
            "call.inbound.phone.premium",
            "1.500000",
        ),
        (
            "call",
            T1,
            &[IN, ("voice_tier", "premium")],
            SECONDS(30),
            "call.inbound.premium",
            "1.500000",
        ),
        ("call", T1, &[IN], SECONDS(0), "call.inbound", "0.000000"),
        (
            "call",
            T1,
            &[OUT, ("channel", "phone")],
            SECONDS(300),
            OUTBOUND_FREE_RULE_ID,
            "0.000000",
        ),
        (
            "call",
            T2,
            &[OUT, ("channel", "phone")],
            SECONDS(300),
            "call.outbound.phone",
            "2.500000",
        ),
        (
            "call",
            T1,
            &[OUT, ("channel", "whatsapp")],
            SECONDS(61),
            "call.outbound.whatsapp",
            "1.000000",
        ),
        (
            "chat_response",
            T1,
            &[("model", "gpt-4o-mini")],
            units("1"),
            "chat.gpt-4o-mini",
            "1.000000",
        ),
        (
            "chat_response",
            T1,
            &[
                ("model", "gpt-4o-mini"),
                ("voice_tier", "premium"),
                ("channel", "voice"),
            ],
            units("1"),
            "chat.gpt-4o-mini.premium",
            "1.500000",
        ),
        (
            "chat_response",
            T1,
            &[("model", "gpt-4o")],
            units("1"),
            "chat.gpt-4o",
            "2.000000",
        ),
        (
            "chat_response",
            T2,
            &[("model", "gpt-4o")],
            units("1"),
            "chat.gpt-4o",
            "1.800000",
        ),
        (
            "instance_hours",
            T1,
            &[("instance_type", "cpu.standard")],
            SECONDS(90 * 60 + 1),
            "instance.cpu.standard",
            "3.033333",
        ),
        (
            "instance_hours",
            T1,
            &[("instance_type", "gpu.h100")],
            SECONDS(3601),
            "instance.gpu.h100",
            "240.000000",
        ),
        (
            "instance_hours",
            T2,
            &[("instance_type", "gpu.a10")],
            SECONDS(60),
            "instance.gpu.a10",
            "25.000000",
        ),
        (
            "ai_analysis",
            T1,
            &[("model", "gemini-3-flash")],
            units("1"),
            "ai_analysis.gemini-3-flash",
            "0.500000",
        ),
        (
            "ai_analysis",
            T2,
            &[("model", "gemini-3-flash")],
            units("1"),
            "ai_analysis.gemini-3-flash",
            "0.400000",
        ),
        (
            "media_generation",
            T1,
            &[("model", "image-v2")],
            units("3"),
            "media_generation.image-v2",
            "12.000000",
        ),
    ];
    for (kind, time, attributes, quantity, rule, credits) in cases {
        let charge = table
            .rate(&usage(kind, time, attributes, *quantity))
            .unwrap();
        assert_eq!(
            (charge.rule_id, charge.credits.to_string().as_str()),
            (*rule, *credits),
            "{kind} {attributes:?} {quantity:?} at {time}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Properties, on generated one-rule tables (rendered as TOML and checked, so the parser is
// exercised too).

#[derive(Debug, Clone)]
struct GenRule {
    unit: Unit,
    credits_per_unit: Decimal,
    increment: Decimal,
    minimum: Decimal,
}

impl GenRule {
    fn kind(&self) -> &'static str {
        if self.unit.is_time() {
            "call"
        } else {
            "metered"
        }
    }

    fn source(&self) -> String {
        format!(
            "[[version]]\nid = \"v\"\neffective_from = 2025-01-01T00:00:00Z\n\n\
             [[version.rule]]\nid = \"r\"\nkind = \"{}\"\nunit = \"{}\"\n\
             credits_per_unit = \"{}\"\nincrement = \"{}\"\nminimum = \"{}\"\n",
            self.kind(),
            self.unit,
            self.credits_per_unit,
            self.increment,
            self.minimum
        )
    }

    fn quantity(&self, q: u64, scale: u32) -> Quantity {
        if self.unit.is_time() {
            Quantity::Seconds(q)
        } else {
            Quantity::Units(Decimal::new(q as i64, scale))
        }
    }
}

fn arb_decimal(max_mantissa: i64, max_scale: u32) -> impl Strategy<Value = Decimal> {
    (0..=max_mantissa, 0..=max_scale).prop_map(|(m, s)| Decimal::new(m, s))
}

fn arb_rule() -> impl Strategy<Value = GenRule> {
    let time = (
        prop::sample::select(vec![Unit::Second, Unit::Minute, Unit::Hour]),
        prop_oneof![
            prop::sample::select(vec![1u64, 6, 30, 60, 3600]),
            1u64..=7200
        ],
    )
        .prop_map(|(unit, increment)| (unit, Decimal::from(increment)));
    let count = (
        prop::sample::select(vec![Unit::Response, Unit::Unit, Unit::Image]),
        prop_oneof![
            Just(Decimal::ONE),
            (1i64..=1_000_000, 0u32..=6).prop_map(|(m, s)| Decimal::new(m, s)),
        ],
    );
    (
        prop_oneof![time, count],
        arb_decimal(100_000_000, 6),
        0u32..=5,
    )
        .prop_map(
            |((unit, increment), credits_per_unit, minimum_increments)| GenRule {
                unit,
                credits_per_unit,
                increment: increment.normalize(),
                minimum: (increment * Decimal::from(minimum_increments)).normalize(),
            },
        )
}

fn quantity_decimal(q: Quantity) -> Decimal {
    match q {
        Quantity::Seconds(s) => Decimal::from(s),
        Quantity::Units(u) => u,
    }
}

fn rate_one(table: &PriceTable, rule: &GenRule, quantity: Quantity) -> Charge<'static> {
    let usage = Usage {
        kind: rule.kind(),
        time: at(T1),
        attributes: vec![("direction", "inbound")],
        quantity,
    };
    let charge = table
        .rate(&usage)
        .expect("one catch-all rule prices everything");
    Charge {
        price_version: "v",
        rule_id: "r",
        ..charge
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn rating_respects_increment_minimum_and_scale(
        rule in arb_rule(),
        q in 0u64..=10_000_000,
        scale in 0u32..=4,
    ) {
        let source = rule.source();
        let table = table(&source);
        let quantity = rule.quantity(q, scale);
        let charge = rate_one(&table, &rule, quantity);

        // Deterministic, also across re-parsing the same table.
        prop_assert_eq!(charge, rate_one(&table, &rule, quantity));
        prop_assert_eq!(charge, rate_one(&super::check(&source).unwrap(), &rule, quantity));

        prop_assert!(charge.credits >= Decimal::ZERO);
        prop_assert_eq!(charge.credits.scale(), 6);
        prop_assert_eq!(charge.billable_quantity.scale(), 6);
        prop_assert_eq!(charge.unit, rule.unit);

        // Billed measure: seconds for time units, units for count units.
        let billed = match rule.unit.seconds() {
            Some(_) => Decimal::from(charge.billable_seconds),
            None => {
                prop_assert_eq!(charge.billable_seconds, 0);
                charge.billable_quantity
            }
        };
        let measured = quantity_decimal(quantity);
        if measured.is_zero() {
            prop_assert!(billed.is_zero());
            prop_assert!(charge.credits.is_zero());
        } else {
            prop_assert!((billed % rule.increment).is_zero(), "{} not a multiple of {}", billed, rule.increment);
            prop_assert!(billed >= rule.minimum);
            prop_assert!(billed >= measured);
            prop_assert!(billed - measured < rule.increment || billed == rule.minimum);
        }
        // Credits: billed quantity in the unit x price, rounded half away from zero.
        let per_unit = Decimal::from(rule.unit.seconds().unwrap_or(1));
        let exact = billed * rule.credits_per_unit / per_unit;
        prop_assert_eq!(charge.credits, crate::credits::fixed(exact));
    }

    #[test]
    fn rating_is_monotone_in_quantity(
        rule in arb_rule(),
        a in 0u64..=10_000_000,
        b in 0u64..=10_000_000,
        scale in 0u32..=4,
    ) {
        let table = table(&rule.source());
        let (small, large) = (a.min(b), a.max(b));
        let low = rate_one(&table, &rule, rule.quantity(small, scale));
        let high = rate_one(&table, &rule, rule.quantity(large, scale));
        prop_assert!(low.credits <= high.credits);
        prop_assert!(low.billable_quantity <= high.billable_quantity);
        prop_assert!(low.billable_seconds <= high.billable_seconds);
    }

    #[test]
    fn the_version_in_force_prices(
        gaps_seconds in prop::collection::vec(1i64..=400 * 86_400, 1..6),
        until_after_seconds in prop::option::of(1i64..=400 * 86_400),
        offset_seconds in -100 * 86_400i64..=3000 * 86_400,
    ) {
        let start = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let mut froms = Vec::new();
        let mut from = start;
        for gap in &gaps_seconds {
            froms.push(from);
            from += Duration::seconds(*gap);
        }
        let until = until_after_seconds.map(|s| *froms.last().unwrap() + Duration::seconds(s));
        let mut source = String::new();
        for (i, from) in froms.iter().enumerate() {
            source += &format!(
                "[[version]]\nid = \"v{i}\"\neffective_from = {}\n",
                from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            if let (Some(until), true) = (until, i + 1 == froms.len()) {
                source += &format!(
                    "effective_until = \"{}\"\n",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
            }
            source += &format!(
                "[[version.rule]]\nid = \"r{i}\"\nkind = \"metered\"\nunit = \"unit\"\ncredits_per_unit = \"{}\"\n",
                i + 1
            );
        }
        let table = table(&source);
        let time = start + Duration::seconds(offset_seconds);
        let expected = froms
            .iter()
            .rposition(|from| *from <= time)
            .filter(|_| until.is_none_or(|until| time < until));
        let usage = Usage { kind: "metered", time, attributes: vec![], quantity: Quantity::Units(Decimal::ONE) };
        match (table.rate(&usage), expected) {
            (Ok(charge), Some(i)) => {
                prop_assert_eq!(charge.price_version, format!("v{i}"));
                prop_assert_eq!(charge.rule_id, format!("r{i}"));
                prop_assert_eq!(charge.credits, crate::credits::fixed(Decimal::from(i + 1)));
                let id = format!("v{i}");
                prop_assert_eq!(table.version_at(time).map(PriceVersion::id), Some(id.as_str()));
            }
            (Err(e), None) => prop_assert_eq!(e.why, UnpricedWhy::NoVersion),
            (got, expected) => prop_assert!(false, "got {:?}, expected version {:?}", got, expected),
        }
    }
}

fn arb_wide_rule() -> impl Strategy<Value = GenRule> {
    (arb_rule(), 0i64..=1_000_000_000_000, 0u32..=12).prop_map(|(rule, mantissa, scale)| GenRule {
        credits_per_unit: Decimal::new(mantissa, scale),
        ..rule
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The integer fast path gives exactly what `Decimal` arithmetic gives, as long as the
    /// latter is exact (results within its 28 significant digits; beyond, only the integer
    /// path is).
    #[test]
    fn integer_billing_matches_decimal_billing(
        rule in arb_wide_rule(),
        q in prop_oneof![0u64..=100_000, 0u64..=1_000_000_000],
        scale in 0u32..=10,
    ) {
        let table = table(&rule.source());
        let price_rule = &table.versions()[0].rules()[0];
        let quantity = rule.quantity(q, scale);
        prop_assert_eq!(
            super::rate::bill(price_rule, quantity),
            super::rate::bill_decimal(price_rule, quantity)
        );
    }

    /// Absurd quantities and prices give a charge or `Overflow`, never a panic.
    #[test]
    fn huge_amounts_never_panic(
        rule in arb_wide_rule(),
        mantissa in any::<i64>(),
        q in any::<u64>(),
        scale in 0u32..=28,
    ) {
        let rule = GenRule { credits_per_unit: Decimal::new(mantissa.saturating_abs(), scale.min(12)), ..rule };
        let table = table(&rule.source());
        let quantity = match rule.quantity(q, 0) {
            Quantity::Units(_) => Quantity::Units(Decimal::from_i128_with_scale(i128::from(q) << 30, scale)),
            seconds => seconds,
        };
        let usage = Usage { kind: rule.kind(), time: at(T1), attributes: vec![], quantity };
        match table.rate(&usage) {
            Ok(charge) => prop_assert_eq!(charge.credits.scale(), 6),
            Err(e) => prop_assert!(matches!(e.why, UnpricedWhy::Overflow { .. }), "{}", e),
        }
    }
}

static DEFAULT: OnceLock<PriceTable> = OnceLock::new();
static EXAMPLE: OnceLock<PriceTable> = OnceLock::new();

fn cached(cell: &'static OnceLock<PriceTable>, source: &str) -> &'static PriceTable {
    cell.get_or_init(|| table(source))
}

fn arb_attributes() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    let key = prop::sample::select(vec![
        "direction",
        "channel",
        "model",
        "voice_tier",
        "instance_type",
        "size",
        "other",
    ]);
    let value = prop::sample::select(vec![
        "inbound",
        "outbound",
        "phone",
        "web",
        "whatsapp",
        "sip",
        "gpt-4o",
        "gpt-4o-mini",
        "claude-sonnet",
        "premium",
        "standard",
        "gpu.h100",
        "cpu.standard",
        "half",
        "less",
        "",
    ]);
    prop::collection::vec((key, value), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Matching by compiled ids finds the rule string comparison finds.
    #[test]
    fn compiled_matching_agrees_with_string_matching(
        attributes in arb_attributes(),
        outbound in any::<bool>(),
    ) {
        for table in [cached(&DEFAULT, DEFAULT_TABLE), cached(&EXAMPLE, EXAMPLES)] {
            for version in table.versions() {
                for index in &version.index {
                    let compiled = index.find(&version.rules, &attributes, outbound).map(PriceRule::id);
                    let strings = index.find_by_strings(&version.rules, &attributes, outbound).map(PriceRule::id);
                    prop_assert_eq!(compiled, strings, "{} {:?}", index.kind, attributes);
                }
            }
        }
    }
}

#[test]
fn a_cover_is_the_longest_usage_the_credits_pay_for() {
    let t = table(EXAMPLES);
    let now = at("2025-06-01T00:00:00Z");
    // 1 credit per started minute: 10.5 credits pay for 10 minutes (600 s); 601 s would
    // bill 11 minutes.
    let c = t
        .cover("call", &[("channel", "phone")], now, dec("10.5"))
        .unwrap();
    assert_eq!(
        (c.seconds, c.units, c.rule_id),
        (Some(600), None, "per-started-minute")
    );
    // 1.5 per minute in 6 s increments, 30 s minimum: 1 credit pays for 36 s (0.15 per 6 s);
    // 0.5 credits do not reach the 30 s minimum (0.75). 36 s cost 0.9, 42 s 1.05.
    let premium = [("channel", "web"), ("voice_tier", "premium")];
    let c = t.cover("call", &premium, now, dec("1")).unwrap();
    assert_eq!(c.seconds, Some(36));
    let c = t.cover("call", &premium, now, dec("0.5")).unwrap();
    assert!(c.is_nothing());
    // 1 credit per response: 2.5 credits pay for 2 responses.
    let c = t
        .cover(
            "chat_response",
            &[("model", "gpt-4o-mini")],
            now,
            dec("2.5"),
        )
        .unwrap();
    assert_eq!((c.seconds, c.units), (None, Some(2)));
    // Free usage (outbound, no rule): the longest usage there is.
    let c = t
        .cover("call", &[("direction", "outbound")], now, dec("1"))
        .unwrap();
    assert_eq!(c.seconds, Some(MAX_COVER_SECONDS));
    assert!(t.cover("nothing", &[], now, dec("1")).is_err());
    assert_eq!(
        t.charge_seconds("call", &[("channel", "phone")], now, 61)
            .unwrap(),
        dec("2")
    );
}
