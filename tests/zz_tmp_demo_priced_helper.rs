use chrono::{TimeZone, Utc};
use tally::demo::*;
use tally::event::{decode, DecodeLimits};
use tally::rating::PriceTable;
#[test]
fn demo_priced() {
    let table =
        PriceTable::load(concat!(env!("CARGO_MANIFEST_DIR"), "/prices/default.toml")).unwrap();
    for (start, end) in [
        (
            Utc.with_ymd_and_hms(2025, 6, 10, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2025, 6, 15, 0, 0, 0).unwrap(),
        ),
        (
            Utc.with_ymd_and_hms(2026, 6, 20, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 7, 10, 0, 0, 0).unwrap(),
        ),
    ] {
        let recs = generate(&DemoConfig {
            seed: 9,
            accounts: 30,
            events: 50_000,
            start,
            end,
            duplicate_every: 0,
            malformed_every: 0,
        });
        let mut n = 0;
        for r in &recs {
            let e = decode(&r.payload, end, &DecodeLimits::default()).unwrap();
            if let Some(u) = e.usage() {
                table
                    .rate(&u)
                    .unwrap_or_else(|x| panic!("{x:?} {}", String::from_utf8_lossy(&r.payload)));
                n += 1;
            }
        }
        println!("{n} usage events priced");
    }
    // hot path: decode + rate
    let end = Utc.with_ymd_and_hms(2025, 6, 15, 0, 0, 0).unwrap();
    let recs = generate(&DemoConfig {
        seed: 9,
        accounts: 30,
        events: 100_000,
        start: end - chrono::Duration::days(5),
        end,
        duplicate_every: 0,
        malformed_every: 0,
    });
    let t = std::time::Instant::now();
    let mut c = rust_decimal::Decimal::ZERO;
    for r in &recs {
        let e = decode(&r.payload, end, &DecodeLimits::default()).unwrap();
        if let Some(u) = e.usage() {
            c += table.rate(&u).unwrap().credits;
        }
    }
    println!(
        "decode+rate: {:.0} ns/event ({c})",
        t.elapsed().as_nanos() as f64 / recs.len() as f64
    );
}
