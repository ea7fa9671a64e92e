//! `UsageQueries`: runs the report statements on ClickHouse and builds the reports.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use clickhouse::{Client, Row, RowOwned, RowRead};
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::analytics::sink::{client, from_mantissa6, run_timed, QUERY_TIMEOUT};
use crate::analytics::ClickHouseConfig;
use crate::analytics::{sql, AnalyticsError};
use crate::credits::cut;
use crate::event::{KIND_CALL, KIND_INSTANCE};

use super::*;

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
