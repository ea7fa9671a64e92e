//! Glue behind the operator commands (`produce`, `balance`, `replay`, `report`, `reconcile`,
//! idle detection):
//! each joins library pieces with IO and prints for people. No domain logic lives here.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;

use crate::config::Config;
use crate::demo::{self, DemoConfig, Expect};
use crate::event::{EventKind, Reason};
use crate::kafka::{self, HEADER_REASON};
use crate::ledger::Store;

pub mod accounts;
pub use crate::escape;
pub mod reconcile;
mod report;
pub use escape::shown;
pub use reconcile::reconcile;
pub use report::report;

/// Options of `tally produce`.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub accounts: usize,
    pub events: usize,
    pub rate_per_second: u64,
    pub seed: u64,
    pub duplicate_every: usize,
    pub malformed_every: usize,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Sends (topic, key, payload, headers) records at `rate_per_second` (0 = unthrottled),
/// waiting for every acknowledgement. Returns the number sent.
pub async fn send_all<'a, I>(
    producer: &FutureProducer,
    records: I,
    total: u64,
    rate_per_second: u64,
    progress: bool,
) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = (&'a str, Option<&'a [u8]>, &'a [u8], Option<OwnedHeaders>)>,
{
    let bar = progress_bar(total, progress, "records");
    let started = Instant::now();
    let mut pending = Vec::with_capacity(1024);
    let mut sent = 0u64;
    for (topic, key, payload, headers) in records {
        if rate_per_second > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate_per_second as f64);
            let elapsed = started.elapsed();
            if due > elapsed + Duration::from_millis(2) {
                tokio::time::sleep(due - elapsed).await;
            }
        }
        let mut record = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((e, r)) => {
                    // Queue full: wait for what is in flight, then try again.
                    if pending.is_empty() {
                        return Err(e.into());
                    }
                    record = r;
                    drain(&mut pending).await?;
                }
            }
        }
        sent += 1;
        bar.inc(1);
        if pending.len() >= 10_000 {
            drain(&mut pending).await?;
        }
    }
    drain(&mut pending).await?;
    bar.finish_and_clear();
    Ok(sent)
}

async fn drain(pending: &mut Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
    for d in pending.drain(..) {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(anyhow::anyhow!("delivery failed: {e}")),
            Err(_) => return Err(anyhow::anyhow!("delivery cancelled")),
        }
    }
    Ok(())
}

fn progress_bar(total: u64, visible: bool, what: &str) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})"
        ))
        .expect("valid template"),
    );
    bar
}

pub async fn produce(cfg: &Config, opts: &ProduceOptions) -> anyhow::Result<()> {
    kafka::ensure_topics(&cfg.kafka, &cfg.all_topics(), cfg.kafka.topic_partitions).await?;
    produce_to_existing_topics(cfg, opts).await
}

/// [`produce`] to topics that exist already (`tally dev`: its broker has no CreateTopics).
pub async fn produce_to_existing_topics(cfg: &Config, opts: &ProduceOptions) -> anyhow::Result<()> {
    let records = demo::generate(&DemoConfig {
        seed: opts.seed,
        accounts: opts.accounts,
        events: opts.events,
        start: opts.start,
        end: opts.end,
        duplicate_every: opts.duplicate_every,
        malformed_every: opts.malformed_every,
    });
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka).create()?;
    let started = Instant::now();
    let sent = send_all(
        &producer,
        records.iter().map(|r| {
            (
                r.topic.topic(&cfg.kafka.topics),
                Some(r.key.as_bytes()),
                r.payload.as_slice(),
                None,
            )
        }),
        records.len() as u64,
        opts.rate_per_second,
        true,
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut by_expect: HashMap<String, usize> = HashMap::new();
    for r in &records {
        let k = match r.expect {
            Expect::Valid => "valid".to_owned(),
            Expect::Duplicate => "duplicate".to_owned(),
            Expect::Rejected(reason) => format!("rejected:{reason}"),
        };
        *by_expect.entry(k).or_default() += 1;
    }
    let mut summary: Vec<_> = by_expect.into_iter().collect();
    summary.sort();
    println!(
        "sent {sent} records in {elapsed:.1} s ({:.0}/s) to {}: {summary:?}",
        sent as f64 / elapsed.max(1e-9),
        cfg.kafka.brokers
    );
    Ok(())
}

pub async fn balance(cfg: &Config, account: &str, entries: i64, json: bool) -> anyhow::Result<()> {
    if json {
        let store = Store::connect(&cfg.postgres).await?;
        let Some(b) = store.balance_view(account, Utc::now()).await? else {
            anyhow::bail!("account `{}` not found", shown(account));
        };
        let lines = store.entries(account, entries).await?;
        // The same document as GET /v1/accounts/{id}/balance, plus the last entries.
        let prices = price_table(cfg);
        let now = Utc::now();
        let version = prices.as_ref().and_then(|t| t.version_at(now));
        let mut doc = crate::api::balance_document(&b, version, now);
        doc["entries"] = lines.iter().map(crate::api::ledger_line_document).collect();
        println!("{}", escape::json(&serde_json::to_string_pretty(&doc)?));
        return Ok(());
    }
    show_account(cfg, account, entries, Utc::now()).await
}

/// The price table of the configuration, or None (with a warning) when it cannot be read:
/// the balance is still shown, without prices.
fn price_table(cfg: &Config) -> Option<crate::rating::PriceTable> {
    match crate::rating::PriceTable::load(&cfg.prices.path) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!(
                "warning: prices not shown: {}: {e}",
                shown(&cfg.prices.path.display().to_string())
            );
            None
        }
    }
}

/// "109,324 / 1,000,117 credits remaining": spendable credits of the total purchased (the
/// original credits of the active grants, `BalanceView::total_granted`).
pub fn remaining_line(remaining: Decimal, total: Decimal) -> String {
    format!(
        "{} / {} credits remaining",
        grouped(remaining),
        grouped(total)
    )
}

/// A decimal with its integer part in groups of three ("1,000,117", "0.5", "12,000.25"),
/// trailing zeros of the fraction dropped.
pub fn grouped(value: Decimal) -> String {
    let text = value.normalize().to_string();
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text.as_str()),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let mut out = String::with_capacity(text.len() + int.len() / 3);
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    format!("{sign}{out}")
}

/// "gemini-3-flash (ai_analysis): 0.5 credits per analysis"; a variant's other conditions
/// follow the kind ("gpt-4o (chat_response, voice_tier=premium): 2.3 credits per response").
pub fn model_price_line(p: &crate::rating::ModelPrice<'_>) -> String {
    let mut what = p.kind.to_owned();
    for (k, v) in &p.other_conditions {
        what.push_str(&format!(", {k}={v}"));
    }
    let credits = if p.credits_per_unit == Decimal::ONE {
        "credit"
    } else {
        "credits"
    };
    format!(
        "{} ({what}): {} {credits} per {}",
        p.model,
        grouped(p.credits_per_unit),
        p.unit
    )
}

/// Prints the billing view: balance by grant, overage, next expiry, cycle, allowance used,
/// days until reset, closed cycles and the last entries.
pub async fn show_account(
    cfg: &Config,
    account: &str,
    entries: i64,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let store = Store::connect(&cfg.postgres).await?;
    let Some(b) = store.balance_view(account, now).await? else {
        anyhow::bail!("account `{}` not found", shown(account));
    };
    let lines = store.entries(account, entries).await?;
    // Every string from the data goes through `shown`: ids may hold anything a producer sent.
    println!("account {}", shown(&b.account_id));
    println!("  {}", remaining_line(b.spendable, b.total_granted));
    println!(
        "  spendable {:>16}   overage {:>14}",
        b.spendable, b.overage
    );
    if let Some(version) = price_table(cfg).as_ref().and_then(|t| t.version_at(now)) {
        println!("  prices in force (version {}):", shown(version.id()));
        for p in version.model_prices() {
            println!("    {}", shown(&model_price_line(&p)));
        }
    }
    if let Some((at, credits, grant)) = &b.next_expiry {
        println!(
            "  next expiry: {credits} credits of {} on {}",
            shown(grant),
            at.format("%Y-%m-%d %H:%M")
        );
    }
    match (&b.plan, &b.cycle) {
        (Some(p), Some(c)) => {
            println!(
                "  plan {} ({} credits/month, billing day {}); cycle {} .. {}; {} day(s) until reset",
                shown(&p.plan_id),
                p.monthly_allowance,
                p.billing_day,
                c.start.format("%Y-%m-%d"),
                c.end.format("%Y-%m-%d"),
                b.days_until_reset.unwrap_or(0)
            );
            if let (Some(threshold), Some(credits)) =
                (p.recharge_threshold_credits, p.recharge_credits)
            {
                println!(
                    "  recharge request below {} credits: {} credits",
                    grouped(threshold),
                    grouped(credits)
                );
            }
            if let Some((granted, used)) = b.allowance {
                println!(
                    "  allowance used {used} of {granted}; cycle usage {} (overage {})",
                    c.used, c.overage
                );
            }
        }
        _ => println!("  prepaid (no plan)"),
    }
    println!("  grants (consumption order):");
    println!(
        "    {:<28} {:<10} {:>4} {:>16} {:>16}  expires",
        "grant", "kind", "prio", "granted", "remaining"
    );
    for g in &b.grants {
        println!(
            "    {:<28} {:<10} {:>4} {:>16} {:>16}  {}",
            shown(&g.grant_id),
            g.kind.as_str(),
            g.priority,
            g.granted,
            g.remaining,
            g.expires_at.map_or("never".to_owned(), |e| e
                .format("%Y-%m-%d %H:%M")
                .to_string())
        );
    }
    let cycles = store.cycles(account).await?;
    if !cycles.is_empty() {
        println!("  closed cycles:");
        for c in cycles.iter().rev().take(3) {
            println!(
                "    {} .. {}  allowance {}  used {} (late {})  overage {} (billed {})  expired unused {}",
                c.start.format("%Y-%m-%d"),
                c.end.format("%Y-%m-%d"),
                c.allowance,
                c.used,
                c.late_used,
                c.overage,
                c.overage_billed,
                c.allowance_expired
            );
        }
    }
    println!("  last {} entries:", lines.len());
    for l in &lines {
        let kind = match &l.corrects {
            Some(k) => format!("{}:{}", l.kind, k),
            None if l.late => format!("{} (late)", l.kind),
            None => l.kind.clone(),
        };
        println!(
            "    #{:<8} {:<8} {:>14} -> {:>14} (overage {:>10})  {}  {} {}",
            l.entry_id,
            shown(&kind),
            l.amount,
            l.balance_after,
            l.overage_after,
            l.effective_at.format("%Y-%m-%d %H:%M:%S"),
            escape::shown_or(l.grant_id.as_deref(), "-"),
            escape::shown_or(l.rule_id.as_deref(), "")
        );
        if let (Some(actor), Some(reason)) = (&l.actor, &l.reason) {
            println!(
                "              by {}: {}",
                escape::shown(actor),
                escape::shown(reason)
            );
        }
        if let (Some(source), Some(id)) = (&l.reverses_source, &l.reverses_id) {
            println!(
                "              reverses usage {} {}",
                escape::shown(source),
                escape::shown(id)
            );
        }
    }
    Ok(())
}

/// Re-submits dead letters (all, or those of one reason) to their source topics, with the
/// original key and headers. Reads the dead-letter topic from the beginning up to its end
/// at start; records dead-lettered again go back to the topic with their new reason.
pub async fn replay_dead_letters(
    cfg: &Config,
    reason: Option<Reason>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let dlq = cfg.kafka.topics.dead_letter.clone();
    let mut cc = kafka::client_config(&cfg.kafka);
    cc.set("group.id", "tally-replay")
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = cc.create()?;
    let marks = kafka::watermarks(&consumer, &[dlq.as_str()], Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    let mut total = 0u64;
    for ((_, p), (low, high)) in marks {
        if high > low {
            tpl.add_partition_offset(&dlq, p, Offset::Offset(low))?;
            ends.insert(p, high);
            total += (high - low) as u64;
        }
    }
    if ends.is_empty() {
        println!("dead-letter topic {dlq} is empty");
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka).create()?;
    let bar = progress_bar(total, true, "dead letters");
    let (mut resubmitted, mut seen) = (0u64, 0u64);
    let mut pending = Vec::new();
    while !ends.is_empty() {
        let Some(msg) = consumer.poll(Duration::from_secs(5)) else {
            continue;
        };
        let msg = msg?;
        seen += 1;
        bar.inc(1);
        if msg.offset() + 1 >= ends.get(&msg.partition()).copied().unwrap_or(0) {
            ends.remove(&msg.partition());
        }
        let header = |name: &str| -> Option<String> {
            msg.headers()?
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let this_reason = header(HEADER_REASON).and_then(|r| Reason::parse(&r));
        if reason.is_some() && this_reason != reason {
            continue;
        }
        let Some(topic) = header(kafka::HEADER_TOPIC) else {
            tracing::warn!(
                offset = msg.offset(),
                "dead letter without source topic header; skipped"
            );
            continue;
        };
        if dry_run {
            println!(
                "{}: {:?} offset {}",
                shown(&topic),
                this_reason,
                msg.offset()
            );
            resubmitted += 1;
            continue;
        }
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = msg.headers() {
            for h in hs.iter().filter(|h| !h.key.starts_with("tally.")) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        pending.push((
            topic,
            msg.key().map(<[u8]>::to_vec),
            msg.payload().unwrap_or_default().to_vec(),
            headers,
        ));
        resubmitted += 1;
        if pending.len() >= 1_000 {
            resubmit(&producer, &mut pending).await?;
        }
    }
    resubmit(&producer, &mut pending).await?;
    producer.flush(Duration::from_secs(30))?;
    bar.finish_and_clear();
    println!(
        "read {seen} dead letters, re-submitted {resubmitted}{}",
        if dry_run { " (dry run)" } else { "" }
    );
    Ok(())
}

type Resubmission = (String, Option<Vec<u8>>, Vec<u8>, OwnedHeaders);

/// Sends the dead letters gathered so far back to their source topics.
async fn resubmit(
    producer: &FutureProducer,
    pending: &mut Vec<Resubmission>,
) -> anyhow::Result<()> {
    let batch = std::mem::take(pending);
    send_all(
        producer,
        batch
            .iter()
            .map(|(t, k, p, h)| (t.as_str(), k.as_deref(), p.as_slice(), Some(h.clone()))),
        batch.len() as u64,
        0,
        false,
    )
    .await?;
    Ok(())
}

/// Sends every line of a JSON-lines file to the topic of its event type, keyed by subject.
pub async fn replay_file(cfg: &Config, path: &Path) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(rename = "type", borrow)]
        event_type: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        subject: Option<std::borrow::Cow<'a, str>>,
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::with_capacity(lines.len());
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let head: Head = serde_json::from_str(line).with_context(|| {
            format!("{}:{}: not a CloudEvent with a type", path.display(), n + 1)
        })?;
        let topic = EventKind::of_type(&head.event_type)
            .map(|k| k.topic(&cfg.kafka.topics))
            .with_context(|| {
                format!(
                    "{}:{}: unknown event type `{}`",
                    path.display(),
                    n + 1,
                    shown(&head.event_type)
                )
            })?;
        let key = head.subject.map(|s| s.into_owned());
        records.push((topic, key, line.as_bytes()));
    }
    let producer: FutureProducer = kafka::producer_config(&cfg.kafka).create()?;
    let sent = send_all(
        &producer,
        records
            .iter()
            .map(|(t, k, p)| (*t, k.as_deref().map(str::as_bytes), *p, None)),
        records.len() as u64,
        0,
        true,
    )
    .await?;
    println!("sent {sent} events from {}", path.display());
    Ok(())
}

/// Returns once, for `quiet` without a break, every consumer group this process runs has held
/// partitions and every input partition has been consumed to its end by those pipelines
/// (ledger positions from PostgreSQL, analytics positions from ClickHouse) with nothing new
/// arriving. A group without partitions consumes nothing, so it is never idle: a process whose
/// group gets no partitions does not exit (its `/readyz` and log say why).
pub async fn wait_until_idle(
    cfg: &Config,
    ledger: bool,
    analytics: bool,
    quiet: Duration,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka::client_config(&cfg.kafka).create()?;
    let store = Store::connect(&cfg.postgres).await?;
    let sink = crate::analytics::AnalyticsSink::new(&cfg.clickhouse);
    let mut caught_up_since: Option<Instant> = None;
    let mut last_ends = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ends: HashMap<_, _> = kafka::watermarks(
            &consumer,
            &cfg.kafka.topics.inputs(),
            Duration::from_secs(5),
        )?
        .into_iter()
        .map(|(k, (_, high))| (k, high))
        .collect();
        let keys: Vec<_> = ends.keys().cloned().collect();
        let reached = |stored: &kafka::Positions| kafka::reached(&ends, stored);
        let mut caught_up = true;
        let mut running = Vec::new();
        if ledger {
            running.push(("ledger", cfg.kafka.ledger_group.as_str()));
        }
        if analytics {
            running.push(("analytics", cfg.kafka.analytics_group.as_str()));
        }
        for (pipeline, group) in running {
            let held = kafka::groups::statuses(&[group])
                .iter()
                .filter(|s| s.pipeline == pipeline)
                .map(|s| s.assigned_partitions)
                .min();
            if held.is_none_or(|n| n == 0) {
                tracing::debug!(pipeline, group, "idle check: no partitions assigned yet");
                caught_up = false;
            }
        }
        if ledger && caught_up {
            caught_up &= reached(&store.load_offsets(&cfg.kafka.ledger_group, &keys).await?);
        }
        if analytics && caught_up {
            caught_up &= reached(
                &sink
                    .load_positions(&cfg.kafka.analytics_group, &keys)
                    .await?,
            );
        }
        if caught_up && ends == last_ends {
            let since = *caught_up_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= quiet {
                return Ok(());
            }
        } else {
            caught_up_since = None;
        }
        last_ends = ends;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn remaining_of_total_purchased_reads_as_on_the_platforms_pages() {
        assert_eq!(
            remaining_line(dec!(109324.000000), dec!(1000117.000000)),
            "109,324 / 1,000,117 credits remaining"
        );
        assert_eq!(
            remaining_line(dec!(0.000000), dec!(0.000000)),
            "0 / 0 credits remaining"
        );
        assert_eq!(
            remaining_line(dec!(999.500000), dec!(1000)),
            "999.5 / 1,000 credits remaining"
        );
    }

    #[test]
    fn grouped_digits() {
        for (d, want) in [
            (dec!(1), "1"),
            (dec!(12), "12"),
            (dec!(123), "123"),
            (dec!(1234), "1,234"),
            (dec!(123456), "123,456"),
            (dec!(1234567.891), "1,234,567.891"),
            (dec!(-15000.25), "-15,000.25"),
            (dec!(0.400000), "0.4"),
        ] {
            assert_eq!(grouped(d), want, "{d}");
        }
    }

    #[test]
    fn a_model_price_line_names_the_model_kind_and_variant() {
        let one = crate::rating::ModelPrice {
            model: "gpt-4o-mini",
            kind: "chat_response",
            other_conditions: vec![],
            unit: crate::rating::Unit::Response,
            credits_per_unit: dec!(1),
            rule_id: "chat.gpt-4o-mini",
        };
        assert_eq!(
            model_price_line(&one),
            "gpt-4o-mini (chat_response): 1 credit per response"
        );
        let base = crate::rating::ModelPrice {
            model: "gemini-3-flash",
            kind: "ai_analysis",
            other_conditions: vec![],
            unit: crate::rating::Unit::Analysis,
            credits_per_unit: dec!(0.5),
            rule_id: "ai_analysis.gemini-3-flash",
        };
        assert_eq!(
            model_price_line(&base),
            "gemini-3-flash (ai_analysis): 0.5 credits per analysis"
        );
        let premium = crate::rating::ModelPrice {
            model: "gpt-4o",
            kind: "chat_response",
            other_conditions: vec![("voice_tier", "premium")],
            unit: crate::rating::Unit::Response,
            credits_per_unit: dec!(2.3),
            rule_id: "chat.gpt-4o.premium",
        };
        assert_eq!(
            model_price_line(&premium),
            "gpt-4o (chat_response, voice_tier=premium): 2.3 credits per response"
        );
    }
}
