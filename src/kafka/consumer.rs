//! A consumer that hands out batches bounded by count, bytes and time, and whose positions
//! come from an external store of record (PostgreSQL for the ledger, ClickHouse for
//! analytics) rather than from Kafka's committed offsets.
//!
//! On partition assignment the rebalance callback loads the stored next offsets and assigns
//! the partitions at exactly those offsets. Records below the stored position (a redelivery
//! after a crash or rebalance) are dropped before they reach the pipeline. Kafka offsets are
//! committed too, after the store commits, so standard lag tools work.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;

use crate::fault::{Classify, Fault};
use crate::retry::{Halt, Retry, RetryPolicy};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::groups::GroupHealth;
use super::KafkaConfig;

/// How long dropping a [`BatchConsumer`] waits for librdkafka's close (revoke, leave the
/// group, final commits) before it abandons it: a close that cannot reach the broker must not
/// hold up the process's shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a static member's close waits for its partitions to be revoked before it closes
/// (the LeaveGroup goes out once they are; see [`leave_group`]).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a consumer waiting for records checks how long its group has had no partitions.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);

/// (topic, partition)
pub type TopicPartition = (String, i32);

/// Next offset to read per partition, as stored by the pipeline's store of record.
pub type Positions = HashMap<TopicPartition, i64>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Sleeps until `until`, or for ever when it is None.
async fn sleep_until_some(until: Option<tokio::time::Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The store of record for consumed positions.
pub trait OffsetStore: Send + Sync + 'static {
    /// Next offsets for the given partitions (absent: nothing consumed yet). The future must
    /// be self-contained (own connection): it also runs on a thread of its own inside the
    /// rebalance callback.
    fn load(&self, partitions: Vec<TopicPartition>) -> BoxFuture<Result<Positions, LoadError>>;
}

/// Why [`BatchConsumer::next_batch`] stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("loading stored positions: {0}")]
    Positions(#[from] LoadError),
}

/// Why stored positions could not be loaded, and whose fault that is: the consumer waits out
/// a transient fault and stops on any other (an unknown table would never go away).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LoadError {
    fault: Fault,
    message: String,
}

impl LoadError {
    pub fn new(error: impl Classify) -> Self {
        LoadError {
            fault: error.fault(),
            message: error.to_string(),
        }
    }
}

impl Classify for LoadError {
    fn fault(&self) -> Fault {
        self.fault
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// One consumed Kafka record, copied out of librdkafka's buffers.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// Next offset per partition after this batch (max offset + 1).
    pub next_offsets: Positions,
    /// Records dropped because they were below the stored position.
    pub skipped: usize,
    pub bytes: usize,
}

struct Ctx {
    store: Arc<dyn OffsetStore>,
    positions: Arc<Mutex<Positions>>,
    health: GroupHealth,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            let partitions: Vec<TopicPartition> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            match load_blocking(&self.store, partitions.clone()) {
                Ok(stored) => {
                    let mut positions = self.positions.lock().expect("positions lock");
                    for (topic, partition) in partitions {
                        let offset = match stored.get(&(topic.clone(), partition)) {
                            Some(&next) => Offset::Offset(next),
                            // Never consumed by this pipeline: the store of record is the
                            // truth, so start at the beginning (dedupe covers overlaps).
                            None => Offset::Beginning,
                        };
                        if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                            tracing::error!(topic, partition, error = %e, "could not set offset");
                        }
                        if let Offset::Offset(next) = offset {
                            positions.insert((topic.clone(), partition), next);
                        }
                        tracing::info!(topic, partition, ?offset, "partition assigned");
                    }
                }
                Err(e) => {
                    // The loop loads the positions again before it processes anything from
                    // these partitions, so nothing is applied twice or skipped.
                    tracing::error!(error = %e, "could not load stored offsets at assignment");
                }
            }
            self.health.assigned(tpl.count());
        } else if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
            self.health.revoked();
            let mut positions = self.positions.lock().expect("positions lock");
            for e in tpl.elements() {
                positions.remove(&(e.topic().to_owned(), e.partition()));
                tracing::info!(
                    topic = e.topic(),
                    partition = e.partition(),
                    "partition revoked"
                );
            }
        } else {
            // A rebalance error: the default strategy unassigns everything.
            self.health.revoked();
        }
        // The default strategy performs the (un)assignment with the offsets set above.
        default_rebalance(base_consumer, err, tpl);
    }
}

/// What the trait's provided `rebalance` does, after our override has set the offsets.
fn default_rebalance(
    base_consumer: &BaseConsumer<Ctx>,
    err: RDKafkaRespErr,
    tpl: &mut TopicPartitionList,
) {
    // Eager protocol (the default assignment strategies): assign the whole list, or clear it.
    let result = match err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => base_consumer.assign(tpl),
        _ => base_consumer.unassign(),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "rebalance (un)assign failed");
    }
}

/// Runs the store's future to completion on a thread of its own, so it works from inside
/// librdkafka's callback whatever the surrounding runtime is.
fn load_blocking(
    store: &Arc<dyn OffsetStore>,
    partitions: Vec<TopicPartition>,
) -> anyhow::Result<Positions> {
    let fut = store.load(partitions);
    std::thread::scope(|s| {
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async { Ok(tokio::time::timeout(Duration::from_secs(15), fut).await??) })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("offset loader panicked"))?
    })
}

/// A Kafka consumer in a group whose positions live in an [`OffsetStore`].
///
/// Dropping it closes the consumer (partitions revoked, the group left), waiting at most
/// [`CLOSE_TIMEOUT`] for the broker.
pub struct BatchConsumer {
    /// Always `Some` until dropped.
    consumer: Option<StreamConsumer<Ctx>>,
    positions: Arc<Mutex<Positions>>,
    store: Arc<dyn OffsetStore>,
    topics: HashMap<String, Arc<str>>,
    /// `group.instance.id` is set (static membership).
    is_static: bool,
}

impl BatchConsumer {
    /// `pipeline` names the member ("ledger", "analytics") for static membership.
    pub fn new(
        kafka: &KafkaConfig,
        group_id: &str,
        pipeline: &str,
        topics: &[&str],
        store: Arc<dyn OffsetStore>,
    ) -> Result<Self, KafkaError> {
        let positions = Arc::new(Mutex::new(Positions::new()));
        let ctx = Ctx {
            store: store.clone(),
            positions: positions.clone(),
            health: GroupHealth::register(
                pipeline,
                group_id,
                Duration::from_millis(kafka.unassigned_alert_ms),
            ),
        };
        let mut cc = super::client_config(kafka);
        // Latency defaults, unless the configuration passes its own values through.
        // max.poll.interval.ms is also the rebalance timeout a joining member announces: a
        // broker waits that long for members that died without leaving (SIGKILL) before it
        // completes the rebalance. The loop polls at least every batch, so 30 s is ample.
        //
        // max.partition.fetch.bytes (librdkafka's default: 1 MB) is what one fetch brings of
        // each partition, so it sets how far the partitions of one account's topics run
        // apart in a batch: with 64 KB (about 180 records of 350 B) the batch interleaves
        // them finely, and an account's events arrive out of event-time order (a replay)
        // rarely and by little. queued.max.messages.kbytes (default 64 MB per consumer) caps
        // the records fetched ahead: a few batches' worth.
        for (key, value) in [
            ("max.partition.fetch.bytes", "65536"),
            ("queued.max.messages.kbytes", "16384"),
            ("fetch.wait.max.ms", "20"),
            ("max.poll.interval.ms", "30000"),
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "1000"),
        ] {
            if !kafka.properties.contains_key(key) {
                cc.set(key, value);
            }
        }
        if let Some(instance) = &kafka.instance_id {
            cc.set("group.instance.id", format!("{instance}-{pipeline}"));
        }
        cc.set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: StreamConsumer<Ctx> = cc.create_with_context(ctx)?;
        consumer.subscribe(topics)?;
        Ok(BatchConsumer {
            consumer: Some(consumer),
            positions,
            store,
            topics: topics
                .iter()
                .map(|t| (t.to_string(), Arc::<str>::from(*t)))
                .collect(),
            is_static: kafka.instance_id.is_some(),
        })
    }

    fn consumer(&self) -> &StreamConsumer<Ctx> {
        self.consumer
            .as_ref()
            .expect("the consumer lives until drop")
    }

    /// Waits for the first record (or shutdown), then gathers records until a limit is hit.
    /// Returns None when shutdown was signalled before any record arrived. While it waits it
    /// checks how long the group has had no partitions (see [`GroupHealth::check`]).
    pub async fn next_batch(
        &self,
        limits: &BatchLimits,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Batch>, ConsumeError> {
        self.next_batch_within(limits, None, shutdown).await
    }

    /// [`next_batch`](Self::next_batch), but when `idle` is set and no record arrived
    /// within it, returns an empty batch (the caller has work to do when the stream is
    /// quiet). Records are never dropped: the wait ends only between records.
    pub async fn next_batch_within(
        &self,
        limits: &BatchLimits,
        idle: Option<Duration>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Batch>, ConsumeError> {
        let mut batch = Batch::default();
        let mut deadline: Option<tokio::time::Instant> = None;
        let idle_until = idle.map(|d| tokio::time::Instant::now() + d);
        let health = &self.consumer().context().health;
        let mut check = tokio::time::interval(HEALTH_CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if batch.records.len() >= limits.max_events || batch.bytes >= limits.max_bytes {
                break;
            }
            let msg = match deadline {
                None => {
                    tokio::select! {
                        biased;
                        _ = stopped(shutdown) => return Ok(None),
                        _ = check.tick() => {
                            health.check();
                            continue;
                        }
                        _ = sleep_until_some(idle_until) => return Ok(Some(batch)),
                        m = self.consumer().recv() => m,
                    }
                }
                Some(d) => {
                    tokio::select! {
                        biased;
                        _ = tokio::time::sleep_until(d) => break,
                        m = self.consumer().recv() => m,
                    }
                }
            };
            // librdkafka reports a broker that is down, a transport failure or a fetch error
            // as a consumption error and recovers by itself: keep polling (the records
            // gathered so far stay in hand). Only a broken deployment ends the loop.
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) if e.fault() == Fault::Bug => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka consumption error; the client reconnects by itself");
                    crate::metrics::retry("consume");
                    tokio::select! {
                        biased;
                        _ = stopped(shutdown) => return Ok((!batch.records.is_empty()).then_some(batch)),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            let topic = self
                .topics
                .get(msg.topic())
                .cloned()
                .unwrap_or_else(|| Arc::from(msg.topic()));
            let (partition, offset) = (msg.partition(), msg.offset());
            let Some(position) = self.position(&topic, partition, offset, shutdown).await? else {
                // Shutdown while the store of record is unreachable: this record is read
                // again at the next start; the records gathered so far are the batch in hand.
                drop(msg);
                return Ok((!batch.records.is_empty()).then_some(batch));
            };
            if offset < position {
                batch.skipped += 1;
                continue;
            }
            let record = Record {
                topic: topic.clone(),
                partition,
                offset,
                key: msg.key().map(<[u8]>::to_vec),
                payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers: msg
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp_ms: msg.timestamp().to_millis(),
            };
            drop(msg);
            batch.bytes += record.payload.len();
            batch
                .next_offsets
                .insert((topic.to_string(), partition), offset + 1);
            batch.records.push(record);
            if deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + limits.max_wait);
            }
        }
        Ok(Some(batch))
    }

    /// The stored position of a partition; loads it (retrying) when the rebalance callback
    /// could not, and seeks when Kafka's position disagrees with the store. None: shutdown
    /// was signalled before the store answered; an error: the store failed for good.
    async fn position(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<i64>, LoadError> {
        let key = (topic.to_owned(), partition);
        if let Some(&p) = self.positions.lock().expect("positions lock").get(&key) {
            return Ok(Some(p));
        }
        let mut retry = Retry::with_policy(RetryPolicy::default(), shutdown.clone());
        let stored = loop {
            let load = tokio::select! {
                biased;
                _ = stopped(shutdown) => return Ok(None),
                load = self.store.load(vec![key.clone()]) => load,
            };
            // The store of record is unreachable: the loop waits (back-pressure).
            match retry.settle("load stored offset", load).await {
                Ok(Some(s)) => break s.get(&key).copied(),
                Ok(None) => continue,
                Err(Halt::Shutdown) => return Ok(None),
                Err(Halt::Failed(e)) => return Err(e),
            }
        };
        let next = stored.unwrap_or(0);
        if offset > next {
            // Kafka is ahead of the store of record: go back so nothing is skipped.
            tracing::warn!(
                topic,
                partition,
                offset,
                stored = next,
                "seeking back to stored offset"
            );
            if let Err(e) = self.consumer().seek(
                topic,
                partition,
                Offset::Offset(next),
                Duration::from_secs(10),
            ) {
                tracing::error!(topic, partition, error = %e, "seek failed");
            }
        }
        self.positions
            .lock()
            .expect("positions lock")
            .insert(key, next);
        Ok(Some(next))
    }

    /// After the store of record committed a batch: advance positions and commit the same
    /// offsets to Kafka (asynchronously; they only serve lag monitoring and fallbacks).
    pub fn committed(&self, next_offsets: &Positions) {
        let mut tpl = TopicPartitionList::new();
        {
            let mut positions = self.positions.lock().expect("positions lock");
            for ((topic, partition), &next) in next_offsets {
                let entry = positions.entry((topic.clone(), *partition)).or_insert(next);
                *entry = (*entry).max(next);
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(next));
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer().commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "kafka offset commit failed (store of record is authoritative)");
            }
        }
    }

    /// Partitions currently assigned to this member.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.consumer()
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Consumer lag per assigned partition (high watermark − stored position); none when the
    /// broker does not answer within 2 s.
    pub fn lag(&self) -> Vec<(TopicPartition, i64)> {
        let positions = self.positions.lock().expect("positions lock").clone();
        let mut topics: Vec<&str> = positions.keys().map(|(t, _)| t.as_str()).collect();
        topics.dedup();
        let Ok(marks) = super::watermarks(self.consumer(), &topics, Duration::from_secs(2)) else {
            return Vec::new();
        };
        positions
            .iter()
            .filter_map(|(tp, pos)| {
                let (_, high) = marks.get(tp)?;
                Some((tp.clone(), (high - pos).max(0)))
            })
            .collect()
    }
}

impl BatchConsumer {
    /// This consumer's group and how many partitions it holds.
    pub fn group_status(&self) -> super::groups::GroupStatus {
        self.consumer().context().health.status()
    }
}

impl Drop for BatchConsumer {
    /// librdkafka's close (revoke, leave, final callbacks) polls until the broker answers,
    /// without a time limit: run it on a thread of its own and stop waiting after
    /// [`CLOSE_TIMEOUT`].
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let is_static = self.is_static;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("tally-consumer-close".into())
            .spawn(move || {
                if is_static {
                    leave_group(&consumer);
                }
                drop(consumer);
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the consumer-close thread");
            return;
        }
        if done_rx.recv_timeout(CLOSE_TIMEOUT).is_err() {
            tracing::warn!(
                timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
                "Kafka consumer close did not finish in time; abandoned (the broker expires the member)"
            );
        }
    }
}

/// Makes a static member leave its group before it closes. librdkafka follows KIP-345: a
/// static member's close sends no LeaveGroup, so the broker keeps the member, and its
/// assignment, until its session times out. Apache Kafka hands that member's place to the next
/// process joining with the same `group.instance.id`; Tansu 0.6.0 can leave the restarted
/// process without partitions instead (see the README, Operations). An unsubscribe before the
/// close does send the LeaveGroup (by member id, which both brokers honour): the partitions
/// are revoked through the rebalance callback, which this serves by polling, and then
/// librdkafka leaves. A clean restart then joins as a new member on any broker; a crashed
/// process's member is still replaced by its successor on Apache Kafka.
fn leave_group(consumer: &StreamConsumer<Ctx>) {
    use futures::{FutureExt, StreamExt};
    consumer.unsubscribe();
    let started = std::time::Instant::now();
    let mut stream = consumer.stream();
    while started.elapsed() < LEAVE_TIMEOUT {
        // Serves queued events (the revoke callback); a record still queued is dropped: it
        // was not processed, so it is read again by whoever takes the partition.
        while let Some(Some(_)) = stream.next().now_or_never() {}
        let revoked = consumer.assignment().map_or(true, |a| a.count() == 0);
        if revoked && started.elapsed() >= Duration::from_millis(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resolves once shutdown is signalled (or its sender is gone, which means the same).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}
