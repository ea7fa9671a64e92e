//! The usage reports — daily series, this cycle, peak days, busiest hours, 3-month trend,
//! month-end projection, counts — read from the roll-ups of migration 0002 (`usage_daily`,
//! `usage_hourly`) for one account. Owns the report SQL (pure functions returning the text, so
//! the tests run the very same statements on ClickHouse 18.16 and on a current release) and
//! the arithmetic done in Rust (zero-filled days, week-over-week change, moving average, pace,
//! run-out date). Reads nothing from the ledger: the allowance, the cycle bounds and the
//! spendable balance are parameters (a plan's cycle is computed with the ledger's pure
//! `cycle` rules, so a report's cycle is the ledger's).
//!
//! Exactness: sums come from ClickHouse as Decimal(38, 6) and stay exact. Every division
//! (averages, pace, minutes, hours, percents) is cut toward zero — to 6 decimal places for
//! credits and measures, 2 for percents — as ClickHouse's own Decimal division does, so the
//! analysts' queries in docs/analytics.md give the same digits. Days are UTC dates of the
//! event time; ranges are inclusive.
//!
//! Parts: [`report`] (the report types and the arithmetic done in Rust), [`sql`] (the
//! statements), [`client`] (`UsageQueries`, running them).

mod client;
mod report;
mod statements;

pub use client::UsageQueries;
pub use report::*;
pub use statements::*;

/// Daily roll-up table (migration 0004: one row per block of offsets, read with FINAL).
pub const USAGE_DAILY: &str = "usage_daily";
/// Hourly roll-up table (migration 0004: one row per block of offsets, read with FINAL).
pub const USAGE_HOURLY: &str = "usage_hourly";
/// Peak days and busiest hours a report lists by default.
pub const DEFAULT_TOP: u32 = 5;
/// How far back the trend looks.
pub const TREND_MONTHS: u32 = 3;
