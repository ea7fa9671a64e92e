//! # Tally — usage aggregator and credit ledger
//!
//! Producer services emit usage events (CloudEvents JSON, in either content mode of the Kafka
//! binding, or over HTTP: `POST /v1/events`) to Kafka. Tally rates each one
//! against a versioned price table, debits the account's credit grants in a PostgreSQL
//! ledger, writes rated usage to ClickHouse, and publishes threshold alerts.
//!
//! ## The path an event takes
//!
//! ```text
//! Kafka record ──► kafka::       consumer set-up, offsets, dead-letter producer
//!      │
//!      ▼
//!   event::decode      bytes (+ ce_* headers in binary mode) -> typed Event, or a
//!                      Rejection{reason} (dead letter)
//!      │
//!      ▼
//!   rating::PriceTable::rate   Usage -> Charge{credits, version, rule} or Unpriced (pure)
//!      │
//!      ├──► pipeline::ledger     one PostgreSQL transaction per batch: dedupe claim,
//!      │                         ledger::buckets (pure debit/cycle logic), entries,
//!      │                         alerts::evaluate -> alert_outbox, offsets
//!      │      pipeline::scheduler  resets cycles, expires grants on time (no traffic needed)
//!      │      pipeline::alerts     alert_outbox -> Kafka tally.alerts.* (relay)
//!      └──► pipeline::analytics  analytics::sink -> ClickHouse usage_events + roll-ups (convergent)
//! ```
//!
//! ## Modules (a module has one job)
//!
//! - [`config`] — typed settings from a TOML file + `TALLY_*` environment, validated once;
//!   composes the components' own settings (each beside its logic).
//! - [`event`] — wire format, decoder, rejection reasons. Pure.
//! - [`rating`] — price table (effective-dated versions, rules) and rating. Pure.
//! - [`ledger`] — credit-bucket and billing-cycle logic (pure) and the PostgreSQL store.
//! - [`alerts`] — threshold detection (pure) and alert messages.
//! - [`analytics`] — the ClickHouse sink, DDL and usage queries.
//! - [`clock`] — time as a dependency (tests move it by hand).
//! - [`credits`] — the one fixed-point amount: 6 places, one rounding (rating) and one cut
//!   (reports).
//! - [`escape`] — data-borne text made safe to print or log (control and bidi characters
//!   escaped). Pure, a leaf.
//! - [`secret`] — a string never printed, and librdkafka properties with secrets hidden (a
//!   leaf).
//! - [`names`] — the names Tally accepts: topics, account ids, SQL identifiers (a leaf).
//! - [`settings`] — what a component's settings check reports: the key and the fault (a
//!   leaf).
//! - [`fault`] — whose fault an error is (transient, input, bug): the retry policy's input.
//! - [`retry`] — the one retry policy (back-off cut short by shutdown) and the isolation of
//!   records a store refuses; every loop uses it.
//! - [`kafka`] — the Kafka source: its settings, consumer and positions, topic
//!   administration, watermarks, dead letters.
//! - [`commands`] — account commands (a plan, a grant) built, checked by the decoder and
//!   published as events; the CLI and the API both publish through it.
//! - [`pipeline`] — the batch loops joining the pieces above.
//! - [`reconcile`] — `tally reconcile`: the ledger's charges against the ClickHouse roll-ups
//!   and rated events, per account × day × usage kind.
//! - [`demo`] — the realistic demo stream behind `tally produce`.
//! - [`metrics`] — the Prometheus registry the pipelines record into (a leaf).
//! - [`api`] — HTTP (axum): balances, usage, grants, plans, prices, health, metrics and the
//!   usage dashboard; reads `ledger` and `analytics`, publishes grants and plans to Kafka.
//! - [`cli`] — glue behind the operator commands (`src/main.rs` only parses arguments).
//! - [`app`] — `tally run`'s supervisor (the tasks of a role, bounded shutdown) and
//!   `tally migrate`; the binary, tests and benches start Tally through it.

pub mod alerts;
pub mod analytics;
pub mod api;
pub mod app;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod credits;
pub mod demo;
pub mod escape;
pub mod event;
pub mod fault;
pub mod kafka;
pub mod ledger;
pub mod metrics;
pub mod names;
pub mod pipeline;
pub mod rating;
pub mod reconcile;
pub mod retry;
pub mod secret;
pub mod settings;
