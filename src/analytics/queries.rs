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

use std::collections::BTreeMap;

use chrono::{Datelike, Months, NaiveDate};
use clickhouse::{Client, Row, RowOwned, RowRead};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::sink::{client, from_mantissa6, run_timed, QUERY_TIMEOUT};
use super::ClickHouseConfig;
use super::{sql, AnalyticsError};
use crate::credits::{cut, Credits};
use crate::event::{KIND_CALL, KIND_INSTANCE};

/// Daily roll-up table (migration 0004: one row per block of offsets, read with FINAL).
pub const USAGE_DAILY: &str = "usage_daily";
/// Hourly roll-up table (migration 0004: one row per block of offsets, read with FINAL).
pub const USAGE_HOURLY: &str = "usage_hourly";
/// Peak days and busiest hours a report lists by default.
pub const DEFAULT_TOP: u32 = 5;
/// How far back the trend looks.
pub const TREND_MONTHS: u32 = 3;

/// Inclusive range of UTC days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DateRange {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

impl DateRange {
    /// Longest range a query accepts (about ten years).
    pub const MAX_DAYS: i64 = 3_660;

    pub fn new(from: NaiveDate, to: NaiveDate) -> Result<Self, AnalyticsError> {
        let problem = if to < from {
            "ends before it starts"
        } else if (to - from).num_days() >= Self::MAX_DAYS {
            "is longer than 3660 days"
        } else if from < NaiveDate::default() {
            "starts before 1970-01-01"
        } else {
            return Ok(DateRange { from, to });
        };
        Err(AnalyticsError::InvalidRange { from, to, problem })
    }

    /// Every day of the range, in order.
    pub fn days(&self) -> impl Iterator<Item = NaiveDate> {
        let to = self.to;
        self.from.iter_days().take_while(move |d| *d <= to)
    }

    /// Number of days in the range.
    pub fn len_days(&self) -> u32 {
        u32::try_from((self.to - self.from).num_days() + 1).unwrap_or(0)
    }

    fn filter(&self, account_id: &str) -> String {
        format!(
            "account_id = {} AND day >= {} AND day <= {}",
            sql::string(account_id),
            sql::date(self.from),
            sql::date(self.to)
        )
    }
}

/// A billing cycle: [start, reset) in UTC days, and its allowance when the plan has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cycle {
    pub start: NaiveDate,
    /// The first day of the next cycle (the allowance resets at its 00:00 UTC).
    pub reset: NaiveDate,
    pub allowance: Option<Decimal>,
}

impl Cycle {
    /// The cycle holding `now` for an account: its plan's billing cycle (computed from the
    /// billing day, so it is right even before the scheduler's reset), or the calendar month
    /// for a prepaid account.
    pub fn for_plan(
        plan: Option<&crate::ledger::buckets::Plan>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Cycle {
        match plan {
            Some(plan) => {
                let (start, reset) = crate::ledger::cycle::containing(now, plan.billing_day);
                Cycle {
                    start: start.date_naive(),
                    reset: reset.date_naive(),
                    allowance: Some(plan.monthly_allowance),
                }
            }
            None => Cycle::calendar_month(now.date_naive()),
        }
    }

    /// The calendar month holding `day`, without an allowance (accounts without a plan).
    pub fn calendar_month(day: NaiveDate) -> Cycle {
        let start = day.with_day(1).unwrap_or(day);
        let reset = start
            .checked_add_months(Months::new(1))
            .unwrap_or(NaiveDate::MAX);
        Cycle {
            start,
            reset,
            allowance: None,
        }
    }

    /// `today` moved into the cycle: its first day if before, its last day if after.
    fn clamp(&self, today: NaiveDate) -> NaiveDate {
        let last = self.reset.pred_opt().unwrap_or(self.reset).max(self.start);
        today.clamp(self.start, last)
    }

    /// The days of the cycle up to `today` (clamped into the cycle).
    pub fn elapsed(&self, today: NaiveDate) -> Result<DateRange, AnalyticsError> {
        DateRange::new(self.start, self.clamp(today))
    }
}

/// Usage of one (kind, model) on one day, or over a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindModelUsage {
    pub kind: String,
    pub model: String,
    pub credits: Decimal,
    /// The raw measure: seconds for calls and instances, units for count kinds.
    pub quantity: Decimal,
    pub billable_seconds: u64,
    pub events: u64,
}

/// One day of the daily series: zero when nothing happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DailyUsage {
    pub day: NaiveDate,
    pub credits: Decimal,
    pub events: u64,
    /// By (kind, model), in that order; empty on a day without usage.
    pub by_kind_model: Vec<KindModelUsage>,
}

/// Credits and events of one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DayTotal {
    pub day: NaiveDate,
    pub credits: Decimal,
    pub events: u64,
}

/// Credits and events in one hour of the day (UTC), summed over a range of days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HourTotal {
    pub hour_of_day: u8,
    pub credits: Decimal,
    pub events: u64,
}

/// This cycle so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CycleUsage {
    pub start: NaiveDate,
    pub reset: NaiveDate,
    /// The day the figures are computed for (clamped into the cycle).
    pub as_of: NaiveDate,
    /// Credits used from the cycle's start through `as_of`.
    pub used: Decimal,
    pub events: u64,
    pub allowance: Option<Decimal>,
    /// allowance − used: negative when the allowance is exceeded.
    pub allowance_left: Option<Decimal>,
    /// used × 100 / allowance, cut to 2 places; None without a (non-zero) allowance.
    pub allowance_used_percent: Option<Decimal>,
    /// Days from the start through `as_of`, both counted.
    pub days_elapsed: u32,
    /// used / days_elapsed, cut to 6 places.
    pub average_daily: Decimal,
    /// Days from `as_of` to the reset (0 when the cycle is over).
    pub days_until_reset: u32,
}

impl CycleUsage {
    pub fn compute(cycle: &Cycle, today: NaiveDate, used: Decimal, events: u64) -> CycleUsage {
        let as_of = cycle.clamp(today);
        let days_elapsed = u32::try_from((as_of - cycle.start).num_days() + 1).unwrap_or(1);
        let allowance_used_percent = cycle
            .allowance
            .filter(|a| !a.is_zero())
            .map(|a| cut(used * Decimal::ONE_HUNDRED / a, 2));
        CycleUsage {
            start: cycle.start,
            reset: cycle.reset,
            as_of,
            used,
            events,
            allowance: cycle.allowance,
            allowance_left: cycle.allowance.map(|a| a - used),
            allowance_used_percent,
            days_elapsed,
            average_daily: cut(used / Decimal::from(days_elapsed), 6),
            days_until_reset: u32::try_from((cycle.reset - today).num_days().max(0)).unwrap_or(0),
        }
    }
}

/// Where the cycle ends at the current pace, and when the balance runs out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Projection {
    pub start: NaiveDate,
    pub reset: NaiveDate,
    pub as_of: NaiveDate,
    pub used_so_far: Decimal,
    /// Credits per day: the cycle's average daily usage so far (used / days elapsed, cut to
    /// 6 places), `as_of` counted as a whole day.
    pub pace_per_day: Decimal,
    /// Days after `as_of` before the reset.
    pub days_left: u32,
    /// used_so_far + pace_per_day × days_left.
    pub projected_total: Decimal,
    /// The spendable balance the run-out date is computed from (the ledger's), if given.
    pub spendable: Option<Decimal>,
    /// The first day by whose end the balance is used up at this pace: `as_of` +
    /// ceil(spendable / pace) days (`as_of` itself when nothing is left). None without a
    /// balance or at a pace of zero.
    pub runs_out_on: Option<NaiveDate>,
    /// True when `runs_out_on` falls before the reset.
    pub runs_out_before_reset: bool,
}

impl Projection {
    pub fn compute(
        cycle: &Cycle,
        today: NaiveDate,
        used: Decimal,
        spendable: Option<Decimal>,
    ) -> Projection {
        let usage = CycleUsage::compute(cycle, today, used, 0);
        let as_of = usage.as_of;
        let days_left = u32::try_from((cycle.reset - as_of).num_days() - 1)
            .unwrap_or(0)
            .min(usage.days_until_reset);
        let pace = usage.average_daily;
        let runs_out_on = spendable.and_then(|s| run_out_day(as_of, s, pace));
        Projection {
            start: cycle.start,
            reset: cycle.reset,
            as_of,
            used_so_far: used,
            pace_per_day: pace,
            days_left,
            projected_total: used + pace * Decimal::from(days_left),
            spendable,
            runs_out_on,
            runs_out_before_reset: runs_out_on.is_some_and(|d| d < cycle.reset),
        }
    }
}

/// `as_of` + ceil(spendable / pace) days, in whole micro-credits (no rounding error).
fn run_out_day(as_of: NaiveDate, spendable: Decimal, pace: Decimal) -> Option<NaiveDate> {
    if spendable <= Decimal::ZERO {
        return Some(as_of);
    }
    let micro = |d: Decimal| Credits::cut(d).map(Credits::micros);
    let (s, p) = (micro(spendable)?, micro(pace)?);
    if p <= 0 {
        return None;
    }
    let days = (s + p - 1) / p;
    as_of.checked_add_days(chrono::Days::new(u64::try_from(days).ok()?))
}

/// One week (Monday to Sunday) of the trend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WeekTotal {
    /// The Monday (ClickHouse `toMonday`).
    pub week_start: NaiveDate,
    pub credits: Decimal,
    /// credits − the previous week's credits.
    pub change: Decimal,
    /// change × 100 / previous week, cut to 2 places; None when the previous week is zero.
    pub change_percent: Option<Decimal>,
    /// False for the week in progress.
    pub complete: bool,
}

/// One day of the trend, with its 7-day moving average.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrendDay {
    pub day: NaiveDate,
    pub credits: Decimal,
    /// (credits of this day and the 6 before) / 7, cut to 6 places.
    pub moving_average_7d: Decimal,
}

/// Usage over the last 3 months: from the Monday of the week 3 months ago through today.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trend {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub weeks: Vec<WeekTotal>,
    pub days: Vec<TrendDay>,
}

impl Trend {
    /// The days a trend ending `today` reads: 7 before its first Monday (for the first week's
    /// change and the first days' averages) through today.
    pub fn query_range(today: NaiveDate) -> Result<DateRange, AnalyticsError> {
        let from = Self::first_monday(today) - chrono::Days::new(7);
        DateRange::new(from.max(NaiveDate::default()), today)
    }

    fn first_monday(today: NaiveDate) -> NaiveDate {
        let back = today
            .checked_sub_months(Months::new(TREND_MONTHS))
            .unwrap_or(today);
        monday(back)
    }

    /// The trend from per-day credits (missing days are zero).
    pub fn compute(today: NaiveDate, credits_by_day: &BTreeMap<NaiveDate, Decimal>) -> Trend {
        let from = Self::first_monday(today);
        let credits = |d: NaiveDate| credits_by_day.get(&d).copied().unwrap_or_default();
        let seven = Decimal::from(7);
        let days: Vec<TrendDay> = from
            .iter_days()
            .take_while(|d| *d <= today)
            .map(|day| {
                let window: Decimal = (0..7)
                    .filter_map(|back| day.checked_sub_days(chrono::Days::new(back)))
                    .map(credits)
                    .sum();
                TrendDay {
                    day,
                    credits: credits(day),
                    moving_average_7d: cut(window / seven, 6),
                }
            })
            .collect();
        let week_credits = |monday: NaiveDate| -> Decimal {
            monday
                .iter_days()
                .take(7)
                .filter(|d| *d <= today)
                .map(credits)
                .sum()
        };
        let mut weeks = Vec::new();
        let mut week = from;
        while week <= today {
            let this = week_credits(week);
            let previous = week_credits(week - chrono::Days::new(7));
            let change = this - previous;
            weeks.push(WeekTotal {
                week_start: week,
                credits: this,
                change,
                change_percent: (!previous.is_zero())
                    .then(|| cut(change * Decimal::ONE_HUNDRED / previous, 2)),
                complete: week + chrono::Days::new(6) <= today,
            });
            week = week + chrono::Days::new(7);
        }
        Trend {
            from,
            to: today,
            weeks,
            days,
        }
    }
}

/// Usage by kind over a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindUsage {
    pub kind: String,
    pub events: u64,
    pub credits: Decimal,
    pub quantity: Decimal,
    pub billable_seconds: u64,
}

/// Counts over a range: what a usage page shows next to credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageCounts {
    pub events: u64,
    pub credits: Decimal,
    /// Distinct call ids (answered or not).
    pub calls: u64,
    pub answered_calls: u64,
    /// Talk time: answer to hang-up, less hold.
    pub call_seconds: Decimal,
    /// call_seconds / 60, cut to 6 places.
    pub call_minutes: Decimal,
    /// Seconds billed after the rules' increments (outbound and unanswered calls bill 0).
    pub billable_call_seconds: u64,
    /// Distinct conversation ids.
    pub chats: u64,
    /// AI responses (each chat_response event carries one or more).
    pub ai_responses: u64,
    pub instance_seconds: Decimal,
    /// instance_seconds / 3600, cut to 6 places.
    pub instance_hours: Decimal,
    /// Hours billed after the rules' increments, cut to 6 places.
    pub billable_instance_hours: Decimal,
    pub by_kind: Vec<KindUsage>,
}

/// What a report is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRequest {
    /// The days of the daily series, peak days, busiest hours and counts.
    pub range: DateRange,
    /// The billing cycle (the calendar month for accounts without a plan).
    pub cycle: Cycle,
    /// Today (UTC): the cycle, projection and trend are computed as of this day.
    pub today: NaiveDate,
    /// The ledger's spendable balance, for the run-out date.
    pub spendable: Option<Decimal>,
    /// How many peak days and busiest hours to list.
    pub top: u32,
}

impl ReportRequest {
    /// A report as of `today`: this cycle's days so far, the top 5.
    pub fn for_cycle(
        cycle: Cycle,
        today: NaiveDate,
        spendable: Option<Decimal>,
    ) -> Result<Self, AnalyticsError> {
        Ok(ReportRequest {
            range: cycle.elapsed(today)?,
            cycle,
            today,
            spendable,
            top: DEFAULT_TOP,
        })
    }
}

/// Every figure of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    pub account_id: String,
    pub range: DateRange,
    pub cycle: CycleUsage,
    pub projection: Projection,
    pub counts: UsageCounts,
    pub daily: Vec<DailyUsage>,
    pub peak_days: Vec<DayTotal>,
    pub busiest_hours: Vec<HourTotal>,
    pub trend: Trend,
    /// Of the range's usage: what analytics read after the billing grace (`late_usage`).
    pub late: LateUsage,
}

/// Usage of a range that reached analytics after the billing grace (docs/billing.md): the
/// ledger charged it to the cycle open when it arrived; the daily series keep its own day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LateUsage {
    pub events: u64,
    pub credits: Decimal,
}

/// Late usage (events, credits) of an account by event day.
pub fn late_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT count() AS events, sum(credits) AS total_credits FROM late_usage FINAL \
         WHERE account_id = {} AND event_date >= {} AND event_date <= {}",
        sql::string(account_id),
        sql::date(range.from),
        sql::date(range.to)
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
        range.filter(account_id)
    )
}

/// Credits and events per day (days without usage absent).
pub fn day_totals_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT day, sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {} GROUP BY day HAVING events > 0 ORDER BY day",
        range.filter(account_id)
    )
}

/// Credits and events over the range (one row, zero when empty).
pub fn total_sql(account_id: &str, range: &DateRange) -> String {
    format!(
        "SELECT sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {}",
        range.filter(account_id)
    )
}

/// The `top` days with the most credits (ties: the earlier day first).
pub fn peak_days_sql(account_id: &str, range: &DateRange, top: u32) -> String {
    format!(
        "SELECT day, sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_DAILY} FINAL WHERE {} GROUP BY day HAVING events > 0 \
         ORDER BY credits DESC, day ASC LIMIT {top}",
        range.filter(account_id)
    )
}

/// The `top` hours of the day (UTC) with the most events over the range (ties: more
/// credits, then the earlier hour).
pub fn busiest_hours_sql(account_id: &str, range: &DateRange, top: u32) -> String {
    format!(
        "SELECT hour_of_day, sumMerge(credits_total) AS credits, countMerge(event_count) AS events \
         FROM {USAGE_HOURLY} FINAL WHERE {} GROUP BY hour_of_day HAVING events > 0 \
         ORDER BY events DESC, credits DESC, hour_of_day ASC LIMIT {top}",
        range.filter(account_id)
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
        range.filter(account_id)
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

// ---------------------------------------------------------------------------------------
// Rows as read back (RowBinary, positional): Date is u16 days, Decimal(38, 6) an i128
// mantissa, UInt8/UInt64 as such.

#[derive(Debug, Row, Deserialize)]
struct DailyRow {
    day: u16,
    kind: String,
    model: String,
    credits: i128,
    quantity: i128,
    billable_seconds: u64,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct DayRow {
    day: u16,
    credits: i128,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct TotalRow {
    credits: i128,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct HourRow {
    hour_of_day: u8,
    credits: i128,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct CountsRow {
    kind: String,
    events: u64,
    credits: i128,
    quantity: i128,
    billable_seconds: u64,
    answered: u64,
    responses: u64,
    calls: u64,
    conversations: u64,
}

fn day_of(days: u16) -> NaiveDate {
    sql::date_from_unix_days(days)
}

/// The usage reports of one ClickHouse database. Cheap to clone; connects lazily.
#[derive(Clone)]
pub struct UsageQueries {
    client: Client,
}

impl std::fmt::Debug for UsageQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageQueries")
            .field("client", &self.client)
            .finish()
    }
}

impl UsageQueries {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        UsageQueries {
            client: client(cfg, Some(&cfg.database)),
        }
    }

    pub(crate) async fn fetch<T>(
        &self,
        op: &'static str,
        sql: &str,
    ) -> Result<Vec<T>, AnalyticsError>
    where
        T: RowOwned + RowRead,
    {
        run_timed(
            op,
            QUERY_TIMEOUT,
            self.client.query_raw(sql).fetch_all::<T>(),
        )
        .await
    }

    /// Usage of `range` read after the billing grace.
    pub async fn late(
        &self,
        account_id: &str,
        range: &DateRange,
    ) -> Result<LateUsage, AnalyticsError> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct LateRow {
            events: u64,
            total_credits: i128,
        }
        const OP: &str = "late usage";
        let rows: Vec<LateRow> = self.fetch(OP, &late_sql(account_id, range)).await?;
        let (events, credits) = rows.first().map_or((0, 0), |r| (r.events, r.total_credits));
        Ok(LateUsage {
            events,
            credits: from_mantissa6(OP, credits)?,
        })
    }

    /// Every day of `range` (zero when nothing happened), with its split by kind and model.
    pub async fn daily(
        &self,
        account_id: &str,
        range: &DateRange,
    ) -> Result<Vec<DailyUsage>, AnalyticsError> {
        const OP: &str = "daily usage";
        let rows: Vec<DailyRow> = self.fetch(OP, &daily_sql(account_id, range)).await?;
        let mut by_day: BTreeMap<NaiveDate, Vec<KindModelUsage>> = BTreeMap::new();
        for r in rows {
            by_day
                .entry(day_of(r.day))
                .or_default()
                .push(KindModelUsage {
                    kind: r.kind,
                    model: r.model,
                    credits: from_mantissa6(OP, r.credits)?,
                    quantity: from_mantissa6(OP, r.quantity)?,
                    billable_seconds: r.billable_seconds,
                    events: r.events,
                });
        }
        Ok(range
            .days()
            .map(|day| {
                let by_kind_model = by_day.remove(&day).unwrap_or_default();
                DailyUsage {
                    day,
                    // cut: an empty day shows 0.000000 like the others.
                    credits: cut(by_kind_model.iter().map(|u| u.credits).sum(), 6),
                    events: by_kind_model.iter().map(|u| u.events).sum(),
                    by_kind_model,
                }
            })
            .collect())
    }

    /// Credits and events per day with usage (days without usage absent).
    pub async fn day_totals(
        &self,
        account_id: &str,
        range: &DateRange,
    ) -> Result<Vec<DayTotal>, AnalyticsError> {
        self.days("day totals", &day_totals_sql(account_id, range))
            .await
    }

    async fn days(&self, op: &'static str, sql: &str) -> Result<Vec<DayTotal>, AnalyticsError> {
        let rows: Vec<DayRow> = self.fetch(op, sql).await?;
        rows.into_iter()
            .map(|r| {
                Ok(DayTotal {
                    day: day_of(r.day),
                    credits: from_mantissa6(op, r.credits)?,
                    events: r.events,
                })
            })
            .collect()
    }

    /// Credits and events over a range.
    pub async fn total(
        &self,
        account_id: &str,
        range: &DateRange,
    ) -> Result<(Decimal, u64), AnalyticsError> {
        const OP: &str = "total usage";
        let rows: Vec<TotalRow> = self.fetch(OP, &total_sql(account_id, range)).await?;
        let row = rows.into_iter().next().unwrap_or(TotalRow {
            credits: 0,
            events: 0,
        });
        Ok((from_mantissa6(OP, row.credits)?, row.events))
    }

    /// This cycle as of `today`: used vs allowance, average daily usage, days until reset.
    pub async fn cycle(
        &self,
        account_id: &str,
        cycle: &Cycle,
        today: NaiveDate,
    ) -> Result<CycleUsage, AnalyticsError> {
        let (used, events) = self.total(account_id, &cycle.elapsed(today)?).await?;
        Ok(CycleUsage::compute(cycle, today, used, events))
    }

    /// The cycle's end at the current pace, and when `spendable` runs out at that pace.
    pub async fn projection(
        &self,
        account_id: &str,
        cycle: &Cycle,
        today: NaiveDate,
        spendable: Option<Decimal>,
    ) -> Result<Projection, AnalyticsError> {
        let (used, _) = self.total(account_id, &cycle.elapsed(today)?).await?;
        Ok(Projection::compute(cycle, today, used, spendable))
    }

    /// The `top` days with the most credits in `range` (ties: the earlier day first).
    pub async fn peak_days(
        &self,
        account_id: &str,
        range: &DateRange,
        top: u32,
    ) -> Result<Vec<DayTotal>, AnalyticsError> {
        self.days("peak days", &peak_days_sql(account_id, range, top))
            .await
    }

    /// The `top` hours of the day (UTC) with the most events in `range`.
    pub async fn busiest_hours(
        &self,
        account_id: &str,
        range: &DateRange,
        top: u32,
    ) -> Result<Vec<HourTotal>, AnalyticsError> {
        const OP: &str = "busiest hours";
        let rows: Vec<HourRow> = self
            .fetch(OP, &busiest_hours_sql(account_id, range, top))
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok(HourTotal {
                    hour_of_day: r.hour_of_day,
                    credits: from_mantissa6(OP, r.credits)?,
                    events: r.events,
                })
            })
            .collect()
    }

    /// Weekly totals, week-over-week change and the 7-day moving average over the last 3
    /// months up to `today`.
    pub async fn trend(&self, account_id: &str, today: NaiveDate) -> Result<Trend, AnalyticsError> {
        let days = self
            .days(
                "trend",
                &day_totals_sql(account_id, &Trend::query_range(today)?),
            )
            .await?;
        let by_day: BTreeMap<NaiveDate, Decimal> =
            days.into_iter().map(|d| (d.day, d.credits)).collect();
        Ok(Trend::compute(today, &by_day))
    }

    /// Calls, chats, AI responses, call minutes, instance hours over `range`.
    pub async fn counts(
        &self,
        account_id: &str,
        range: &DateRange,
    ) -> Result<UsageCounts, AnalyticsError> {
        const OP: &str = "usage counts";
        let rows: Vec<CountsRow> = self.fetch(OP, &counts_sql(account_id, range)).await?;
        let mut counts = UsageCounts {
            events: 0,
            credits: Decimal::ZERO,
            calls: 0,
            answered_calls: 0,
            call_seconds: Decimal::ZERO,
            call_minutes: Decimal::ZERO,
            billable_call_seconds: 0,
            chats: 0,
            ai_responses: 0,
            instance_seconds: Decimal::ZERO,
            instance_hours: Decimal::ZERO,
            billable_instance_hours: Decimal::ZERO,
            by_kind: Vec::with_capacity(rows.len()),
        };
        let mut billable_instance_seconds = 0u64;
        for r in rows {
            let credits = from_mantissa6(OP, r.credits)?;
            let quantity = from_mantissa6(OP, r.quantity)?;
            counts.events += r.events;
            counts.credits += credits;
            counts.calls += r.calls;
            counts.answered_calls += r.answered;
            counts.chats += r.conversations;
            counts.ai_responses += r.responses;
            match r.kind.as_str() {
                KIND_CALL => {
                    counts.call_seconds += quantity;
                    counts.billable_call_seconds += r.billable_seconds;
                }
                KIND_INSTANCE => {
                    counts.instance_seconds += quantity;
                    billable_instance_seconds += r.billable_seconds;
                }
                _ => {}
            }
            counts.by_kind.push(KindUsage {
                kind: r.kind,
                events: r.events,
                credits,
                quantity,
                billable_seconds: r.billable_seconds,
            });
        }
        counts.call_minutes = cut(counts.call_seconds / Decimal::from(60), 6);
        counts.instance_hours = cut(counts.instance_seconds / Decimal::from(3600), 6);
        counts.billable_instance_hours = cut(
            Decimal::from(billable_instance_seconds) / Decimal::from(3600),
            6,
        );
        Ok(counts)
    }

    /// Every figure at once (the queries run concurrently: 7 small reads).
    pub async fn report(
        &self,
        account_id: &str,
        request: &ReportRequest,
    ) -> Result<UsageReport, AnalyticsError> {
        let range = &request.range;
        let elapsed = request.cycle.elapsed(request.today)?;
        let ((used, events), counts, daily, peak_days, busiest_hours, trend, late) = tokio::try_join!(
            self.total(account_id, &elapsed),
            self.counts(account_id, range),
            self.daily(account_id, range),
            self.peak_days(account_id, range, request.top),
            self.busiest_hours(account_id, range, request.top),
            self.trend(account_id, request.today),
            self.late(account_id, range),
        )?;
        Ok(UsageReport {
            account_id: account_id.to_owned(),
            range: *range,
            cycle: CycleUsage::compute(&request.cycle, request.today, used, events),
            projection: Projection::compute(&request.cycle, request.today, used, request.spendable),
            counts,
            daily,
            peak_days,
            busiest_hours,
            trend,
            late,
        })
    }
}

/// The Monday of `day`'s week (ClickHouse `toMonday`).
pub fn monday(day: NaiveDate) -> NaiveDate {
    day - chrono::Days::new(u64::from(day.weekday().num_days_from_monday()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_are_checked() {
        assert!(DateRange::new(d("2025-06-02"), d("2025-06-01")).is_err());
        assert!(DateRange::new(d("1969-12-31"), d("2025-06-01")).is_err());
        assert!(DateRange::new(d("2000-01-01"), d("2025-06-01")).is_err());
        let r = DateRange::new(d("2025-06-01"), d("2025-06-03")).unwrap();
        assert_eq!(r.len_days(), 3);
        assert_eq!(r.days().count(), 3);
    }

    #[test]
    fn calendar_cycles() {
        let c = Cycle::calendar_month(d("2024-02-29"));
        assert_eq!((c.start, c.reset), (d("2024-02-01"), d("2024-03-01")));
        let c = Cycle::calendar_month(d("2025-12-31"));
        assert_eq!((c.start, c.reset), (d("2025-12-01"), d("2026-01-01")));
    }

    #[test]
    fn cycle_figures() {
        let cycle = Cycle {
            start: d("2025-06-01"),
            reset: d("2025-07-01"),
            allowance: Some(dec!(300)),
        };
        let u = CycleUsage::compute(&cycle, d("2025-06-03"), dec!(100), 7);
        assert_eq!(u.days_elapsed, 3);
        assert_eq!(u.average_daily, dec!(33.333333));
        assert_eq!(u.days_until_reset, 28);
        assert_eq!(u.allowance_left, Some(dec!(200)));
        assert_eq!(u.allowance_used_percent, Some(dec!(33.33)));
        let none = Cycle {
            allowance: None,
            ..cycle
        };
        let u = CycleUsage::compute(&none, d("2025-06-30"), dec!(1), 1);
        assert_eq!((u.allowance_used_percent, u.days_until_reset), (None, 1));
    }

    #[test]
    fn projection_and_run_out() {
        let cycle = Cycle::calendar_month(d("2025-06-10"));
        // 10 days, 25 credits: pace 2.5, 20 days left.
        let p = Projection::compute(&cycle, d("2025-06-10"), dec!(25), Some(dec!(10)));
        assert_eq!(p.pace_per_day, dec!(2.5));
        assert_eq!(p.days_left, 20);
        assert_eq!(p.projected_total, dec!(75));
        // 10 / 2.5 = 4 days exactly: gone by the end of the 14th.
        assert_eq!(p.runs_out_on, Some(d("2025-06-14")));
        assert!(p.runs_out_before_reset);
        let p = Projection::compute(&cycle, d("2025-06-10"), dec!(25), Some(dec!(10.000001)));
        assert_eq!(p.runs_out_on, Some(d("2025-06-15")));
        let p = Projection::compute(&cycle, d("2025-06-10"), dec!(25), Some(dec!(0)));
        assert_eq!(p.runs_out_on, Some(d("2025-06-10")));
        let p = Projection::compute(&cycle, d("2025-06-10"), dec!(0), Some(dec!(5)));
        assert_eq!((p.runs_out_on, p.runs_out_before_reset), (None, false));
        let p = Projection::compute(&cycle, d("2025-06-10"), dec!(25), Some(dec!(1000)));
        assert_eq!(p.runs_out_on, Some(d("2026-07-15"))); // 400 days
        assert!(!p.runs_out_before_reset);
        // Last day of the cycle: nothing left to project.
        let p = Projection::compute(&cycle, d("2025-06-30"), dec!(30), None);
        assert_eq!((p.days_left, p.projected_total), (0, dec!(30)));
    }

    #[test]
    fn trend_weeks_and_moving_average() {
        let today = d("2025-06-18"); // a Wednesday
        let mut by_day = BTreeMap::new();
        by_day.insert(d("2025-06-09"), dec!(7));
        by_day.insert(d("2025-06-16"), dec!(14));
        by_day.insert(d("2025-06-18"), dec!(0.000001));
        let t = Trend::compute(today, &by_day);
        // 3 months back: 2025-03-18, a Tuesday -> Monday 2025-03-17.
        assert_eq!(t.from, d("2025-03-17"));
        assert_eq!(t.weeks.first().unwrap().week_start, d("2025-03-17"));
        let last = t.weeks.last().unwrap();
        assert_eq!(last.week_start, d("2025-06-16"));
        assert!(!last.complete);
        assert_eq!(last.credits, dec!(14.000001));
        assert_eq!(last.change, dec!(7.000001));
        assert_eq!(last.change_percent, Some(dec!(100.00)));
        let before = t.weeks[t.weeks.len() - 2];
        assert_eq!((before.credits, before.change_percent), (dec!(7), None));
        let day = |s: &str| t.days.iter().find(|x| x.day == d(s)).unwrap();
        assert_eq!(day("2025-06-09").moving_average_7d, dec!(1));
        assert_eq!(day("2025-06-15").moving_average_7d, dec!(1));
        assert_eq!(day("2025-06-16").moving_average_7d, dec!(2));
        assert_eq!(day("2025-06-18").moving_average_7d, dec!(2)); // 14.000001 / 7 cut
        assert_eq!(t.days.last().unwrap().day, today);
        assert_eq!(Trend::query_range(today).unwrap().from, d("2025-03-10"));
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
