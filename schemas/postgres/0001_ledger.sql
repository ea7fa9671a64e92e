-- Tally ledger of record. Applied by `tally migrate` inside the configured schema
-- (search_path), once, recorded in schema_migrations.

-- One row per account: the lock every batch takes (in account_id order) and the
-- denormalized balance the API reads.
CREATE TABLE accounts (
    account_id      text PRIMARY KEY,
    spendable       numeric(24, 6) NOT NULL DEFAULT 0,
    overage         numeric(24, 6) NOT NULL DEFAULT 0,
    overage_policy  text NOT NULL DEFAULT 'settle_from_next_grant'
                    CHECK (overage_policy IN ('settle_from_next_grant', 'bill_overage')),
    top_up_validity_months integer NOT NULL DEFAULT 3 CHECK (top_up_validity_months > 0),
    last_grant_seq  bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Credit buckets. Idempotent by (account_id, grant_id).
CREATE TABLE grants (
    account_id  text NOT NULL REFERENCES accounts (account_id),
    grant_id    text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('allowance', 'package', 'top_up', 'promo', 'manual')),
    priority    integer NOT NULL,
    granted     numeric(24, 6) NOT NULL CHECK (granted > 0),
    remaining   numeric(24, 6) NOT NULL CHECK (remaining >= 0 AND remaining <= granted),
    expires_at  timestamptz,
    granted_at  timestamptz NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (account_id, grant_id)
);
CREATE INDEX grants_live ON grants (account_id) WHERE remaining > 0;

-- Every balance change, with the balance after it.
CREATE TABLE ledger_entries (
    entry_id      bigserial PRIMARY KEY,
    account_id    text NOT NULL REFERENCES accounts (account_id),
    kind          text NOT NULL CHECK (kind IN ('grant', 'debit', 'overage', 'settle', 'expiry', 'renewal')),
    grant_id      text,
    amount        numeric(24, 6) NOT NULL,
    balance_after numeric(24, 6) NOT NULL,
    overage_after numeric(24, 6) NOT NULL,
    effective_at  timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    event_source  text,
    event_id      text,
    usage_kind    text,
    price_version text,
    rule_id       text
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, entry_id);

-- Dedupe claims: an event identity is claimed in the same transaction as its effects.
CREATE TABLE processed_events (
    event_source text NOT NULL,
    event_id     text NOT NULL,
    account_id   text NOT NULL,
    event_time   timestamptz NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_source, event_id)
);
CREATE INDEX processed_events_claimed_at ON processed_events (claimed_at);

-- Next Kafka offset per consumer group and partition, stored with the effects.
CREATE TABLE consumer_offsets (
    group_id    text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
