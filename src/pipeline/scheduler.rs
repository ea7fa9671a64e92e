//! The scheduler inside `tally run`: at every tick, accounts whose billing cycle ended get
//! their reset (unused allowance expires, the new allowance is granted), grants past their
//! expiry expire, and time-based alerts (credits expiring) are evaluated — even for accounts
//! with no traffic. Every instance may run it: accounts are locked, so a second instance finds
//! nothing left to do.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Backoff;
use crate::clock::Clock;
use crate::config::Config;
use crate::ledger::Store;

pub async fn run(
    cfg: Arc<Config>,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let interval = Duration::from_millis(cfg.pipeline.scheduler_interval_ms);
    let mut backoff = Backoff::new(&cfg.pipeline);
    let mut store: Option<Store> = None;
    let mut ticks = 0u64;
    while !*shutdown.borrow() {
        let result = match store.as_mut() {
            Some(s) => s.tick(clock.now()).await.map_err(anyhow::Error::from),
            None => match Store::connect(&cfg.postgres).await {
                Ok(mut s) => {
                    s.alert_defaults = cfg.alerts.defaults();
                    store = Some(s);
                    continue;
                }
                Err(e) => Err(e.into()),
            },
        };
        match result {
            Ok(_) => {
                ticks += 1;
                backoff.reset();
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduler tick failed; retrying");
                if store.as_ref().is_some_and(Store::is_closed) {
                    store = None;
                }
                backoff.wait().await;
            }
        }
    }
    Ok(ticks)
}
