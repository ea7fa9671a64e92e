//! `tally report ACCOUNT`: the usage report of one account — ClickHouse roll-ups through
//! `analytics::queries`, the spendable balance from the ledger — printed for people or as JSON.
//! Only joins and prints; every figure is computed in `analytics::queries`.

use anyhow::Context;
use chrono::{NaiveDate, Utc};
use rust_decimal::Decimal;

use super::escape::{self, shown};
use crate::analytics::queries::{Cycle, DateRange, ReportRequest, UsageQueries, UsageReport};
use crate::config::Config;
use crate::ledger::Store;

/// Prints the report of `account` as of today (UTC). The cycle is the plan's billing cycle
/// holding today, with the plan's allowance, or the calendar month for an account without a
/// plan. The days of the daily series, peak days, busiest hours and counts default to this
/// cycle so far.
pub async fn report(
    cfg: &Config,
    account: &str,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    json: bool,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let today = now.date_naive();
    let store = Store::connect(&cfg.postgres)
        .await
        .context("connecting to PostgreSQL (the ledger's balance and plan)")?;
    let balance = store
        .balance(account)
        .await
        .context("reading the balance")?;
    let plan = store.plan(account).await.context("reading the plan")?;
    let cycle = Cycle::for_plan(plan.as_ref().map(|(plan, _)| plan), now);
    let mut request = ReportRequest::for_cycle(cycle, today, balance.map(|b| b.spendable))?;
    if from.is_some() || to.is_some() {
        request.range = DateRange::new(
            from.unwrap_or(request.range.from),
            to.unwrap_or(request.range.to),
        )?;
    }
    let report = UsageQueries::new(&cfg.clickhouse)
        .report(account, &request)
        .await
        .context("reading usage from ClickHouse")?;
    if json {
        println!("{}", escape::json(&serde_json::to_string_pretty(&report)?));
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

fn or_dash(value: Option<Decimal>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The report as text for people.
pub fn text(r: &UsageReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let c = &r.cycle;
    let p = &r.projection;
    let n = &r.counts;
    let _ = writeln!(
        out,
        "usage of {}   days {} .. {} (UTC)   as of {}",
        shown(&r.account_id),
        r.range.from,
        r.range.to,
        c.as_of
    );
    let _ = writeln!(
        out,
        "cycle {} .. {}   resets {} (in {} days)",
        c.start,
        c.reset.pred_opt().unwrap_or(c.reset),
        c.reset,
        c.days_until_reset
    );
    let _ = writeln!(
        out,
        "  used {}   allowance {}   left {}   used {}%   average/day {} over {} days",
        c.used,
        or_dash(c.allowance),
        or_dash(c.allowance_left),
        or_dash(c.allowance_used_percent),
        c.average_daily,
        c.days_elapsed
    );
    let _ = writeln!(
        out,
        "projection   pace {}/day   {} days left   cycle end {}",
        p.pace_per_day, p.days_left, p.projected_total
    );
    let runs_out = match (p.spendable, p.runs_out_on) {
        (None, _) => "no ledger account".to_owned(),
        (Some(_), None) => "not at this pace".to_owned(),
        (Some(_), Some(day)) if p.runs_out_before_reset => format!("{day} (before the reset)"),
        (Some(_), Some(day)) => day.to_string(),
    };
    let _ = writeln!(
        out,
        "  spendable {}   runs out {runs_out}",
        or_dash(p.spendable)
    );
    let _ = writeln!(out, "counts   events {}   credits {}", n.events, n.credits);
    if r.late.events > 0 {
        let _ = writeln!(
            out,
            "  late (read after the billing grace, charged to the cycle open then) {} events, {} credits",
            r.late.events, r.late.credits
        );
    }
    let _ = writeln!(
        out,
        "  calls {} (answered {})   call minutes {}   billable call seconds {}",
        n.calls, n.answered_calls, n.call_minutes, n.billable_call_seconds
    );
    let _ = writeln!(
        out,
        "  chats {}   AI responses {}   instance hours {} (billable {})",
        n.chats, n.ai_responses, n.instance_hours, n.billable_instance_hours
    );
    for k in &n.by_kind {
        let _ = writeln!(
            out,
            "    {:<20} {:>8} events {:>18} credits   quantity {}",
            shown(&k.kind),
            k.events,
            k.credits,
            k.quantity
        );
    }
    let _ = writeln!(out, "daily");
    for d in &r.daily {
        let split: Vec<String> = d
            .by_kind_model
            .iter()
            .map(|u| {
                if u.model.is_empty() {
                    format!("{} {}", shown(&u.kind), u.credits)
                } else {
                    format!("{}/{} {}", shown(&u.kind), shown(&u.model), u.credits)
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "  {}  {:>18}  {:>6} events  {}",
            d.day,
            d.credits,
            d.events,
            split.join(", ")
        );
    }
    let _ = writeln!(out, "peak days");
    for d in &r.peak_days {
        let _ = writeln!(
            out,
            "  {}  {:>18}  {:>6} events",
            d.day, d.credits, d.events
        );
    }
    let _ = writeln!(out, "busiest hours (UTC)");
    for h in &r.busiest_hours {
        let _ = writeln!(
            out,
            "  {:02}:00  {:>6} events  {:>18} credits",
            h.hour_of_day, h.events, h.credits
        );
    }
    let _ = writeln!(
        out,
        "trend {} .. {} by week (Monday)",
        r.trend.from, r.trend.to
    );
    for w in &r.trend.weeks {
        let _ = writeln!(
            out,
            "  {}  {:>18}  change {:>18}  {:>8}%{}",
            w.week_start,
            w.credits,
            w.change,
            or_dash(w.change_percent),
            if w.complete { "" } else { "  (in progress)" }
        );
    }
    if let Some(last) = r.trend.days.last() {
        let _ = writeln!(
            out,
            "  7-day moving average on {}: {}",
            last.day, last.moving_average_7d
        );
    }
    out
}
