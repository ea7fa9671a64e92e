//! The ledger's store settings: where PostgreSQL is and which schema holds Tally's tables
//! (`[postgres]`; the connection string is parsed by [`conninfo`](super::conninfo)).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::conninfo;
use crate::secret::Secret;

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
