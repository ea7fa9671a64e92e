//! Bytes -> typed events. Owns the CloudEvents 1.0 wire format of every message Tally
//! consumes (structured JSON, and the Kafka binding's binary mode: `ce_*` headers), its
//! validation, and the machine-readable reasons a message is rejected with. Pure: no IO, no clock (the caller passes "now" for the future-time check).
//! Must not know about prices, balances or storage.

mod decode;
pub mod encode;
mod kinds;
// The file is types.rs; `types` itself names the CloudEvents type constants.
#[path = "types.rs"]
mod model;

pub use decode::{
    content_mode, decode, decode_binary, decode_record, decode_serde_path, ContentMode,
    DecodeLimits,
};
pub use kinds::{EventKind, Topics};
pub use model::*;
