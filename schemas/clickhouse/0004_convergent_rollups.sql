-- Tally analytics schema, migration 0004: one identity per event and roll-ups that converge.
--
-- Replaces the check-then-insert write path of 0001/0002 (rows keyed by account, day and
-- identity; roll-ups incremented by materialized views that see every inserted block, so a
-- retried, timed-out or doubled insert left them short or doubled). Now:
--
-- - `usage_events`: every admitted rated usage record, keyed by its Kafka position (topic,
--   partition, offset). A record read again (replay, retry, two instances in a rebalance)
--   writes the same key again: ReplacingMergeTree keeps one. Nothing is checked before writing.
-- - `usage_identities`: every position of every identity (`event_source`, `event_id`, the
--   ledger's identity: whatever the event's account or time). The copy that counts is the one
--   with the highest `admission` (the earliest admitted: see docs/analytics.md), a function of
--   the stored rows alone, so every reader and every writer picks the same one.
-- - `usage_losers`: the copies that do not count (by position), found when a batch's
--   identities are looked up.
-- - `usage_daily`, `usage_hourly`: the roll-ups, recomputed (never incremented) from
--   `usage_events` FINAL less `usage_losers`, per block of 8192 offsets of one partition:
--   rows keyed by (account, day, dimensions, topic, partition, block), ReplacingMergeTree
--   whose version is the highest offset of the block the computation saw, so a stale or
--   partial computation never replaces a fuller one. Each write recomputes the blocks its
--   batch touched (and those of other copies of its identities): a bounded read. Read them
--   with FINAL and the -Merge combinators, as before.
--
-- Same constraints as 0001: runs unchanged on ClickHouse 18.16 and on current releases.
-- `rated_events` (0001) is no longer written; it is kept for reading history and can be
-- dropped once the backfill below is checked. Stop the analytics pipeline while migrating.

CREATE TABLE IF NOT EXISTS {database}.usage_events
(
    event_source      String,
    event_id          String,
    account_id        String,
    kind              String,
    event_time        DateTime('UTC'),
    event_date        Date,
    model             String,
    voice_tier        String,
    channel           String,
    direction         String,
    instance_type     String,
    call_id           String,
    conversation_id   String,
    instance_id       String,
    answered          UInt8,
    responses         UInt32,
    quantity          Decimal(38, 6),
    billable_seconds  UInt64,
    billable_quantity Decimal(18, 6),
    unit              String,
    credits           Decimal(18, 6),
    price_version     String,
    rule_id           String,
    topic             String,
    `partition`       UInt32,
    `offset`          UInt64,
    inserted_at       DateTime('UTC'),
    -- Larger = admitted earlier: u64::MAX - (record timestamp ms * 2^21 + offset mod 2^21).
    admission         UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date)
ORDER BY (topic, `partition`, `offset`);

CREATE TABLE IF NOT EXISTS {database}.usage_identities
(
    event_source String,
    event_id     String,
    topic        String,
    `partition`  UInt32,
    `offset`     UInt64,
    admission    UInt64
)
ENGINE = ReplacingMergeTree(admission)
ORDER BY (event_id, event_source, topic, `partition`, `offset`)
SETTINGS index_granularity = 64;

-- The copies that do not count: every copy of an identity but the one with the highest
-- admission, by position. Written by the sink when it finds another copy of a batch's identity
-- (a copy once beaten stays beaten: admission never changes), read by the roll-up computation
-- by position, so it never looks identities up itself.
CREATE TABLE IF NOT EXISTS {database}.usage_losers
(
    topic        String,
    `partition`  UInt32,
    `offset`     UInt64,
    event_source String,
    event_id     String
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, `partition`, `offset`);

-- Backfill from 0001 (each stored row once, FINAL), only while the new table is empty.
INSERT INTO {database}.usage_events
SELECT
    event_source, event_id, account_id, kind, event_time, event_date, model, voice_tier,
    channel, direction, instance_type, call_id, conversation_id, instance_id, answered,
    responses, quantity, billable_seconds, billable_quantity, unit, credits, price_version,
    rule_id, topic, `partition`, `offset`, inserted_at,
    toUInt64(18446744073709551615) - (toUInt64(toUnixTimestamp(inserted_at)) * 1000 * 2097152 + (`offset` % 2097152)) AS admission_rank
FROM {database}.rated_events FINAL
WHERE (SELECT count() FROM {database}.usage_events) = 0;

INSERT INTO {database}.usage_identities
SELECT event_source, event_id, topic, `partition`, `offset`, admission
FROM {database}.usage_events
WHERE (SELECT count() FROM {database}.usage_identities) = 0;

INSERT INTO {database}.usage_losers
SELECT topic, `partition`, `offset`, event_source, event_id
FROM {database}.usage_identities
WHERE (event_source, event_id, topic, `partition`, `offset`) NOT IN
    (
        SELECT event_source, event_id, argMax(topic, admission), argMax(`partition`, admission),
            argMax(`offset`, admission)
        FROM {database}.usage_identities
        GROUP BY event_source, event_id
    )
    AND (SELECT count() FROM {database}.usage_losers) = 0;

DROP TABLE IF EXISTS {database}.usage_daily_mv;

DROP TABLE IF EXISTS {database}.usage_hourly_mv;

DROP TABLE IF EXISTS {database}.usage_daily;

DROP TABLE IF EXISTS {database}.usage_hourly;

CREATE TABLE IF NOT EXISTS {database}.usage_daily
(
    account_id              String,
    day                     Date,
    kind                    String,
    model                   String,
    voice_tier              String,
    instance_type           String,
    topic                   String,
    `partition`             UInt32,
    block                   UInt64,
    -- The highest offset of the block the computation read (the version).
    covered_offset          UInt64,
    credits_total           AggregateFunction(sum, Decimal(18, 6)),
    quantity_total          AggregateFunction(sum, Decimal(38, 6)),
    billable_seconds_total  AggregateFunction(sum, UInt64),
    billable_quantity_total AggregateFunction(sum, Decimal(18, 6)),
    event_count             AggregateFunction(count),
    answered_calls          AggregateFunction(sum, UInt8),
    ai_responses            AggregateFunction(sum, UInt32),
    distinct_calls          AggregateFunction(uniqExactIf, String, UInt8),
    distinct_conversations  AggregateFunction(uniqExactIf, String, UInt8)
)
ENGINE = ReplacingMergeTree(covered_offset)
PARTITION BY toYYYYMM(day)
ORDER BY (account_id, day, kind, model, voice_tier, instance_type, topic, `partition`, block);

CREATE TABLE IF NOT EXISTS {database}.usage_hourly
(
    account_id     String,
    day            Date,
    hour_of_day    UInt8,
    kind           String,
    topic          String,
    `partition`    UInt32,
    block          UInt64,
    covered_offset UInt64,
    credits_total  AggregateFunction(sum, Decimal(18, 6)),
    event_count    AggregateFunction(count)
)
ENGINE = ReplacingMergeTree(covered_offset)
PARTITION BY toYYYYMM(day)
ORDER BY (account_id, day, hour_of_day, kind, topic, `partition`, block);

-- Backfill: every block computed from the rows above, only while the roll-up is empty (the
-- statements the sink runs for a batch's blocks, over every block: AnalyticsSink::recompute).
INSERT INTO {database}.usage_daily
SELECT
    account_id, event_date AS day, kind, model, voice_tier, instance_type,
    topic, `partition`, intDiv(`offset`, 8192) AS block, max(`offset`) AS covered_offset,
    sumStateIf(credits, counted) AS credits_total,
    sumStateIf(quantity, counted) AS quantity_total,
    sumStateIf(billable_seconds, counted) AS billable_seconds_total,
    sumStateIf(billable_quantity, counted) AS billable_quantity_total,
    countStateIf(counted) AS event_count,
    sumStateIf(answered, counted) AS answered_calls,
    sumStateIf(responses, counted) AS ai_responses,
    uniqExactIfState(call_id, counted AND call_id != '') AS distinct_calls,
    uniqExactIfState(conversation_id, counted AND conversation_id != '') AS distinct_conversations
FROM
(
    SELECT *, (topic, `partition`, `offset`) NOT IN
        (SELECT topic, `partition`, `offset` FROM {database}.usage_losers) AS counted
    FROM {database}.usage_events FINAL
)
WHERE (SELECT count() FROM {database}.usage_daily) = 0
GROUP BY account_id, day, kind, model, voice_tier, instance_type, topic, `partition`, block;

INSERT INTO {database}.usage_hourly
SELECT
    account_id, event_date AS day, toHour(event_time) AS hour_of_day, kind,
    topic, `partition`, intDiv(`offset`, 8192) AS block, max(`offset`) AS covered_offset,
    sumStateIf(credits, counted) AS credits_total,
    countStateIf(counted) AS event_count
FROM
(
    SELECT *, (topic, `partition`, `offset`) NOT IN
        (SELECT topic, `partition`, `offset` FROM {database}.usage_losers) AS counted
    FROM {database}.usage_events FINAL
)
WHERE (SELECT count() FROM {database}.usage_hourly) = 0
GROUP BY account_id, day, hour_of_day, kind, topic, `partition`, block
