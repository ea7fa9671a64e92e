//! Secrets in settings: a string that is never printed ([`Secret`]), and librdkafka
//! properties with their secret values hidden, for logs and `tally config`. A leaf: imports
//! nothing of the crate.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A string that is never printed: Debug and Display show `***`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// librdkafka properties for display: the values of keys naming a password, a secret or a key
/// replaced by `***`.
pub fn redact_properties(properties: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    properties
        .iter()
        .map(|(k, v)| {
            let secret = ["password", "secret", "key"]
                .iter()
                .any(|s| k.to_ascii_lowercase().contains(s));
            (k.clone(), if secret { "***".into() } else { v.clone() })
        })
        .collect()
}
