//! Billing-cycle calendar math (pure). A cycle runs from one billing date to the next, at
//! 00:00 UTC; a billing day of 29–31 falls on the last day of shorter months, and each
//! boundary is computed from the billing day itself (Jan 31 → Feb 28 → Mar 31).

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

/// The billing boundary of `billing_day` in the given month.
pub fn boundary(year: i32, month: u32, billing_day: u8) -> DateTime<Utc> {
    let day = u32::from(billing_day).clamp(1, last_day(year, month));
    Utc.from_utc_datetime(
        &NaiveDate::from_ymd_opt(year, month, day)
            .expect("clamped day is valid")
            .and_hms_opt(0, 0, 0)
            .expect("midnight"),
    )
}

pub fn last_day(year: i32, month: u32) -> u32 {
    let (ny, nm) = next_month(year, month);
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map(|d| d.day())
        .expect("valid month")
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn prev_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

/// The cycle [start, end) that contains `at`.
pub fn containing(at: DateTime<Utc>, billing_day: u8) -> (DateTime<Utc>, DateTime<Utc>) {
    let (y, m) = (at.year(), at.month());
    let this = boundary(y, m, billing_day);
    if at >= this {
        let (ny, nm) = next_month(y, m);
        (this, boundary(ny, nm, billing_day))
    } else {
        let (py, pm) = prev_month(y, m);
        (boundary(py, pm, billing_day), this)
    }
}

/// The boundary after `start` (a boundary itself).
pub fn next_boundary(start: DateTime<Utc>, billing_day: u8) -> DateTime<Utc> {
    let (ny, nm) = next_month(start.year(), start.month());
    boundary(ny, nm, billing_day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(y: i32, m: u32, day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, day, 0, 0, 0).unwrap()
    }

    #[test]
    fn billing_day_31_falls_on_month_ends() {
        assert_eq!(next_boundary(d(2027, 1, 31), 31), d(2027, 2, 28));
        assert_eq!(next_boundary(d(2027, 2, 28), 31), d(2027, 3, 31));
        assert_eq!(next_boundary(d(2028, 1, 31), 31), d(2028, 2, 29));
        assert_eq!(next_boundary(d(2027, 3, 31), 31), d(2027, 4, 30));
        assert_eq!(
            containing(d(2027, 2, 15), 31),
            (d(2027, 1, 31), d(2027, 2, 28))
        );
        assert_eq!(
            containing(d(2027, 2, 28), 31),
            (d(2027, 2, 28), d(2027, 3, 31))
        );
        assert_eq!(
            containing(d(2027, 1, 1), 15),
            (d(2026, 12, 15), d(2027, 1, 15))
        );
    }

    proptest! {
        #[test]
        fn containing_is_a_cycle_around_at(secs in 1_600_000_000i64..2_200_000_000, day in 1u8..=31) {
            let at = Utc.timestamp_opt(secs, 0).unwrap();
            let (start, end) = containing(at, day);
            prop_assert!(start <= at && at < end);
            prop_assert_eq!(next_boundary(start, day), end);
            prop_assert!((28..=31).contains(&(end - start).num_days()));
        }
    }
}
