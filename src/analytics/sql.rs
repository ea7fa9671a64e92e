//! SQL text for queries sent verbatim (`Client::query_raw`): literals escaped here, so values
//! that contain `?` (event sources are URIs) are never taken for bind placeholders, and the
//! same text can be printed, logged or run on another server (the chDB test does).

use chrono::NaiveDate;

/// A ClickHouse string literal: quoted, with backslash, quote and control characters escaped.
pub fn string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A Date literal: `toDate('YYYY-MM-DD')`.
pub fn date(day: NaiveDate) -> String {
    format!("toDate('{}')", day.format("%Y-%m-%d"))
}

/// A day as days since 1970-01-01 (a ClickHouse Date on the wire), as a date.
pub fn date_from_unix_days(days: u16) -> NaiveDate {
    NaiveDate::default() + chrono::Days::new(u64::from(days))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_literals() {
        assert_eq!(string("acct-1"), "'acct-1'");
        assert_eq!(string(r"a'b\c?"), r"'a\'b\\c?'");
        assert_eq!(string("x\ny\t\0"), r"'x\ny\t\0'");
        let d = NaiveDate::from_ymd_opt(2025, 6, 1).unwrap();
        assert_eq!(date(d), "toDate('2025-06-01')");
        assert_eq!(date_from_unix_days(20_240), d);
    }
}
