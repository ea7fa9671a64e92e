//! The batch loops that join the pieces: Kafka batch -> decode -> rate -> store of record.
//! [`prepare`] is the shared front half (pure); [`ledger`] and [`analytics`] are the loops.
//! Owns shutdown (the retry policy is [`crate::retry`]); owns no SQL and no wire format.

pub mod alerts;
pub mod analytics;
pub mod ledger;
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
}

impl Default for Admission {
    fn default() -> Self {
        limits(&crate::config::PipelineConfig::default()).1
    }
}

/// Decodes, admits and rates one record. Rejections carry the dead-letter reason.
pub fn prepare<'r, 'p>(
    record: &'r Record,
    prices: &'p PriceTable,
    now: DateTime<Utc>,
    admission: &Admission,
) -> Result<Prepared<'r, 'p>, Rejection> {
    let event = event::decode(&record.payload, now, &admission.decode)?;
    if event.envelope.time < now - admission.dedupe_window {
        return Err(Rejection::new(
            Reason::TooLate,
            Some("time"),
            format!(
                "event time is older than the {}-day dedupe window",
                admission.dedupe_window.num_days()
            ),
        ));
    }
    let (charge, columns) = match event.usage() {
        None => (None, None),
        Some(usage) => {
            let charge = prices
                .rate(&usage)
                .map_err(|e| Rejection::new(Reason::Unpriced, None, e.to_string()))?;
            // Both stores must hold it exactly, or neither gets it (ClickHouse's columns are
            // the narrower): the ledger dead-letters it and the analytics loop skips it.
            let env = &event.envelope;
            let columns = crate::analytics::numeric_columns(
                &usage,
                &charge,
                env.time,
                (&env.source, &env.id),
            )
            .map_err(|e| Rejection::new(Reason::RefusedByStore, None, e.to_string()))?;
            (Some(charge), Some(columns))
        }
    };
    Ok(Prepared {
        record,
        event,
        charge,
        columns,
    })
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
        },
    )
}
