-- Plans, billing cycles and threshold alerts.

-- The account's plan (NULL plan_id: prepaid) and its current cycle.
ALTER TABLE accounts
    ADD COLUMN plan_id                  text,
    ADD COLUMN monthly_allowance        numeric(24, 6) CHECK (monthly_allowance >= 0),
    ADD COLUMN billing_day              integer CHECK (billing_day BETWEEN 1 AND 31),
    ADD COLUMN low_balance_credits      numeric(24, 6),
    ADD COLUMN low_balance_percent      numeric(9, 6),
    ADD COLUMN allowance_alert_percents integer[],
    ADD COLUMN cycle_start              timestamptz,
    ADD COLUMN cycle_end                timestamptz,
    ADD COLUMN cycle_used               numeric(24, 6) NOT NULL DEFAULT 0,
    ADD COLUMN cycle_overage            numeric(24, 6) NOT NULL DEFAULT 0;
-- The scheduler finds the accounts whose cycle ended...
CREATE INDEX accounts_cycle_end ON accounts (cycle_end) WHERE cycle_end IS NOT NULL;
-- ...and the grants that expire.
CREATE INDEX grants_expiry ON grants (expires_at) WHERE remaining > 0;

-- 'reset': a bill_overage cycle closed with its overage reported (see cycles).
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('grant', 'debit', 'overage', 'settle', 'expiry', 'renewal', 'reset'));

-- Closed cycles: what each cycle's billing page reports.
CREATE TABLE cycles (
    account_id        text NOT NULL REFERENCES accounts (account_id),
    cycle_start       timestamptz NOT NULL,
    cycle_end         timestamptz NOT NULL,
    allowance         numeric(24, 6) NOT NULL,
    used              numeric(24, 6) NOT NULL,
    overage           numeric(24, 6) NOT NULL,
    allowance_expired numeric(24, 6) NOT NULL,
    closed_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, cycle_start)
);

-- Alert crossings: a key fires once while active, re-arms when its condition stops holding.
CREATE TABLE alert_state (
    account_id  text NOT NULL REFERENCES accounts (account_id),
    alert_key   text NOT NULL,
    fired_count bigint NOT NULL,
    active      boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, alert_key)
);

-- Alerts written with the change that caused them; the relay publishes them to Kafka.
CREATE TABLE alert_outbox (
    seq          bigserial PRIMARY KEY,
    alert_id     text NOT NULL UNIQUE,
    kind         text NOT NULL,
    account_id   text NOT NULL,
    payload      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX alert_outbox_pending ON alert_outbox (seq) WHERE published_at IS NULL;
