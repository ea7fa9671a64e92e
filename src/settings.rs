//! What a component's settings validation reports: the key at fault and what is wrong with
//! it. Each component validates its own section (`KafkaConfig::validate`, ...); `config`
//! turns an [`Invalid`] into its `ConfigError`. A leaf: imports nothing of the crate.

/// A setting found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The setting's key, as written in the file (`kafka.brokers`).
    pub key: &'static str,
    pub message: String,
}

/// `Err(Invalid { key, message })`.
pub fn invalid<T>(key: &'static str, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        key,
        message: message.into(),
    })
}
