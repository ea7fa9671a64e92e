//! The names Tally accepts in settings and events: Kafka topics, account ids, and SQL
//! identifiers (schema and database names spliced into statements). A leaf: imports nothing
//! of the crate.

/// A Kafka topic name: `[A-Za-z0-9._-]{1,249}`.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// An account id as events carry it (`subject`): `^[A-Za-z0-9._:-]{1,128}$`.
pub fn valid_account_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A lower-case identifier safe to splice into SQL (schema and database names).
pub fn valid_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && s.len() <= 63
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
