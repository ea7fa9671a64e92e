-- Tally analytics schema, migration 0001: rated usage events and consumed positions.
--
-- `{database}` is replaced by the configured database (a checked lower-case identifier);
-- statements are separated by `;` and every one is idempotent (IF NOT EXISTS), so a migration
-- interrupted half-way is simply run again. Must run unchanged on ClickHouse 18.16 and on
-- current releases: no DateTime64, LowCardinality, TTL, window functions, CTEs or server-side
-- parameters. `partition` and `offset` are backquoted: both are SQL keywords.

-- One row per rated usage event, keyed by event identity. A replayed batch or a producer retry
-- writes the same key again; ReplacingMergeTree keeps the row with the latest `inserted_at`,
-- so exact totals are read with FINAL (or argMax by key) whatever was inserted twice.
CREATE TABLE IF NOT EXISTS {database}.rated_events
(
    event_source      String,
    event_id          String,
    account_id        String,
    -- call | chat_response | instance_hours | a metered kind (ai_analysis, media_generation...)
    kind              String,
    event_time        DateTime('UTC'),
    event_date        Date,
    -- Attributes rules match on; '' when the event has none.
    model             String,
    voice_tier        String,
    channel           String,
    direction         String,
    instance_type     String,
    -- The producer's ids; '' when not applicable to the kind.
    call_id           String,
    conversation_id   String,
    instance_id       String,
    -- Calls: 1 when answered. Chat responses: the number of responses in the event.
    answered          UInt8,
    responses         UInt32,
    -- The raw measure: seconds for time kinds, units for count kinds.
    quantity          Decimal(38, 6),
    -- What was billed, after the rule's increment and minimum.
    billable_seconds  UInt64,
    billable_quantity Decimal(18, 6),
    unit              String,
    credits           Decimal(18, 6),
    price_version     String,
    rule_id           String,
    -- Where the event was read: lets the consumer resume past what is already stored.
    topic             String,
    `partition`       UInt32,
    `offset`          UInt64,
    inserted_at       DateTime('UTC')
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(event_date)
ORDER BY (account_id, event_date, event_source, event_id);

-- Highest offset stored in rated_events per partition, maintained by the view below on every
-- insert (replays included: a max is idempotent). The version column keeps the largest.
CREATE TABLE IF NOT EXISTS {database}.rated_offsets
(
    topic       String,
    `partition` UInt32,
    max_offset  UInt64
)
ENGINE = ReplacingMergeTree(max_offset)
ORDER BY (topic, `partition`);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.rated_offsets_mv
TO {database}.rated_offsets
AS SELECT
    topic,
    `partition`,
    max(`offset`) AS max_offset
FROM {database}.rated_events
GROUP BY topic, `partition`;

-- Next offset to read per consumer group and partition, stored after every batch: covers the
-- partitions whose records produce no rows (grants, plans, rejected events). Positions only
-- move forward, so the version column is the offset itself.
CREATE TABLE IF NOT EXISTS {database}.consumer_offsets
(
    group_id    String,
    topic       String,
    `partition` UInt32,
    next_offset UInt64,
    updated_at  DateTime('UTC')
)
ENGINE = ReplacingMergeTree(next_offset)
ORDER BY (group_id, topic, `partition`);
