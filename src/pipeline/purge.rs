//! The dedupe purge inside `tally run`: its own task and PostgreSQL connection beside the
//! ledger consumers, so a purge never stops a batch. (It ran between batches before: with
//! 20 million claims stored, one call deleting 100,000 of them held the ledger loop 2 s.)
//!
//! Every `pipeline.dedupe_purge_interval_ms` (and once at start) it moves the stored dedupe
//! horizon ([`Store::advance_dedupe_horizon`], the only step that waits for the batches in
//! flight), then deletes the claims dated before it one statement of
//! [`DEDUPE_PURGE_CHUNK_ROWS`] at a time, pausing after each twice as long as it took: the
//! purge takes at most about a third of one core, and the ledger's batches go on meanwhile
//! (with 20 million claims stored it still deletes about 13,000 claims a second, more than
//! 10,000 events/s store). Every instance runs it; the statements skip the rows another
//! instance's purge holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::fault::{Classify, Fault};
use crate::ledger::{Store, StoreError, DEDUPE_PURGE_CHUNK_ROWS};

/// What the purge task did, for logs and benches.
#[derive(Debug, Default, Clone)]
pub struct PurgeStats {
    /// Purges run (horizon moved, then claims deleted until none was left).
    pub purges: u64,
    /// Claims deleted.
    pub deleted: u64,
    /// When the first purge had deleted every claim before its horizon.
    pub first_done: Option<Instant>,
}

/// Purges until shutdown, which ends a purge in hand at once (a statement cut short deletes
/// nothing; the next start purges again). A transient failure (PostgreSQL unreachable, a
/// deadlock) is logged and the purge tried again after `pipeline.retry_max_ms`; any other
/// (a refused statement, a broken schema) is logged as an error and tried again only at the
/// next interval. Neither stops the ledger: claiming checks the stored horizon anyway.
pub async fn run(
    cfg: Arc<Config>,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<PurgeStats> {
    let interval = Duration::from_millis(cfg.pipeline.dedupe_purge_interval_ms);
    let window = chrono::TimeDelta::days(cfg.pipeline.dedupe_window_days);
    let mut store: Option<Store> = None;
    let mut stats = PurgeStats::default();
    while !*shutdown.borrow() {
        let purged = tokio::select! {
            purged = purge(&cfg, &mut store, clock.now(), window, &mut stats) => purged,
            _ = shutdown.wait_for(|&stop| stop) => break,
        };
        let wait = match purged {
            Ok(()) => interval,
            Err(e) if e.fault() == Fault::Transient => {
                tracing::warn!(error = %e, "purging dedupe claims failed: trying again soon");
                store = None;
                Duration::from_millis(cfg.pipeline.retry_max_ms)
            }
            Err(e) => {
                tracing::error!(error = %e, "purging dedupe claims failed: trying again at the next interval");
                store = None;
                interval
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|&stop| stop) => {}
        }
    }
    Ok(stats)
}

/// One purge: the horizon, then chunk after chunk until none is left.
async fn purge(
    cfg: &Config,
    store: &mut Option<Store>,
    now: chrono::DateTime<chrono::Utc>,
    window: chrono::TimeDelta,
    stats: &mut PurgeStats,
) -> Result<(), StoreError> {
    if store.as_ref().is_none_or(Store::is_closed) {
        *store = Some(Store::connect(&cfg.postgres).await?);
    }
    let s = store.as_mut().expect("connected above");
    let horizon = s.advance_dedupe_horizon(now, window).await?;
    let started = Instant::now();
    let mut deleted = 0;
    loop {
        let chunk = Instant::now();
        let (n, done) = s
            .delete_claims_before(horizon, DEDUPE_PURGE_CHUNK_ROWS as u64)
            .await?;
        deleted += n;
        stats.deleted += n;
        crate::metrics::purged_claims(n);
        if done {
            break;
        }
        // A third of one core at most: twice as long a pause as the statement took.
        tokio::time::sleep(chunk.elapsed() * 2).await;
    }
    stats.purges += 1;
    stats.first_done.get_or_insert_with(Instant::now);
    if deleted > 0 {
        tracing::info!(purged = deleted, %horizon, elapsed_ms = started.elapsed().as_millis() as u64, "purged expired dedupe claims");
    }
    Ok(())
}
