//! The ledger of record: pure credit-bucket logic ([`buckets`]) and the PostgreSQL store
//! ([`store`]) that applies a batch of claimed events, their entries and the consumed
//! offsets in one transaction. Knows nothing of Kafka or ClickHouse.

pub mod buckets;
pub mod cycle;
pub mod migrate;
pub mod store;

pub use buckets::{Account, Entry, EntryKind, NewGrant};
pub use store::{
    dedupe_cutoff, AccountBalance, Action, BalanceView, BatchOutcome, ClaimScope, DebitInfo, Item,
    LedgerLine, PgOffsetStore, PurgeOutcome, Store, StoreError, DEDUPE_PURGE_MARGIN,
};
