//! The ClickHouse sink's and the reports' settings (`[clickhouse]`).

use serde::{Deserialize, Serialize};

use crate::names::valid_identifier;
use crate::secret::Secret;
use crate::settings::{invalid, Invalid};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: Secret,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://127.0.0.1:8123".into(),
            database: "tally".into(),
            user: "default".into(),
            password: Secret::default(),
        }
    }
}

impl ClickHouseConfig {
    /// Checks the section's own values.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return invalid("clickhouse.url", "must start with http:// or https://");
        }
        if !valid_identifier(&self.database) {
            return invalid(
                "clickhouse.database",
                "must be a lower-case identifier ([a-z_][a-z0-9_]{0,62})",
            );
        }
        Ok(())
    }
}
