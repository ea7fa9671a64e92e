//! The scheduler's tick (cycle resets and expiries written on time, holds past their TTL)
//! and the dedupe purge.

use chrono::{DateTime, SubsecRound, Utc};

use crate::alerts::{self};

use super::*;

impl Store {
    /// The scheduler's step at `now`: every account whose final point lags (`now - grace`),
    /// whose cycle ended or whose grant expired by then is finalized there ([`Book::finalize`]:
    /// resets and expiries as entries, closed cycles made final), and accounts whose grants
    /// expire within the alert window get their alerts, even without traffic. Returns the
    /// accounts touched.
    ///
    /// An account another transaction holds (a ledger batch, another instance's tick) is
    /// skipped (`FOR UPDATE SKIP LOCKED`), not waited for: it stays due, and the next tick
    /// takes it. So N instances' schedulers split the due accounts and never queue behind
    /// each other or behind the ledger.
    pub async fn tick(&mut self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        // Holds whose TTL passed are marked expired, ended holds past their retention purged
        // (their own short statements, before the accounts' transaction).
        let (expired, purged) = self.expire_holds(now).await?;
        if expired + purged > 0 {
            tracing::info!(expired, purged, %now, "holds expired and purged");
        }
        self.prepare().await?;
        let st = self.stmts.as_ref().expect("prepared above");
        let tx = self.client.transaction().await?;
        // Whole microseconds, as PostgreSQL stores times: `at < until` means the same in SQL
        // and in the book.
        let until = (now - self.grace).trunc_subsecs(6);
        let horizon = now + self.alert_defaults.expiring_within;
        let rows = tx
            .query(
                "SELECT account_id FROM accounts WHERE account_id IN (
                    (SELECT account_id FROM accounts WHERE due_at <= $1 ORDER BY due_at LIMIT 1000)
                    UNION
                    SELECT g.account_id FROM grants g
                    WHERE g.remaining > 0 AND g.expires_at <= $3 AND g.expires_at > $2
                      AND g.kind <> 'allowance' AND NOT EXISTS (
                           SELECT 1 FROM alert_state s WHERE s.account_id = g.account_id
                             AND s.alert_key = 'credits_expiring:' || g.grant_id || ':'
                                               || extract(epoch FROM g.expires_at)::bigint))
                 ORDER BY account_id
                 FOR UPDATE SKIP LOCKED",
                &[&until, &now, &horizon],
            )
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut locked = lock_accounts(&tx, st, &ids).await?;
        let folded = load_folded(&tx, &ids, until).await?;
        let mut rows = EntryRows::default();
        let mut fired = Vec::new();
        let mut finals = Vec::new();
        let locked_ids: Vec<String> = locked.books.keys().cloned().collect();
        for id in &locked_ids {
            let book = locked.books.get_mut(id).expect("locked above");
            let window = folded.get(id).cloned().unwrap_or_default();
            let (lines, closed) = book.finalize(until, window);
            if book.final_at() == Some(until) {
                locked.checkpoints.insert(id.clone());
            }
            for line in &lines {
                rows.push(id, None, &line.entry);
            }
            finals.extend(closed.into_iter().map(|c| (id.clone(), c)));
            let state = locked.alerts.entry(id.clone()).or_default();
            let view = book.view(now);
            fired.extend(alerts::evaluate(&view, now, &self.alert_defaults, state));
        }
        let touched = locked.books.len();
        tx.execute(
            "DELETE FROM open_events WHERE account_id = ANY($1) AND at < $2",
            &[&ids, &until],
        )
        .await?;
        write_back(&tx, st, &locked, &rows, &fired, &finals).await?;
        fail::fail_point!("tick-before-commit", |_| std::process::abort());
        tx.commit().await?;
        if touched > 0 {
            tracing::info!(accounts = touched, entries = rows.len(), alerts = fired.len(), %now, %until, "scheduler tick");
        }
        Ok(touched)
    }

    /// Purges dedupe claims by event time, with Tally's clock (`now`, the clock admission
    /// uses): [`Store::advance_dedupe_horizon`], then [`Store::delete_claims_before`] the
    /// stored horizon, at most about `max_rows` per call.
    pub async fn purge_dedupe(
        &mut self,
        now: DateTime<Utc>,
        window: chrono::TimeDelta,
        max_rows: u64,
    ) -> Result<PurgeOutcome, StoreError> {
        let horizon = self.advance_dedupe_horizon(now, window).await?;
        let (deleted, done) = self.delete_claims_before(horizon, max_rows).await?;
        Ok(PurgeOutcome {
            deleted,
            horizon,
            done,
        })
    }

    /// Moves the stored dedupe horizon to `now - window - margin` ([`dedupe_cutoff`]; never
    /// backwards) and returns it.
    ///
    /// The horizon is committed under the advisory lock every claiming transaction holds
    /// shared ([`claim`]): transactions that read the old horizon have committed when this
    /// returns, and every later one refuses events dated before the new horizon. So no event
    /// whose claim is deleted after this can be claimed again, whatever the window is later.
    /// (The lock waits for the batches in flight: call it once per purge, not per chunk.)
    pub async fn advance_dedupe_horizon(
        &mut self,
        now: DateTime<Utc>,
        window: chrono::TimeDelta,
    ) -> Result<DateTime<Utc>, StoreError> {
        let tx = self.client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(7421002, hashtext(current_schema()))",
            &[],
        )
        .await?;
        let horizon: DateTime<Utc> = tx
            .query_one(
                "INSERT INTO dedupe_horizon (singleton, purged_before) VALUES (true, $1)
                 ON CONFLICT (singleton) DO UPDATE
                 SET purged_before = GREATEST(dedupe_horizon.purged_before, EXCLUDED.purged_before),
                     updated_at = now()
                 RETURNING purged_before",
                &[&dedupe_cutoff(now, window)],
            )
            .await?
            .get(0);
        tx.commit().await?;
        Ok(horizon)
    }

    /// Deletes claims of events dated before `horizon` (a horizon stored by
    /// [`Store::advance_dedupe_horizon`], never a later one), in statements of
    /// [`DEDUPE_PURGE_CHUNK_ROWS`] each, at most about `max_rows`: (deleted, done), done
    /// false when claims are left. Each statement skips the claims another instance's purge
    /// is deleting (`SKIP LOCKED`), so N instances purging at once share the work instead of
    /// queueing on the same rows; none waits for a ledger batch (it deletes only claims no
    /// batch can insert any more).
    pub async fn delete_claims_before(
        &mut self,
        horizon: DateTime<Utc>,
        max_rows: u64,
    ) -> Result<(u64, bool), StoreError> {
        let mut deleted = 0;
        loop {
            let n = self
                .client
                .execute(
                    "DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM processed_events WHERE event_time < $1 LIMIT $2
                         FOR UPDATE SKIP LOCKED))",
                    &[&horizon, &DEDUPE_PURGE_CHUNK_ROWS],
                )
                .await?;
            deleted += n;
            if n < DEDUPE_PURGE_CHUNK_ROWS as u64 {
                return Ok((deleted, true));
            }
            if deleted >= max_rows {
                return Ok((deleted, false));
            }
        }
    }

    /// The stored dedupe horizon (None: nothing purged by event time yet).
    pub async fn dedupe_horizon(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self
            .client
            .query_opt("SELECT purged_before FROM dedupe_horizon", &[])
            .await?
            .map(|r| r.get(0)))
    }
}
