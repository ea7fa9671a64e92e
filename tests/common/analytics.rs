//! Shared by the analytics report tests (docs examples, chDB): the example queries of
//! docs/analytics.md, a deterministic data set for the account those examples name, and
//! reading a query's result as TabSeparated text.
#![allow(dead_code)]

use chrono::NaiveDate;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use tally::analytics::RatedRow;

/// The account, days and "today" the examples in docs/analytics.md use.
pub const DOC_ACCOUNT: &str = "acct-42";
pub const DOC_FROM: &str = "2025-06-01";
pub const DOC_TO: &str = "2025-06-20";

pub fn day(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

/// An example query of the docs: its name and its statements (split on `;`).
#[derive(Debug, Clone)]
pub struct Example {
    pub name: String,
    pub statements: Vec<String>,
}

/// Every ```sql block of docs/analytics.md, each named by the `<!-- example: NAME -->` line
/// before it. Panics on a block without a name: every query in the page is run.
pub fn doc_examples() -> Vec<Example> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/analytics.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut name: Option<String> = None;
    let mut block: Option<String> = None;
    for line in text.lines() {
        if let Some(sql) = block.as_mut() {
            if line.trim_start().starts_with("```") {
                let statements = sql
                    .split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                out.push(Example {
                    name: name.take().expect("named"),
                    statements,
                });
                block = None;
            } else {
                sql.push_str(line);
                sql.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.trim().strip_prefix("<!-- example:") {
            name = Some(rest.trim_end_matches("-->").trim().to_owned());
        } else if line.trim_start().starts_with("```sql") {
            assert!(
                name.is_some(),
                "docs/analytics.md: a ```sql block without an <!-- example: NAME --> line before it"
            );
            block = Some(String::new());
        }
    }
    assert!(block.is_none(), "docs/analytics.md: unclosed ```sql block");
    out
}

/// Usage for DOC_ACCOUNT (and a little for another account) from 2025-03-01 to the docs'
/// "today", every kind, credits down to the micro-credit, some days empty.
pub fn docs_dataset() -> Vec<RatedRow> {
    let mut rng = SmallRng::seed_from_u64(42);
    let mut rows = Vec::new();
    let mut d = day("2025-03-01");
    let last = day(DOC_TO);
    let mut n = 0u32;
    while d <= last {
        for account in [DOC_ACCOUNT, "acct-7"] {
            let per_day = if account == DOC_ACCOUNT {
                rng.gen_range(0..6)
            } else {
                rng.gen_range(0..2)
            };
            for _ in 0..per_day {
                n += 1;
                let time = d.and_hms_opt(0, 0, 0).unwrap().and_utc()
                    + chrono::Duration::seconds(rng.gen_range(0..86_400));
                let mut row = RatedRow {
                    event_source: "//docs.test".into(),
                    event_id: format!("d-{n}"),
                    account_id: account.into(),
                    kind: String::new(),
                    event_time_unix_seconds: u32::try_from(time.timestamp()).unwrap(),
                    event_date_unix_days: u16::try_from((d - NaiveDate::default()).num_days())
                        .unwrap(),
                    model: String::new(),
                    voice_tier: String::new(),
                    channel: String::new(),
                    direction: String::new(),
                    instance_type: String::new(),
                    call_id: String::new(),
                    conversation_id: String::new(),
                    instance_id: String::new(),
                    answered: 0,
                    responses: 0,
                    quantity_e6: 0,
                    billable_seconds: 0,
                    billable_quantity_e6: 0,
                    unit: String::new(),
                    // Up to 20 credits, to the micro-credit.
                    credits_e6: rng.gen_range(0..20_000_000),
                    price_version: "docs".into(),
                    rule_id: "docs".into(),
                    topic: "usage.docs".into(),
                    partition: 0,
                    offset: u64::from(n),
                    inserted_at_unix_seconds: 1_750_000_000,
                    admission: tally::analytics::admission_rank(
                        time.timestamp_millis(),
                        i64::from(n),
                    ),
                };
                match rng.gen_range(0..10) {
                    0..=3 => {
                        row.kind = "call".into();
                        row.call_id = format!("call-{n}");
                        row.direction = "inbound".into();
                        row.model = ["voice-a", "voice-b"][rng.gen_range(0..2)].into();
                        row.answered = u8::from(rng.gen_range(0..5) > 0);
                        let seconds: i128 = if row.answered == 1 {
                            rng.gen_range(1..1200)
                        } else {
                            0
                        };
                        row.quantity_e6 = seconds * 1_000_000;
                        row.billable_seconds = u64::try_from(seconds).unwrap().div_ceil(60) * 60;
                        row.unit = "minute".into();
                        if row.answered == 0 {
                            row.credits_e6 = 0;
                        }
                    }
                    4..=6 => {
                        row.kind = "chat_response".into();
                        row.conversation_id = format!("conv-{}", n / 4);
                        row.model = ["gpt-4o-mini", "gpt-4o"][rng.gen_range(0..2)].into();
                        row.voice_tier = ["standard", "premium"][rng.gen_range(0..2)].into();
                        row.responses = rng.gen_range(1..8);
                        row.quantity_e6 = i128::from(row.responses) * 1_000_000;
                        row.unit = "response".into();
                    }
                    7 => {
                        row.kind = "instance_hours".into();
                        row.instance_type = "gpu.a10".into();
                        row.instance_id = format!("i-{n}");
                        let seconds: i128 = rng.gen_range(60..20_000);
                        row.quantity_e6 = seconds * 1_000_000;
                        row.billable_seconds =
                            u64::try_from(seconds).unwrap().div_ceil(3600) * 3600;
                        row.unit = "hour".into();
                    }
                    _ => {
                        row.kind = "ai_analysis".into();
                        row.model = "gemini-3-flash".into();
                        row.quantity_e6 = rng.gen_range(1..5_000_000);
                        row.unit = "analysis".into();
                    }
                }
                row.billable_quantity_e6 = i64::try_from(row.quantity_e6).unwrap();
                rows.push(row);
            }
        }
        d = d.succ_opt().unwrap();
    }
    // An identity SQL must quote with care.
    let mut odd = rows
        .iter()
        .find(|r| r.account_id == DOC_ACCOUNT && r.kind == "ai_analysis")
        .unwrap()
        .clone();
    odd.event_source = r"//docs.test/a?b='x'\y".into();
    odd.event_id = "id ? with 'quotes'\t and a tab\t".into();
    // A record of its own: one position holds one record.
    odd.offset = u64::from(n) + 1;
    odd.admission = tally::analytics::admission_rank(1_750_000_000_000, i64::from(n) + 1);
    rows.push(odd);
    rows
}

/// A query's result as TabSeparated text (how 18.16 prints it: decimals with all their
/// places, NULL as \N).
pub async fn tsv(
    client: &clickhouse::Client,
    sql: &str,
) -> Result<String, clickhouse::error::Error> {
    let mut cursor = client.query_raw(sql).fetch_bytes("TabSeparated")?;
    let bytes = cursor.collect().await?;
    Ok(String::from_utf8(bytes.to_vec()).unwrap())
}

/// TabSeparated text as rows of fields.
pub fn rows_of(tsv: &str) -> Vec<Vec<String>> {
    tsv.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// A ClickHouse configuration with a database of its own (tests run in parallel).
pub fn clickhouse_config(name: &str) -> tally::config::ClickHouseConfig {
    tally::config::ClickHouseConfig {
        url: super::clickhouse_url(),
        database: super::unique(&format!("t_{name}")),
        ..tally::config::ClickHouseConfig::default()
    }
}
