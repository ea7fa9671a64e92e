//! Analytics: rated usage in ClickHouse. Owns the ClickHouse DDL ([`migrate`], from
//! `schemas/clickhouse/`), the sink that writes one `usage_events` row per rated usage record
//! and the consumed positions ([`sink`]), the usage reports read from the roll-ups
//! ([`queries`]), and the day totals `tally reconcile` compares with the ledger
//! ([`reconcile`]). Knows nothing of Kafka clients, PostgreSQL or the ledger; the batch loop
//! lives in `pipeline::analytics`.
//!
//! Convergence (migrations 0004, 0005): rows are keyed by their Kafka position in `usage_events`;
//! an event's identity is (`event_source`, `event_id`), as in the ledger, and of its stored
//! copies the one admitted first counts (`usage_copies`, highest `admission`; the others
//! are recorded in `usage_losers` when a batch's identity lookup finds them). The
//! roll-ups (`usage_daily`, `usage_hourly`) are recomputed, never incremented, per block of
//! offsets from the stored rows, so a replayed, half-done, timed-out or doubled write ends
//! with the same figures. Positions resume at the group's `consumer_offsets`, stored only
//! after a batch's rows and roll-ups are written.

mod config;
mod error;
pub mod migrate;
pub mod queries;
pub mod reconcile;
pub mod sink;
pub mod sql;

pub use config::ClickHouseConfig;
pub use error::AnalyticsError;
pub use migrate::{migrate, MIGRATIONS};
pub use queries::{Cycle, DateRange, ReportRequest, UsageQueries, UsageReport};
pub use sink::{
    admission_rank, numeric_columns, AnalyticsSink, ChOffsetStore, InsertOutcome, LateRow,
    NumericColumns, OffsetRange, RatedRow, StatementTimes, VoidRow,
};
