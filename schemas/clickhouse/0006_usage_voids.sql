-- Tally analytics schema, migration 0006: voided usage (tally.usage.void.v1, docs/billing.md
-- "Corrections"). One row per voided usage event, keyed by the ORIGINAL's identity
-- (`event_source`, `event_id`) and its account: a void written twice (a replay, a re-sent
-- void) collapses. A usage row counts nowhere when its (account_id, event_source, event_id)
-- is here: the roll-up recomputation (`usage_daily`, `usage_hourly`) and the counting copies
-- (`tally reconcile`) leave it out, whichever arrived first, the usage or its void (the sink
-- recomputes the blocks holding the original's copies when the void arrives, and a usage row
-- written after its void is left out by its own block's recomputation). Voids are rare: every
-- recomputation reads this table whole.
--
-- Same constraints as 0001: runs unchanged on ClickHouse 18.16 and on current releases.
CREATE TABLE IF NOT EXISTS {database}.usage_voids
(
    id_hash      UInt64 MATERIALIZED cityHash64(event_source, event_id),
    -- The voided usage event's identity and account.
    event_source String,
    event_id     String,
    account_id   String,
    -- The void event's identity, time, author and reason.
    void_source  String,
    void_id      String,
    void_time    DateTime('UTC'),
    actor        String,
    reason       String,
    inserted_at  DateTime('UTC')
)
ENGINE = ReplacingMergeTree(inserted_at)
ORDER BY (id_hash, event_source, event_id, account_id)
SETTINGS index_granularity = 256;
