//! The scheduler inside `tally run`: at every tick, accounts whose billing cycle ended get
//! their reset (unused allowance expires, the new allowance is granted), grants past their
//! expiry expire, and time-based alerts (credits expiring) are evaluated — even for accounts
//! with no traffic. Every instance may run it: accounts are locked, so a second instance finds
//! nothing left to do.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::ledger::Store;
use crate::retry::{Halt, Retry};

/// Ticks every `pipeline.scheduler_interval_ms` until shutdown. Transient faults are retried
/// with back-off; anything else ends the loop with its error (a tick that fails for its data
/// would fail again at every tick: a bug to fix, not to skip).
pub async fn run(
    cfg: Arc<Config>,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let interval = Duration::from_millis(cfg.pipeline.scheduler_interval_ms);
    let mut retry = Retry::with_policy(cfg.pipeline.retry_policy(), shutdown.clone());
    let mut store: Option<Store> = None;
    let mut ticks = 0u64;
    while !*shutdown.borrow() {
        let attempt = async {
            if store.as_ref().is_none_or(Store::is_closed) {
                let mut s = Store::connect(&cfg.postgres).await?;
                s.alert_defaults = cfg.alerts.defaults();
                s.grace = cfg.billing.grace();
                store = Some(s);
            }
            let s = store.as_mut().expect("connected above");
            s.tick(clock.now()).await
        };
        let tick = match retry.settle("scheduler tick", attempt.await).await {
            Ok(Some(n)) => Ok(n),
            Ok(None) => continue,
            Err(halt) => Err(halt),
        };
        match tick {
            Ok(_) => {
                ticks += 1;
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Err(Halt::Shutdown) => break,
            Err(Halt::Failed(e)) => return Err(anyhow::anyhow!("scheduler tick: {e}")),
        }
    }
    Ok(ticks)
}
