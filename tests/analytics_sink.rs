//! The ClickHouse sink against a real server (TALLY_TEST_CLICKHOUSE_URL, default
//! http://127.0.0.1:8123; `scripts/services up` starts one). Each test uses a database of its
//! own and drops it at the end.
//!
//! - `migrate_is_idempotent`: a second run applies nothing and breaks nothing.
//! - `replayed_batch_keeps_exact_totals`: the same rows inserted twice (a replayed batch), the
//!   same event read again at another offset (a producer retry) and a repeat inside one batch
//!   count once, in the counting rows and in the roll-ups.
//! - `copies_stored_before_migration_5_still_count`: migration 0005 copies the identities of
//!   0004's `usage_identities` into `usage_copies`, and a re-send of one of them loses to it.
//! - `positions_resume_past_what_is_stored`: the stored positions only (never the highest
//!   stored row: its roll-ups may be missing); per group; only the partitions asked for; via
//!   the OffsetStore too.
//! - `decimals_round_trip_exactly`: 6-decimal values at the edges of Decimal(18, 6) and
//!   Decimal(38, 6) come back unchanged, as does every other column.
//! - `errors_are_classified`: server down is transient, a missing table is not.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use common::analytics::clickhouse_config;
use tally::analytics::{migrate, AnalyticsSink, ChOffsetStore, RatedRow};
use tally::config::ClickHouseConfig;
use tally::kafka::{OffsetStore, Positions, Record};
use tally::pipeline::analytics::rated_row;
use tally::pipeline::prepare;
use tally::rating::PriceTable;

async fn fresh(name: &str) -> (ClickHouseConfig, AnalyticsSink) {
    let cfg = clickhouse_config(name);
    migrate(&cfg)
        .await
        .expect("ClickHouse is up (run scripts/services up)");
    let sink = AnalyticsSink::new(&cfg);
    (cfg, sink)
}

async fn drop_database(cfg: &ClickHouseConfig) {
    clickhouse::Client::default()
        .with_url(&cfg.url)
        .query(&format!("DROP DATABASE IF EXISTS {}", cfg.database))
        .execute()
        .await
        .unwrap();
}

fn raw(cfg: &ClickHouseConfig) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_database(&cfg.database)
        .with_validation(false)
}

fn prices() -> PriceTable {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prices/default.toml");
    PriceTable::load(&path).expect("default price table")
}

fn record(topic: &str, partition: i32, offset: i64, event: serde_json::Value) -> Record {
    Record {
        topic: Arc::from(topic),
        partition,
        offset,
        key: None,
        payload: serde_json::to_vec(&event).unwrap(),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

fn envelope(
    event_type: &str,
    id: &str,
    account: &str,
    data: serde_json::Value,
) -> serde_json::Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "//tests/analytics",
        "type": event_type,
        "subject": account,
        "time": "2025-06-15T11:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// A realistic batch for one account: calls (answered, unanswered, outbound), chat responses,
/// an instance, a metered analysis, and a grant (no row). Partitions 0 and 1 of one topic.
fn batch(topic: &str, account: &str) -> Vec<Record> {
    let call = |id: &str, direction: &str, answered: Option<&str>| {
        envelope(
            "tally.usage.call.v1",
            id,
            account,
            json!({
                "call_id": id, "direction": direction, "channel": "phone",
                "started_at": "2025-06-15T10:00:00Z", "answered_at": answered,
                "ended_at": "2025-06-15T10:03:07Z",
                "hold_seconds": if answered.is_some() { 20 } else { 0 },
            }),
        )
    };
    vec![
        record(
            topic,
            0,
            3,
            call("call-1", "inbound", Some("2025-06-15T10:00:05Z")),
        ),
        record(topic, 0, 4, call("call-2", "inbound", None)),
        record(
            topic,
            1,
            0,
            call("call-3", "outbound", Some("2025-06-15T10:00:05Z")),
        ),
        record(
            topic,
            1,
            1,
            envelope(
                "tally.usage.chat_response.v1",
                "chat-1",
                account,
                json!({"conversation_id": "conv-1", "model": "gpt-4o-mini", "voice_tier": "premium", "responses": 3}),
            ),
        ),
        record(
            topic,
            0,
            5,
            envelope(
                "tally.usage.instance_hours.v1",
                "inst-1",
                account,
                json!({"instance_id": "i-1", "instance_type": "gpu.a10",
                       "started_at": "2025-06-15T08:00:00Z", "ended_at": "2025-06-15T09:30:00Z"}),
            ),
        ),
        record(
            topic,
            0,
            7,
            envelope(
                "tally.usage.metered.v1",
                "an-1",
                account,
                json!({"kind": "ai_analysis", "quantity": "2.5", "attributes": {"model": "gemini-3-flash"}}),
            ),
        ),
        record(
            topic,
            1,
            2,
            envelope(
                "tally.credit.grant.v1",
                "grant-1",
                account,
                json!({"grant_id": "g-1", "kind": "top_up", "credits": "100"}),
            ),
        ),
    ]
}

fn rows(records: &[Record], prices: &PriceTable, inserted_at: DateTime<Utc>) -> Vec<RatedRow> {
    records
        .iter()
        .filter_map(|r| {
            // Rated as of the day after the events (fixed dates): inside the dedupe window
            // whatever today is.
            let now = DateTime::parse_from_rfc3339("2025-06-16T00:00:00Z")
                .unwrap()
                .to_utc();
            let p = prepare(r, prices, now, &tally::pipeline::Admission::default())
                .unwrap_or_else(|e| panic!("offset {}: {e}", r.offset));
            rated_row(&p, inserted_at).unwrap()
        })
        .collect()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn migrate_is_idempotent() {
    let cfg = clickhouse_config("migrate");
    assert_eq!(migrate(&cfg).await.unwrap(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(migrate(&cfg).await.unwrap(), Vec::<u32>::new());
    // Each run again after a half-applied migration: the statements are IF NOT EXISTS.
    raw(&cfg)
        .query("ALTER TABLE schema_migrations DELETE WHERE version = 1")
        .execute()
        .await
        .unwrap();
    for _ in 0..200 {
        // Mutations are asynchronous.
        let left: u64 = raw(&cfg)
            .query("SELECT count() FROM schema_migrations")
            .fetch_one()
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(migrate(&cfg).await.unwrap(), vec![1]);
    let tables: Vec<String> = raw(&cfg)
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(&cfg.database)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        tables,
        [
            "consumer_offsets",
            "late_usage",
            "rated_events",
            "rated_offsets",
            "rated_offsets_mv",
            "schema_migrations",
            "usage_copies",
            "usage_daily",
            "usage_events",
            "usage_hourly",
            "usage_identities",
            "usage_losers",
            "usage_voids"
        ]
    );
    drop_database(&cfg).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn replayed_batch_keeps_exact_totals() {
    let (cfg, sink) = fresh("replay").await;
    let prices = prices();
    let records = batch("usage.mixed", "acct-replay");
    let first = rows(&records, &prices, Utc::now());
    assert_eq!(
        first.len(),
        6,
        "every usage event gives a row, the grant none"
    );
    let expected_credits: Decimal = first.iter().map(RatedRow::credits).sum();
    assert!(expected_credits > Decimal::ZERO);

    let outcome = sink.insert(&first).await.unwrap();
    assert_eq!(
        (outcome.written, outcome.duplicates, outcome.blocks),
        (6, 0, 2),
        "offsets 3..7 of partition 0 and 0..1 of partition 1: block 0 of each"
    );
    let totals = sink.totals_by_account("acct-replay").await.unwrap();
    assert_eq!(totals, (6, expected_credits));

    // Every column comes back as written, and says what the event was.
    let stored = sink.rated_events_of("acct-replay").await.unwrap();
    let mut sorted = first.clone();
    sorted.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert_eq!(stored, sorted);
    let row = |id: &str| stored.iter().find(|r| r.event_id == id).unwrap().clone();
    let call = row("call-1");
    assert_eq!(
        (
            call.kind.as_str(),
            call.call_id.as_str(),
            call.direction.as_str(),
            call.channel.as_str()
        ),
        ("call", "call-1", "inbound", "phone")
    );
    // Hang-up - answer - hold: 187 - 5 - 20 seconds.
    assert_eq!(
        (call.answered, call.quantity()),
        (1, Some(Decimal::from(162)))
    );
    assert_eq!(
        (call.topic.as_str(), call.partition, call.offset),
        ("usage.mixed", 0, 3)
    );
    assert_eq!(call.event_time().to_rfc3339(), "2025-06-15T11:00:00+00:00");
    assert_eq!(call.event_date().to_string(), "2025-06-15");
    assert!(call.credits() > Decimal::ZERO && call.billable_seconds >= 162);
    let unanswered = row("call-2");
    assert_eq!((unanswered.answered, unanswered.billable_seconds), (0, 0));
    assert_eq!(unanswered.credits(), Decimal::ZERO);
    let outbound = row("call-3");
    assert_eq!(outbound.rule_id, tally::rating::OUTBOUND_FREE_RULE_ID);
    assert_eq!(outbound.credits(), Decimal::ZERO);
    let chat = row("chat-1");
    assert_eq!(
        (
            chat.kind.as_str(),
            chat.conversation_id.as_str(),
            chat.model.as_str(),
            chat.voice_tier.as_str()
        ),
        ("chat_response", "conv-1", "gpt-4o-mini", "premium")
    );
    assert_eq!(
        (chat.responses, chat.quantity()),
        (3, Some(Decimal::from(3)))
    );
    let instance = row("inst-1");
    assert_eq!(
        (
            instance.instance_type.as_str(),
            instance.instance_id.as_str(),
            instance.quantity()
        ),
        ("gpu.a10", "i-1", Some(Decimal::from(5400)))
    );
    let analysis = row("an-1");
    assert_eq!(
        (
            analysis.kind.as_str(),
            analysis.model.as_str(),
            analysis.quantity()
        ),
        ("ai_analysis", "gemini-3-flash", Some(Decimal::new(25, 1)))
    );
    assert!(stored
        .iter()
        .all(|r| !r.price_version.is_empty() && !r.rule_id.is_empty()));

    // The same batch again (a crash before positions were stored), rated a second later.
    let again = rows(&records, &prices, Utc::now() + chrono::Duration::seconds(1));
    let outcome = sink.insert(&again).await.unwrap();
    assert_eq!(
        (outcome.written, outcome.duplicates),
        (6, 0),
        "the same positions again: the same copies count"
    );
    // A producer retry: the same event identity, read at another offset.
    let retried = vec![record(
        "usage.mixed",
        1,
        9,
        envelope(
            "tally.usage.chat_response.v1",
            "chat-1",
            "acct-replay",
            json!({"conversation_id": "conv-1", "model": "gpt-4o-mini", "voice_tier": "premium", "responses": 3}),
        ),
    )];
    let retried = rows(&retried, &prices, Utc::now());
    let outcome = sink.insert(&retried).await.unwrap();
    assert_eq!((outcome.written, outcome.duplicates), (1, 1));
    // Repeats inside one batch, at two offsets: the lower counts.
    let repeat = |offset: i64| {
        record(
            "usage.other",
            0,
            offset,
            envelope(
                "tally.usage.call.v1",
                "call-r",
                "acct-repeat",
                json!({"call_id": "call-r", "direction": "inbound", "channel": "phone",
                       "started_at": "2025-06-15T10:00:00Z", "answered_at": null,
                       "ended_at": "2025-06-15T10:03:07Z", "hold_seconds": 0}),
            ),
        )
    };
    let twice = rows(&[repeat(4), repeat(5)], &prices, Utc::now());
    let outcome = sink.insert(&twice).await.unwrap();
    assert_eq!((outcome.written, outcome.duplicates), (2, 1));

    let physical: u64 = raw(&cfg)
        .query("SELECT count() FROM usage_events FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(
        physical, 9,
        "one row per position: 6 + the retry + 2 repeats"
    );
    let rolled: u64 = raw(&cfg)
        .query("SELECT countMerge(event_count) FROM usage_daily FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(rolled, 7, "the roll-up counts each identity once");
    assert_eq!(
        sink.totals_by_account("acct-replay").await.unwrap(),
        (6, expected_credits)
    );
    // The roll-up's credits of the account, by hand: the six rows of the first batch.
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Totals {
        events: u64,
        total_credits: i128,
    }
    let by_rollup: Totals = raw(&cfg)
        .query(
            "SELECT countMerge(event_count) AS events, sumMerge(credits_total) AS total_credits \
             FROM usage_daily FINAL WHERE account_id = ?",
        )
        .bind("acct-replay")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(by_rollup.events, 6);
    assert_eq!(
        Decimal::from_i128_with_scale(by_rollup.total_credits, 6),
        expected_credits
    );

    // Other accounts see nothing; an unknown account has zero totals.
    assert_eq!(
        sink.totals_by_account("nobody").await.unwrap(),
        (0, Decimal::ZERO)
    );
    drop_database(&cfg).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn copies_stored_before_migration_5_still_count() {
    use tally::analytics::migrate::{bootstrap, statements, MIGRATIONS};
    // A database as migration 4 left it, with a batch written the way the sink wrote it then
    // (rows, and their identities in `usage_identities`).
    let cfg = clickhouse_config("mig5");
    let server = clickhouse::Client::default().with_url(&cfg.url);
    for statement in bootstrap(&cfg.database) {
        server.query(&statement).execute().await.unwrap();
    }
    for (version, name, sql) in &MIGRATIONS[..4] {
        for statement in statements(sql, &cfg.database) {
            server.query(&statement).execute().await.unwrap();
        }
        raw(&cfg)
            .query(&format!(
                "INSERT INTO schema_migrations VALUES ({version}, '{name}', now())"
            ))
            .execute()
            .await
            .unwrap();
    }
    let prices = prices();
    let first = rows(&batch("usage.mixed", "acct-mig"), &prices, Utc::now());
    let mut insert = raw(&cfg).insert::<RatedRow>("usage_events").await.unwrap();
    for row in &first {
        insert.write(row).await.unwrap();
    }
    insert.end().await.unwrap();
    raw(&cfg)
        .query(
            "INSERT INTO usage_identities SELECT event_source, event_id, topic, `partition`, \
             `offset`, admission FROM usage_events",
        )
        .execute()
        .await
        .unwrap();

    assert_eq!(migrate(&cfg).await.unwrap(), vec![5, 6]);
    let copies: u64 = raw(&cfg)
        .query(
            "SELECT count() FROM usage_copies WHERE id_hash = cityHash64(event_source, event_id)",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(copies, 6, "every stored copy, with its hash");

    // A producer retry of one of them, at a later offset: the copy stored before the
    // migration is found and keeps counting.
    let sink = AnalyticsSink::new(&cfg);
    let retried = vec![record(
        "usage.mixed",
        1,
        9,
        envelope(
            "tally.usage.chat_response.v1",
            "chat-1",
            "acct-mig",
            json!({"conversation_id": "conv-1", "model": "gpt-4o-mini", "voice_tier": "premium", "responses": 3}),
        ),
    )];
    let retried = rows(&retried, &prices, Utc::now());
    let outcome = sink.insert(&retried).await.unwrap();
    assert_eq!((outcome.written, outcome.duplicates), (1, 1));
    let losers: Vec<(String, u32, u64)> = raw(&cfg)
        .query("SELECT topic, `partition`, `offset` FROM usage_losers FINAL")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(losers, vec![("usage.mixed".to_owned(), 1, 9)]);
    drop_database(&cfg).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn positions_resume_past_what_is_stored() {
    let (cfg, sink) = fresh("positions").await;
    let t = "usage.mixed".to_string();
    let all = vec![
        (t.clone(), 0),
        (t.clone(), 1),
        (t.clone(), 2),
        ("grants".to_string(), 0),
    ];
    assert_eq!(
        sink.load_positions("g", &all).await.unwrap(),
        Positions::new()
    );

    // Rows up to offset 7 on partition 0 and 1 on partition 1: positions do not move (a
    // crash before the positions are stored reads the batch again).
    sink.insert(&rows(&batch(&t, "acct-pos"), &prices(), Utc::now()))
        .await
        .unwrap();
    let expect = |pairs: &[((&str, i32), i64)]| -> Positions {
        pairs
            .iter()
            .map(|&((topic, p), next)| ((topic.to_string(), p), next))
            .collect()
    };
    assert_eq!(
        sink.load_positions("g", &all).await.unwrap(),
        Positions::new()
    );

    // Stored positions; a lower stored position never moves a partition back.
    let stored = expect(&[
        (("usage.mixed", 1), 3),
        (("grants", 0), 12),
        (("usage.mixed", 0), 6),
    ]);
    sink.store_positions("g", &stored).await.unwrap();
    sink.store_positions("g", &expect(&[(("grants", 0), 10)]))
        .await
        .unwrap();
    let full = expect(&[
        (("usage.mixed", 0), 6),
        (("usage.mixed", 1), 3),
        (("grants", 0), 12),
    ]);
    assert_eq!(sink.load_positions("g", &all).await.unwrap(), full);

    // Only the partitions asked for.
    assert_eq!(
        sink.load_positions("g", &[(t.clone(), 1)]).await.unwrap(),
        expect(&[(("usage.mixed", 1), 3)])
    );
    // Another group has positions of its own.
    assert_eq!(
        sink.load_positions("other", &all).await.unwrap(),
        Positions::new()
    );
    // The consumer's OffsetStore answers the same, from a client of its own.
    let store = ChOffsetStore {
        config: cfg.clone(),
        group_id: "g".into(),
    };
    assert_eq!(store.load(all.clone()).await.unwrap(), full);
    drop_database(&cfg).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn decimals_round_trip_exactly() {
    let (cfg, sink) = fresh("decimals").await;
    let d = |s: &str| s.parse::<Decimal>().unwrap();
    let mantissa = |s: &str| {
        let mut v = d(s);
        v.rescale(6);
        v.mantissa()
    };
    let base = RatedRow {
        event_source: "//tests/decimals".into(),
        event_id: "e-1".into(),
        account_id: "acct-dec".into(),
        kind: "ai_analysis".into(),
        event_time_unix_seconds: 1_750_000_000,
        event_date_unix_days: 20_254,
        model: "gemini-3-flash".into(),
        voice_tier: String::new(),
        channel: String::new(),
        direction: String::new(),
        instance_type: String::new(),
        call_id: String::new(),
        conversation_id: String::new(),
        instance_id: String::new(),
        answered: 0,
        responses: 0,
        quantity_e6: mantissa("999999999999.999999"),
        billable_seconds: 0,
        billable_quantity_e6: i64::try_from(mantissa("0.000001")).unwrap(),
        unit: "analysis".into(),
        credits_e6: i64::try_from(mantissa("123456.654321")).unwrap(),
        price_version: "2025-01".into(),
        rule_id: "ai_analysis.gemini-3-flash".into(),
        topic: "usage.metered".into(),
        partition: 2,
        offset: u64::MAX >> 1,
        inserted_at_unix_seconds: 1_750_000_100,
        admission: tally::analytics::admission_rank(1_750_000_050_000, 7),
    };
    let big = RatedRow {
        event_id: "e-2".into(),
        offset: (u64::MAX >> 1) - 1,
        credits_e6: 999_999_999_999_999_999, // 999999999999.999999, the Decimal(18, 6) maximum
        billable_quantity_e6: 1,
        quantity_e6: mantissa("0.000001"),
        ..base.clone()
    };
    sink.insert(&[base.clone(), big.clone()]).await.unwrap();

    let back = sink.rated_events_of("acct-dec").await.unwrap();
    assert_eq!(back, vec![base.clone(), big.clone()]);
    assert_eq!(back[0].credits().to_string(), "123456.654321");
    assert_eq!(
        back[0].quantity().unwrap().to_string(),
        "999999999999.999999"
    );
    assert_eq!(back[0].billable_quantity().to_string(), "0.000001");
    assert_eq!(back[1].credits().to_string(), "999999999999.999999");
    assert_eq!(back[0].event_date(), back[0].event_time().date_naive());

    // The server agrees on the decimal text, and sums exactly into Decimal(38, 6).
    let text: Vec<String> = raw(&cfg)
        .query("SELECT toString(credits) FROM usage_events ORDER BY event_id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(text, ["123456.654321", "999999999999.999999"]);
    assert_eq!(
        sink.totals_by_account("acct-dec").await.unwrap(),
        (2, d("1000000123456.654320"))
    );
    drop_database(&cfg).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn errors_are_classified() {
    // Nothing listens on port 1: ClickHouse is "down".
    let down = AnalyticsSink::new(&ClickHouseConfig {
        url: "http://127.0.0.1:1".into(),
        ..clickhouse_config("down")
    });
    let e = down.ping().await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    let e = down.load_positions("g", &[]).await.unwrap_err();
    assert!(e.is_transient(), "{e}");

    // A database that was never migrated: retrying will not help.
    let cfg = clickhouse_config("unmigrated");
    let sink = AnalyticsSink::new(&cfg);
    let e = sink.totals_by_account("a").await.unwrap_err();
    assert!(!e.is_transient(), "{e}");

    // The password is never shown.
    let secret = ClickHouseConfig {
        password: tally::config::Secret::new("hunter2"),
        ..cfg
    };
    assert!(!format!("{:?}", AnalyticsSink::new(&secret)).contains("hunter2"));
    assert!(!format!(
        "{:?}",
        ChOffsetStore {
            config: secret,
            group_id: "g".into()
        }
    )
    .contains("hunter2"));
}
