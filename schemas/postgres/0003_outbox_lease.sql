-- The alert relay claims outbox rows with a lease instead of holding a transaction open
-- across its Kafka send: a claimed row is skipped by other relays until the lease passes;
-- a relay that dies mid-send leaves the lease to expire and the alert is sent again
-- (at-least-once, same alert_id and content).
ALTER TABLE alert_outbox ADD COLUMN lease_until timestamptz;
