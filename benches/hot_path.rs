//! The hot path, per core: decode a realistic CloudEvent and rate it against the default
//! price table. `cargo bench --bench hot_path` prints time per batch of 10,000 mixed demo
//! events (calls, chats, instance hours, metered) and the throughput in events/s.

use std::hint::black_box;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use tally::demo::{self, DemoConfig, Expect};
use tally::event::{decode, DecodeLimits};
use tally::rating::PriceTable;

fn events() -> Vec<Vec<u8>> {
    let end = Utc::now();
    demo::generate(&DemoConfig {
        seed: 3,
        accounts: 100,
        events: 10_000,
        start: end - chrono::Duration::days(2),
        end,
        duplicate_every: 0,
        malformed_every: 0,
    })
    .into_iter()
    .filter(|r| r.expect == Expect::Valid)
    .map(|r| r.payload)
    .collect()
}

fn hot_path(c: &mut Criterion) {
    let prices = PriceTable::load(concat!(env!("CARGO_MANIFEST_DIR"), "/prices/default.toml"))
        .expect("default price table");
    let payloads = events();
    let now = Utc::now();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("decode", |b| {
        b.iter(|| {
            for p in &payloads {
                black_box(decode(black_box(p), now, &limits).unwrap());
            }
        })
    });
    group.bench_function("decode_and_rate", |b| {
        b.iter(|| {
            let mut credits = rust_decimal::Decimal::ZERO;
            for p in &payloads {
                let e = decode(black_box(p), now, &limits).unwrap();
                if let Some(u) = e.usage() {
                    credits += prices.rate(&u).unwrap().credits;
                }
            }
            black_box(credits)
        })
    });
    let decoded: Vec<_> = payloads
        .iter()
        .map(|p| decode(p, now, &limits).unwrap())
        .collect();
    group.bench_function("rate", |b| {
        b.iter(|| {
            for e in &decoded {
                if let Some(u) = e.usage() {
                    black_box(prices.rate(&u).unwrap());
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
