//! Checks that the three real services answer the way Tally uses them: Kafka (topic creation,
//! keyed idempotent produce, consumer group), ClickHouse (DDL, RowBinary insert, exact decimal
//! sum) and PostgreSQL (exact numeric sum). Starts nothing: run `scripts/services up` first
//! (`scripts/test` does). Addresses come from TALLY_TEST_KAFKA_BROKERS,
//! TALLY_TEST_CLICKHOUSE_URL and TALLY_TEST_POSTGRES_URL.

use std::collections::BTreeMap;
use std::net::ToSocketAddrs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clickhouse::Row;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde::Serialize;

const KAFKA_VAR: &str = "TALLY_TEST_KAFKA_BROKERS";
const CLICKHOUSE_VAR: &str = "TALLY_TEST_CLICKHOUSE_URL";
const POSTGRES_VAR: &str = "TALLY_TEST_POSTGRES_URL";

const KAFKA_DEFAULT: &str = "127.0.0.1:9092";
const CLICKHOUSE_DEFAULT: &str = "http://127.0.0.1:8123";
const POSTGRES_DEFAULT: &str = "host=127.0.0.1 user=postgres dbname=tally";

/// How long one step against a service may take before the test gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn setting(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// A name no other run (or concurrent test process) uses: `<prefix>-<pid>-<nanos>`.
fn unique_name(prefix: &str, separator: char) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "{prefix}{separator}{}{separator}{nanos}",
        std::process::id()
    )
}

/// Fails the test with the hint every unreachable service deserves.
#[track_caller]
fn unreachable(service: &str, address: &str, var: &str, error: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is unreachable at {address}: {error}\n\
         Start the local services with `scripts/services up` (scripts/test does it for you), \
         or point {var} at a running {service}."
    )
}

/// An error and its causes, `: `-separated (some errors only say "error connecting to server").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP_TIMEOUT:?}"))
}

// --- Kafka ----------------------------------------------------------------------------------

/// Connects to the first bootstrap broker, so that a stopped broker fails fast and clearly
/// instead of through librdkafka's retries.
async fn assert_kafka_reachable(brokers: &str) {
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let addresses: Vec<_> = match first.to_socket_addrs() {
        Ok(addresses) => addresses.collect(),
        Err(error) => unreachable("Kafka", first, KAFKA_VAR, error),
    };
    let Some(address) = addresses.first() else {
        unreachable("Kafka", first, KAFKA_VAR, "no address")
    };
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => unreachable("Kafka", first, KAFKA_VAR, error),
        Err(_) => unreachable("Kafka", first, KAFKA_VAR, "connect timed out"),
    }
}

fn kafka_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", "10000");
    config
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn kafka_topic_produce_consume_round_trip() {
    const PARTITIONS: i32 = 3;
    let brokers = setting(KAFKA_VAR, KAFKA_DEFAULT);
    assert_kafka_reachable(&brokers).await;

    // Topics are never auto-created and never deleted (DeleteTopics on Tansu's sqlite storage
    // drops every topic): each run uses a fresh name.
    let topic = unique_name("svc-check", '-');
    let admin: AdminClient<DefaultClientContext> =
        kafka_config(&brokers).create().expect("Kafka admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let created = within(
        "Kafka CreateTopics",
        admin.create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &options,
        ),
    )
    .await
    .unwrap_or_else(|error| unreachable("Kafka", &brokers, KAFKA_VAR, error));
    for result in created {
        result.unwrap_or_else(|(name, code)| panic!("creating topic {name}: {code}"));
    }

    let producer: FutureProducer = kafka_config(&brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "20000")
        .create()
        .expect("Kafka producer");
    let sent: Vec<(String, String)> = (0..9)
        .map(|i| (format!("account-{}", i % 3), format!("payload-{i}")))
        .collect();
    let mut partition_of_key = BTreeMap::new();
    for (key, payload) in &sent {
        let delivery = within(
            "Kafka produce",
            producer.send(
                FutureRecord::to(&topic).key(key).payload(payload),
                Duration::from_secs(10),
            ),
        )
        .await
        .unwrap_or_else(|(error, _)| panic!("producing to {topic}: {error}"));
        assert!((0..PARTITIONS).contains(&delivery.partition));
        assert!(delivery.offset >= 0);
        // Keyed messages stick to one partition.
        let first = *partition_of_key
            .entry(key.clone())
            .or_insert(delivery.partition);
        assert_eq!(
            first, delivery.partition,
            "key {key} moved between partitions"
        );
    }

    let consumer: StreamConsumer = kafka_config(&brokers)
        .set("group.id", unique_name("svc-check-group", '-'))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000")
        .create()
        .expect("Kafka consumer");
    consumer
        .subscribe(&[&topic])
        .expect("subscribing to the topic");
    let mut received: Vec<(String, String)> = Vec::new();
    while received.len() < sent.len() {
        let message = within("Kafka consume", consumer.recv())
            .await
            .unwrap_or_else(|error| panic!("consuming {topic}: {error}"));
        let key = String::from_utf8(message.key().expect("message key").to_vec()).expect("utf-8");
        let payload =
            String::from_utf8(message.payload().expect("payload").to_vec()).expect("utf-8");
        assert_eq!(
            Some(&message.partition()),
            partition_of_key.get(&key),
            "{key} consumed from another partition than it was produced to"
        );
        received.push((key, payload));
    }

    // Exact payloads, each key's messages in the order they were produced.
    let by_key = |messages: &[(String, String)]| {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, payload) in messages {
            map.entry(key.clone()).or_default().push(payload.clone());
        }
        map
    };
    assert_eq!(by_key(&received), by_key(&sent));
}

// --- ClickHouse -----------------------------------------------------------------------------

#[derive(Row, Serialize)]
struct CreditRow {
    account: String,
    /// Decimal(18, 6) travels in RowBinary as its raw mantissa (micro-credits).
    credits: i64,
    events: u32,
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn clickhouse_insert_and_exact_sum() {
    let url = setting(CLICKHOUSE_VAR, CLICKHOUSE_DEFAULT);
    // 18.16 does not know RowBinaryWithNamesAndTypes: no client-side validation.
    let client = clickhouse::Client::default()
        .with_url(&url)
        .with_validation(false);
    let one = within(
        "ClickHouse SELECT 1",
        client.query("SELECT 1").fetch_one::<u8>(),
    )
    .await
    .unwrap_or_else(|error| unreachable("ClickHouse", &url, CLICKHOUSE_VAR, with_causes(&error)));
    assert_eq!(one, 1);

    let database = unique_name("svc_check", '_');
    client
        .query(&format!("CREATE DATABASE {database}"))
        .execute()
        .await
        .expect("CREATE DATABASE");
    // LowCardinality proves the server profile allows it (an experimental type on 18.16).
    client
        .query(&format!(
            "CREATE TABLE {database}.credits (account LowCardinality(String), \
             credits Decimal(18, 6), events UInt32) ENGINE = MergeTree ORDER BY account"
        ))
        .execute()
        .await
        .expect("CREATE TABLE with a LowCardinality column");

    // insert("db.table") would quote the whole name: database on the client, bare table name.
    let in_database = client.clone().with_database(&database);
    let rows = [
        ("acct-a", 1_500_000_i64, 1_u32), // 1.5
        ("acct-b", 2_250_001, 2),         // 2.250001
        ("acct-a", 999_999, 3),           // 0.999999
        ("acct-c", 10_000_000_000, 4),    // 10000
    ];
    let mut insert = in_database
        .insert::<CreditRow>("credits")
        .await
        .expect("INSERT start");
    for (account, credits_micros, events) in rows {
        insert
            .write(&CreditRow {
                account: account.to_owned(),
                credits: credits_micros,
                events,
            })
            .await
            .expect("INSERT row");
    }
    within("ClickHouse INSERT", insert.end())
        .await
        .expect("INSERT end");

    // sum() of a Decimal(18, 6) is a Decimal(38, 6): an i128 mantissa.
    let (sum_micros, events, accounts) = in_database
        .query("SELECT sum(credits), sum(events), uniqExact(account) FROM credits")
        .fetch_one::<(i128, u64, u64)>()
        .await
        .expect("SELECT sum");
    assert_eq!(sum_micros, 10_004_750_000);
    assert_eq!(Decimal::from_i128_with_scale(sum_micros, 6), dec!(10004.75));
    assert_eq!(events, 10);
    assert_eq!(accounts, 3);

    client
        .query(&format!("DROP DATABASE {database}"))
        .execute()
        .await
        .expect("DROP DATABASE");
}

// --- PostgreSQL -----------------------------------------------------------------------------

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn postgres_exact_numeric_sum() {
    let url = setting(POSTGRES_VAR, POSTGRES_DEFAULT);
    let (client, connection) = within(
        "PostgreSQL connect",
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await
    .unwrap_or_else(|error| unreachable("PostgreSQL", &url, POSTGRES_VAR, with_causes(&error)));
    let connection = tokio::spawn(connection);

    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .expect("server_version_num")
        .get(0);
    assert!(
        version >= 150_000,
        "PostgreSQL 15 or newer expected, got {version}"
    );

    client
        .batch_execute(
            "CREATE TEMPORARY TABLE svc_check (credits numeric(20, 6) NOT NULL);
             INSERT INTO svc_check VALUES (1.5), (2.250001), (0.999999), (10000);",
        )
        .await
        .expect("temporary table");
    let row = client
        .query_one(
            "SELECT sum(credits), count(*), $1::int8 + 1 FROM svc_check",
            &[&41_i64],
        )
        .await
        .expect("SELECT sum");
    let sum: Decimal = row.get(0);
    let count: i64 = row.get(1);
    let answer: i64 = row.get(2);
    assert_eq!(sum, dec!(10004.750000));
    assert_eq!(sum.to_string(), "10004.750000");
    assert_eq!(count, 4);
    assert_eq!(answer, 42);

    drop(client);
    connection
        .await
        .expect("connection task")
        .expect("connection closed cleanly");
}
