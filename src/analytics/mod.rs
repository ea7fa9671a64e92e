//! Analytics: rated usage in ClickHouse. Owns the ClickHouse DDL ([`migrate`], from
//! `schemas/clickhouse/`), the sink that writes one `rated_events` row per rated usage event
//! and the consumed positions ([`sink`]), the usage reports read from the roll-ups
//! ([`queries`]), and the day totals `tally reconcile` compares with the ledger
//! ([`reconcile`]). Knows nothing of Kafka clients, PostgreSQL or the ledger; the batch loop
//! lives in `pipeline::analytics`.
//!
//! Idempotence: rows are keyed by event identity (`event_source`, `event_id`, within the
//! account and event date) in a ReplacingMergeTree, read with `FINAL`. The roll-ups
//! (`usage_daily`, `usage_hourly`) are kept by materialized views that see every inserted
//! block, so the sink writes only identities not stored yet (a replayed batch or a producer
//! retry writes nothing). Positions resume past what is stored: the highest offset in
//! `rated_events` (kept by a materialized view in `rated_offsets`) or the group's
//! `consumer_offsets`, whichever is further.

mod error;
pub mod migrate;
pub mod queries;
pub mod reconcile;
pub mod sink;
pub mod sql;

pub use error::AnalyticsError;
pub use migrate::{migrate, MIGRATIONS};
pub use queries::{Cycle, DateRange, ReportRequest, UsageQueries, UsageReport};
pub use sink::{
    numeric_columns, rated_row, AnalyticsSink, ChOffsetStore, InsertOutcome, LateRow,
    NumericColumns, RatedRow,
};
