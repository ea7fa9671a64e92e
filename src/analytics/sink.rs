//! The ClickHouse sink: turns a prepared (decoded and rated) event into a `rated_events` row,
//! writes a batch of rows in one INSERT, stores and loads consumed positions, and answers the
//! exact-total queries tests and reports use. With `migrate`, owns every ClickHouse call of
//! the crate.
//!
//! Wire quirks (clickhouse crate 0.15, servers 18.16 to current): validation is off (18.16 has
//! no RowBinaryWithNamesAndTypes), the database is set on the client and tables are named
//! bare, Decimals travel as their raw mantissa (i64 for Decimal(18, 6), i128 for
//! Decimal(38, 6)), DateTime as u32 Unix seconds and Date as u16 days since 1970-01-01.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::{Client, Compression, Row};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use super::{sql, AnalyticsError};
use crate::config::ClickHouseConfig;
use crate::event::{Payload, Quantity};
use crate::kafka::{LoadError, OffsetStore, Positions, TopicPartition};
use crate::pipeline::Prepared;

/// Rated usage, one row per event (see schemas/clickhouse/0001_rated_events.sql).
pub const RATED_EVENTS: &str = "rated_events";
/// Usage read after the billing grace (schemas/clickhouse/0003_late_usage.sql).
pub const LATE_USAGE: &str = "late_usage";

/// One `late_usage` row: a rated event analytics read after the billing grace.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct LateRow {
    pub event_source: String,
    pub event_id: String,
    pub account_id: String,
    pub kind: String,
    #[serde(rename = "event_date")]
    pub event_date_unix_days: u16,
    /// Decimal(18, 6) mantissa.
    #[serde(rename = "credits")]
    pub credits_e6: i64,
    #[serde(rename = "processed_at")]
    pub processed_at_unix_seconds: u32,
}

impl LateRow {
    /// The rows of `rows` whose event time is before `cutoff` (now - grace), read at `now`.
    pub fn of(rows: &[RatedRow], cutoff: DateTime<Utc>, now: DateTime<Utc>) -> Vec<LateRow> {
        let cutoff = unix_seconds(cutoff).unwrap_or(0);
        let now = unix_seconds(now).unwrap_or(u32::MAX);
        rows.iter()
            .filter(|r| r.event_time_unix_seconds < cutoff)
            .map(|r| LateRow {
                event_source: r.event_source.clone(),
                event_id: r.event_id.clone(),
                account_id: r.account_id.clone(),
                kind: r.kind.clone(),
                event_date_unix_days: r.event_date_unix_days,
                credits_e6: r.credits_e6,
                processed_at_unix_seconds: now,
            })
            .collect()
    }
}
/// Highest stored offset per partition, kept by a materialized view over `rated_events`.
pub const RATED_OFFSETS: &str = "rated_offsets";
/// Next offset per consumer group and partition, stored after every batch.
pub const CONSUMER_OFFSETS: &str = "consumer_offsets";

/// Longest a query (DDL, positions, totals) may take before it counts as a transient failure.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one batch INSERT may take. A timed-out insert may still land: the retry first asks
/// which identities are stored and writes only the others (see `docs/analytics.md`, "Limits",
/// for an insert still running on the server when the retry asks).
pub(crate) const INSERT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest text of one stored-identities query; a bigger batch is asked in several.
const STORED_KEYS_QUERY_BYTES: usize = 1 << 20;

/// Decimal columns have 6 decimal places: values travel as value × 10^6.
const SCALE: u32 = 6;

/// One `rated_events` row, in the column order of the table. Decimals, times and dates are
/// held in their wire form; the accessors give the typed values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct RatedRow {
    pub event_source: String,
    pub event_id: String,
    pub account_id: String,
    pub kind: String,
    #[serde(rename = "event_time")]
    pub event_time_unix_seconds: u32,
    #[serde(rename = "event_date")]
    pub event_date_unix_days: u16,
    pub model: String,
    pub voice_tier: String,
    pub channel: String,
    pub direction: String,
    pub instance_type: String,
    pub call_id: String,
    pub conversation_id: String,
    pub instance_id: String,
    pub answered: u8,
    pub responses: u32,
    /// Decimal(38, 6) mantissa: the raw measure (seconds or units) × 10^6.
    #[serde(rename = "quantity")]
    pub quantity_e6: i128,
    pub billable_seconds: u64,
    /// Decimal(18, 6) mantissa.
    #[serde(rename = "billable_quantity")]
    pub billable_quantity_e6: i64,
    pub unit: String,
    /// Decimal(18, 6) mantissa.
    #[serde(rename = "credits")]
    pub credits_e6: i64,
    pub price_version: String,
    pub rule_id: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    #[serde(rename = "inserted_at")]
    pub inserted_at_unix_seconds: u32,
}

impl RatedRow {
    pub fn credits(&self) -> Decimal {
        Decimal::new(self.credits_e6, SCALE)
    }

    pub fn billable_quantity(&self) -> Decimal {
        Decimal::new(self.billable_quantity_e6, SCALE)
    }

    /// None only if the mantissa exceeds `Decimal`'s 96 bits (never for rows built here).
    pub fn quantity(&self) -> Option<Decimal> {
        Decimal::try_from_i128_with_scale(self.quantity_e6, SCALE).ok()
    }

    pub fn event_time(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(i64::from(self.event_time_unix_seconds), 0).unwrap_or_default()
    }

    pub fn event_date(&self) -> NaiveDate {
        NaiveDate::default() + chrono::Days::new(u64::from(self.event_date_unix_days))
    }
}

/// The numeric columns of a usage event's `rated_events` row, checked to fit.
#[derive(Debug, Clone, Copy)]
pub struct NumericColumns {
    quantity_e6: i128,
    billable_quantity_e6: i64,
    credits_e6: i64,
    event_time_unix_seconds: u32,
    event_date_unix_days: u16,
}

/// The numeric columns of a usage event, or the error naming the value that cannot be stored
/// exactly (a time before 1970 or after 2106, a charge beyond Decimal(18, 6)). Cheap (no
/// allocation on success): both pipelines call it, so they refuse the same events.
pub fn numeric_columns(
    usage: &crate::event::Usage<'_>,
    charge: &crate::rating::Charge<'_>,
    time: DateTime<Utc>,
    identity: (&str, &str),
) -> Result<NumericColumns, AnalyticsError> {
    let out_of_range = |field: &'static str, value: String| AnalyticsError::OutOfRange {
        source_id: identity.0.to_owned(),
        event_id: identity.1.to_owned(),
        field,
        value,
    };
    let quantity = match usage.quantity {
        Quantity::Seconds(s) => Decimal::from(s),
        Quantity::Units(u) => u,
    };
    let quantity_e6 =
        mantissa6(quantity).ok_or_else(|| out_of_range("quantity", quantity.to_string()))?;
    let billable_quantity_e6 = mantissa6(charge.billable_quantity)
        .and_then(|m| i64::try_from(m).ok())
        .ok_or_else(|| out_of_range("billable_quantity", charge.billable_quantity.to_string()))?;
    let credits_e6 = mantissa6(charge.credits)
        .and_then(|m| i64::try_from(m).ok())
        .ok_or_else(|| out_of_range("credits", charge.credits.to_string()))?;
    let event_time_unix_seconds =
        unix_seconds(time).ok_or_else(|| out_of_range("event_time", time.to_rfc3339()))?;
    let event_date_unix_days = unix_days(time.date_naive())
        .ok_or_else(|| out_of_range("event_date", time.date_naive().to_string()))?;
    Ok(NumericColumns {
        quantity_e6,
        billable_quantity_e6,
        credits_e6,
        event_time_unix_seconds,
        event_date_unix_days,
    })
}

/// The `rated_events` row of a prepared event: None for grants and plans (they carry no
/// usage). Its numeric columns were checked by `prepare` ([`numeric_columns`]).
pub fn rated_row(
    p: &Prepared<'_, '_>,
    inserted_at: DateTime<Utc>,
) -> Result<Option<RatedRow>, AnalyticsError> {
    let (Some(charge), Some(columns), Some(usage)) = (&p.charge, p.columns, p.event.usage()) else {
        return Ok(None);
    };
    let env = &p.event.envelope;
    let NumericColumns {
        quantity_e6,
        billable_quantity_e6,
        credits_e6,
        event_time_unix_seconds,
        event_date_unix_days,
    } = columns;
    let attribute = |key: &str| -> String {
        usage
            .attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
            .unwrap_or_default()
    };
    let (mut call_id, mut conversation_id, mut instance_id) =
        (String::new(), String::new(), String::new());
    let (mut answered, mut responses) = (0u8, 0u32);
    match &p.event.payload {
        Payload::Call(c) => {
            call_id = c.call_id.to_string();
            answered = u8::from(c.answered_at.is_some());
        }
        Payload::Chat(c) => {
            conversation_id = c.conversation_id.to_string();
            responses = c.responses;
        }
        Payload::Instance(i) => instance_id = i.instance_id.to_string(),
        Payload::Metered(_) | Payload::Grant(_) | Payload::Plan(_) => {}
    }
    let inserted_at_unix_seconds =
        unix_seconds(inserted_at).ok_or_else(|| AnalyticsError::OutOfRange {
            source_id: env.source.to_string(),
            event_id: env.id.to_string(),
            field: "inserted_at",
            value: inserted_at.to_rfc3339(),
        })?;
    Ok(Some(RatedRow {
        event_source: env.source.to_string(),
        event_id: env.id.to_string(),
        account_id: env.account_id.to_string(),
        kind: usage.kind.to_owned(),
        event_time_unix_seconds,
        event_date_unix_days,
        model: attribute("model"),
        voice_tier: attribute("voice_tier"),
        channel: attribute("channel"),
        direction: attribute("direction"),
        instance_type: attribute("instance_type"),
        call_id,
        conversation_id,
        instance_id,
        answered,
        responses,
        quantity_e6,
        billable_seconds: charge.billable_seconds,
        billable_quantity_e6,
        unit: charge.unit.as_str().to_owned(),
        credits_e6,
        price_version: charge.price_version.to_owned(),
        rule_id: charge.rule_id.to_owned(),
        topic: p.record.topic.to_string(),
        partition: u32::try_from(p.record.partition).unwrap_or_default(),
        offset: u64::try_from(p.record.offset).unwrap_or_default(),
        inserted_at_unix_seconds,
    }))
}

/// value × 10^6 as an integer (rounded half away from zero past 6 places, like credits);
/// None when it does not fit.
fn mantissa6(value: Decimal) -> Option<i128> {
    let mut v = value.round_dp_with_strategy(SCALE, RoundingStrategy::MidpointAwayFromZero);
    v.rescale(SCALE);
    (v.scale() == SCALE).then(|| v.mantissa())
}

pub(crate) fn from_mantissa6(op: &'static str, mantissa: i128) -> Result<Decimal, AnalyticsError> {
    Decimal::try_from_i128_with_scale(mantissa, SCALE).map_err(|_| AnalyticsError::Overflow {
        op,
        value: format!("{mantissa}e-6"),
    })
}

fn unix_seconds(t: DateTime<Utc>) -> Option<u32> {
    u32::try_from(t.timestamp()).ok()
}

fn unix_days(d: NaiveDate) -> Option<u16> {
    u16::try_from((d - NaiveDate::default()).num_days()).ok()
}

/// What [`AnalyticsSink::insert`] did with a batch: every row is in exactly one count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Rows written: identities not stored before.
    pub written: usize,
    /// Rows not written because their identity was already in `rated_events`.
    pub already_stored: usize,
    /// Rows not written because an earlier row of the same batch had their identity.
    pub repeated: usize,
}

/// A row's key in `rated_events` (its ORDER BY): account, day, then the event identity.
type RowKey<'a> = (&'a str, u16, &'a str, &'a str);

fn row_key(row: &RatedRow) -> RowKey<'_> {
    (
        &row.account_id,
        row.event_date_unix_days,
        &row.event_source,
        &row.event_id,
    )
}

/// A key found stored, as read back.
#[derive(Debug, Row, Deserialize)]
struct StoredKey {
    account_id: String,
    event_date: u16,
    event_source: String,
    event_id: String,
}

/// The queries asking which of `rows`' keys are stored, each at most about `max_bytes` long
/// (one row's key always fits in a query of its own). They return candidates: rows whose
/// account, day and event id are each among the chunk's (a superset of the stored keys, which
/// the caller matches exactly). Flat lists rather than a list of key tuples: ClickHouse 18.16
/// parses and plans thousands of tuple literals several times slower. The account and day
/// lists narrow the read by the primary key; `event_id` is checked first (PREWHERE), so the
/// other columns are read only for candidates. No FINAL: any stored copy counts.
pub fn stored_keys_queries(rows: &[&RatedRow], max_bytes: usize) -> Vec<String> {
    use std::collections::BTreeSet;
    #[derive(Default)]
    struct Chunk<'a> {
        accounts: BTreeSet<&'a str>,
        days: BTreeSet<u16>,
        ids: BTreeSet<&'a str>,
        bytes: usize,
    }
    fn sql_of(c: &Chunk<'_>) -> String {
        let list = |items: Vec<String>| items.join(", ");
        format!(
            "SELECT account_id, event_date, event_source, event_id FROM rated_events \
             PREWHERE event_id IN ({}) WHERE account_id IN ({}) AND event_date IN ({})",
            list(c.ids.iter().map(|s| sql::string(s)).collect()),
            list(c.accounts.iter().map(|s| sql::string(s)).collect()),
            list(
                c.days
                    .iter()
                    .map(|&d| format!("'{}'", sql::date_from_unix_days(d).format("%Y-%m-%d")))
                    .collect()
            ),
        )
    }
    let mut queries = Vec::new();
    let mut chunk = Chunk::default();
    for row in rows {
        let cost = row.account_id.len() + row.event_id.len() + 32;
        if !chunk.ids.is_empty() && chunk.bytes + cost > max_bytes {
            queries.push(sql_of(&chunk));
            chunk = Chunk::default();
        }
        chunk.bytes += cost;
        chunk.accounts.insert(&row.account_id);
        chunk.days.insert(row.event_date_unix_days);
        chunk.ids.insert(&row.event_id);
    }
    if !chunk.ids.is_empty() {
        queries.push(sql_of(&chunk));
    }
    queries
}

/// A `consumer_offsets` row.
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct OffsetRow {
    group_id: String,
    topic: String,
    partition: u32,
    next_offset: u64,
    #[serde(rename = "updated_at")]
    updated_at_unix_seconds: u32,
}

/// One stored position, as read back.
#[derive(Debug, Row, Deserialize)]
struct PositionRow {
    topic: String,
    partition: u32,
    next_offset: u64,
}

/// Writes rated rows and positions to one ClickHouse database. Cheap to clone; the HTTP
/// client connects lazily, so building one never fails for a server that is down.
#[derive(Clone)]
pub struct AnalyticsSink {
    client: Client,
    database: String,
}

impl std::fmt::Debug for AnalyticsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's own Debug redacts credentials.
        f.debug_struct("AnalyticsSink")
            .field("client", &self.client)
            .field("database", &self.database)
            .finish()
    }
}

/// A client for the configured server: RowBinary without validation, LZ4, and the database
/// when given (it must exist: migrate builds its client without one).
pub(crate) fn client(cfg: &ClickHouseConfig, database: Option<&str>) -> Client {
    let mut client = Client::default()
        .with_url(&cfg.url)
        .with_user(&cfg.user)
        .with_compression(Compression::Lz4)
        .with_validation(false);
    if !cfg.password.expose().is_empty() {
        client = client.with_password(cfg.password.expose());
    }
    if let Some(db) = database {
        client = client.with_database(db);
    }
    client
}

/// Runs a client call under a deadline, naming the operation in the error.
pub(crate) async fn run_timed<T>(
    op: &'static str,
    after: Duration,
    fut: impl Future<Output = clickhouse::error::Result<T>>,
) -> Result<T, AnalyticsError> {
    match tokio::time::timeout(after, fut).await {
        Ok(result) => result.map_err(AnalyticsError::clickhouse(op)),
        Err(_) => Err(AnalyticsError::Timeout { op, after }),
    }
}

impl AnalyticsSink {
    /// A sink for `cfg.database` (which [`super::migrate`] creates). Never fails: nothing
    /// connects until the first call, and the database travels as a URL parameter, never
    /// spliced into SQL.
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        AnalyticsSink {
            client: client(cfg, Some(&cfg.database)),
            database: cfg.database.clone(),
        }
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Succeeds when the server answers a query in the database.
    pub async fn ping(&self) -> Result<(), AnalyticsError> {
        run_timed(
            "ping",
            QUERY_TIMEOUT,
            self.client.query("SELECT 1").execute(),
        )
        .await
    }

    /// Writes the rows whose identity is not stored yet, in one INSERT (one HTTP request,
    /// LZ4-compressed). A row repeating an identity earlier in `rows`, or one already in
    /// `rated_events` (a replayed batch, a producer retry read at another offset, the retry of
    /// an insert that landed), is not written: the roll-ups' materialized views see every
    /// inserted block, so each identity must reach them once. Which keys exist is asked first
    /// (see [`stored_keys_queries`]).
    pub async fn insert(&self, rows: &[RatedRow]) -> Result<InsertOutcome, AnalyticsError> {
        if rows.is_empty() {
            return Ok(InsertOutcome::default());
        }
        // First occurrence of each identity, in batch order.
        let mut index: HashMap<RowKey<'_>, usize> = HashMap::with_capacity(rows.len());
        let mut unique: Vec<&RatedRow> = Vec::with_capacity(rows.len());
        for row in rows {
            if let std::collections::hash_map::Entry::Vacant(e) = index.entry(row_key(row)) {
                e.insert(unique.len());
                unique.push(row);
            }
        }
        let repeated = rows.len() - unique.len();
        let mut stored = vec![false; unique.len()];
        for sql in stored_keys_queries(&unique, STORED_KEYS_QUERY_BYTES) {
            // Room for the whole text whatever the server's default (256 KiB).
            let max_query_size = (sql.len() + 4096).max(262_144).to_string();
            let found = run_timed(
                "check stored identities",
                QUERY_TIMEOUT,
                self.client
                    .query_raw(&sql)
                    .with_setting("max_query_size", max_query_size)
                    .fetch_all::<StoredKey>(),
            )
            .await?;
            for k in &found {
                let key = (
                    k.account_id.as_str(),
                    k.event_date,
                    k.event_source.as_str(),
                    k.event_id.as_str(),
                );
                if let Some(&i) = index.get(&key) {
                    stored[i] = true;
                }
            }
        }
        let fresh: Vec<&RatedRow> = unique
            .iter()
            .zip(&stored)
            .filter(|(_, &s)| !s)
            .map(|(r, _)| *r)
            .collect();
        let outcome = InsertOutcome {
            written: fresh.len(),
            already_stored: unique.len() - fresh.len(),
            repeated,
        };
        if fresh.is_empty() {
            return Ok(outcome);
        }
        let client = &self.client;
        run_timed("insert rated_events", INSERT_TIMEOUT, async move {
            let mut insert = client.insert::<RatedRow>(RATED_EVENTS).await?;
            for row in fresh {
                insert.write(row).await?;
            }
            insert.end().await
        })
        .await?;
        Ok(outcome)
    }

    /// Marks rows late (one INSERT; idempotent by identity).
    pub async fn insert_late(&self, rows: &[LateRow]) -> Result<(), AnalyticsError> {
        if rows.is_empty() {
            return Ok(());
        }
        let client = &self.client;
        run_timed("insert late_usage", INSERT_TIMEOUT, async move {
            let mut insert = client.insert::<LateRow>(LATE_USAGE).await?;
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        })
        .await
    }

    /// Exact (events, credits) of an account's usage marked late, duplicates collapsed.
    pub async fn late_totals(&self, account_id: &str) -> Result<(u64, Decimal), AnalyticsError> {
        self.exact_totals("late totals", LATE_USAGE, account_id)
            .await
    }

    /// Stores the next offset of each partition for `group` (one INSERT). Positions only move
    /// forward: the table keeps the largest offset per partition.
    pub async fn store_positions(
        &self,
        group: &str,
        positions: &Positions,
    ) -> Result<(), AnalyticsError> {
        if positions.is_empty() {
            return Ok(());
        }
        let now = unix_seconds(Utc::now()).unwrap_or(u32::MAX);
        let rows: Vec<OffsetRow> = positions
            .iter()
            .map(|((topic, partition), &next)| OffsetRow {
                group_id: group.to_owned(),
                topic: topic.clone(),
                partition: u32::try_from(*partition).unwrap_or_default(),
                next_offset: u64::try_from(next).unwrap_or_default(),
                updated_at_unix_seconds: now,
            })
            .collect();
        let client = &self.client;
        run_timed("store positions", QUERY_TIMEOUT, async move {
            let mut insert = client.insert::<OffsetRow>(CONSUMER_OFFSETS).await?;
            for row in &rows {
                insert.write(row).await?;
            }
            insert.end().await
        })
        .await
    }

    /// The next offset to read for each of `partitions` that has anything stored: the larger
    /// of (highest offset in `rated_events`) + 1 and the group's stored position. Partitions
    /// with nothing stored are absent (the consumer starts them at the beginning).
    pub async fn load_positions(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<Positions, AnalyticsError> {
        let mut positions = self.committed_positions(group, partitions).await?;
        let rated = run_timed(
            "load positions",
            QUERY_TIMEOUT,
            self.client
                .query(
                    "SELECT topic, `partition`, max(max_offset) + 1 AS next_offset \
                     FROM rated_offsets GROUP BY topic, `partition`",
                )
                .fetch_all::<PositionRow>(),
        )
        .await?;
        fold_positions(rated, partitions, &mut positions);
        Ok(positions)
    }

    /// The positions the group stored after its batches were fully written (roll-up views
    /// included): what "caught up" means for idle detection. `rated_offsets` alone can run
    /// ahead of the roll-ups while an insert is still feeding its views.
    pub async fn committed_positions(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<Positions, AnalyticsError> {
        // A handful of rows per partition: read them whole, filter here.
        let stored = run_timed(
            "load positions",
            QUERY_TIMEOUT,
            self.client
                .query(
                    "SELECT topic, `partition`, max(next_offset) AS stored_next_offset \
                     FROM consumer_offsets WHERE group_id = ? GROUP BY topic, `partition`",
                )
                .bind(group)
                .fetch_all::<PositionRow>(),
        )
        .await?;
        let mut positions = Positions::new();
        fold_positions(stored, partitions, &mut positions);
        Ok(positions)
    }

    /// Exact (events, credits) of an account, duplicates collapsed (`FINAL`).
    pub async fn totals_by_account(
        &self,
        account_id: &str,
    ) -> Result<(u64, Decimal), AnalyticsError> {
        self.exact_totals("totals by account", RATED_EVENTS, account_id)
            .await
    }

    /// (events, credits) of an account in `table` (keyed by identity, read with `FINAL`).
    async fn exact_totals(
        &self,
        op: &'static str,
        table: &str,
        account_id: &str,
    ) -> Result<(u64, Decimal), AnalyticsError> {
        #[derive(Row, Deserialize)]
        struct Totals {
            events: u64,
            // sum() of a Decimal(18, 6) is a Decimal(38, 6).
            total_credits: i128,
        }
        let totals = run_timed(
            op,
            QUERY_TIMEOUT,
            self.client
                .query(&format!(
                    // An alias never reuses a column name: ClickHouse resolves aliases
                    // first, so `sum(credits) AS credits` shadows the column query-wide.
                    "SELECT count() AS events, sum(credits) AS total_credits \
                     FROM {table} FINAL WHERE account_id = ?"
                ))
                .bind(account_id)
                .fetch_one::<Totals>(),
        )
        .await?;
        Ok((totals.events, from_mantissa6(op, totals.total_credits)?))
    }

    /// An account's rows, duplicates collapsed (`FINAL`), by event identity.
    pub async fn rated_events_of(&self, account_id: &str) -> Result<Vec<RatedRow>, AnalyticsError> {
        run_timed(
            "rated events of account",
            QUERY_TIMEOUT,
            self.client
                .query(
                    "SELECT ?fields FROM rated_events FINAL WHERE account_id = ? \
                     ORDER BY event_source, event_id",
                )
                .bind(account_id)
                .fetch_all::<RatedRow>(),
        )
        .await
    }
}

/// The analytics consumer's [`OffsetStore`]: positions as [`AnalyticsSink::load_positions`]
/// computes them. Each load builds its own client (the rebalance callback runs it on a runtime
/// of its own).
#[derive(Debug, Clone)]
pub struct ChOffsetStore {
    pub config: ClickHouseConfig,
    pub group_id: String,
}

impl OffsetStore for ChOffsetStore {
    fn load(
        &self,
        partitions: Vec<TopicPartition>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Positions, LoadError>> + Send>> {
        let config = self.config.clone();
        let group = self.group_id.clone();
        Box::pin(async move {
            let sink = AnalyticsSink::new(&config);
            sink.load_positions(&group, &partitions)
                .await
                .map_err(LoadError::new)
        })
    }
}

/// Keeps, per asked-for partition, the highest next offset among `rows`.
fn fold_positions(
    rows: Vec<PositionRow>,
    partitions: &[TopicPartition],
    positions: &mut Positions,
) {
    for row in rows {
        let key = (row.topic, i32::try_from(row.partition).unwrap_or(i32::MAX));
        if !partitions.contains(&key) {
            continue;
        }
        let next = i64::try_from(row.next_offset).unwrap_or(i64::MAX);
        let entry = positions.entry(key).or_insert(next);
        *entry = (*entry).max(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn mantissas_are_exact() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(mantissa6(d("1.5")), Some(1_500_000));
        assert_eq!(mantissa6(d("0.000001")), Some(1));
        assert_eq!(
            mantissa6(d("123456789012.123456")),
            Some(123_456_789_012_123_456)
        );
        assert_eq!(mantissa6(d("0.0000005")), Some(1));
        assert_eq!(mantissa6(Decimal::ZERO), Some(0));
        // Decimal's maximum (~7.9e28) cannot carry 6 decimal places.
        assert_eq!(mantissa6(Decimal::MAX), None);
        let back = from_mantissa6("t", 123_456_789_012_123_456).unwrap();
        assert_eq!(back.to_string(), "123456789012.123456");
    }

    #[test]
    fn stored_keys_queries_cover_every_row() {
        let row = |account: &str, days: u16, id: &str| RatedRow {
            event_source: "//s?x='1'".into(),
            event_id: id.into(),
            account_id: account.into(),
            kind: "call".into(),
            event_time_unix_seconds: u32::from(days) * 86_400,
            event_date_unix_days: days,
            ..Default::default()
        };
        let rows = [
            row("a", 20_240, "e-1"),
            row("b", 20_241, "e'2?"),
            row("a", 20_240, "e-3"),
        ];
        let refs: Vec<&RatedRow> = rows.iter().collect();
        let one = stored_keys_queries(&refs, 1 << 20);
        assert_eq!(one.len(), 1);
        assert!(
            one[0].contains(r"PREWHERE event_id IN ('e\'2?', 'e-1', 'e-3')"),
            "{}",
            one[0]
        );
        assert!(one[0]
            .contains("account_id IN ('a', 'b') AND event_date IN ('2025-06-01', '2025-06-02')"));
        // One row per query when each is over the limit: never an empty query.
        assert_eq!(stored_keys_queries(&refs, 1).len(), 3);
        assert!(stored_keys_queries(&[], 1).is_empty());
    }

    #[test]
    fn times_and_dates() {
        let t = DateTime::parse_from_rfc3339("2024-02-29T23:59:59Z")
            .unwrap()
            .to_utc();
        assert_eq!(unix_seconds(t), Some(1_709_251_199));
        assert_eq!(unix_days(t.date_naive()), Some(19_782));
        let before = DateTime::parse_from_rfc3339("1969-12-31T23:59:59Z")
            .unwrap()
            .to_utc();
        assert_eq!(unix_seconds(before), None);
        assert_eq!(unix_days(before.date_naive()), None);
    }
}
