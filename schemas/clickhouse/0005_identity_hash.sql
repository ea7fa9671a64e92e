-- Tally analytics schema, migration 0005: the copies of each identity, keyed by a hash of the
-- identity, so that looking up a batch's identities costs about the same whatever the table
-- holds.
--
-- `usage_identities` (0004) is ordered by the identity's strings (`event_id`, then
-- `event_source`). A batch's ids are random (UUIDs), so its lookup touched a granule per id
-- and compared strings over the whole index: at 10 million stored copies a lookup of 50,000
-- ids took seconds, against a few milliseconds with 100,000 stored.
--
-- `usage_copies` holds the same rows (every position of every identity, with its admission
-- rank) ordered by `id_hash` (cityHash64 of `event_source` and `event_id`, computed by the
-- server: MATERIALIZED, never sent by a client, not in `SELECT *`), then the position. The
-- sink first asks which of its batch's hashes have more than one stored copy, reading that
-- 8-byte column only, then reads the copies of those few identities (docs/analytics.md).
-- Two identities may share a hash: readers always match the copies on `event_source` and
-- `event_id` too, so a collision costs a read, never a wrong answer.
--
-- `usage_identities` is no longer written; it is kept for reading history and can be dropped
-- once the copy below is checked. Stop the analytics pipeline while migrating. The copy
-- writes every row again when the migration is run again (it is not recorded until it ends):
-- the key collapses them, so it is safe to repeat.
--
-- Same constraints as 0001: runs unchanged on ClickHouse 18.16 and on current releases.

CREATE TABLE IF NOT EXISTS {database}.usage_copies
(
    id_hash      UInt64 MATERIALIZED cityHash64(event_source, event_id),
    event_source String,
    event_id     String,
    topic        String,
    `partition`  UInt32,
    `offset`     UInt64,
    -- Larger = admitted earlier (as in usage_events): of an identity's copies, the largest counts.
    admission    UInt64
)
ENGINE = ReplacingMergeTree(admission)
ORDER BY (id_hash, topic, `partition`, `offset`)
SETTINGS index_granularity = 256;

INSERT INTO {database}.usage_copies (event_source, event_id, topic, `partition`, `offset`, admission)
SELECT event_source, event_id, topic, `partition`, `offset`, admission
FROM {database}.usage_identities
