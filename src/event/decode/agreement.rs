//! Fuzz-style tests that the fast path (`fast`, the scanner) and the serde path decode every
//! message to the same outcome: the same event, or the same rejection (reason, field and
//! detail). Messages are the corpus files and demo records, mutated at random (seeded, so a
//! failure reproduces): members replaced, removed, repeated, renamed or moved, values swapped
//! for awkward JSON, whitespace varied, bytes flipped, inserted, deleted or cut.

use super::*;
use chrono::TimeZone;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 15, 12, 0, 0).unwrap()
}

type Outcome<'a> = Result<Event<'a>, Rejection>;

/// Both paths' outcomes for `bytes`, and whether the scanner read the envelope itself.
fn both(bytes: &[u8]) -> (Outcome<'_>, Outcome<'_>, bool) {
    let limits = DecodeLimits::default();
    let fast = decode_with(bytes, now(), &limits, true);
    let slow = decode_with(bytes, now(), &limits, false);
    let scanned = bytes.len() <= limits.max_message_bytes
        && std::str::from_utf8(bytes).is_ok_and(|text| {
            text.trim_start_matches(|c: char| c.is_ascii_whitespace())
                .starts_with('{')
                && fast::read_envelope(text, &mut RawEnvelope::default()).is_some()
        });
    (fast, slow, scanned)
}

/// The corpus files (valid and invalid) and a few hundred demo records, malformed ones
/// included.
fn seeds() -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut out = Vec::new();
    for dir in ["valid", "invalid"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        out.extend(paths.iter().map(|p| std::fs::read(p).unwrap()));
    }
    let demo = crate::demo::generate(&crate::demo::DemoConfig {
        seed: 11,
        accounts: 20,
        events: 400,
        start: now() - chrono::Duration::days(2),
        end: now() - chrono::Duration::hours(1),
        duplicate_every: 0,
        malformed_every: 4,
    });
    out.extend(demo.into_iter().map(|r| r.payload));
    out
}

/// An object's members in wire order: (key, raw JSON value). `None` if `json` is no object.
fn members(json: &str) -> Option<Vec<(String, String)>> {
    struct Members;
    impl<'de> de::Visitor<'de> for Members {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                let value = map.next_value::<&RawValue>()?;
                out.push((key, value.get().to_owned()));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    de.deserialize_map(Members).ok()
}

/// Awkward values: every JSON type, numbers at the edges of what the scanner reads, escapes,
/// non-ASCII, deep nesting, and plausible values of the wrong field.
fn value_pool() -> Vec<String> {
    let mut pool: Vec<String> = [
        "null",
        "true",
        "false",
        "0",
        "-0",
        "1",
        "-1",
        "7",
        "45",
        "100",
        "10000",
        "10001",
        "2147483648",
        "-2147483649",
        "123456789012345678",
        "999999999999999999",
        "9999999999999999999",
        "-9999999999999999999",
        "-123456789012345678",
        "1234567890123456789",
        "12345678901234567890",
        "1.5",
        "1.0",
        "-0.0",
        "0.000000000000000001",
        "1e3",
        "1E3",
        "2.5e-3",
        "01",
        "-01",
        "00",
        ".5",
        "-",
        "1.",
        "1.e3",
        "+1",
        "1_0",
        "0x10",
        "nul",
        "nulll",
        "True",
        "\"\"",
        "\"x\"",
        "\"1\"",
        "\"2.5\"",
        "\"0\"",
        "\"-1\"",
        "\"inbound\"",
        "\"outbound\"",
        "\"phone\"",
        "\"gpt-4o\"",
        "\"standard\"",
        "\"top_up\"",
        "\"bill_overage\"",
        "\"ai_analysis\"",
        "\"1.0\"",
        "\"2025-06-15T10:00:00Z\"",
        "\"2025-06-15T10:00:12.123+02:00\"",
        "\"2025-06-15T11:00:00Z\"",
        "\"2999-01-01T00:00:00Z\"",
        "\"application/json\"",
        "\"application/json; charset=utf-8\"",
        "\"text/plain\"",
        "\"acct-0001\"",
        "\"a b\"",
        "\"é\"",
        "\"\\u00e9\"",
        "\"a\\\"b\"",
        "\"a\\\\b\"",
        "\"\\n\"",
        "\"\\ud800\"",
        "\"\u{1F600}\"",
        // Refused in ids and attribute values: escaped, and raw where JSON allows it.
        "\"p\\u0000oison\"",
        "\"a\\u001fb\"",
        "\"a\u{7f}b\"",
        "\"a\\u007fb\"",
        "\"\u{202e}gpt\"",
        "\"x\\u2066\"",
        "\"x\u{2069}\"",
        "\"application/json;\u{202a}\"",
        "[]",
        "[1]",
        "[50,80,100]",
        "[0]",
        "[1,]",
        "[\"x\"]",
        "[null]",
        "{}",
        "{\"model\":\"gpt-4o\"}",
        "{\"a\":\"b\",\"a\":\"c\"}",
        "{\"A\":\"b\"}",
        "{\"model\":1}",
        "{\"model\":null}",
        "{\"a\":{\"b\":[1,{\"c\":null}],\"d\":-0.5}}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    pool.extend(
        EventKind::ALL
            .iter()
            .map(|k| format!("\"{}\"", k.event_type())),
    );
    for depth in [10, 31, 32, 33, 40, 127, 130] {
        pool.push(format!("{}1{}", "[".repeat(depth), "]".repeat(depth)));
        pool.push(format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)));
    }
    pool
}

/// Keys to insert or rename to: every attribute the decoder knows, and a few it does not.
const KEY_POOL: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
    "call_id",
    "direction",
    "channel",
    "model",
    "voice_tier",
    "started_at",
    "answered_at",
    "ended_at",
    "hold_seconds",
    "hold_id",
    "conversation_id",
    "responses",
    "instance_id",
    "instance_type",
    "kind",
    "quantity",
    "attributes",
    "grant_id",
    "credits",
    "expires_at",
    "priority",
    "plan_id",
    "monthly_allowance",
    "billing_day",
    "overage_policy",
    "top_up_validity_months",
    "low_balance_credits",
    "low_balance_percent",
    "allowance_alert_percents",
    "recharge_threshold_credits",
    "recharge_credits",
    "traceparent",
    "x",
    "Type",
    "",
];

/// Whitespace between tokens: mostly none (as producers write), sometimes pretty, rarely a
/// form feed, which JSON does not allow.
fn ws(rng: &mut SmallRng) -> &'static str {
    match rng.gen_range(0..40) {
        0..=27 => "",
        28..=31 => " ",
        32..=34 => "\n  ",
        35 => "\t",
        36 => "\r\n",
        37 => "  \n\t ",
        38 => " \r",
        _ => "\x0C",
    }
}

fn write_object(members: &[(String, String)], rng: &mut SmallRng) -> String {
    let mut out = format!("{{{}", ws(rng));
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push_str(ws(rng));
            out.push(',');
            out.push_str(ws(rng));
        }
        // Keys are written raw (they may hold an escape on purpose).
        out.push_str(key);
        out.push_str(ws(rng));
        out.push(':');
        out.push_str(ws(rng));
        out.push_str(value);
    }
    out.push_str(ws(rng));
    out.push('}');
    out
}

/// One structural change to an object's members (keys already JSON-quoted).
fn mutate_members(members: &mut Vec<(String, String)>, pool: &[String], rng: &mut SmallRng) {
    let quote = |k: &str| serde_json::to_string(k).unwrap();
    let n = members.len();
    match rng.gen_range(0..10) {
        0..=2 if n > 0 => {
            let i = rng.gen_range(0..n);
            members[i].1 = if rng.gen_bool(0.8) {
                pool[rng.gen_range(0..pool.len())].clone()
            } else {
                members[rng.gen_range(0..n)].1.clone()
            };
        }
        3 if n > 0 => {
            members.remove(rng.gen_range(0..n));
        }
        4 if n > 0 => {
            let copy = members[rng.gen_range(0..n)].clone();
            members.insert(rng.gen_range(0..=n), copy);
        }
        5 => {
            let key = quote(KEY_POOL[rng.gen_range(0..KEY_POOL.len())]);
            let value = pool[rng.gen_range(0..pool.len())].clone();
            members.insert(rng.gen_range(0..=n), (key, value));
        }
        6 if n > 0 => {
            let i = rng.gen_range(0..n);
            members[i].0 = match rng.gen_range(0..4) {
                0 => quote(KEY_POOL[rng.gen_range(0..KEY_POOL.len())]),
                // The same key, spelled with an escape.
                1 => members[i].0.replacen('t', "\\u0074", 1),
                2 => members[i].0.to_uppercase(),
                _ => format!("{} ", &members[i].0[..members[i].0.len() - 1]) + "\"",
            };
        }
        7 if n > 1 => {
            let m = members.remove(rng.gen_range(0..n));
            members.insert(rng.gen_range(0..n), m);
        }
        _ => {}
    }
}

/// Bytes that matter to a JSON reader, and some that are not ASCII or not UTF-8.
const BYTE_POOL: &[u8] = b"\"\\{}[]:,0123456789-+.eEtfnul \n\t\rax\x00\x1f\x7f\x0c";

fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut SmallRng) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    let at = rng.gen_range(0..n);
    let pick = |rng: &mut SmallRng| match rng.gen_range(0..10) {
        0 => [0x80, 0xc3, 0xe2, 0xff][rng.gen_range(0..4)],
        _ => BYTE_POOL[rng.gen_range(0..BYTE_POOL.len())],
    };
    match rng.gen_range(0..6) {
        0 => bytes[at] = pick(rng),
        1 => {
            let b = pick(rng);
            bytes.insert(at, b);
        }
        2 => {
            let end = (at + rng.gen_range(1..8)).min(n);
            bytes.drain(at..end);
        }
        3 => {
            let end = (at + rng.gen_range(1..24)).min(n);
            let piece = bytes[at..end].to_vec();
            let to = rng.gen_range(0..=n);
            bytes.splice(to..to, piece);
        }
        4 => bytes.truncate(at),
        _ => {
            let snippet: &[u8] = [
                &b"\\u0041"[..],
                b"\\n",
                b"null",
                b"-0",
                b"1e3",
                b".5",
                b"{}",
                b"[]",
                "é".as_bytes(),
                b"\"\"",
                b",\"x\":1",
            ][rng.gen_range(0..11)];
            bytes.splice(at..at, snippet.iter().copied());
        }
    }
}

/// Mutates `seed` by a few structural changes (to the envelope or to `data`) and,
/// sometimes, a few byte-level ones.
fn mutate(seed: &[u8], pool: &[String], rng: &mut SmallRng) -> Vec<u8> {
    let text = std::str::from_utf8(seed).ok();
    let mut out = match text.and_then(members) {
        Some(envelope) if rng.gen_bool(0.85) => {
            let quote = |k: &str| serde_json::to_string(k).unwrap();
            let mut envelope: Vec<(String, String)> =
                envelope.into_iter().map(|(k, v)| (quote(&k), v)).collect();
            for _ in 0..rng.gen_range(0..3) {
                if rng.gen_bool(0.5) {
                    mutate_members(&mut envelope, pool, rng);
                } else if let Some((_, data)) = envelope.iter_mut().find(|(k, _)| k == "\"data\"") {
                    if let Some(fields) = members(data) {
                        let mut fields: Vec<(String, String)> =
                            fields.into_iter().map(|(k, v)| (quote(&k), v)).collect();
                        mutate_members(&mut fields, pool, rng);
                        *data = write_object(&fields, rng);
                    }
                }
            }
            write_object(&envelope, rng).into_bytes()
        }
        _ => seed.to_vec(),
    };
    if rng.gen_bool(0.3) {
        for _ in 0..rng.gen_range(1..4) {
            mutate_bytes(&mut out, rng);
        }
    }
    out
}

#[test]
fn the_scanner_reads_the_usual_messages() {
    // Compact, in the usual order: every valid demo record is read by the scanner.
    let demo = crate::demo::generate(&crate::demo::DemoConfig {
        seed: 5,
        accounts: 10,
        events: 300,
        start: now() - chrono::Duration::days(2),
        end: now() - chrono::Duration::hours(1),
        duplicate_every: 0,
        malformed_every: 0,
    });
    for record in &demo {
        let (fast, slow, scanned) = both(&record.payload);
        assert!(scanned, "{}", String::from_utf8_lossy(&record.payload));
        assert!(fast.is_ok());
        assert_eq!(fast, slow);
    }
    // Pretty-printed corpus files too, unless `data` comes before `type`.
    let mut read = 0;
    for seed in seeds() {
        let (fast, slow, scanned) = both(&seed);
        assert_eq!(fast, slow, "{}", String::from_utf8_lossy(&seed));
        read += usize::from(scanned);
    }
    assert!(read >= 50, "only {read} seeds read by the scanner");
}

#[test]
fn fast_and_serde_paths_agree_on_mutated_messages() {
    let seeds = seeds();
    let pool = value_pool();
    let (mut scanned_ok, mut scanned_rejected, mut cases) = (0, 0, 0);
    for round in 0..12_000u64 {
        let mut rng = SmallRng::seed_from_u64(round);
        let seed = &seeds[rng.gen_range(0..seeds.len())];
        let message = mutate(seed, &pool, &mut rng);
        let (fast, slow, scanned) = both(&message);
        assert_eq!(
            fast,
            slow,
            "round {round}: {:?}",
            String::from_utf8_lossy(&message)
        );
        cases += 1;
        match (scanned, &fast) {
            (true, Ok(_)) => scanned_ok += 1,
            (true, Err(_)) => scanned_rejected += 1,
            _ => {}
        }
    }
    // The fast path was exercised both ways, not just skipped.
    assert!(
        scanned_ok > cases / 20 && scanned_rejected > cases / 20,
        "of {cases}: {scanned_ok} read by the scanner and accepted, {scanned_rejected} rejected"
    );
}

/// One compact record of each event type, in the usual attribute order.
fn one_of_each_type() -> Vec<Vec<u8>> {
    let demo = crate::demo::generate(&crate::demo::DemoConfig {
        seed: 7,
        accounts: 5,
        events: 200,
        start: now() - chrono::Duration::days(2),
        end: now() - chrono::Duration::hours(1),
        duplicate_every: 0,
        malformed_every: 0,
    });
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut seen = Vec::new();
    for record in demo {
        let event_type = decode(&record.payload, now(), &DecodeLimits::default())
            .unwrap()
            .envelope
            .event_type
            .into_owned();
        if !seen.contains(&event_type) {
            seen.push(event_type);
            out.push(record.payload);
        }
    }
    assert_eq!(out.len(), 6, "{seen:?}");
    out
}

/// Every value of the pool in place of every attribute, and every key of the pool at every
/// position, in the envelope and in `data`.
#[test]
fn fast_and_serde_paths_agree_on_every_value_in_every_place() {
    let pool = value_pool();
    let quote = |k: &str| serde_json::to_string(k).unwrap();
    let check = |envelope: &[(String, String)]| {
        let mut out = String::from("{");
        for (i, (k, v)) in envelope.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!("{k}:{v}"));
        }
        out.push('}');
        let (fast, slow, _) = both(out.as_bytes());
        assert_eq!(fast, slow, "{out}");
    };
    for base in one_of_each_type() {
        let envelope: Vec<(String, String)> = members(std::str::from_utf8(&base).unwrap())
            .unwrap()
            .into_iter()
            .map(|(k, v)| (quote(&k), v))
            .collect();
        let at_data = envelope.iter().position(|(k, _)| k == "\"data\"").unwrap();
        let data: Vec<(String, String)> = members(&envelope[at_data].1)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (quote(&k), v))
            .collect();
        let with_data = |fields: &[(String, String)]| {
            let mut e = envelope.clone();
            e[at_data].1 = format!(
                "{{{}}}",
                fields
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            e
        };
        for value in &pool {
            // As an extension attribute, first and last.
            for at in [0, envelope.len()] {
                let mut e = envelope.clone();
                e.insert(at, ("\"ext\"".to_owned(), value.clone()));
                check(&e);
            }
            for i in 0..envelope.len() {
                let mut e = envelope.clone();
                e[i].1 = value.clone();
                check(&e);
            }
            for i in 0..data.len() {
                let mut d = data.clone();
                d[i].1 = value.clone();
                check(&with_data(&d));
            }
        }
        for key in KEY_POOL {
            for value in ["null", "\"x\"", "1", "{}"] {
                for i in 0..=envelope.len() {
                    let mut e = envelope.clone();
                    e.insert(i, (quote(key), value.to_owned()));
                    check(&e);
                }
                for i in 0..=data.len() {
                    let mut d = data.clone();
                    d.insert(i, (quote(key), value.to_owned()));
                    check(&with_data(&d));
                }
            }
        }
    }
}

/// Control characters, quotes and backslashes at every offset of a string, near the end of
/// the message too (where the scanner reads byte by byte rather than eight at a time).
#[test]
fn fast_and_serde_paths_agree_on_special_bytes_in_strings() {
    let base = &one_of_each_type()[0];
    let body = std::str::from_utf8(&base[..base.len() - 1]).unwrap();
    let specials = (0u8..0x20)
        .chain([b'"', b'\\', 0x7f])
        .map(|b| (b as char).to_string())
        .chain(["\\n", "\\u0041", "\\\"", "é", "\\x"].map(String::from));
    for special in specials {
        for before in 0..12 {
            for after in 0..12 {
                let s = format!("{}{special}{}", "a".repeat(before), "b".repeat(after));
                for message in [
                    format!("{body},\"ext\":\"{s}\"}}"),
                    format!("{body},\"ext\":\"{s}\" }}"),
                    format!("{body},\"ext\":[\"{s}\"]}}"),
                    format!("{body},\"{s}\":1}}"),
                ] {
                    let (fast, slow, _) = both(message.as_bytes());
                    assert_eq!(fast, slow, "{message:?}");
                }
            }
        }
    }
}

/// A 19-digit integer: the scanner gives up (it counted the digit before multiplying, so no
/// overflow panic in debug builds) and serde_json names the field.
#[test]
fn nineteen_digits_leave_the_scanner_without_overflow() {
    // serde_json reads a positive integer beyond i64 as a u64 (not an i64: invalid value), a
    // negative one as a float (wrong type); 10^18 fits but is outside 1..=10000.
    for (digits, reason) in [
        ("9999999999999999999", Reason::InvalidValue),
        ("-9999999999999999999", Reason::WrongType),
        ("1000000000000000000", Reason::InvalidValue),
    ] {
        let message = format!(
            r#"{{"specversion":"1.0","id":"e","source":"s","type":"tally.usage.chat_response.v1","subject":"a","time":"2025-06-15T11:00:00Z","data":{{"conversation_id":"c","model":"m","responses":{digits}}}}}"#
        );
        assert!(fast::read_envelope(&message, &mut RawEnvelope::default()).is_none());
        let (fast, slow, scanned) = both(message.as_bytes());
        assert!(!scanned);
        assert_eq!(fast, slow);
        let r = fast.unwrap_err();
        assert_eq!(
            (r.reason, r.field.as_deref()),
            (reason, Some("data.responses")),
            "{digits}: {}",
            r.detail
        );
    }
    // 18 digits are still read by the scanner.
    let message = r#"{"specversion":"1.0","id":"e","source":"s","type":"tally.usage.chat_response.v1","subject":"a","time":"2025-06-15T11:00:00Z","data":{"conversation_id":"c","model":"m","responses":999999999999999999}}"#;
    assert!(fast::read_envelope(message, &mut RawEnvelope::default()).is_some());
}

/// Every refused character (each control character, DEL, each bidirectional override or
/// isolate), raw where JSON allows it and escaped, in every id and attribute value of every
/// type: both paths answer `invalid_value` naming that field.
#[test]
fn forbidden_characters_are_refused_by_both_paths_in_every_field() {
    let forbidden: Vec<char> = (0u32..0x20)
        .chain([0x7f])
        .chain(0x202a..=0x202e)
        .chain(0x2066..=0x2069)
        .map(|c| char::from_u32(c).unwrap())
        .collect();
    // (type, data object with FIELD where the value goes, field path)
    let data_fields: &[(&str, &str, &str)] = &[
        (
            types::CALL,
            r#"{"call_id":FIELD,"direction":"inbound","started_at":"2025-06-15T10:00:00Z","ended_at":"2025-06-15T10:01:00Z"}"#,
            "data.call_id",
        ),
        (
            types::CALL,
            r#"{"call_id":"c","direction":"inbound","channel":FIELD,"started_at":"2025-06-15T10:00:00Z","ended_at":"2025-06-15T10:01:00Z"}"#,
            "data.channel",
        ),
        (
            types::CALL,
            r#"{"call_id":"c","direction":"inbound","model":FIELD,"started_at":"2025-06-15T10:00:00Z","ended_at":"2025-06-15T10:01:00Z"}"#,
            "data.model",
        ),
        (
            types::CALL,
            r#"{"call_id":"c","direction":"inbound","voice_tier":FIELD,"started_at":"2025-06-15T10:00:00Z","ended_at":"2025-06-15T10:01:00Z"}"#,
            "data.voice_tier",
        ),
        (
            types::CHAT_RESPONSE,
            r#"{"conversation_id":FIELD,"model":"m"}"#,
            "data.conversation_id",
        ),
        (
            types::CHAT_RESPONSE,
            r#"{"conversation_id":"c","model":FIELD}"#,
            "data.model",
        ),
        (
            types::CHAT_RESPONSE,
            r#"{"conversation_id":"c","model":"m","voice_tier":FIELD}"#,
            "data.voice_tier",
        ),
        (
            types::CHAT_RESPONSE,
            r#"{"conversation_id":"c","model":"m","channel":FIELD}"#,
            "data.channel",
        ),
        (
            types::INSTANCE_HOURS,
            r#"{"instance_id":FIELD,"instance_type":"t","started_at":"2025-06-15T10:00:00Z","ended_at":"2025-06-15T10:01:00Z"}"#,
            "data.instance_id",
        ),
        (
            types::INSTANCE_HOURS,
            r#"{"instance_id":"i","instance_type":FIELD,"started_at":"2025-06-15T10:00:00Z","ended_at":"2025-06-15T10:01:00Z"}"#,
            "data.instance_type",
        ),
        (
            types::METERED,
            r#"{"kind":"ai_analysis","quantity":"1","attributes":{"model":FIELD}}"#,
            "data.attributes.model",
        ),
        (
            types::GRANT,
            r#"{"grant_id":FIELD,"kind":"promo","credits":"1"}"#,
            "data.grant_id",
        ),
        (
            types::PLAN,
            r#"{"plan_id":FIELD,"monthly_allowance":"1","billing_day":1,"overage_policy":"bill_overage"}"#,
            "data.plan_id",
        ),
    ];
    let message = |id: &str, source: &str, content_type: &str, event_type: &str, data: &str| {
        format!(
            r#"{{"specversion":"1.0","id":{id},"source":{source},"type":"{event_type}","subject":"acct-1","time":"2025-06-15T11:00:00Z","datacontenttype":{content_type},"data":{data}}}"#
        )
    };
    let chat = r#"{"conversation_id":"c","model":"m"}"#;
    let mut checked = 0;
    for &c in &forbidden {
        // Escaped (JSON forbids raw control characters), and raw where JSON allows it.
        let mut spellings = vec![format!("\\u{:04x}", c as u32)];
        if c as u32 >= 0x20 {
            spellings.push(c.to_string());
        }
        for spelling in &spellings {
            let value = format!("\"x{spelling}y\"");
            // (message, field, byte offset of the character in the value)
            let mut cases: Vec<(String, &str, usize)> = vec![
                (
                    message(&value, "\"s\"", "null", types::CHAT_RESPONSE, chat),
                    "id",
                    1,
                ),
                (
                    message("\"e\"", &value, "null", types::CHAT_RESPONSE, chat),
                    "source",
                    1,
                ),
                (
                    message(
                        "\"e\"",
                        "\"s\"",
                        &format!("\"application/json;{spelling}\""),
                        types::CHAT_RESPONSE,
                        chat,
                    ),
                    "datacontenttype",
                    "application/json;".len(),
                ),
            ];
            for (event_type, data, field) in data_fields {
                cases.push((
                    message(
                        "\"e\"",
                        "\"s\"",
                        "null",
                        event_type,
                        &data.replace("FIELD", &value),
                    ),
                    field,
                    1,
                ));
            }
            for (text, field, at) in cases {
                let (fast, slow, _) = both(text.as_bytes());
                assert_eq!(fast, slow, "{text:?}");
                let r = fast.expect_err(&text);
                assert_eq!(
                    (r.reason, r.field.as_deref()),
                    (Reason::InvalidValue, Some(field)),
                    "{text:?}: {}",
                    r.detail
                );
                assert!(
                    r.detail
                        .starts_with(&format!("U+{:04X} at byte {at}:", c as u32)),
                    "{text:?}: {}",
                    r.detail
                );
                checked += 1;
            }
        }
    }
    // 32 + 1 + 5 + 4 = 42 characters, each escaped, and the 10 of them JSON allows raw
    // (DEL and the nine bidirectional ones): 52 spellings, in 3 envelope + 13 data fields.
    assert_eq!(checked, 52 * 16);
}

/// A record's headers: (name, value).
type Headers = Vec<(String, Vec<u8>)>;

/// The binary-mode form (Kafka binding) of a structured message: each envelope attribute
/// that is a JSON string becomes its `ce_*` header (`datacontenttype`: `content-type`), null
/// ones are left out (absent, as null is in structured mode), `data` becomes the value, and
/// string extensions are dropped (both modes ignore them). `None` when the message cannot be
/// written so: not one JSON object, or an attribute or extension of another JSON type.
fn as_binary(message: &[u8]) -> Option<(Headers, Vec<u8>)> {
    let text = std::str::from_utf8(message).ok()?;
    // One whole JSON value (members() reads the first and ignores what follows).
    serde_json::from_str::<de::IgnoredAny>(text).ok()?;
    let mut headers = Vec::new();
    let mut value = None;
    for (key, raw) in members(text)? {
        let header = match key.as_str() {
            // A record has one value: `data` twice has no binary form.
            "data" if value.is_some() => return None,
            "data" => {
                value = Some(raw.into_bytes());
                continue;
            }
            "datacontenttype" => "content-type".to_owned(),
            "specversion" | "id" | "source" | "type" | "subject" | "time" => format!("ce_{key}"),
            // An extension: ignored by both modes when it is a string; any other value
            // (nested deeper than the limit, say) has no binary form.
            _ => {
                serde_json::from_str::<String>(&raw).ok()?;
                continue;
            }
        };
        match serde_json::from_str::<Option<String>>(&raw).ok()? {
            Some(s) => headers.push((header, s.into_bytes())),
            None => continue,
        }
    }
    Some((headers, value.unwrap_or_default()))
}

/// Both content modes agree: a message and its binary form decode to the same event, or to
/// rejections with the same reason and field (the detail may word the origin differently:
/// "header ce_id" rather than a JSON position).
#[test]
fn binary_and_structured_modes_agree() {
    let seeds = seeds();
    let pool = value_pool();
    let limits = DecodeLimits::default();
    let (mut accepted, mut rejected) = (0, 0);
    let messages = seeds.iter().cloned().chain((0..6_000u64).map(|round| {
        let mut rng = SmallRng::seed_from_u64(round);
        let seed = &seeds[rng.gen_range(0..seeds.len())];
        mutate(seed, &pool, &mut rng)
    }));
    for message in messages {
        let Some((headers, value)) = as_binary(&message) else {
            continue;
        };
        let structured = decode(&message, now(), &limits);
        let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        let binary = decode_binary(&value, pairs, now(), &limits);
        let shown = String::from_utf8_lossy(&message);
        match (&structured, &binary) {
            (Ok(s), Ok(b)) => {
                assert_eq!(s, b, "{shown}");
                accepted += 1;
            }
            (Err(s), Err(b)) => {
                assert_eq!(
                    (s.reason, &s.field),
                    (b.reason, &b.field),
                    "{shown}\n{s}\n{b}"
                );
                rejected += 1;
            }
            _ => panic!("{shown}\nstructured: {structured:?}\nbinary: {binary:?}"),
        }
    }
    assert!(
        accepted > 100 && rejected > 1_000,
        "{accepted} accepted, {rejected} rejected"
    );
}

/// The Kafka binding's mode rule, and a binary record read through [`decode_record`].
#[test]
fn the_content_mode_follows_the_binding() {
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    };
    let mode = |headers: &[(String, Vec<u8>)]| {
        content_mode(headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    };
    assert_eq!(mode(&h(&[])), ContentMode::Structured);
    assert_eq!(mode(&h(&[("traceparent", "x")])), ContentMode::Structured);
    assert_eq!(
        mode(&h(&[
            (
                "content-type",
                "application/cloudevents+json; charset=utf-8"
            ),
            ("ce_id", "1")
        ])),
        ContentMode::Structured
    );
    assert_eq!(
        mode(&h(&[("Content-Type", "Application/CloudEvents+JSON")])),
        ContentMode::Structured
    );
    assert_eq!(
        mode(&h(&[("content-type", "application/json"), ("ce_id", "1")])),
        ContentMode::Binary
    );
    assert_eq!(mode(&h(&[("ce_specversion", "1.0")])), ContentMode::Binary);

    let headers = h(&[
        ("ce_specversion", "1.0"),
        ("ce_id", "e-1"),
        ("ce_source", "//voice/eu"),
        ("ce_type", "tally.usage.chat_response.v1"),
        ("ce_subject", "acct-1"),
        ("ce_time", "2025-06-15T11:00:00Z"),
        ("ce_traceparent", "00-ab-cd-01"),
        ("content-type", "application/json"),
    ]);
    let value = br#"{"conversation_id":"c-1","model":"gpt-4o","responses":2}"#;
    let event = decode_record(value, &headers, now(), &DecodeLimits::default()).unwrap();
    assert_eq!(event.envelope.id, "e-1");
    assert_eq!(event.envelope.source, "//voice/eu");
    assert_eq!(event.envelope.account_id, "acct-1");
    match event.payload {
        Payload::Chat(c) => assert_eq!((c.model.as_ref(), c.responses), ("gpt-4o", 2)),
        other => panic!("{other:?}"),
    }

    // Without ce_specversion: the same reason and field as a structured event without it.
    let reject = |headers: &[(String, Vec<u8>)], value: &[u8]| {
        let r = decode_record(value, headers, now(), &DecodeLimits::default()).unwrap_err();
        (r.reason, r.field)
    };
    let missing: Vec<_> = headers[1..].to_vec();
    assert_eq!(
        reject(&missing, value),
        (Reason::MissingField, Some("specversion".into()))
    );
    // No value: no data.
    assert_eq!(
        reject(&headers, b""),
        (Reason::MissingField, Some("data".into()))
    );
    assert_eq!(
        reject(&headers, b"null"),
        (Reason::MissingField, Some("data".into()))
    );
    assert_eq!(
        reject(&headers, b"{\"conversation_id\":"),
        (Reason::MalformedJson, None)
    );
    assert_eq!(
        reject(&headers, b"[1]"),
        (Reason::WrongType, Some("data".into()))
    );
    let mut xml = headers.clone();
    xml[7].1 = b"application/xml".to_vec();
    assert_eq!(
        reject(&xml, value),
        (Reason::InvalidValue, Some("datacontenttype".into()))
    );
    let mut twice = headers.clone();
    twice.push(("ce_id".into(), b"e-2".to_vec()));
    assert_eq!(
        reject(&twice, value),
        (Reason::InvalidValue, Some("id".into()))
    );
    let mut not_utf8 = headers.clone();
    not_utf8[1].1 = vec![0xff, 0xfe];
    assert_eq!(reject(&not_utf8, value), (Reason::MalformedJson, None));
    // The limit counts the value and the CloudEvents headers: 56 bytes of value, and
    // 14+3 + 5+3 + 9+10 + 7+28 + 10+6 + 7+20 + 14+11 + 12+16 = 175 of headers = 231.
    let limits = DecodeLimits {
        max_message_bytes: 230,
        ..DecodeLimits::default()
    };
    let r = decode_record(value, &headers, now(), &limits).unwrap_err();
    assert_eq!(r.reason, Reason::TooLarge);
    let limits = DecodeLimits {
        max_message_bytes: 231,
        ..DecodeLimits::default()
    };
    assert!(decode_record(value, &headers, now(), &limits).is_ok());
}
