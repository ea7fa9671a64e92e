-- Tally analytics schema, migration 0003: usage that reached analytics after the billing
-- grace (`billing.grace`, docs/billing.md). Its `rated_events` row keeps its event day (charts
-- show usage on the day it happened); this table marks it late, keyed by identity, so reports
-- can count it apart. A replay writes the same key again (ReplacingMergeTree). The ledger's
-- `late` flag is the one billing uses: analytics decides with its own clock when it reads the
-- event, so an event read close to the grace's end may be marked on one side only.
CREATE TABLE IF NOT EXISTS {database}.late_usage
(
    event_source  String,
    event_id      String,
    account_id    String,
    kind          String,
    event_date    Date,
    credits       Decimal(18, 6),
    -- When analytics read it (event_date + grace had passed).
    processed_at  DateTime('UTC')
)
ENGINE = ReplacingMergeTree(processed_at)
ORDER BY (account_id, event_source, event_id);
