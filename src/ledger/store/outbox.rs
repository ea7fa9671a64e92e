//! The alert outbox: claimed by the relay, marked published once Kafka acknowledged.

use super::*;

impl Store {
    /// Claims up to `limit` unpublished outbox alerts, oldest first, for `lease`: other relays
    /// skip them until the lease passes. One statement, no transaction left open: the caller
    /// publishes, then calls [`Store::mark_published`]. A relay that dies in between leaves
    /// the lease to expire and the alerts are claimed again (at-least-once, same alert id).
    pub async fn claim_outbox(
        &self,
        limit: i64,
        lease: std::time::Duration,
    ) -> Result<Vec<OutboxAlert>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .client
            .query(
                "UPDATE alert_outbox o SET lease_until = now() + $2 * interval '1 millisecond'
                 FROM (SELECT seq FROM alert_outbox
                       WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < now())
                       ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) c
                 WHERE o.seq = c.seq
                 RETURNING o.seq, o.alert_id, o.kind, o.account_id, o.payload",
                &[&limit, &(lease_ms as f64)],
            )
            .await?;
        let mut alerts: Vec<OutboxAlert> = rows
            .iter()
            .map(|r| OutboxAlert {
                seq: r.get(0),
                alert_id: r.get(1),
                kind: r.get(2),
                account_id: r.get(3),
                payload: r.get(4),
            })
            .collect();
        alerts.sort_by_key(|a| a.seq);
        Ok(alerts)
    }

    /// Marks claimed alerts published (after the broker acknowledged them).
    pub async fn mark_published(&self, seqs: &[i64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.client
            .execute(
                "UPDATE alert_outbox SET published_at = now(), lease_until = NULL
                 WHERE seq = ANY($1) AND published_at IS NULL",
                &[&seqs],
            )
            .await?;
        Ok(())
    }
}

/// An alert waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxAlert {
    pub seq: i64,
    pub alert_id: String,
    pub kind: String,
    pub account_id: String,
    pub payload: String,
}
