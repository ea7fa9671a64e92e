//! The ClickHouse sink: the `usage_events` row type (the analytics pipeline fills it from a
//! prepared event: `pipeline::analytics::rated_row`) and its checked numeric columns, writes a
//! batch (its rows, their identities, then the roll-up blocks it touched, recomputed),
//! stores and loads consumed positions, and answers the exact-total queries tests and reports
//! use. With `migrate`, owns every ClickHouse call of the crate.
//!
//! Convergence (schemas/clickhouse/0004_convergent_rollups.sql): nothing is checked before
//! writing and nothing is incremented. A row is keyed by its Kafka position, an identity's
//! counting copy is the one with the highest `admission` among its stored copies, and a roll-up
//! row is a pure function of the stored rows of one block of offsets. So writing a batch twice,
//! half-way, late, or from two instances at once ends with the same tables.
//!
//! Wire quirks (clickhouse crate 0.15, servers 18.16 to current): validation is off (18.16 has
//! no RowBinaryWithNamesAndTypes), the database is set on the client and tables are named
//! bare, Decimals travel as their raw mantissa (i64 for Decimal(18, 6), i128 for
//! Decimal(38, 6)), DateTime as u32 Unix seconds and Date as u16 days since 1970-01-01.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::{Client, Compression, Row};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::ClickHouseConfig;
use super::{sql, AnalyticsError};
use crate::credits::{Credits, SCALE};
use crate::event::Quantity;
use crate::kafka::{LoadError, OffsetStore, Positions, TopicPartition};

/// Rated usage, one row per admitted record, keyed by position (migration 0004).
pub const USAGE_EVENTS: &str = "usage_events";
/// Every stored copy of every identity, with its admission rank, keyed by a hash of the
/// identity (`id_hash`, computed by the server: migration 0005). Replaces 0004's
/// `usage_identities`, no longer written.
pub const USAGE_COPIES: &str = "usage_copies";
/// The identity hash of `usage_copies`, as an expression on `event_source` and `event_id`
/// (the column's MATERIALIZED expression).
const ID_HASH: &str = "cityHash64(event_source, event_id)";
/// The copies that do not count, by position (migration 0004).
pub const USAGE_LOSERS: &str = "usage_losers";
/// Most identity hashes named in one statement reading their copies ([`copies_sql`]); past
/// it, the copies of the whole batch are read ([`batch_copies_sql`]).
const HASHES_PER_QUERY: usize = 4096;
/// Offsets per roll-up block: each roll-up row covers one block of one partition.
pub const BLOCK_OFFSETS: u64 = 8192;
/// Voided usage, by the original's identity and account (migration 0006).
pub const USAGE_VOIDS: &str = "usage_voids";
/// The condition a `usage_events` row counts under when it is not voided (SQL on its
/// columns): its (account, identity) is not in [`USAGE_VOIDS`].
pub const NOT_VOIDED: &str = "(account_id, event_source, event_id) NOT IN \
     (SELECT account_id, event_source, event_id FROM usage_voids)";
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
/// Next offset per consumer group and partition, stored after every batch.
pub const CONSUMER_OFFSETS: &str = "consumer_offsets";

/// Longest a query (DDL, positions, totals) may take before it counts as a transient failure.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one batch INSERT may take. A timed-out insert may still land: the retry writes the
/// same keys again and recomputes the same blocks, so either outcome converges.
pub(crate) const INSERT_TIMEOUT: Duration = Duration::from_secs(60);

/// One `usage_events` row, in the column order of the table. Decimals, times and dates are
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
    /// Larger = admitted earlier ([`admission_rank`]): of an identity's copies, the one with
    /// the largest counts.
    pub admission: u64,
}

/// The admission rank of a record: `u64::MAX - (timestamp_ms * 2^21 + offset mod 2^21)`, so
/// the copy with the earliest record timestamp (then the lowest offset) ranks highest. The
/// record's Kafka timestamp, or the event time when it has none: a function of the record,
/// the same whoever reads it and whenever.
pub fn admission_rank(timestamp_ms: i64, offset: i64) -> u64 {
    const OFFSET_BITS: u32 = 21;
    let ms = u64::try_from(timestamp_ms).unwrap_or(0).min((1 << 42) - 1);
    let low = u64::try_from(offset).unwrap_or(0) & ((1 << OFFSET_BITS) - 1);
    u64::MAX - ((ms << OFFSET_BITS) | low)
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

/// The numeric columns of a usage event's `usage_events` row, checked to fit: made only by
/// [`numeric_columns`] (outside the crate).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct NumericColumns {
    pub quantity_e6: i128,
    pub billable_quantity_e6: i64,
    pub credits_e6: i64,
    pub event_time_unix_seconds: u32,
    pub event_date_unix_days: u16,
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
    let quantity_e6 = Credits::round(quantity)
        .map(Credits::micros)
        .ok_or_else(|| out_of_range("quantity", quantity.to_string()))?;
    let billable_quantity_e6 = Credits::round(charge.billable_quantity)
        .map(Credits::micros)
        .and_then(|m| i64::try_from(m).ok())
        .ok_or_else(|| out_of_range("billable_quantity", charge.billable_quantity.to_string()))?;
    let credits_e6 = Credits::round(charge.credits)
        .map(Credits::micros)
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

pub(crate) fn from_mantissa6(op: &'static str, mantissa: i128) -> Result<Decimal, AnalyticsError> {
    Credits::from_micros(mantissa)
        .map(Decimal::from)
        .ok_or_else(|| AnalyticsError::Overflow {
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

/// What [`AnalyticsSink::insert`] did with a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Rows written to `usage_events` (every row given, replays included: they collapse).
    pub written: usize,
    /// Rows of the batch that do not count: another copy of their identity (earlier in the
    /// batch, or stored before) was admitted first.
    pub duplicates: usize,
    /// Roll-up blocks recomputed.
    pub blocks: usize,
    /// How long each statement took (summed over the parts of a split batch).
    pub timings: StatementTimes,
}

/// Wall-clock time of each statement of [`AnalyticsSink::insert`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatementTimes {
    /// INSERT into `usage_events`.
    pub events: Duration,
    /// INSERT into `usage_copies`.
    pub identities: Duration,
    /// The lookup of the stored copies of the batch's identities.
    pub lookup: Duration,
    /// INSERT into `usage_losers` (zero when no copy lost).
    pub losers: Duration,
    /// INSERT ... SELECT recomputing the `usage_daily` blocks.
    pub daily: Duration,
    /// INSERT ... SELECT recomputing the `usage_hourly` blocks.
    pub hourly: Duration,
}

impl std::ops::AddAssign for StatementTimes {
    fn add_assign(&mut self, o: StatementTimes) {
        self.events += o.events;
        self.identities += o.identities;
        self.lookup += o.lookup;
        self.losers += o.losers;
        self.daily += o.daily;
        self.hourly += o.hourly;
    }
}

/// Offsets `first..=last` of one partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OffsetRange {
    pub topic: String,
    pub partition: u32,
    pub first: u64,
    pub last: u64,
}

/// `(topic, partition, offset)` conditions selecting `ranges` by the primary key of
/// `usage_events` (an OR of key ranges). `1 = 1` when `ranges` is None (everything).
pub fn ranges_condition(ranges: Option<&[OffsetRange]>) -> String {
    let Some(ranges) = ranges else {
        return "1 = 1".to_owned();
    };
    if ranges.is_empty() {
        return "0 = 1".to_owned();
    }
    ranges
        .iter()
        .map(|r| {
            format!(
                "(topic = {} AND `partition` = {} AND `offset` >= {} AND `offset` <= {})",
                sql::string(&r.topic),
                r.partition,
                r.first,
                r.last
            )
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// The offset ranges covering `rows` exactly per partition: first..=last offset of each.
pub fn batch_ranges<'a>(
    positions: impl IntoIterator<Item = (&'a str, u32, u64)>,
) -> Vec<OffsetRange> {
    let mut by: std::collections::BTreeMap<(&str, u32), (u64, u64)> = Default::default();
    for (topic, partition, offset) in positions {
        let e = by.entry((topic, partition)).or_insert((offset, offset));
        e.0 = e.0.min(offset);
        e.1 = e.1.max(offset);
    }
    by.into_iter()
        .map(|((topic, partition), (first, last))| OffsetRange {
            topic: topic.to_owned(),
            partition,
            first,
            last,
        })
        .collect()
}

/// The whole blocks ([`BLOCK_OFFSETS`]) holding `positions`, adjacent blocks merged.
pub fn block_ranges<'a>(
    positions: impl IntoIterator<Item = (&'a str, u32, u64)>,
) -> Vec<OffsetRange> {
    let mut blocks: std::collections::BTreeSet<(&str, u32, u64)> = Default::default();
    for (topic, partition, offset) in positions {
        blocks.insert((topic, partition, offset / BLOCK_OFFSETS));
    }
    let mut out: Vec<OffsetRange> = Vec::new();
    for (topic, partition, block) in blocks {
        let first = block * BLOCK_OFFSETS;
        let last = first + (BLOCK_OFFSETS - 1);
        match out.last_mut() {
            Some(r) if r.topic == topic && r.partition == partition && r.last + 1 == first => {
                r.last = last
            }
            _ => out.push(OffsetRange {
                topic: topic.to_owned(),
                partition,
                first,
                last,
            }),
        }
    }
    out
}

/// The counting copy of each identity among `usage_events` rows in `ranges` (None: all): the
/// position with the highest admission among the identity's stored copies, as a tuple
/// `(event_source, event_id, topic, partition, offset)` list for `IN`.
fn counting_copies_sql(condition: &str) -> String {
    format!(
        "SELECT event_source, event_id, argMax(topic, admission), argMax(`partition`, admission), \
         argMax(`offset`, admission) FROM {USAGE_COPIES} \
         WHERE id_hash IN (SELECT {ID_HASH} FROM {USAGE_EVENTS} WHERE {condition}) \
         GROUP BY event_source, event_id"
    )
}

/// `usage_events` rows of `ranges` (None: all), each with `counted` (1: its identity's
/// counting copy), duplicates of a position collapsed (FINAL).
pub fn counted_events_sql(ranges: Option<&[OffsetRange]>) -> String {
    counted_events_where(&ranges_condition(ranges))
}

/// `usage_events` rows matching `condition` (SQL on its columns), each with `counted`.
pub fn counted_events_where(condition: &str) -> String {
    format!(
        "SELECT *, (event_source, event_id, topic, `partition`, `offset`) IN ({}) \
         AND {NOT_VOIDED} AS counted \
         FROM {USAGE_EVENTS} FINAL WHERE {condition}",
        counting_copies_sql(condition),
    )
}

/// Recomputes the daily roll-up rows of the blocks in `ranges` (whole blocks; None: all)
/// from the stored rows: every (account, day, dimensions) present in a block gets a row,
/// aggregating only the counting copies (rows not in `usage_losers`), versioned by the
/// highest offset of the key's rows it read.
pub fn rollup_daily_sql(ranges: Option<&[OffsetRange]>) -> String {
    format!(
        "INSERT INTO usage_daily SELECT account_id, event_date AS day, kind, model, voice_tier, \
         instance_type, topic, `partition`, intDiv(`offset`, {BLOCK_OFFSETS}) AS block, \
         max(`offset`) AS covered_offset, \
         sumStateIf(credits, counted) AS credits_total, \
         sumStateIf(quantity, counted) AS quantity_total, \
         sumStateIf(billable_seconds, counted) AS billable_seconds_total, \
         sumStateIf(billable_quantity, counted) AS billable_quantity_total, \
         countStateIf(counted) AS event_count, \
         sumStateIf(answered, counted) AS answered_calls, \
         sumStateIf(responses, counted) AS ai_responses, \
         uniqExactIfState(call_id, counted AND call_id != '') AS distinct_calls, \
         uniqExactIfState(conversation_id, counted AND conversation_id != '') AS distinct_conversations \
         FROM ({}) \
         GROUP BY account_id, day, kind, model, voice_tier, instance_type, topic, `partition`, block",
        rollup_source_sql(ranges)
    )
}

/// The rows of `ranges` (None: all) with `counted`: not a known losing copy, and not voided.
/// Reads `usage_losers` by position only, never the identities, and `usage_voids` whole
/// (voids are rare).
///
/// The ranges are a PREWHERE: the index also selects, in every part, the granule where each
/// Kafka partition's offsets end (it cannot tell that they end there), 8192 rows per
/// partition and part; PREWHERE reads only the position columns of those and drops them
/// before FINAL merges them. Safe with FINAL: it tests key columns only, so it keeps or
/// drops every row of a key together.
fn rollup_source_sql(ranges: Option<&[OffsetRange]>) -> String {
    let condition = ranges_condition(ranges);
    let filter = if ranges.is_some() {
        "PREWHERE"
    } else {
        "WHERE"
    };
    format!(
        "SELECT *, (topic, `partition`, `offset`) NOT IN \
         (SELECT topic, `partition`, `offset` FROM {USAGE_LOSERS} WHERE {condition}) \
         AND {NOT_VOIDED} AS counted \
         FROM {USAGE_EVENTS} FINAL {filter} {condition}"
    )
}

/// [`rollup_daily_sql`] for the hourly roll-up.
pub fn rollup_hourly_sql(ranges: Option<&[OffsetRange]>) -> String {
    format!(
        "INSERT INTO usage_hourly SELECT account_id, event_date AS day, \
         toHour(event_time) AS hour_of_day, kind, topic, `partition`, \
         intDiv(`offset`, {BLOCK_OFFSETS}) AS block, max(`offset`) AS covered_offset, \
         sumStateIf(credits, counted) AS credits_total, countStateIf(counted) AS event_count \
         FROM ({}) \
         GROUP BY account_id, day, hour_of_day, kind, topic, `partition`, block",
        rollup_source_sql(ranges)
    )
}

/// The identity hashes of the `usage_events` rows in `ranges` that have more than one stored
/// row in `usage_copies`: the identities that may have another copy (or a copy written twice,
/// not merged yet; or a hash shared with another identity). Reads the `id_hash` column only,
/// by the primary key: a granule per identity at most.
pub fn shared_identities_sql(ranges: &[OffsetRange]) -> String {
    format!(
        "SELECT id_hash FROM {USAGE_COPIES} \
         WHERE id_hash IN (SELECT {ID_HASH} FROM {USAGE_EVENTS} WHERE {}) \
         GROUP BY id_hash HAVING count() > 1",
        ranges_condition(Some(ranges))
    )
}

/// Every stored copy of the identities of the `usage_events` rows in `ranges` (the caller
/// matches them on `event_source` and `event_id`).
pub fn batch_copies_sql(ranges: &[OffsetRange]) -> String {
    format!(
        "SELECT event_source, event_id, topic, `partition`, `offset`, admission \
         FROM {USAGE_COPIES} \
         WHERE id_hash IN (SELECT {ID_HASH} FROM {USAGE_EVENTS} WHERE {})",
        ranges_condition(Some(ranges))
    )
}

/// Every stored copy of the identities hashed to `hashes` (from [`shared_identities_sql`]);
/// the caller matches them on `event_source` and `event_id`.
pub fn copies_sql(hashes: &[u64]) -> String {
    let condition = if hashes.is_empty() {
        "0 = 1".to_owned()
    } else {
        let list: Vec<String> = hashes.iter().map(u64::to_string).collect();
        format!("id_hash IN ({})", list.join(", "))
    };
    format!(
        "SELECT event_source, event_id, topic, `partition`, `offset`, admission \
         FROM {USAGE_COPIES} WHERE {condition}"
    )
}

/// The positions of the stored copies of the voided identities of `voids` (their blocks are
/// recomputed when a void is written).
pub fn voided_copies_sql(voids: &[VoidRow]) -> String {
    let hashes: Vec<String> = voids
        .iter()
        .map(|v| {
            format!(
                "cityHash64({}, {})",
                sql::string(&v.event_source),
                sql::string(&v.event_id)
            )
        })
        .collect();
    let ids: Vec<String> = voids
        .iter()
        .map(|v| {
            format!(
                "({}, {})",
                sql::string(&v.event_source),
                sql::string(&v.event_id)
            )
        })
        .collect();
    format!(
        "SELECT topic, `partition`, `offset` FROM {USAGE_COPIES} \
         WHERE id_hash IN ({}) AND (event_source, event_id) IN ({})",
        hashes.join(", "),
        ids.join(", ")
    )
}

/// One `usage_voids` row: a usage event voided (`tally.usage.void.v1`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct VoidRow {
    /// The voided usage event's identity and account.
    pub event_source: String,
    pub event_id: String,
    pub account_id: String,
    /// The void event's identity, time, author and reason.
    pub void_source: String,
    pub void_id: String,
    #[serde(rename = "void_time")]
    pub void_time_unix_seconds: u32,
    pub actor: String,
    pub reason: String,
    #[serde(rename = "inserted_at")]
    pub inserted_at_unix_seconds: u32,
}

/// A Kafka position: topic, partition, offset.
type Position<'a> = (&'a str, u32, u64);

/// The number of whole blocks in `blocks` ([`block_ranges`]).
fn block_count(blocks: &[OffsetRange]) -> usize {
    blocks
        .iter()
        .map(|r| ((r.last - r.first + 1) / BLOCK_OFFSETS) as usize)
        .sum()
}

/// The copies that do not count among `copies` (stored copies of some identities, as read by
/// hash: other identities sharing a hash may be among them): per identity (`event_source`,
/// `event_id`), every position but the one with the highest (admission, position). A position
/// read twice (written twice, not merged yet) is one copy.
fn losing_copies(copies: &[IdentityRow]) -> Vec<LoserRow> {
    let mut best: HashMap<(&str, &str), (u64, Position<'_>)> = HashMap::new();
    for c in copies {
        let ranked = (c.admission, (c.topic.as_str(), c.partition, c.offset));
        let e = best
            .entry((c.event_source.as_str(), c.event_id.as_str()))
            .or_insert(ranked);
        if ranked > *e {
            *e = ranked;
        }
    }
    let mut seen: std::collections::HashSet<Position<'_>> = Default::default();
    let mut losers = Vec::new();
    for c in copies {
        let position = (c.topic.as_str(), c.partition, c.offset);
        let (_, winner) = best[&(c.event_source.as_str(), c.event_id.as_str())];
        if winner != position && seen.insert(position) {
            losers.push(LoserRow {
                topic: c.topic.clone(),
                partition: c.partition,
                offset: c.offset,
                event_source: c.event_source.clone(),
                event_id: c.event_id.clone(),
            });
        }
    }
    losers
}

/// One `usage_losers` row.
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct LoserRow {
    topic: String,
    partition: u32,
    offset: u64,
    event_source: String,
    event_id: String,
}

/// One `usage_copies` row (its `id_hash` is computed by the server).
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct IdentityRow {
    event_source: String,
    event_id: String,
    topic: String,
    partition: u32,
    offset: u64,
    admission: u64,
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

/// The `max_query_size` setting for `sql`: its length and some room, at least the 256 KiB
/// default (a batch's ranges or hashes can make a long statement).
fn query_size(sql: &str) -> String {
    (sql.len() + 4096).max(262_144).to_string()
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

    /// Writes a batch and resolves its identities: [`write`](Self::write) then
    /// [`resolve`](Self::resolve) over the batch's offsets. Idempotent: calling it again with
    /// the same rows, or with part of them, or from another instance at the same time,
    /// converges to the same tables. The pipeline calls the two steps apart, resolving many
    /// batches at once (docs/analytics.md, "Identities").
    pub async fn insert(&self, rows: &[RatedRow]) -> Result<InsertOutcome, AnalyticsError> {
        if rows.is_empty() {
            return Ok(InsertOutcome::default());
        }
        let written = self.write(rows).await?;
        let ranges = batch_ranges(
            rows.iter()
                .map(|r| (r.topic.as_str(), r.partition, r.offset)),
        );
        let (resolved, losers) = self.resolve_losers(&ranges).await?;
        let positions = rows
            .iter()
            .map(|r| (r.topic.as_str(), r.partition, r.offset))
            .chain(
                losers
                    .iter()
                    .map(|l| (l.topic.as_str(), l.partition, l.offset)),
            );
        let mut timings = written.timings;
        timings += resolved.timings;
        Ok(InsertOutcome {
            written: written.written,
            duplicates: resolved.duplicates,
            blocks: block_count(&block_ranges(positions)),
            timings,
        })
    }

    /// Writes a batch: its rows to `usage_events` and their identities to `usage_copies`
    /// (one INSERT each, LZ4-compressed, nothing asked first), then recomputes the roll-up
    /// blocks holding its rows (one INSERT ... SELECT per roll-up), counting every row not
    /// already known to lose ([`USAGE_LOSERS`]). A row whose identity has another copy counts
    /// until [`resolve`](Self::resolve) passes over its offsets. The work grows with the batch
    /// (its rows, at most a block of stored rows per partition it touches), not with the
    /// table: nothing is looked up.
    pub async fn write(&self, rows: &[RatedRow]) -> Result<InsertOutcome, AnalyticsError> {
        if rows.is_empty() {
            return Ok(InsertOutcome::default());
        }
        let client = &self.client;
        let mut timings = StatementTimes::default();
        let started = Instant::now();
        run_timed("insert usage_events", INSERT_TIMEOUT, async move {
            let mut insert = client.insert::<RatedRow>(USAGE_EVENTS).await?;
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        })
        .await?;
        timings.events = started.elapsed();
        let started = Instant::now();
        run_timed("insert usage_copies", INSERT_TIMEOUT, async move {
            let mut insert = client.insert::<IdentityRow>(USAGE_COPIES).await?;
            for row in rows {
                insert
                    .write(&IdentityRow {
                        event_source: row.event_source.clone(),
                        event_id: row.event_id.clone(),
                        topic: row.topic.clone(),
                        partition: row.partition,
                        offset: row.offset,
                        admission: row.admission,
                    })
                    .await?;
            }
            insert.end().await
        })
        .await?;
        timings.identities = started.elapsed();
        fail::fail_point!("analytics-before-rollups", |_| std::process::abort());
        let blocks = block_ranges(
            rows.iter()
                .map(|r| (r.topic.as_str(), r.partition, r.offset)),
        );
        self.recompute_blocks(&blocks, &mut timings).await?;
        Ok(InsertOutcome {
            written: rows.len(),
            duplicates: 0,
            blocks: block_count(&blocks),
            timings,
        })
    }

    /// Resolves the identities of the rows stored in `ranges` (written by
    /// [`write`](Self::write), by this instance or another): finds every identity with
    /// another stored copy, records the copies that lose ([`USAGE_LOSERS`]: all but the one
    /// with the highest admission) and recomputes the roll-up blocks holding them. Returns
    /// the losers found in `ranges` as `duplicates` and the blocks recomputed.
    ///
    /// The lookup reads the `id_hash` column of `usage_copies` by its index. Random ids touch
    /// most of its granules whatever the number of ids asked, so its time grows with the
    /// table, not with `ranges`: the pipeline calls it once for many batches (at most every
    /// `pipeline.analytics_resolve_every_ms`), not once per batch. Idempotent, and safe
    /// concurrently with another instance resolving the same or other ranges: the losers are
    /// a function of the stored copies, and whichever of two copies is stored second is seen
    /// with the first by the resolve that follows its write.
    pub async fn resolve(&self, ranges: &[OffsetRange]) -> Result<InsertOutcome, AnalyticsError> {
        Ok(self.resolve_losers(ranges).await?.0)
    }

    async fn resolve_losers(
        &self,
        ranges: &[OffsetRange],
    ) -> Result<(InsertOutcome, Vec<LoserRow>), AnalyticsError> {
        let mut timings = StatementTimes::default();
        if ranges.is_empty() {
            return Ok((InsertOutcome::default(), Vec::new()));
        }
        let started = Instant::now();
        // Most identities have one copy: find the few with more first (one narrow column),
        // then read only their copies.
        let sql = shared_identities_sql(ranges);
        let shared = run_timed(
            "find shared identities",
            QUERY_TIMEOUT,
            self.client
                .query_raw(&sql)
                .with_setting("max_query_size", query_size(&sql))
                .fetch_all::<u64>(),
        )
        .await?;
        // Many only when the rows were written before (a replay): their positions are stored
        // twice until a merge. Then the copies of every identity of the ranges are read in one
        // statement (naming that many hashes would be slower, and a server refuses a
        // statement of more than 50,000 AST elements).
        let copies = if shared.is_empty() {
            Vec::new()
        } else {
            let sql = if shared.len() <= HASHES_PER_QUERY {
                copies_sql(&shared)
            } else {
                batch_copies_sql(ranges)
            };
            run_timed(
                "read identity copies",
                QUERY_TIMEOUT,
                self.client
                    .query_raw(&sql)
                    .with_setting("max_query_size", query_size(&sql))
                    .fetch_all::<IdentityRow>(),
            )
            .await?
        };
        timings.lookup = started.elapsed();
        let losers = losing_copies(&copies);
        if !losers.is_empty() {
            let started = Instant::now();
            let client = &self.client;
            let losers = &losers;
            run_timed("insert usage_losers", INSERT_TIMEOUT, async move {
                let mut insert = client.insert::<LoserRow>(USAGE_LOSERS).await?;
                for row in losers {
                    insert.write(row).await?;
                }
                insert.end().await
            })
            .await?;
            timings.losers = started.elapsed();
        }
        let blocks = block_ranges(
            losers
                .iter()
                .map(|l| (l.topic.as_str(), l.partition, l.offset)),
        );
        self.recompute_blocks(&blocks, &mut timings).await?;
        let in_ranges = |l: &&LoserRow| {
            ranges.iter().any(|r| {
                r.topic == l.topic
                    && r.partition == l.partition
                    && (r.first..=r.last).contains(&l.offset)
            })
        };
        let outcome = InsertOutcome {
            written: 0,
            duplicates: losers.iter().filter(in_ranges).count(),
            blocks: block_count(&blocks),
            timings,
        };
        Ok((outcome, losers))
    }

    /// Recomputes the roll-up rows of `blocks` (whole blocks) from the stored rows, one
    /// INSERT ... SELECT per roll-up.
    async fn recompute_blocks(
        &self,
        blocks: &[OffsetRange],
        timings: &mut StatementTimes,
    ) -> Result<(), AnalyticsError> {
        if blocks.is_empty() {
            return Ok(());
        }
        for (op, sql, took) in [
            (
                "recompute usage_daily",
                rollup_daily_sql(Some(blocks)),
                &mut timings.daily,
            ),
            (
                "recompute usage_hourly",
                rollup_hourly_sql(Some(blocks)),
                &mut timings.hourly,
            ),
        ] {
            let started = Instant::now();
            run_timed(
                op,
                INSERT_TIMEOUT,
                self.client
                    .query_raw(&sql)
                    .with_setting("max_query_size", query_size(&sql))
                    .execute(),
            )
            .await?;
            *took += started.elapsed();
        }
        Ok(())
    }

    /// Writes voids: their rows to `usage_voids` (one INSERT; idempotent by the original's
    /// identity and account), then recomputes the roll-up blocks holding the stored copies
    /// of the voided usage, which then count nowhere. A copy written later is left out by its
    /// own block's recomputation ([`rollup_daily_sql`] reads `usage_voids`). Returns the
    /// blocks recomputed.
    pub async fn void(&self, voids: &[VoidRow]) -> Result<usize, AnalyticsError> {
        if voids.is_empty() {
            return Ok(0);
        }
        let client = &self.client;
        run_timed("insert usage_voids", INSERT_TIMEOUT, async move {
            let mut insert = client.insert::<VoidRow>(USAGE_VOIDS).await?;
            for row in voids {
                insert.write(row).await?;
            }
            insert.end().await
        })
        .await?;
        #[derive(Row, Deserialize)]
        struct Copy {
            topic: String,
            partition: u32,
            offset: u64,
        }
        let sql = voided_copies_sql(voids);
        let copies = run_timed(
            "read voided copies",
            QUERY_TIMEOUT,
            self.client
                .query_raw(&sql)
                .with_setting("max_query_size", query_size(&sql))
                .fetch_all::<Copy>(),
        )
        .await?;
        let blocks = block_ranges(
            copies
                .iter()
                .map(|c| (c.topic.as_str(), c.partition, c.offset)),
        );
        let mut timings = StatementTimes::default();
        self.recompute_blocks(&blocks, &mut timings).await?;
        Ok(block_count(&blocks))
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

    /// The next offset to read for each of `partitions` the group stored a position for
    /// (after its batch's rows and roll-ups were written). Partitions with nothing stored are
    /// absent (the consumer starts them at the beginning). Never the highest stored row: a
    /// batch whose rows are in but whose roll-ups are not must be read again.
    pub async fn load_positions(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<Positions, AnalyticsError> {
        self.committed_positions(group, partitions).await
    }

    /// The positions the group stored after its batches were fully written (roll-ups
    /// included): what "caught up" means for idle detection.
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

    /// Exact (events, credits) of an account: its identities' counting copies.
    pub async fn totals_by_account(
        &self,
        account_id: &str,
    ) -> Result<(u64, Decimal), AnalyticsError> {
        let counted = format!(
            "({}) WHERE counted",
            counted_events_where(&format!("account_id = {}", sql::string(account_id)))
        );
        self.exact_totals("totals by account", &counted, account_id)
            .await
    }

    /// (events, credits) of an account in `table` (keyed by identity, read with `FINAL`), or
    /// in `(subquery) WHERE condition` (a table expression ending in a condition).
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
                    "SELECT count() AS events, sum(credits) AS total_credits FROM {} account_id = {}",
                    if table.starts_with('(') {
                        format!("{table} AND")
                    } else {
                        format!("{table} FINAL WHERE")
                    },
                    sql::string(account_id)
                ))
                .fetch_one::<Totals>(),
        )
        .await?;
        Ok((totals.events, from_mantissa6(op, totals.total_credits)?))
    }

    /// An account's counting rows (one per identity), by event identity.
    pub async fn rated_events_of(&self, account_id: &str) -> Result<Vec<RatedRow>, AnalyticsError> {
        let sql = format!(
            "SELECT {} FROM ({}) WHERE counted ORDER BY event_source, event_id",
            RatedRow::COLUMN_NAMES.join(", "),
            counted_events_where(&format!("account_id = {}", sql::string(account_id)))
        );
        run_timed(
            "rated events of account",
            QUERY_TIMEOUT,
            self.client.query_raw(&sql).fetch_all::<RatedRow>(),
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
        // What the rows carry: the amount at scale 6, as its mantissa.
        let mantissa6 = |v: Decimal| Credits::round(v).map(Credits::micros);
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
    fn ranges_and_blocks() {
        let positions = [("t", 0, 5), ("t", 0, 9000), ("t", 1, 3), ("u'", 0, 16_383)];
        assert_eq!(
            batch_ranges(positions),
            vec![
                OffsetRange {
                    topic: "t".into(),
                    partition: 0,
                    first: 5,
                    last: 9000
                },
                OffsetRange {
                    topic: "t".into(),
                    partition: 1,
                    first: 3,
                    last: 3
                },
                OffsetRange {
                    topic: "u'".into(),
                    partition: 0,
                    first: 16_383,
                    last: 16_383
                },
            ]
        );
        // Offsets 5 and 9000 are in blocks 0 and 1 (8192 each): one range of two blocks.
        let blocks = block_ranges(positions);
        assert_eq!(
            blocks,
            vec![
                OffsetRange {
                    topic: "t".into(),
                    partition: 0,
                    first: 0,
                    last: 16_383
                },
                OffsetRange {
                    topic: "t".into(),
                    partition: 1,
                    first: 0,
                    last: 8191
                },
                OffsetRange {
                    topic: "u'".into(),
                    partition: 0,
                    first: 8192,
                    last: 16_383
                },
            ]
        );
        assert_eq!(
            ranges_condition(Some(&blocks[2..])),
            "(topic = 'u\\'' AND `partition` = 0 AND `offset` >= 8192 AND `offset` <= 16383)"
        );
        assert_eq!(ranges_condition(Some(&[])), "0 = 1");
        assert_eq!(ranges_condition(None), "1 = 1");
    }

    #[test]
    fn the_earliest_record_ranks_highest() {
        // Earlier timestamp first; at the same millisecond, the lower offset.
        assert!(admission_rank(1_000, 7) > admission_rank(1_001, 0));
        assert!(admission_rank(1_000, 7) > admission_rank(1_000, 8));
        assert_eq!(admission_rank(0, 0), u64::MAX);
        assert_eq!(admission_rank(1, 1), u64::MAX - (1 << 21) - 1);
        // Out-of-range inputs are clamped, never wrap.
        assert_eq!(admission_rank(-5, -1), u64::MAX);
    }

    #[test]
    fn every_copy_but_the_first_admitted_loses() {
        let copy = |id: &str, partition: u32, offset: u64, admission: u64| IdentityRow {
            event_source: "src".into(),
            event_id: id.into(),
            topic: "usage".into(),
            partition,
            offset,
            admission,
        };
        let copies = [
            // x: admitted first at 0:5; re-sent at 0:40; 0:5 read twice (not merged yet).
            copy("x", 0, 40, 90),
            copy("x", 0, 5, 100),
            copy("x", 0, 5, 100),
            // y: the copy read first (1:3) was admitted after the one at 0:9000.
            copy("y", 1, 3, 50),
            copy("y", 0, 9000, 80),
            // w: one copy (read because another identity shares its hash).
            copy("w", 1, 4, 60),
        ];
        let losers: Vec<(String, u32, u64)> = losing_copies(&copies)
            .into_iter()
            .map(|l| (l.event_id, l.partition, l.offset))
            .collect();
        assert_eq!(losers, [("x".into(), 0, 40), ("y".into(), 1, 3)]);
        assert!(losing_copies(&copies[5..]).is_empty());
        assert!(
            losing_copies(&copies[1..3]).is_empty(),
            "one position read twice"
        );
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
