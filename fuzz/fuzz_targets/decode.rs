//! The decoder on any bytes: it never panics, and the fast path (scanner) and the serde path
//! give the same outcome — the same event, or the same rejection (reason, field, detail).
#![no_main]

use chrono::TimeZone;
use libfuzzer_sys::fuzz_target;
use tally::event::{decode, decode_serde_path, DecodeLimits};

fuzz_target!(|bytes: &[u8]| {
    // The fixed "now" of the corpus tests, so corpus events are not "in the future".
    let now = chrono::Utc.with_ymd_and_hms(2025, 6, 15, 12, 0, 0).unwrap();
    let limits = DecodeLimits::default();
    let fast = decode(bytes, now, &limits);
    let slow = decode_serde_path(bytes, now, &limits);
    assert_eq!(
        fast,
        slow,
        "the paths disagree on {:?}",
        String::from_utf8_lossy(bytes)
    );
});
