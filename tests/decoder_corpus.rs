//! The decoder and the JSON Schemas (schemas/events/) against the same corpus
//! (tests/corpus/): every valid example passes both; every invalid one gets its exact reason
//! and field from the decoder and is rejected by the schema too, except the rules the
//! manifest marks as beyond a schema, which the schema must then accept.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use tally::event::{decode, DecodeLimits, EventKind, Reason};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixed "now" of every test (the future-time rule is relative to it).
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 15, 12, 0, 0).unwrap()
}

struct Schemas(BTreeMap<&'static str, jsonschema::Validator>);

impl Schemas {
    fn load() -> Schemas {
        let mut out = BTreeMap::new();
        for kind in EventKind::ALL {
            let path = root().join(format!("schemas/events/{}.schema.json", kind.name()));
            let schema: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                schema,
                serde_json::from_str::<Value>(kind.schema()).unwrap(),
                "the registry embeds {}",
                path.display()
            );
            assert_eq!(
                schema["$schema"],
                "https://json-schema.org/draft/2020-12/schema"
            );
            assert_eq!(schema["title"], kind.event_type(), "{}", path.display());
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(&schema)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.insert(kind.event_type(), validator);
        }
        Schemas(out)
    }

    /// Ok if the schema of the message's `type` accepts it; Err(why) otherwise (not JSON, no
    /// such schema, or the validation errors).
    fn check(&self, bytes: &[u8]) -> Result<(), String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not parsed: {e}"))?;
        let event_type = value
            .get("type")
            .and_then(Value::as_str)
            .ok_or("no string `type`")?;
        let validator = self
            .0
            .get(event_type)
            .ok_or_else(|| format!("no schema for {event_type:?}"))?;
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out
}

#[test]
fn valid_examples_pass_the_decoder_and_the_schema() {
    let schemas = Schemas::load();
    let mut per_type: BTreeMap<String, usize> = BTreeMap::new();
    for path in files(&root().join("tests/corpus/valid"), "json") {
        let bytes = std::fs::read(&path).unwrap();
        let event = decode(&bytes, now(), &DecodeLimits::default())
            .unwrap_or_else(|r| panic!("{}: {r}", path.display()));
        schemas
            .check(&bytes)
            .unwrap_or_else(|e| panic!("{}: schema: {e}", path.display()));
        *per_type
            .entry(event.envelope.event_type.to_string())
            .or_default() += 1;
    }
    for event_type in EventKind::ALL.map(EventKind::event_type) {
        assert!(
            per_type.get(event_type).copied().unwrap_or(0) >= 2,
            "fewer than two valid examples of {event_type}: {per_type:?}"
        );
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    case: Vec<Case>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    file: String,
    reason: String,
    field: Option<String>,
    /// Whether the JSON Schema rejects it too.
    schema: bool,
    #[allow(dead_code)]
    note: Option<String>,
}

/// Checks one invalid example against both validators; returns a description of every
/// disagreement (empty when all is well).
fn check_invalid(
    schemas: &Schemas,
    limits: &DecodeLimits,
    name: &str,
    bytes: &[u8],
    reason: Reason,
    field: Option<&str>,
    schema_rejects: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    match decode(bytes, now(), limits) {
        Ok(e) => problems.push(format!("{name}: accepted by the decoder: {e:?}")),
        Err(r) => {
            if (r.reason, r.field.as_deref()) != (reason, field) {
                problems.push(format!(
                    "{name}: decoder said {} {:?} ({}), expected {reason} {field:?}",
                    r.reason, r.field, r.detail
                ));
            }
        }
    }
    match (schemas.check(bytes), schema_rejects) {
        (Ok(()), true) => problems.push(format!("{name}: accepted by the schema")),
        (Err(e), false) => problems.push(format!(
            "{name}: rejected by the schema ({e}), but the manifest says a schema cannot express this rule"
        )),
        _ => {}
    }
    problems
}

#[test]
fn invalid_examples_are_rejected_by_both() {
    let schemas = Schemas::load();
    let dir = root().join("tests/corpus/invalid");
    let manifest: Manifest =
        toml::from_str(&std::fs::read_to_string(dir.join("manifest.toml")).unwrap()).unwrap();

    let listed: BTreeSet<String> = manifest.case.iter().map(|c| c.file.clone()).collect();
    assert_eq!(listed.len(), manifest.case.len(), "a file is listed twice");
    let on_disk: BTreeSet<String> = files(&dir, "json")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, on_disk, "manifest and directory disagree");

    let mut problems = Vec::new();
    let mut reasons = HashSet::new();
    for case in &manifest.case {
        let reason = Reason::parse(&case.reason)
            .unwrap_or_else(|| panic!("{}: unknown reason {}", case.file, case.reason));
        reasons.insert(reason);
        let bytes = std::fs::read(dir.join(&case.file)).unwrap();
        problems.extend(check_invalid(
            &schemas,
            &DecodeLimits::default(),
            &case.file,
            &bytes,
            reason,
            case.field.as_deref(),
            case.schema,
        ));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    for reason in [
        Reason::MalformedJson,
        Reason::MissingField,
        Reason::WrongType,
        Reason::UnknownType,
        Reason::InvalidValue,
    ] {
        assert!(reasons.contains(&reason), "no example of {reason}");
    }
}

/// A valid call from the corpus, as a JSON value to break.
fn valid_call() -> Value {
    let path = root().join("tests/corpus/valid/call_inbound_phone.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Examples too big, too deep or too broken to keep as files.
#[test]
fn generated_invalid_examples_are_rejected_by_both() {
    let schemas = Schemas::load();
    let limits = DecodeLimits::default();
    let call = serde_json::to_string(&valid_call()).unwrap();
    let with_extension = |json: &str| format!("{{\"ext\":{json},{}", &call[1..]);
    let with_data_field =
        |json: &str| call.replacen("\"data\":{", &format!("\"data\":{{\"x\":{json},"), 1);
    let with_id = |id: &str| {
        let mut v = valid_call();
        v["id"] = Value::String(id.to_owned());
        serde_json::to_vec(&v).unwrap()
    };
    let mut invalid_utf8 = call.clone().into_bytes();
    let at = call.find("acct-0001").unwrap() + 4;
    invalid_utf8[at] = 0xff;
    let mut invalid_utf8_in_data = call.clone().into_bytes();
    let at = call.find("call-100").unwrap() + 5;
    invalid_utf8_in_data.splice(at..at, [0xe2, 0x82]);

    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<u8>, Reason, Option<&str>, bool)> = vec![
        // Over 64 KiB: refused before parsing. The schema sets no size limit.
        (
            "too_large",
            with_extension(&format!("\"{}\"", "p".repeat(70_000))).into_bytes(),
            Reason::TooLarge,
            None,
            false,
        ),
        (
            "too_large_and_not_json",
            vec![b'{'; 70_000],
            Reason::TooLarge,
            None,
            true,
        ),
        // A huge string under the size limit.
        (
            "huge_id",
            with_id(&"x".repeat(60_000)),
            Reason::InvalidValue,
            Some("id"),
            true,
        ),
        (
            "deep_extension",
            with_extension(&nested(200)).into_bytes(),
            Reason::MalformedJson,
            None,
            true,
        ),
        (
            "deep_data",
            with_data_field(&nested(200)).into_bytes(),
            Reason::MalformedJson,
            None,
            true,
        ),
        (
            "deep_object",
            with_extension(&format!("{}1{}", "{\"a\":".repeat(300), "}".repeat(300))).into_bytes(),
            Reason::MalformedJson,
            None,
            true,
        ),
        (
            "invalid_utf8_subject",
            invalid_utf8,
            Reason::MalformedJson,
            None,
            true,
        ),
        (
            "invalid_utf8_in_data",
            invalid_utf8_in_data,
            Reason::MalformedJson,
            None,
            true,
        ),
        ("nul_bytes", vec![0; 100], Reason::MalformedJson, None, true),
    ];
    let mut problems = Vec::new();
    for (name, bytes, reason, field, schema_rejects) in &cases {
        problems.extend(check_invalid(
            &schemas,
            &limits,
            name,
            bytes,
            *reason,
            *field,
            *schema_rejects,
        ));
    }
    // Moderate nesting in an extension is fine for both.
    let ok = with_extension(&nested(60));
    decode(ok.as_bytes(), now(), &limits).expect("60 levels in an extension");
    schemas
        .check(ok.as_bytes())
        .expect("60 levels in an extension");
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn every_truncation_of_a_valid_example_is_malformed() {
    let limits = DecodeLimits::default();
    for path in files(&root().join("tests/corpus/valid"), "json") {
        let bytes = std::fs::read(&path).unwrap();
        let end = bytes.iter().rposition(|b| *b == b'}').unwrap();
        for cut in 0..=end {
            let r = decode(&bytes[..cut], now(), &limits).expect_err("a truncated event");
            assert_eq!(
                (r.reason, r.field.as_deref()),
                (Reason::MalformedJson, None),
                "{} cut at {cut}",
                path.display()
            );
        }
    }
}

#[test]
fn schema_files_are_the_registry_kinds() {
    let names: BTreeSet<String> = files(&root().join("schemas/events"), "json")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = EventKind::ALL
        .iter()
        .map(|k| format!("{}.schema.json", k.name()))
        .collect();
    assert_eq!(names, expected);
}

/// The README's examples are valid events, one of each type.
#[test]
fn readme_examples_are_valid() {
    let schemas = Schemas::load();
    let readme = std::fs::read_to_string(root().join("schemas/events/README.md")).unwrap();
    let mut seen = BTreeSet::new();
    for block in readme.split("```json").skip(1) {
        let json = block.split("```").next().unwrap();
        let event = decode(json.as_bytes(), now(), &DecodeLimits::default())
            .unwrap_or_else(|r| panic!("README example: {r}\n{json}"));
        schemas
            .check(json.as_bytes())
            .unwrap_or_else(|e| panic!("README example: schema: {e}\n{json}"));
        seen.insert(event.envelope.event_type.to_string());
    }
    assert_eq!(
        seen.len(),
        EventKind::ALL.len(),
        "one example of each type: {seen:?}"
    );
}
