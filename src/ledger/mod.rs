//! The ledger of record: its pure core — credit buckets at event time ([`buckets`]) and
//! the event-time book that makes an account's ledger a function of the set of its events
//! ([`book`]) — and the PostgreSQL store ([`store`]) that loads books, applies a batch of
//! claimed events, their entries and the consumed offsets in one transaction, and saves
//! them.

pub mod book;
pub mod buckets;
mod config;
pub mod conninfo;
pub mod cycle;
pub mod holds;
pub mod migrate;
pub mod store;

pub use buckets::{Account, Entry, EntryKind, NewGrant};
pub use config::{redact_url, BillingConfig, PostgresConfig};
pub use store::{
    dedupe_cutoff, AccountBalance, Action, BalanceView, BatchOutcome, ClaimScope, Correction,
    DebitInfo, HoldAnswer, HoldFigures, HoldMissing, HoldPool, HoldRefused, Item, LedgerLine,
    PgOffsetStore, PurgeOutcome, Store, StoreError, DEDUPE_PURGE_CHUNK_ROWS, DEDUPE_PURGE_MARGIN,
};
