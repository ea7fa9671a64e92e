//! # Tally — usage aggregator and credit ledger
//!
//! Producer services emit usage events (CloudEvents JSON) to Kafka. Tally rates each one
//! against a versioned price table, debits the account's credit grants in a PostgreSQL
//! ledger, writes rated usage to ClickHouse, and publishes threshold alerts.
//!
//! ## The path an event takes
//!
//! ```text
//! Kafka record ──► kafka::       consumer set-up, offsets, dead-letter producer
//!      │
//!      ▼
//!   event::decode      bytes -> typed Event, or a Rejection{reason} (dead letter)
//!      │
//!      ▼
//!   rating::PriceTable::rate   Usage -> Charge{credits, version, rule} or Unpriced (pure)
//!      │
//!      ├──► pipeline::ledger     one PostgreSQL transaction per batch: dedupe claim,
//!      │                         ledger::buckets (pure debit logic), entries, offsets
//!      └──► pipeline::analytics  analytics::sink -> ClickHouse rated_events (idempotent)
//! ```
//!
//! ## Modules (a module has one job; dependencies point down this list)
//!
//! - [`config`] — typed settings from a TOML file + `TALLY_*` environment, validated once.
//! - [`event`] — wire format, decoder, rejection reasons. Pure.
//! - [`rating`] — price table (effective-dated versions, rules) and rating. Pure.
//! - [`ledger`] — credit-bucket logic (pure) and the PostgreSQL store.
//! - [`analytics`] — the ClickHouse sink and DDL.
//! - [`kafka`] — client configuration, topic administration, dead letters.
//! - [`pipeline`] — the batch loops joining the pieces above.
//! - [`demo`] — the realistic demo stream behind `tally produce`.

pub mod alerts;
pub mod analytics;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod event;
pub mod kafka;
pub mod ledger;
pub mod pipeline;
pub mod rating;
