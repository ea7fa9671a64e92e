//! `tally prices check`: every bad table in prices/examples/ gives exactly its expected
//! errors, at their lines; prices/default.toml checks clean.

use std::path::{Path, PathBuf};

use tally::rating::{check, check_file, CheckReport, TableError};

fn path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn errors_of(example: &str) -> Vec<(usize, String)> {
    let source = std::fs::read_to_string(path(&format!("prices/examples/{example}"))).unwrap();
    match check(&source) {
        Ok(_) => panic!("{example} checks clean, but it is meant to be bad"),
        Err(errors) => errors.into_iter().map(|e| (e.line, e.message)).collect(),
    }
}

fn assert_errors(example: &str, expected: &[(usize, &str)]) {
    let actual = errors_of(example);
    let expected: Vec<(usize, String)> = expected
        .iter()
        .map(|(line, message)| (*line, (*message).to_owned()))
        .collect();
    if actual != expected {
        let show = |errors: &[(usize, String)]| {
            errors
                .iter()
                .map(|(line, message)| format!("  {line}: {message}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "{example}:\nexpected\n{}\nactual\n{}",
            show(&expected),
            show(&actual)
        );
    }
}

#[test]
fn default_table_checks_clean() {
    let table = check_file(path("prices/default.toml")).unwrap_or_else(|report| panic!("{report}"));
    let versions: Vec<&str> = table.versions().iter().map(|v| v.id()).collect();
    assert_eq!(versions, ["2025-01", "2026-07"]);
    for version in table.versions() {
        let kinds: Vec<&str> = version.kinds().collect();
        assert_eq!(
            kinds,
            [
                "ai_analysis",
                "call",
                "chat_response",
                "instance_hours",
                "media_generation"
            ]
        );
    }
}

#[test]
fn every_example_is_tested() {
    let mut examples: Vec<String> = std::fs::read_dir(path("prices/examples"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    examples.sort();
    assert_eq!(
        examples,
        [
            "coverage.toml",
            "empty.toml",
            "keys.toml",
            "numbers.toml",
            "rules.toml",
            "syntax.toml",
            "units.toml",
            "versions.toml"
        ]
    );
}

#[test]
fn syntax_error() {
    assert_errors("syntax.toml", &[(7, "TOML syntax: invalid basic string")]);
}

#[test]
fn empty_table() {
    assert_errors(
        "empty.toml",
        &[(
            1,
            "no [[version]]: a price table needs at least one version",
        )],
    );
}

#[test]
fn unknown_and_missing_keys() {
    assert_errors(
        "keys.toml",
        &[
            (2, "unknown key `currency` (a price table holds only [[version]] tables)"),
            (4, "version `2025-01` is missing `effective_from`"),
            (6, "version `2025-01`: unknown key `effective_form` (expected id, effective_from, effective_until, rule)"),
            (8, "rule `chat` is missing `credits_per_unit`"),
            (12, "rule `chat`: unknown key `credit_per_unit` (expected id, kind, match, unit, credits_per_unit, increment, minimum)"),
            (14, "rule is missing `id`"),
            (19, "rule: unknown key `note` (expected id, kind, match, unit, credits_per_unit, increment, minimum)"),
            (21, "version is missing `id`"),
            (21, "version has no [[version.rule]]"),
        ],
    );
}

#[test]
fn units_and_kinds() {
    assert_errors(
        "units.toml",
        &[
            (10, "rule `call.phone`: unknown unit `minutes` (expected second, minute, hour, response, unit, image, analysis, request or token)"),
            (18, "rule `call.web`: kind `call` is measured in seconds, but `response` is a count unit (use second, minute or hour)"),
            (24, "rule `chat`: kind `chat_response` is counted, but `minute` is a time unit (use response, unit, image, analysis, request or token)"),
            (31, "rule `instance.cpu`: kind `instance_hours` is measured in seconds, but `image` is a count unit (use second, minute or hour)"),
            (37, "rule `analysis`: kind `ai_analysis` is counted, but `second` is a time unit (use response, unit, image, analysis, request or token)"),
            (42, "rule `Media`: kind `Media-Generation` must match ^[a-z][a-z0-9_]{0,63}$"),
        ],
    );
}

#[test]
fn prices_increments_and_minimums() {
    assert_errors(
        "numbers.toml",
        &[
            (11, "rule `call.phone`: `credits_per_unit` must not be negative, got -1"),
            (12, "rule `call.phone`: `increment` must not be zero"),
            (19, "rule `call.web`: `credits_per_unit` must be a decimal string such as \"0.8\" (floats are inexact)"),
            (20, "rule `call.web`: `increment` must be positive, got -6"),
            (21, "rule `call.web`: `minimum` must not be negative, got -30"),
            (29, "rule `call.whatsapp`: `increment` must be a whole number of seconds, got 1.5"),
            (38, "rule `instance.gpu`: `minimum` 5400 is not a multiple of `increment` 3600"),
            (44, "rule `analysis`: `credits_per_unit` must be a decimal number, got \"one\""),
            (45, "rule `analysis`: `increment` must have at most 6 decimal places, got 0.0000001"),
            (50, "rule `media`: `match.model` must be a string, found integer"),
        ],
    );
}

#[test]
fn version_order_gaps_and_overlaps() {
    assert_errors(
        "versions.toml",
        &[
            (5, "version `2025-01`: effective_until 2025-05-01T00:00:00Z leaves a gap before version `2025-06` starts at 2025-06-01T00:00:00Z (usage in between would be unpriced)"),
            (16, "version `2025-06`: effective_until 2025-08-01T00:00:00Z is after version `2025-07` starts at 2025-07-01T00:00:00Z (versions overlap)"),
            (36, "version `2025-03`: effective_from 2025-03-01T00:00:00Z is not after the effective_from of version `2025-07` (2025-07-01T00:00:00Z): versions must be in time order"),
            (37, "version `2025-03`: effective_until 2025-02-01T00:00:00Z is not after its effective_from 2025-03-01T00:00:00Z"),
            (45, "duplicate version id `2025-07` (first at line 24)"),
            (47, "version `2025-07`: `effective_from` must be an RFC 3339 date-time with an offset, e.g. 2025-01-01T00:00:00Z"),
        ],
    );
}

#[test]
fn duplicate_and_overlapping_rules() {
    assert_errors(
        "rules.toml",
        &[
            (13, "duplicate rule id `chat.gpt-4o` in version `2025-01` (first at line 6)"),
            (21, "rule `chat.gpt-4o.again` has the same chat_response conditions as rule `chat.gpt-4o` (line 6): { model = \"gpt-4o\" }"),
            (29, "rule `chat.premium` ties with rule `chat.gpt-4o` (line 6): a chat_response event matching { model = \"gpt-4o\", voice_tier = \"premium\" } matches both with the same specificity; add a rule for exactly those attributes or make one more specific"),
            (29, "rule `chat.premium` ties with rule `chat.gpt-4o` (line 13): a chat_response event matching { model = \"gpt-4o-mini\", voice_tier = \"premium\" } matches both with the same specificity; add a rule for exactly those attributes or make one more specific"),
            (29, "rule `chat.premium` ties with rule `chat.gpt-4o.again` (line 21): a chat_response event matching { model = \"gpt-4o\", voice_tier = \"premium\" } matches both with the same specificity; add a rule for exactly those attributes or make one more specific"),
            (69, "rule `call.inbound` ties with rule `call.web` (line 38): a call event matching { channel = \"web\", direction = \"inbound\" } matches both with the same specificity; add a rule for exactly those attributes or make one more specific"),
            (69, "rule `call.inbound` ties with rule `call.premium` (line 45): a call event matching { voice_tier = \"premium\", direction = \"inbound\" } matches both with the same specificity; add a rule for exactly those attributes or make one more specific"),
            (79, "rule `call.sideways`: `match.direction` must be \"inbound\" or \"outbound\", got \"sideways\""),
        ],
    );
}

#[test]
fn coverage_gaps_between_versions() {
    assert_errors(
        "coverage.toml",
        &[
            (50, "version `2026-07` prices no call usage matching { direction = \"inbound\" } (rule `call.inbound` of version `2025-01`, line 6): such usage from 2026-07-01T00:00:00Z on would be unpriced"),
            (50, "version `2026-07` prices no chat_response usage matching { model = \"claude-sonnet\" } (rule `chat.claude-sonnet` of version `2025-01`, line 27): such usage from 2026-07-01T00:00:00Z on would be unpriced"),
            (50, "version `2026-07` has no rule for kind `ai_analysis`, which version `2025-01` prices: ai_analysis usage from 2026-07-01T00:00:00Z on would be unpriced"),
        ],
    );
}

#[test]
fn report_prints_file_line_message() {
    let file = path("prices/examples/syntax.toml");
    let report = check_file(&file).unwrap_err();
    assert_eq!(
        report.errors(),
        [TableError {
            line: 7,
            message: "TOML syntax: invalid basic string".into()
        }]
    );
    assert_eq!(
        report.to_string(),
        format!("{}:7: TOML syntax: invalid basic string", file.display())
    );

    let file = path("prices/examples/units.toml");
    let report = check_file(&file).unwrap_err();
    let lines: Vec<String> = report.to_string().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[0].starts_with(&format!(
        "{}:10: rule `call.phone`: unknown unit",
        file.display()
    )));
    assert!(lines[5].starts_with(&format!("{}:42: ", file.display())));

    let missing = path("prices/examples/no-such-file.toml");
    let report = check_file(&missing).unwrap_err();
    assert!(matches!(report, CheckReport::Unreadable { .. }));
    assert!(report
        .to_string()
        .starts_with(&format!("{}: cannot read: ", missing.display())));
}
