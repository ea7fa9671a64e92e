//! The price table's settings (`[prices]`): which file holds it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the price table is (a TOML file, checked with `tally prices check`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricesConfig {
    pub path: PathBuf,
}

impl Default for PricesConfig {
    fn default() -> Self {
        PricesConfig {
            path: PathBuf::from("prices/default.toml"),
        }
    }
}
