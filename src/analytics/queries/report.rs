//! The report types and the arithmetic done in Rust: zero-filled days, the cycle's figures,
//! week-over-week change, moving average, pace and run-out date. Pure.

use std::collections::BTreeMap;

use chrono::{Datelike, Months, NaiveDate};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::analytics::AnalyticsError;
use crate::credits::{cut, Credits};

use super::*;

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
}
