//! The ClickHouse side of `tally reconcile`: usage per account × UTC day × kind, read twice —
//! from the daily roll-up (`usage_daily`, what every report reads) and from the distinct rated
//! events (each identity's counting copy in `usage_events`, what the roll-up must equal). Owns the two statements (pure
//! functions, so the chDB test runs the very same text on a current ClickHouse). Knows nothing
//! of the ledger: `crate::reconcile` compares these with it.

use chrono::NaiveDate;
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::queries::{DateRange, UsageQueries, USAGE_DAILY};
use super::sink::{counted_events_where, from_mantissa6};
use super::{sql, AnalyticsError};

/// Usage of one account on one UTC day of one kind, as ClickHouse holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindDay {
    pub account_id: String,
    pub day: NaiveDate,
    pub kind: String,
    pub credits: Decimal,
    /// Events counted (every rated event, those that cost nothing included).
    pub events: u64,
    /// Events that cost credits (`credits > 0`): what the ledger has entries for. From
    /// the rated events only (the roll-up does not keep it): None for the roll-up.
    pub charged_events: Option<u64>,
}

fn conditions(column: &str, range: &DateRange, account_id: Option<&str>) -> String {
    let mut out = format!(
        "{column} >= {} AND {column} <= {}",
        sql::date(range.from),
        sql::date(range.to)
    );
    if let Some(a) = account_id {
        out = format!("account_id = {} AND {out}", sql::string(a));
    }
    out
}

/// Credits and events per account × day × kind from the daily roll-up.
pub fn rollup_days_sql(range: &DateRange, account_id: Option<&str>) -> String {
    format!(
        "SELECT account_id, day, kind, sumMerge(credits_total) AS credits_sum, \
         countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {} \
         GROUP BY account_id, day, kind HAVING events > 0 ORDER BY account_id, day, kind",
        conditions("day", range, account_id)
    )
}

/// Credits, events and events that cost credits per account × day × kind from the distinct
/// rated events (each identity's counting copy in `usage_events`).
pub fn rated_days_sql(range: &DateRange, account_id: Option<&str>) -> String {
    format!(
        "SELECT account_id, event_date AS day, kind, sum(credits) AS credits_sum, \
         count() AS events, countIf(credits > 0) AS charged_events \
         FROM ({}) WHERE counted \
         GROUP BY account_id, day, kind ORDER BY account_id, day, kind",
        counted_events_where(&conditions("event_date", range, account_id))
    )
}

#[derive(Debug, Row, Deserialize)]
struct RollupRow {
    account_id: String,
    day: u16,
    kind: String,
    credits: i128,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct RatedRow {
    account_id: String,
    day: u16,
    kind: String,
    credits: i128,
    events: u64,
    charged_events: u64,
}

impl UsageQueries {
    /// [`rollup_days_sql`], read.
    pub async fn rollup_days(
        &self,
        range: &DateRange,
        account_id: Option<&str>,
    ) -> Result<Vec<KindDay>, AnalyticsError> {
        const OP: &str = "roll-up days";
        let rows: Vec<RollupRow> = self.fetch(OP, &rollup_days_sql(range, account_id)).await?;
        rows.into_iter()
            .map(|r| {
                Ok(KindDay {
                    account_id: r.account_id,
                    day: sql::date_from_unix_days(r.day),
                    kind: r.kind,
                    credits: from_mantissa6(OP, r.credits)?,
                    events: r.events,
                    charged_events: None,
                })
            })
            .collect()
    }

    /// [`rated_days_sql`], read.
    pub async fn rated_days(
        &self,
        range: &DateRange,
        account_id: Option<&str>,
    ) -> Result<Vec<KindDay>, AnalyticsError> {
        const OP: &str = "rated event days";
        let rows: Vec<RatedRow> = self.fetch(OP, &rated_days_sql(range, account_id)).await?;
        rows.into_iter()
            .map(|r| {
                Ok(KindDay {
                    account_id: r.account_id,
                    day: sql::date_from_unix_days(r.day),
                    kind: r.kind,
                    credits: from_mantissa6(OP, r.credits)?,
                    events: r.events,
                    charged_events: Some(r.charged_events),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_filter_by_key_prefix() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let range = DateRange::new(d("2025-06-01"), d("2025-06-20")).unwrap();
        let one = rollup_days_sql(&range, Some("a'b"));
        assert!(one.contains(
            "WHERE account_id = 'a\\'b' AND day >= toDate('2025-06-01') AND day <= toDate('2025-06-20')"
        ));
        let all = rated_days_sql(&range, None);
        assert!(all.contains("FROM usage_events FINAL WHERE event_date >= toDate('2025-06-01')"));
        assert!(!all.contains("account_id ="));
    }
}
