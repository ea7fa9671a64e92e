//! Threshold alerts' settings (`[alerts]`): the topics each alert kind is published to and
//! the defaults for accounts whose plan sets no thresholds of its own. Validated here; the
//! uniqueness of topic names across sections is checked by `config`.

use serde::{Deserialize, Serialize};

use crate::settings::{invalid, Invalid};

/// Threshold alerts: where they are published and the defaults for accounts whose plan does
/// not set its own thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    pub topics: AlertTopics,
    /// Low-balance alert below this many credits for every account (a decimal string);
    /// unset: only plans with their own threshold get low-balance alerts.
    pub low_balance_credits: Option<rust_decimal::Decimal>,
    /// Allowance-used thresholds in percent, for plans that do not set their own.
    pub allowance_percents: Vec<u32>,
    /// Credits-expiring alerts this many days before a grant expires.
    pub expiring_within_days: i64,
    /// How often the relay looks for unpublished alerts when idle.
    pub relay_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertTopics {
    pub low_balance: String,
    pub allowance_used: String,
    pub credits_exhausted: String,
    pub projected_exhaustion: String,
    pub credits_expiring: String,
    /// Recharge requests for the payment system (not an alert: never resolved).
    pub recharge_requested: String,
}

impl AlertTopics {
    pub fn all(&self) -> Vec<&str> {
        vec![
            &self.low_balance,
            &self.allowance_used,
            &self.credits_exhausted,
            &self.projected_exhaustion,
            &self.credits_expiring,
            &self.recharge_requested,
        ]
    }

    /// The topic of an alert kind (`AlertKind::as_str`).
    pub fn for_kind(&self, kind: &str) -> Option<&str> {
        Some(match kind {
            "low_balance" => &self.low_balance,
            "allowance_used" => &self.allowance_used,
            "credits_exhausted" => &self.credits_exhausted,
            "projected_exhaustion" => &self.projected_exhaustion,
            "credits_expiring" => &self.credits_expiring,
            "recharge_requested" => &self.recharge_requested,
            _ => return None,
        })
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            topics: AlertTopics::default(),
            low_balance_credits: None,
            allowance_percents: vec![50, 80, 100],
            expiring_within_days: 7,
            relay_interval_ms: 200,
        }
    }
}

impl Default for AlertTopics {
    fn default() -> Self {
        AlertTopics {
            low_balance: "tally.alerts.low_balance".into(),
            allowance_used: "tally.alerts.allowance_used".into(),
            credits_exhausted: "tally.alerts.credits_exhausted".into(),
            projected_exhaustion: "tally.alerts.projected_exhaustion".into(),
            credits_expiring: "tally.alerts.credits_expiring".into(),
            recharge_requested: "tally.recharge".into(),
        }
    }
}

impl AlertsConfig {
    pub fn defaults(&self) -> super::AlertDefaults {
        super::AlertDefaults {
            low_balance_credits: self.low_balance_credits,
            allowance_percents: self.allowance_percents.clone(),
            expiring_within: chrono::Duration::days(self.expiring_within_days),
        }
    }
}
impl AlertsConfig {
    /// Checks the section's own values.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self
            .low_balance_credits
            .is_some_and(|c| c < rust_decimal::Decimal::ZERO)
        {
            return invalid("alerts.low_balance_credits", "must be >= 0");
        }
        if self
            .allowance_percents
            .iter()
            .any(|p| !(1..=1000).contains(p))
        {
            return invalid("alerts.allowance_percents", "each must be 1..=1000");
        }
        if !(0..=366).contains(&self.expiring_within_days) {
            return invalid("alerts.expiring_within_days", "must be 0..=366");
        }
        if !(1..=60_000).contains(&self.relay_interval_ms) {
            return invalid("alerts.relay_interval_ms", "must be 1..=60000");
        }
        Ok(())
    }
}
