//! The report statements: pure functions returning the text, so the tests run the very same
//! statements on ClickHouse 18.16 and on a current release.

use crate::analytics::{sql, AnalyticsError};

use super::*;

/// One account's rows of `range`: the roll-ups' key prefix (account, day).
fn filter(range: &DateRange, account_id: &str) -> String {
    format!(
        "account_id = {} AND day >= {} AND day <= {}",
        sql::string(account_id),
        sql::date(range.from),
        sql::date(range.to)
    )
}

/// Late usage (events, credits) of an account by event day; voided usage left out.
pub fn late_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT count() AS events, sum(credits) AS total_credits FROM late_usage FINAL \
         WHERE account_id = {} AND event_date >= {} AND event_date <= {} \
         AND {}",
        sql::string(account_id),
        sql::date(range.from),
        sql::date(range.to),
        crate::analytics::sink::NOT_VOIDED
    )
}

// ---------------------------------------------------------------------------------------
// SQL. Every statement reads one account's rows by the tables' key prefix (account_id, day),
// with FINAL (a block's newest computation). `HAVING events > 0` leaves out the keys whose
// events all lost to another copy of their identity (a re-send on another day).
// Aliases never reuse a column name of the table they read.

/// Credits, quantity, billable seconds and events per day × kind × model.
pub fn daily_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT day, kind, model, sumMerge(credits_total) AS credits, \
         sumMerge(quantity_total) AS quantity, sumMerge(billable_seconds_total) AS billable_seconds, \
         countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {} \
         GROUP BY day, kind, model HAVING events > 0 ORDER BY day, kind, model",
        filter(range, account_id)
    )
}

/// Credits and events per day (days without usage absent).
pub fn day_totals_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT day, sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {} GROUP BY day HAVING events > 0 ORDER BY day",
        filter(range, account_id)
    )
}

/// Credits and events over the range (one row, zero when empty).
pub fn total_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {}",
        filter(range, account_id)
    )
}

/// The `top` days with the most credits (ties: the earlier day first).
pub fn peak_days_sql(account_id: &str, range: &DateRange, top: u32) -> String {
    format!(
        "SELECT day, sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {} GROUP BY day HAVING events > 0 \
         ORDER BY credits DESC, day ASC LIMIT {top}",
        filter(range, account_id)
    )
}

/// The `top` hours of the day (UTC) with the most events over the range (ties: more
/// credits, then the earlier hour).
pub fn busiest_hours_sql(account_id: &str, range: &DateRange, top: u32) -> String {
    format!(
        "SELECT hour_of_day, sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_HOURLY} FINAL WHERE {} GROUP BY hour_of_day HAVING events > 0 \
         ORDER BY events DESC, credits DESC, hour_of_day ASC LIMIT {top}",
        filter(range, account_id)
    )
}

/// Everything counted, per kind.
pub fn counts_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT kind, countMerge(event_count) AS events, sumMerge(credits_total) AS credits, \
         sumMerge(quantity_total) AS quantity, sumMerge(billable_seconds_total) AS billable_seconds, \
         sumMerge(answered_calls) AS answered, sumMerge(ai_responses) AS responses, \
         uniqExactIfMerge(distinct_calls) AS calls, \
         uniqExactIfMerge(distinct_conversations) AS conversations \
         FROM {USAGE_DAILY} FINAL WHERE {} GROUP BY kind HAVING events > 0 ORDER BY kind",
        filter(range, account_id)
    )
}

/// Every statement [`UsageQueries::report`] runs for `request`, named.
pub fn report_sql(
    account_id: &str,
    request: &ReportRequest,
) -> Result<Vec<(&'static str, String)>, AnalyticsError> {
    let range = &request.range;
    Ok(vec![
        ("daily", daily_sql(account_id, range)),
        (
            "cycle_used",
            total_sql(account_id, &request.cycle.elapsed(request.today)?),
        ),
        ("peak_days", peak_days_sql(account_id, range, request.top)),
        (
            "busiest_hours",
            busiest_hours_sql(account_id, range, request.top),
        ),
        (
            "trend",
            day_totals_sql(account_id, &Trend::query_range(request.today)?),
        ),
        ("counts", counts_sql(account_id, range)),
    ])
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;
    use crate::analytics::queries::{monday, Cycle, ReportRequest};

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn sql_reads_one_account_by_key_prefix() {
        let r = DateRange::new(d("2025-06-01"), d("2025-06-30")).unwrap();
        let req = ReportRequest::for_cycle(
            Cycle::calendar_month(d("2025-06-15")),
            d("2025-06-15"),
            None,
        )
        .unwrap();
        for (_, s) in report_sql("o'brien", &req).unwrap() {
            assert!(
                s.contains(r"account_id = 'o\'brien' AND day >= toDate("),
                "{s}"
            );
            assert!(!s.contains('?'), "{s}");
        }
        assert!(daily_sql("a", &r).contains("toDate('2025-06-30')"));
        assert_eq!(monday(d("2025-06-15")), d("2025-06-09"));
        assert_eq!(monday(d("2025-06-16")), d("2025-06-16"));
    }
}
