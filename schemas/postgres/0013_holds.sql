-- Holds for live usage (issue 14, item 1): credits reserved for a call or a conversation in
-- progress, so usage never runs past the credits that pay for it. available = spendable -
-- the credits of the account's live holds (state 'live' and expires_at in the future).
--
-- Every write to a hold row happens under the account's hold lock (a transaction-level
-- advisory lock, see src/ledger/store/holds.rs), which the ledger's batch transaction also
-- takes, just before it commits, for every account it debits: a hold is decided on a
-- spendable balance no uncommitted debit is about to lower. The one exception is the
-- scheduler marking holds whose TTL passed as 'expired': a hold stops counting at its
-- expires_at whatever its state says, so that write changes no figure.
CREATE TABLE holds (
    account_id         text NOT NULL,
    hold_id            text NOT NULL,
    -- The usage the hold is for: the price rule that gives its rate.
    usage_kind         text NOT NULL,
    attributes         jsonb NOT NULL DEFAULT '{}',
    price_version      text NOT NULL,
    rule_id            text NOT NULL,
    unit               text NOT NULL,
    -- What was asked: credits, or the credits of a duration (requested_seconds).
    requested_credits  numeric NOT NULL CHECK (requested_credits > 0),
    requested_seconds  bigint CHECK (requested_seconds > 0),
    partial            boolean NOT NULL,
    -- What is held, and the usage it covers ("time to zero": seconds for time units, whole
    -- units for count units).
    credits            numeric NOT NULL CHECK (credits > 0),
    covers_seconds     bigint,
    covers_units       bigint,
    ttl_seconds        integer NOT NULL CHECK (ttl_seconds > 0),
    created_at         timestamptz NOT NULL,
    expires_at         timestamptz NOT NULL,
    heartbeats         integer NOT NULL DEFAULT 0,
    state              text NOT NULL DEFAULT 'live'
                       CHECK (state IN ('live', 'settled', 'released', 'expired')),
    ended_at           timestamptz,
    -- The usage event that settled it.
    settled_by_source  text,
    settled_by_id      text,
    -- The credits_exhausted alert naming this hold: times fired, and fired now (not re-armed).
    exhausted_fired    integer NOT NULL DEFAULT 0,
    exhausted_active   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (account_id, hold_id)
);
-- The live holds of an account (available credits), and those whose TTL passes (scheduler).
CREATE INDEX holds_live ON holds (account_id) WHERE state = 'live';
CREATE INDEX holds_expiry ON holds (expires_at) WHERE state = 'live';
-- Ended holds are purged after a retention period (their hold_id can then be used again).
CREATE INDEX holds_ended ON holds (ended_at) WHERE state <> 'live';
