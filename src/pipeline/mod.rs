//! The batch loops that join the pieces: Kafka batch -> decode -> rate -> store of record.
//! [`prepare`] is the shared front half (pure); [`ledger`] and [`analytics`] are the loops.
//! Owns shutdown (the retry policy is [`crate::retry`]); owns no SQL and no wire format.

pub mod alerts;
pub mod analytics;
pub mod ledger;
pub mod purge;
pub mod scheduler;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::analytics::NumericColumns;
use crate::event::{self, DecodeLimits, Event, Reason, Rejection};
use crate::kafka::{BatchLimits, Record};
use crate::rating::{Charge, PriceTable};

/// A decoded event and, for usage, its charge.
#[derive(Debug)]
pub struct Prepared<'r, 'p> {
    pub record: &'r Record,
    pub event: Event<'r>,
    /// None for grants and plans.
    pub charge: Option<Charge<'p>>,
    /// The usage's numeric ClickHouse columns, checked to fit (with `charge`).
    pub columns: Option<NumericColumns>,
}

/// What an event must satisfy to enter either pipeline (both reject the same events, so the
/// ledger and ClickHouse agree on which events exist).
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub decode: DecodeLimits,
    /// Events older than this (the dedupe window) are rejected as `too_late`: their dedupe
    /// claims may already be purged, so exactly-once could not be guaranteed.
    pub dedupe_window: chrono::Duration,
    /// The stored dedupe horizon (`Store::purge_dedupe`): claims of events dated before it
    /// may have been purged, so such events are `too_late` whatever the window is now (a
    /// window enlarged after a purge must not re-admit them). None: not known (nothing
    /// purged yet, or a pipeline that does not read it; the store checks it again when
    /// claiming).
    pub purged_before: Option<DateTime<Utc>>,
}

impl Default for Admission {
    fn default() -> Self {
        limits(&crate::config::PipelineConfig::default()).1
    }
}

/// The time admission is decided at: the record's Kafka timestamp (set when it was produced
/// or appended), so the ledger and analytics decide the same whatever their lag; `clock` only
/// for a record without one (never from a Kafka broker >= 0.10).
pub fn decided_at(record: &Record, clock: DateTime<Utc>) -> DateTime<Utc> {
    record
        .timestamp_ms
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or(clock)
}

/// Decodes, admits and rates one record. Rejections carry the dead-letter reason. Admission
/// (the future-time and dedupe-window checks) is decided at the record's time
/// ([`decided_at`]), not at `now`, which serves only records without a timestamp.
pub fn prepare<'r, 'p>(
    record: &'r Record,
    prices: &'p PriceTable,
    now: DateTime<Utc>,
    admission: &Admission,
) -> Result<Prepared<'r, 'p>, Rejection> {
    let at = decided_at(record, now);
    let event = event::decode_record(&record.payload, &record.headers, at, &admission.decode)?;
    let (charge, columns) = admit_and_rate(&event, prices, at, admission)?;
    Ok(Prepared {
        record,
        event,
        charge,
        columns,
    })
}

/// What [`prepare`] decides about one structured-mode event, without a Kafka record: the
/// event, or the rejection the pipelines would dead-letter it with. The HTTP ingest route
/// checks events with it before publishing them, so what it accepts is never dead-lettered
/// for its content.
pub fn validate<'b>(
    bytes: &'b [u8],
    prices: &PriceTable,
    now: DateTime<Utc>,
    admission: &Admission,
) -> Result<Event<'b>, Rejection> {
    let event = event::decode(bytes, now, &admission.decode)?;
    admit_and_rate(&event, prices, now, admission)?;
    Ok(event)
}

/// Admission (`too_late`), rating (`unpriced`) and the stores' numeric ranges
/// (`refused_by_store`) of a decoded event.
fn admit_and_rate<'p>(
    event: &Event<'_>,
    prices: &'p PriceTable,
    now: DateTime<Utc>,
    admission: &Admission,
) -> Result<(Option<Charge<'p>>, Option<NumericColumns>), Rejection> {
    admit(event.envelope.time, now, admission)?;
    let Some(usage) = event.usage() else {
        return Ok((None, None));
    };
    let charge = prices
        .rate(&usage)
        .map_err(|e| Rejection::new(Reason::Unpriced, None, e.to_string()))?;
    // Both stores must hold it exactly, or neither gets it (ClickHouse's columns are the
    // narrower): the ledger dead-letters it and the analytics loop skips it.
    let env = &event.envelope;
    let columns =
        crate::analytics::numeric_columns(&usage, &charge, env.time, (&env.source, &env.id))
            .map_err(|e| Rejection::new(Reason::RefusedByStore, None, e.to_string()))?;
    Ok((Some(charge), Some(columns)))
}

/// Refuses (`too_late`) an event dated before the dedupe window at `now` (the record's time)
/// or before the stored dedupe horizon: its claim may have been purged, so it could be
/// applied twice.
pub fn admit(
    time: DateTime<Utc>,
    now: DateTime<Utc>,
    admission: &Admission,
) -> Result<(), Rejection> {
    if time < now - admission.dedupe_window {
        return Err(Rejection::new(
            Reason::TooLate,
            Some("time"),
            format!(
                "event time is older than the {}-day dedupe window",
                admission.dedupe_window.num_days()
            ),
        ));
    }
    if let Some(horizon) = admission.purged_before.filter(|&h| time < h) {
        return Err(Rejection::new(
            Reason::TooLate,
            Some("time"),
            format!(
                "event time {} is before the dedupe horizon {}: claims of events dated before it have been purged, so it could be applied twice",
                time.to_rfc3339(),
                horizon.to_rfc3339()
            ),
        ));
    }
    Ok(())
}

/// The analytics pipeline's batch limits (`pipeline.analytics_batch_*`).
pub fn analytics_limits(cfg: &crate::config::PipelineConfig) -> BatchLimits {
    BatchLimits {
        max_events: cfg.analytics_batch_max_events,
        max_bytes: cfg.analytics_batch_max_bytes,
        max_wait: Duration::from_millis(cfg.analytics_batch_max_wait_ms),
    }
}

/// Batch limits and admission rules from configuration.
pub fn limits(cfg: &crate::config::PipelineConfig) -> (BatchLimits, Admission) {
    (
        BatchLimits {
            max_events: cfg.batch_max_events,
            max_bytes: cfg.batch_max_bytes,
            max_wait: Duration::from_millis(cfg.batch_max_wait_ms),
        },
        Admission {
            decode: DecodeLimits {
                max_message_bytes: cfg.max_message_bytes,
                max_future_seconds: cfg.max_future_seconds,
            },
            dedupe_window: chrono::Duration::days(cfg.dedupe_window_days),
            purged_before: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn chat_record(time: &str, timestamp_ms: Option<i64>) -> Record {
        let event = serde_json::json!({
            "specversion": "1.0", "id": "c-1", "source": "//tests/admission",
            "type": "tally.usage.chat_response.v1", "subject": "acct-1", "time": time,
            "datacontenttype": "application/json",
            "data": {"conversation_id": "conv-1", "model": "gpt-4o-mini", "responses": 1},
        });
        Record {
            topic: std::sync::Arc::from("usage.chat"),
            partition: 0,
            offset: 0,
            key: None,
            payload: serde_json::to_vec(&event).unwrap(),
            headers: Vec::new(),
            timestamp_ms,
        }
    }

    #[test]
    fn admission_is_decided_at_the_records_time_not_the_clock() {
        let prices = PriceTable::load(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prices/default.toml"),
        )
        .unwrap();
        let admission = Admission::default(); // 35 days, 300 s ahead
                                              // Produced 2026-01-10T00:05Z, about an event of 2026-01-10T00:00Z.
        let produced = at("2026-01-10T00:05:00Z").timestamp_millis();
        let record = chat_record("2026-01-10T00:00:00Z", Some(produced));
        // Read at once, or 40 days later (a lagging pipeline): admitted both times.
        for now in [at("2026-01-10T00:05:01Z"), at("2026-02-19T00:00:00Z")] {
            assert!(prepare(&record, &prices, now, &admission).is_ok(), "{now}");
        }
        // Without a timestamp, the clock decides: 40 days later it is too late.
        let bare = chat_record("2026-01-10T00:00:00Z", None);
        let r = prepare(&bare, &prices, at("2026-02-19T00:00:00Z"), &admission).unwrap_err();
        assert_eq!(r.reason, Reason::TooLate);
        // Too late or too far ahead of its record, whenever it is read.
        let old = chat_record("2025-12-01T00:00:00Z", Some(produced));
        let r = prepare(&old, &prices, at("2025-12-01T00:00:01Z"), &admission).unwrap_err();
        assert_eq!(r.reason, Reason::TooLate);
        let ahead = chat_record("2026-01-10T00:10:01Z", Some(produced));
        let r = prepare(&ahead, &prices, at("2026-01-10T01:00:00Z"), &admission).unwrap_err();
        assert_eq!(
            (r.reason, r.field.as_deref()),
            (Reason::InvalidValue, Some("time"))
        );
    }

    #[test]
    fn events_before_the_window_or_the_stored_horizon_are_too_late() {
        let now = at("2026-03-10T12:00:00Z");
        let mut admission = Admission {
            dedupe_window: chrono::Duration::days(35),
            ..Admission::default()
        };
        // The window alone: 35 days before now is 2026-02-03T12:00Z.
        assert!(admit(at("2026-02-03T12:00:00Z"), now, &admission).is_ok());
        let r = admit(at("2026-02-03T11:59:59Z"), now, &admission).unwrap_err();
        assert_eq!(
            (r.reason, r.field.as_deref()),
            (Reason::TooLate, Some("time"))
        );
        assert!(r.detail.contains("35-day dedupe window"), "{}", r.detail);

        // A purge with a 7-day window at 2026-03-01T00:00Z stored the horizon
        // 2026-03-01 - 7 days - 1 hour = 2026-02-21T23:00Z; the window is 35 days now.
        admission.purged_before = Some(at("2026-02-21T23:00:00Z"));
        assert!(admit(at("2026-02-21T23:00:00Z"), now, &admission).is_ok());
        let r = admit(at("2026-02-21T22:59:59Z"), now, &admission).unwrap_err();
        assert_eq!(
            (r.reason, r.field.as_deref()),
            (Reason::TooLate, Some("time"))
        );
        assert!(
            r.detail
                .contains("before the dedupe horizon 2026-02-21T23:00:00+00:00"),
            "{}",
            r.detail
        );
        // Inside the window and after the horizon: admitted.
        assert!(admit(at("2026-03-10T11:00:00Z"), now, &admission).is_ok());
    }
}
