//! The analytics boundary's error type, classified once: transient (ClickHouse unreachable,
//! overloaded or slow: retry with back-off) or not (bad configuration, broken schema, a bug,
//! or a value ClickHouse cannot hold).

use std::time::Duration;

use crate::fault::{Classify, Fault};

/// What went wrong talking to ClickHouse or building a row.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("clickhouse.database `{0}` is not a lower-case identifier ([a-z_][a-z0-9_]{{0,62}})")]
    InvalidDatabase(String),

    #[error("ClickHouse {op}: {source}")]
    ClickHouse {
        op: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },

    #[error("ClickHouse {op}: no answer within {} ms", after.as_millis())]
    Timeout { op: &'static str, after: Duration },

    #[error("ClickHouse migration {version} statement {statement}: {source}")]
    Migration {
        version: u32,
        statement: usize,
        #[source]
        source: clickhouse::error::Error,
    },

    /// A value that does not fit its ClickHouse column (a time before 1970, a charge beyond
    /// Decimal(18, 6)). The event cannot be stored exactly, so it is not stored at all.
    #[error(
        "event ({source_id}, {event_id}): {field} = {value} does not fit the ClickHouse column"
    )]
    OutOfRange {
        source_id: String,
        event_id: String,
        field: &'static str,
        value: String,
    },

    /// A report asked for an empty or unreasonably long date range.
    #[error("date range {from} to {to}: {problem}")]
    InvalidRange {
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        problem: &'static str,
    },

    /// A stored value that does not fit its Rust type (e.g. a sum beyond `Decimal`).
    #[error("ClickHouse {op}: stored value {value} does not fit")]
    Overflow { op: &'static str, value: String },
}

/// ClickHouse error codes that say "try again later" rather than "this will never work".
const TRANSIENT_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    160, // TOO_SLOW
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
    439, // CANNOT_SCHEDULE_TASK
    999, // KEEPER_EXCEPTION
];

/// ClickHouse error codes that say "this data cannot be stored" (the input's fault).
const INPUT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    407, // DECIMAL_OVERFLOW
    469, // VIOLATED_CONSTRAINT
];

impl Classify for AnalyticsError {
    /// Whose fault the error is: [`AnalyticsError::is_transient`] ones are transient; data
    /// ClickHouse refuses (a value it cannot parse or hold, a violated constraint) or that
    /// cannot be stored exactly is the input's; the rest (bad database name, unknown table,
    /// credentials, a report's bad range) is a bug or a broken deployment.
    fn fault(&self) -> Fault {
        if self.is_transient() {
            return Fault::Transient;
        }
        match self {
            AnalyticsError::OutOfRange { .. } => Fault::Input,
            AnalyticsError::ClickHouse {
                source: clickhouse::error::Error::BadResponse(text),
                ..
            } if exception_code(text).is_some_and(|c| INPUT_CODES.contains(&c)) => Fault::Input,
            _ => Fault::Bug,
        }
    }
}

impl AnalyticsError {
    pub(crate) fn clickhouse(op: &'static str) -> impl FnOnce(clickhouse::error::Error) -> Self {
        move |source| AnalyticsError::ClickHouse { op, source }
    }

    /// True when retrying later may succeed: the network, a timeout, an HTTP 5xx without a
    /// ClickHouse exception (a proxy, a server starting), or a ClickHouse code meaning overload.
    pub fn is_transient(&self) -> bool {
        match self {
            AnalyticsError::Timeout { .. } => true,
            AnalyticsError::ClickHouse { source, .. }
            | AnalyticsError::Migration { source, .. } => client_error_is_transient(source),
            AnalyticsError::InvalidDatabase(_)
            | AnalyticsError::InvalidRange { .. }
            | AnalyticsError::OutOfRange { .. }
            | AnalyticsError::Overflow { .. } => false,
        }
    }
}

fn client_error_is_transient(e: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error;
    match e {
        Error::Network(_) | Error::TimedOut => true,
        Error::BadResponse(text) => response_is_transient(text),
        _ => false,
    }
}

/// The client reports a failed response as its body (`Code: 60. DB::Exception: ...`, or on
/// 18.16 `Code: 60, e.displayText() = ...`) or, with an empty body, as `503 Service Unavailable`.
fn response_is_transient(text: &str) -> bool {
    if let Some(code) = exception_code(text) {
        return TRANSIENT_CODES.contains(&code);
    }
    let status = text.split_whitespace().next().unwrap_or("");
    status.len() == 3 && status.starts_with('5') && status.bytes().all(|b| b.is_ascii_digit())
}

fn exception_code(text: &str) -> Option<u32> {
    let at = text.find("Code: ")? + "Code: ".len();
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_responses() {
        // 18.16 and current formats.
        assert!(!response_is_transient(
            "Code: 60, e.displayText() = DB::Exception: Table x.y doesn't exist., e.what() = DB::Exception"
        ));
        assert!(!response_is_transient(
            "Code: 62. DB::Exception: Syntax error"
        ));
        assert!(response_is_transient(
            "Code: 252. DB::Exception: Too many parts (300)"
        ));
        assert!(response_is_transient(
            "Code: 241, e.displayText() = DB::Exception: Memory limit"
        ));
        assert!(response_is_transient("503 Service Unavailable"));
        assert!(response_is_transient("502 Bad Gateway"));
        assert!(!response_is_transient("404 Not Found"));
        assert!(!response_is_transient("Code: 516"));
    }

    #[test]
    fn classifies_errors() {
        let net = AnalyticsError::ClickHouse {
            op: "insert",
            source: clickhouse::error::Error::Network("connection refused".into()),
        };
        assert!(net.is_transient());
        let timeout = AnalyticsError::Timeout {
            op: "insert",
            after: Duration::from_secs(1),
        };
        assert!(timeout.is_transient());
        assert!(!AnalyticsError::InvalidDatabase("X".into()).is_transient());
        let format = AnalyticsError::ClickHouse {
            op: "insert",
            source: clickhouse::error::Error::NotEnoughData,
        };
        assert!(!format.is_transient());
        assert_eq!(format.fault(), Fault::Bug);
        assert_eq!(net.fault(), Fault::Transient);
        let refused = AnalyticsError::ClickHouse {
            op: "insert",
            source: clickhouse::error::Error::BadResponse(
                "Code: 407. DB::Exception: Decimal math overflow".into(),
            ),
        };
        assert_eq!(refused.fault(), Fault::Input);
        let missing = AnalyticsError::ClickHouse {
            op: "insert",
            source: clickhouse::error::Error::BadResponse(
                "Code: 60, e.displayText() = DB::Exception: Table x.y doesn't exist.".into(),
            ),
        };
        assert_eq!(missing.fault(), Fault::Bug);
    }
}
