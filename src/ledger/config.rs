//! The ledger's settings: where PostgreSQL is and which schema holds Tally's tables
//! (`[postgres]`; the connection string is parsed by [`conninfo`](super::conninfo)), and
//! the billing semantics of the event-time book (`[billing]`: the grace).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::conninfo;
use crate::secret::Secret;
use crate::settings::{invalid, Invalid};

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style connection string or URL; may hold a password, so it is a Secret.
    pub url: Secret,
    /// Schema holding Tally's tables (tests use one schema each).
    pub schema: String,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(self.url.expose()))
            .field("schema", &self.schema)
            .finish()
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: Secret::new("host=127.0.0.1 user=postgres dbname=tally"),
            schema: "tally".into(),
        }
    }
}

/// A PostgreSQL connection string for display: every spelling of a password replaced by
/// `***` ([`conninfo::redact`]).
pub fn redact_url(url: &str) -> String {
    conninfo::redact(url)
}

impl PostgresConfig {
    /// Checks the section's own values (the connection string parses, the schema is an
    /// identifier).
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.url.expose().trim().is_empty() {
            return invalid("postgres.url", "must not be empty");
        }
        if !crate::names::valid_identifier(&self.schema) {
            return invalid(
                "postgres.schema",
                "must be a lower-case SQL identifier ([a-z_][a-z0-9_]{0,62})",
            );
        }
        if let Err(e) = conninfo::parse(self.url.expose()) {
            return invalid("postgres.url", e.to_string());
        }
        Ok(())
    }
}

/// Billing semantics (docs/billing.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// How long after its event time an event may arrive and still be billed in event-time
    /// order ("24h", "90m", "2d"): a reset or an expiry is final only this long after it, and
    /// usage arriving later is charged at the account's current time and marked late.
    #[serde(with = "humantime_serde")]
    pub grace: std::time::Duration,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            grace: std::time::Duration::from_secs(24 * 3600),
        }
    }
}

impl BillingConfig {
    /// The grace as a signed duration (validated to fit).
    pub fn grace(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.grace).unwrap_or(chrono::Duration::MAX)
    }
}

impl BillingConfig {
    /// Checks the section's own values (the grace against the dedupe window is `config`'s).
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.grace > std::time::Duration::from_secs(30 * 86_400) {
            return invalid(
                "billing.grace",
                "must be at most 30 days (the open window is replayed on every out-of-order event)",
            );
        }
        Ok(())
    }
}
