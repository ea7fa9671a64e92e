//! One retry policy for every loop: an error is classified once, where it is made
//! ([`Classify`]), and the loop's [`Retry`] decides what that means — a transient fault waits
//! with exponential back-off and tries again, an input fault is isolated and dead-lettered
//! ([`isolate`]), a bug stops the loop loudly. Every wait ends early on shutdown.
//! Vector's `RetryLogic` is the model: the sink says what is retriable, the policy does the rest.
//! A leaf below the loops (`pipeline`, the Kafka consumer): it knows configuration and
//! metrics, nothing of stores or Kafka.

use std::fmt::Display;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use tokio::sync::watch;

pub use crate::fault::{Classify, Fault};

/// Why a retried operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Halt<E> {
    /// Shutdown was requested while waiting to retry: nothing was done, nothing is lost (the
    /// batch in hand is read again at the next start).
    #[error("shutdown requested while retrying")]
    Shutdown,
    /// A fault that retrying cannot cure ([`Fault::Input`] or [`Fault::Bug`]).
    #[error("{0}")]
    Failed(E),
}

/// Shutdown was requested while waiting to retry ([`Retry::pause`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown;

impl<E> From<Shutdown> for Halt<E> {
    fn from(_: Shutdown) -> Self {
        Halt::Shutdown
    }
}

impl<E> Halt<E> {
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> Halt<F> {
        match self {
            Halt::Shutdown => Halt::Shutdown,
            Halt::Failed(e) => Halt::Failed(f(e)),
        }
    }
}

/// The back-off bounds: the first wait, doubled after each failure up to the longest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// 200 ms doubling up to 10 s (`pipeline.retry_initial_ms`, `pipeline.retry_max_ms`).
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
    };

    /// From milliseconds; the longest wait is never below the first.
    pub fn from_millis(initial_ms: u64, max_ms: u64) -> Self {
        RetryPolicy {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms.max(initial_ms)),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Exponential back-off between `retry_initial_ms` and `retry_max_ms`, cut short by shutdown.
#[derive(Debug, Clone)]
pub struct Retry {
    policy: RetryPolicy,
    next: Duration,
    attempts: u32,
    shutdown: watch::Receiver<bool>,
}

impl Retry {
    pub fn with_policy(policy: RetryPolicy, shutdown: watch::Receiver<bool>) -> Self {
        Retry {
            policy,
            next: policy.initial,
            attempts: 0,
            shutdown,
        }
    }

    /// True once shutdown was requested.
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Failed attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Records a success: the next failure waits the initial delay again.
    pub fn succeeded(&mut self, what: &str) {
        if self.attempts > 0 {
            tracing::info!(what, attempts = self.attempts, "recovered");
        }
        self.attempts = 0;
        self.next = self.policy.initial;
    }

    /// After a transient failure of `what`: logs it and waits the back-off. Returns
    /// [`Shutdown`] at once when shutdown is (or becomes) requested. (The error is logged
    /// before the wait, so the returned future does not hold it.)
    pub fn pause(
        &mut self,
        what: &str,
        error: &dyn Display,
    ) -> impl std::future::Future<Output = Result<(), Shutdown>> + Send + '_ {
        self.attempts += 1;
        tracing::warn!(what, attempt = self.attempts, error = %error, retry_in_ms = self.next.as_millis() as u64, "failed; retrying");
        crate::metrics::retry(what);
        let wait = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        async move {
            if self.stopping() {
                return Err(Shutdown);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.changed() => {}
            }
            if self.stopping() {
                return Err(Shutdown);
            }
            Ok(())
        }
    }

    /// Settles one attempt of `what` for a loop that cannot hand [`Retry::run`] a closure
    /// (it reconnects a `&mut` client between attempts): `Ok(Some(v))` on success,
    /// `Ok(None)` after a transient fault and its back-off (try again), `Err` on shutdown or
    /// a fault retrying cannot cure.
    pub async fn settle<T, E: Classify>(
        &mut self,
        what: &str,
        attempt: Result<T, E>,
    ) -> Result<Option<T>, Halt<E>> {
        match attempt {
            Ok(v) => {
                self.succeeded(what);
                Ok(Some(v))
            }
            Err(e) if e.fault() == Fault::Transient => {
                self.pause(what, &e).await?;
                Ok(None)
            }
            Err(e) => Err(Halt::Failed(e)),
        }
    }

    /// Runs `op` until it succeeds, retrying transient faults; an input fault or a bug is
    /// returned as [`Halt::Failed`] at once.
    pub async fn run<T, E, F, Fut>(&mut self, what: &str, mut op: F) -> Result<T, Halt<E>>
    where
        E: Classify,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        loop {
            if let Some(v) = self.settle(what, op().await).await? {
                return Ok(v);
            }
        }
    }
}

/// What [`isolate`] applies: a part of a batch, as a range of indices, atomically.
pub trait ApplyPart {
    type Error: Classify + Send;
    fn apply(&mut self, part: Range<usize>)
        -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A record the store refused, found by [`isolate`]: its index in the slice and the error.
#[derive(Debug)]
pub struct Refused<E> {
    pub index: usize,
    pub error: E,
}

/// A bug met while applying one record alone: its index and the error.
#[derive(Debug)]
pub struct BugAt<E> {
    pub index: usize,
    pub error: E,
}

/// Applies the records `0..len` in order, in parts (`apply` gets a range of indices): a part
/// the store refuses for its data is split in
/// halves until each refused record stands alone. Transient faults are retried (the same
/// part again). Returns the refused records (the caller dead-letters them); every other
/// record was applied, in order. A bug stops at the first record that fails alone with it.
///
/// `apply` must be atomic per call (all of the part or nothing), and idempotent for records
/// already applied (the ledger's dedupe claims, ClickHouse's identity check).
pub async fn isolate<A: ApplyPart>(
    len: usize,
    retry: &mut Retry,
    what: &str,
    target: &mut A,
) -> Result<Vec<Refused<A::Error>>, Halt<BugAt<A::Error>>> {
    let mut refused = Vec::new();
    // Parts still to apply, the next one last.
    let mut parts: Vec<Range<usize>> = Vec::new();
    parts.push(0..len);
    while let Some(part) = parts.pop() {
        if part.is_empty() {
            continue;
        }
        loop {
            let error = match target.apply(part.clone()).await {
                Ok(()) => {
                    retry.succeeded(what);
                    break;
                }
                Err(e) => e,
            };
            match error.fault() {
                Fault::Transient => retry.pause(what, &error).await?,
                fault if part.len() == 1 => {
                    if fault == Fault::Bug {
                        return Err(Halt::Failed(BugAt {
                            index: part.start,
                            error,
                        }));
                    }
                    refused.push(Refused {
                        index: part.start,
                        error,
                    });
                    break;
                }
                _ => {
                    let mid = part.start + part.len() / 2;
                    parts.push(mid..part.end);
                    parts.push(part.start..mid);
                    break;
                }
            }
        }
    }
    Ok(refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[derive(Debug)]
    struct E(Fault);
    impl Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl Classify for E {
        fn fault(&self) -> Fault {
            self.0
        }
    }

    fn retry() -> (watch::Sender<bool>, Retry) {
        let (tx, rx) = watch::channel(false);
        (tx, Retry::with_policy(RetryPolicy::from_millis(1, 2), rx))
    }

    /// A store that refuses parts holding a poison record, fails transiently every third call,
    /// and keeps what it applied.
    struct Fake {
        poison: BTreeSet<u32>,
        bug: Option<u32>,
        calls: u32,
        applied: Vec<u32>,
    }

    struct Part<'a> {
        items: &'a [u32],
        store: &'a mut Fake,
    }

    impl ApplyPart for Part<'_> {
        type Error = E;
        async fn apply(&mut self, part: Range<usize>) -> Result<(), E> {
            self.store.apply(&self.items[part])
        }
    }

    impl Fake {
        fn apply(&mut self, part: &[u32]) -> Result<(), E> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(E(Fault::Transient));
            }
            if part.iter().any(|i| Some(*i) == self.bug) {
                return Err(E(Fault::Bug));
            }
            if part.iter().any(|i| self.poison.contains(i)) {
                return Err(E(Fault::Input));
            }
            self.applied.extend_from_slice(part);
            Ok(())
        }
    }

    #[tokio::test]
    async fn isolates_every_refused_record_and_applies_the_rest_in_order() {
        for poison in [
            vec![],
            vec![0],
            vec![99],
            vec![3, 4, 5],
            vec![0, 17, 18, 63, 99],
        ] {
            let items: Vec<u32> = (0..100).collect();
            let (_tx, mut retry) = retry();
            let mut store = Fake {
                poison: poison.iter().copied().collect(),
                bug: None,
                calls: 0,
                applied: vec![],
            };
            let mut target = Part {
                items: &items,
                store: &mut store,
            };
            let refused = isolate(items.len(), &mut retry, "t", &mut target)
                .await
                .unwrap();
            let refused: Vec<u32> = refused.iter().map(|r| items[r.index]).collect();
            assert_eq!(refused, poison);
            let expected: Vec<u32> = items
                .iter()
                .copied()
                .filter(|i| !poison.contains(i))
                .collect();
            assert_eq!(store.applied, expected);
        }
    }

    #[tokio::test]
    async fn a_bug_names_the_record_that_fails_alone() {
        let items: Vec<u32> = (0..50).collect();
        let (_tx, mut retry) = retry();
        let mut store = Fake {
            poison: [7].into_iter().collect(),
            bug: Some(31),
            calls: 0,
            applied: vec![],
        };
        let mut target = Part {
            items: &items,
            store: &mut store,
        };
        let err = isolate(items.len(), &mut retry, "t", &mut target)
            .await
            .unwrap_err();
        match err {
            Halt::Failed(BugAt { index, error }) => {
                assert_eq!(index, 31);
                assert_eq!(error.0, Fault::Bug);
            }
            Halt::Shutdown => panic!("not a shutdown"),
        }
        // Everything before the bug except the poison record was applied, nothing after it.
        let expected: Vec<u32> = (0..31).filter(|i| *i != 7).collect();
        assert_eq!(store.applied, expected);
    }

    #[tokio::test]
    async fn shutdown_ends_a_transient_outage() {
        let (tx, mut retry) = retry();
        let mut calls = 0;
        let result = retry
            .run("t", || {
                calls += 1;
                if calls == 4 {
                    tx.send(true).unwrap();
                }
                std::future::ready(Err::<(), _>(E(Fault::Transient)))
            })
            .await;
        assert!(matches!(result, Err(Halt::Shutdown)));
        assert_eq!(calls, 4);
    }

    #[tokio::test]
    async fn run_retries_transient_faults_and_returns_others_at_once() {
        let (_tx, mut retry) = retry();
        let mut calls = 0;
        let ok = retry
            .run("t", || {
                calls += 1;
                std::future::ready(if calls < 20 {
                    Err(E(Fault::Transient))
                } else {
                    Ok(calls)
                })
            })
            .await
            .unwrap();
        assert_eq!(ok, 20);
        assert_eq!(retry.attempts(), 0);
        let mut calls = 0;
        let err = retry
            .run("t", || {
                calls += 1;
                std::future::ready(Err::<(), _>(E(Fault::Input)))
            })
            .await;
        assert!(matches!(err, Err(Halt::Failed(E(Fault::Input)))));
        assert_eq!(calls, 1);
    }
}
