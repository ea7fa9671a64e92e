//! The scheduler's tick (cycle resets and expiries written on time) and the dedupe purge.

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
    /// uses): the stored horizon moves to `now - window - margin` ([`dedupe_cutoff`]; never
    /// backwards), then every day partition of claims whose whole day is before the stored
    /// horizon is dropped, and the claims of the default partition dated before it are
    /// deleted in statements of [`DEDUPE_PURGE_CHUNK_ROWS`] each, at most about `max_rows`
    /// per call. The days from yesterday to the day after tomorrow get their partitions
    /// first, so claims rarely wait for one to be made.
    ///
    /// The horizon is committed first, under the advisory lock every claiming transaction
    /// holds shared ([`claim`]): transactions that read the old horizon have committed when
    /// the drops and deletes start, and every later one refuses events dated before the new
    /// horizon. So no event whose claim is purged can be claimed again, whatever the window
    /// is later.
    ///
    /// A drop takes `processed_events`' lock for a moment: it waits (at most
    /// [`DEDUPE_DROP_LOCK_TIMEOUT`]) for the batches in flight, and batches wait for it; past
    /// that it gives up and the purge is not done (the ledger calls again after its next
    /// batch). Each chunk skips the claims another instance's purge is deleting (`SKIP
    /// LOCKED`), so N instances purging at once share the work instead of queueing.
    /// `deleted` counts the claims removed: those of a dropped day exactly, unless the
    /// planner's statistics put it over a million (then their estimate, to spare a scan).
    pub async fn purge_dedupe(
        &mut self,
        now: DateTime<Utc>,
        window: chrono::TimeDelta,
        max_rows: u64,
    ) -> Result<PurgeOutcome, StoreError> {
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
        let today = now.date_naive();
        self.ensure_claim_days((-1..=2).map(|d| today + chrono::TimeDelta::days(d)))
            .await?;
        let mut deleted = 0;
        let mut done = true;
        for (day, part) in self.claim_partitions().await? {
            // Every claim of `day` is dated before the next midnight (UTC).
            let next = (day + chrono::TimeDelta::days(1))
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc();
            if next > horizon {
                continue;
            }
            let counted = self.claims_in(&part).await?;
            let tx = self.client.transaction().await?;
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '{}ms'",
                DEDUPE_DROP_LOCK_TIMEOUT.as_millis()
            ))
            .await?;
            match tx
                .batch_execute(&format!("DROP TABLE IF EXISTS \"{part}\""))
                .await
            {
                Ok(()) => {
                    tx.commit().await?;
                    self.claim_days.remove(&day);
                    deleted += counted;
                    tracing::info!(%day, claims = counted, "dropped a day of dedupe claims");
                }
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    tracing::info!(%day, "dropping a day of dedupe claims waited too long for the batches in flight; again after the next batch");
                    done = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !done {
            return Ok(PurgeOutcome {
                deleted,
                horizon,
                done,
            });
        }
        let mut chunked = 0;
        loop {
            let n = self
                .client
                .execute(
                    "DELETE FROM processed_events_default WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM processed_events_default WHERE event_time < $1 LIMIT $2
                         FOR UPDATE SKIP LOCKED))",
                    &[&horizon, &DEDUPE_PURGE_CHUNK_ROWS],
                )
                .await?;
            chunked += n;
            deleted += n;
            if n < DEDUPE_PURGE_CHUNK_ROWS as u64 {
                return Ok(PurgeOutcome {
                    deleted,
                    horizon,
                    done: true,
                });
            }
            if chunked >= max_rows {
                return Ok(PurgeOutcome {
                    deleted,
                    horizon,
                    done: false,
                });
            }
        }
    }

    /// The day partitions of `processed_events`: (day, table name), oldest first.
    async fn claim_partitions(&self) -> Result<Vec<(chrono::NaiveDate, String)>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'processed_events'::regclass
                   AND c.relname LIKE 'processed\\_events\\_d%'
                 ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let day = chrono::NaiveDate::parse_from_str(
                    name.strip_prefix("processed_events_d")?,
                    "%Y%m%d",
                )
                .ok()?;
                Some((day, name))
            })
            .collect())
    }

    /// The claims a partition holds: counted, unless the statistics say over a million.
    async fn claims_in(&self, part: &str) -> Result<u64, StoreError> {
        let estimate: f32 = self
            .client
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)",
                &[&part],
            )
            .await?
            .get(0);
        if estimate > 1e6 {
            return Ok(estimate as u64);
        }
        let n: i64 = self
            .client
            .query_one(&format!("SELECT count(*) FROM \"{part}\""), &[])
            .await?
            .get(0);
        Ok(n as u64)
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
