//! The consumed offsets, stored in the batch's transaction: the ledger's [`OffsetStore`].

use tokio_postgres::Transaction;

use crate::kafka::{LoadError, OffsetStore, Positions, TopicPartition};
use crate::ledger::PostgresConfig;

use super::*;

impl Store {
    /// Stored next offsets of a group for the given partitions.
    pub async fn load_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Positions, StoreError> {
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        let parts: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let rows = self
            .client
            .query(
                "SELECT o.topic, o.partition, o.next_offset FROM consumer_offsets o
                 JOIN unnest($2::text[], $3::int[]) AS w(topic, partition)
                   ON o.topic = w.topic AND o.partition = w.partition
                 WHERE o.group_id = $1",
                &[&group_id, &topics, &parts],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    (r.get::<_, String>(0), r.get::<_, i32>(1)),
                    r.get::<_, i64>(2),
                )
            })
            .collect())
    }
}

pub(super) async fn store_offsets(
    tx: &Transaction<'_>,
    st: &Stmts,
    group_id: &str,
    next_offsets: &Positions,
) -> Result<(), StoreError> {
    if next_offsets.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = next_offsets.keys().map(|(t, _)| t.as_str()).collect();
    let parts: Vec<i32> = next_offsets.keys().map(|(_, p)| *p).collect();
    let offsets: Vec<i64> = next_offsets.values().copied().collect();
    tx.execute(
        st.get(STORE_OFFSETS),
        &[&group_id, &topics, &parts, &offsets],
    )
    .await?;
    Ok(())
}

/// Loads the ledger group's positions from PostgreSQL (own connection per call: it also runs
/// inside the rebalance callback).
pub struct PgOffsetStore {
    pub config: PostgresConfig,
    pub group_id: String,
}

impl OffsetStore for PgOffsetStore {
    fn load(
        &self,
        partitions: Vec<TopicPartition>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Positions, LoadError>> + Send>>
    {
        let config = self.config.clone();
        let group = self.group_id.clone();
        Box::pin(async move {
            let store = Store::connect(&config).await.map_err(LoadError::new)?;
            store
                .load_offsets(&group, &partitions)
                .await
                .map_err(LoadError::new)
        })
    }
}
