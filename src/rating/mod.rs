//! Price table and rating. Owns the price table file format (versions, rules, units), its
//! validation (`check`), and rating a `Usage` into a `Charge`. Pure: no IO except reading a
//! table file (`check_file` / `PriceTable::load`), no clock (the event time decides the
//! version). Must not know about balances, storage or Kafka.

mod check;
mod config;
mod cover;
mod rate;
mod table;

pub use check::{check, check_file, CheckReport, TableError};
pub use config::PricesConfig;
pub use cover::{Cover, MAX_COVER_SECONDS, MAX_COVER_UNITS};
pub use rate::{Charge, Unpriced, UnpricedWhy, OUTBOUND_FREE_RULE_ID};
pub use table::{ModelPrice, PriceRule, PriceTable, PriceVersion, Unit};

#[cfg(test)]
mod tests;
