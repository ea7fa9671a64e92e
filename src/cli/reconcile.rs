//! `tally reconcile`: runs `crate::reconcile` over a range of days and prints every
//! difference for people (or the whole outcome as JSON). Only joins and prints.

use std::fmt::Write;

use anyhow::Context;
use chrono::{Days, NaiveDate, Utc};

use super::escape::{self, shown};
use crate::analytics::DateRange;
use crate::config::Config;
use crate::reconcile::{self, DayFigures, Difference, Figures, Reconciliation};

/// Days compared when `--from` is not given: `--to` and the 30 days before it.
pub const DEFAULT_DAYS: u64 = 31;

/// Reconciles the UTC days `from..=to` (default: the last [`DEFAULT_DAYS`] days up to today)
/// of one account or all, prints the outcome, and returns whether everything agreed.
pub async fn reconcile(
    cfg: &Config,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    account: Option<&str>,
    json: bool,
) -> anyhow::Result<bool> {
    let to = to.unwrap_or_else(|| Utc::now().date_naive());
    let from = from.unwrap_or_else(|| to - Days::new(DEFAULT_DAYS - 1));
    let range = DateRange::new(from, to)?;
    let outcome = reconcile::reconcile(cfg, &range, account)
        .await
        .context("reconciling the ledger with ClickHouse")?;
    if json {
        println!("{}", escape::json(&serde_json::to_string_pretty(&outcome)?));
    } else {
        print!("{}", text(&outcome));
    }
    Ok(outcome.is_clean())
}

fn figures(f: &Figures) -> String {
    format!("{} ({})", f.credits, f.events)
}

fn day_line(out: &mut String, f: &DayFigures) {
    let late = if f.has_late() {
        format!("LATE {}", figures(&f.late))
    } else {
        String::new()
    };
    let line = format!(
        "{:<16} {}  {:<16} {:>22} {:>22} {:>22} {:>7}  {late}",
        shown(&f.account_id),
        f.day,
        shown(&f.kind),
        figures(&f.ledger),
        figures(&f.rollup),
        figures(&f.rated),
        f.rated_charged_events,
    );
    let _ = writeln!(out, "{}", line.trim_end());
}

/// The outcome as text: a header, one line per difference, a summary.
pub fn text(r: &Reconciliation) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "reconcile {} .. {} (UTC days of event time), {}",
        r.from,
        r.to,
        r.account_id.as_deref().map_or_else(
            || "every account".to_owned(),
            |a| format!("account {}", shown(a))
        )
    );
    let days: Vec<&DayFigures> = r
        .differences
        .iter()
        .filter_map(|d| match d {
            Difference::Day(f) => Some(f),
            Difference::Corrections { .. } => None,
        })
        .collect();
    if !days.is_empty() {
        let _ = writeln!(
            out,
            "{:<16} {:<10}  {:<16} {:>22} {:>22} {:>22} {:>7}  late usage (ledger)",
            "account",
            "day",
            "kind",
            "ledger credits (ev)",
            "roll-up credits (ev)",
            "rated credits (ev)",
            "charged"
        );
        for f in days {
            day_line(&mut out, f);
        }
    }
    for d in &r.differences {
        if let Difference::Corrections {
            account_id,
            credits,
        } = d
        {
            let _ = writeln!(
                out,
                "{:<16} corrections of debits and overage net to {credits}, not 0",
                shown(account_id)
            );
        }
    }
    let _ = writeln!(
        out,
        "{} difference(s); {} account x day x kind compared, {} with late usage",
        r.differences.len(),
        r.compared,
        r.late
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn prints_each_difference_with_its_late_usage() {
        let day = NaiveDate::from_ymd_opt(2025, 6, 3).unwrap();
        let r = Reconciliation {
            from: day,
            to: day,
            account_id: None,
            compared: 4,
            late: 1,
            differences: vec![
                Difference::Day(DayFigures {
                    account_id: "acct-1".into(),
                    day,
                    kind: "call".into(),
                    ledger: Figures {
                        credits: dec!(12.000000),
                        events: 3,
                    },
                    late: Figures {
                        credits: dec!(2.000000),
                        events: 1,
                    },
                    rollup: Figures {
                        credits: dec!(10.000000),
                        events: 2,
                    },
                    rated: Figures {
                        credits: dec!(12.000000),
                        events: 3,
                    },
                    rated_charged_events: 3,
                }),
                Difference::Corrections {
                    account_id: "acct-\u{1b}2".into(),
                    credits: dec!(-0.5),
                },
            ],
        };
        let t = text(&r);
        assert!(
            t.starts_with(
                "reconcile 2025-06-03 .. 2025-06-03 (UTC days of event time), every account\n"
            ),
            "{t}"
        );
        assert!(t.contains("acct-1           2025-06-03  call                      12.000000 (3)          10.000000 (2)          12.000000 (3)       3  LATE 2.000000 (1)\n"), "{t}");
        assert!(
            t.contains("acct-\\u{1b}2     corrections of debits and overage net to -0.5, not 0\n"),
            "{t}"
        );
        assert!(
            t.ends_with("2 difference(s); 4 account x day x kind compared, 1 with late usage\n"),
            "{t}"
        );
    }
}
