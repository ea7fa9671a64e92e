//! What this process knows about its consumer groups: how many partitions each consumer holds
//! and since when it has held none. The consumers' rebalance callbacks write it; `/readyz`,
//! idle exit (`tally run --idle-exit-secs`) and the `tally_consumer_assigned_partitions` gauge
//! read it. Process-wide, one entry per live consumer; touches no broker and no store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// A warning about a group without partitions is repeated at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static REGISTRY: LazyLock<Mutex<BTreeMap<u64, Arc<Entry>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

struct Entry {
    pipeline: String,
    group_id: String,
    alert_after: Duration,
    state: Mutex<State>,
}

struct State {
    partitions: usize,
    /// Set while the consumer holds no partition: when that started (monotonic, and the wall
    /// clock for people).
    unassigned_since: Option<(Instant, DateTime<Utc>)>,
    /// When the next warning is due while unassigned; `Some` once one was logged.
    next_warning: Option<Instant>,
}

/// One consumer's assignment state, as reported by [`statuses`] and [`GroupHealth::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// "ledger" or "analytics".
    pub pipeline: String,
    pub group_id: String,
    pub assigned_partitions: usize,
    /// Since when the consumer has held no partition (None: it holds some).
    pub unassigned_since: Option<DateTime<Utc>>,
    /// How long it has held none (zero when it holds some).
    pub unassigned_for: Duration,
    /// Held none for longer than `kafka.unassigned_alert_ms`.
    pub alerting: bool,
}

/// A consumer's entry in the registry; removed (and its gauge with it) when dropped.
pub struct GroupHealth {
    id: u64,
    entry: Arc<Entry>,
}

impl GroupHealth {
    /// Registers a consumer that holds no partition yet.
    pub fn register(pipeline: &str, group_id: &str, alert_after: Duration) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            pipeline: pipeline.to_owned(),
            group_id: group_id.to_owned(),
            alert_after,
            state: Mutex::new(State {
                partitions: 0,
                unassigned_since: Some((Instant::now(), Utc::now())),
                next_warning: None,
            }),
        });
        REGISTRY
            .lock()
            .expect("group registry lock")
            .insert(id, entry.clone());
        crate::metrics::set_assigned_partitions(pipeline, group_id, 0);
        GroupHealth { id, entry }
    }

    /// The consumer now holds `partitions` partitions (0: an empty assignment).
    pub fn assigned(&self, partitions: usize) {
        let e = &self.entry;
        crate::metrics::set_assigned_partitions(&e.pipeline, &e.group_id, partitions as i64);
        let mut state = e.state.lock().expect("group state lock");
        state.partitions = partitions;
        if partitions == 0 {
            state
                .unassigned_since
                .get_or_insert_with(|| (Instant::now(), Utc::now()));
            return;
        }
        if let Some((since, _)) = state.unassigned_since.take() {
            if state.next_warning.take().is_some() {
                tracing::info!(
                    pipeline = %e.pipeline,
                    group = %e.group_id,
                    partitions,
                    unassigned_ms = since.elapsed().as_millis() as u64,
                    "consumer group has partitions again"
                );
            }
        }
    }

    /// The consumer's partitions were revoked (a rebalance starts, or the group was left).
    pub fn revoked(&self) {
        self.assigned(0);
    }

    /// Logs a warning when the consumer has held no partition for longer than the alert
    /// time: once when that happens, then at most once a minute while it lasts. Cheap; call
    /// it as often as convenient.
    pub fn check(&self) {
        let e = &self.entry;
        let mut state = e.state.lock().expect("group state lock");
        let Some((since, since_utc)) = state.unassigned_since else {
            return;
        };
        let now = Instant::now();
        let unassigned_for = now.duration_since(since);
        if unassigned_for <= e.alert_after || state.next_warning.is_some_and(|due| now < due) {
            return;
        }
        state.next_warning = Some(now + WARN_EVERY.max(e.alert_after));
        tracing::warn!(
            pipeline = %e.pipeline,
            group = %e.group_id,
            unassigned_since = %since_utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            unassigned_ms = unassigned_for.as_millis() as u64,
            alert_ms = e.alert_after.as_millis() as u64,
            "consumer group has no partitions assigned (longer than kafka.unassigned_alert_ms): this process consumes nothing for it"
        );
    }

    pub fn status(&self) -> GroupStatus {
        self.entry.status()
    }
}

impl Drop for GroupHealth {
    fn drop(&mut self) {
        REGISTRY
            .lock()
            .expect("group registry lock")
            .remove(&self.id);
        let e = &self.entry;
        let others = REGISTRY
            .lock()
            .expect("group registry lock")
            .values()
            .any(|o| o.pipeline == e.pipeline && o.group_id == e.group_id);
        if !others {
            crate::metrics::remove_assigned_partitions(&e.pipeline, &e.group_id);
        }
    }
}

impl Entry {
    fn status(&self) -> GroupStatus {
        let state = self.state.lock().expect("group state lock");
        let unassigned_for = state
            .unassigned_since
            .map(|(since, _)| since.elapsed())
            .unwrap_or_default();
        GroupStatus {
            pipeline: self.pipeline.clone(),
            group_id: self.group_id.clone(),
            assigned_partitions: state.partitions,
            unassigned_since: state.unassigned_since.map(|(_, utc)| utc),
            unassigned_for,
            alerting: state.unassigned_since.is_some() && unassigned_for > self.alert_after,
        }
    }
}

/// Every live consumer of this process whose group is one of `group_ids`, in registration
/// order.
pub fn statuses(group_ids: &[&str]) -> Vec<GroupStatus> {
    let entries: Vec<Arc<Entry>> = REGISTRY
        .lock()
        .expect("group registry lock")
        .values()
        .filter(|e| group_ids.contains(&e.group_id.as_str()))
        .cloned()
        .collect();
    entries.iter().map(|e| e.status()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_assignment_and_alerts_after_the_threshold() {
        let group = "unit-groups-alert";
        let h = GroupHealth::register("ledger", group, Duration::from_millis(30));
        let s = h.status();
        assert_eq!(s.assigned_partitions, 0);
        assert!(s.unassigned_since.is_some());
        assert!(!s.alerting);
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.status().alerting);
        h.check();
        h.assigned(3);
        let s = h.status();
        assert_eq!(s.assigned_partitions, 3);
        assert_eq!(s.unassigned_since, None);
        assert_eq!(s.unassigned_for, Duration::ZERO);
        assert!(!s.alerting);
        h.revoked();
        let s = h.status();
        assert_eq!(s.assigned_partitions, 0);
        assert!(s.unassigned_since.is_some());
        assert!(!s.alerting, "a fresh rebalance is not a fault");
        // An empty assignment keeps the time it started.
        let since = s.unassigned_since;
        h.assigned(0);
        assert_eq!(h.status().unassigned_since, since);
        assert_eq!(statuses(&[group]).len(), 1);
        assert!(crate::metrics::render().contains(&format!(
            "tally_consumer_assigned_partitions{{group=\"{group}\",pipeline=\"ledger\"}} 0"
        )));
        drop(h);
        assert!(statuses(&[group]).is_empty());
        assert!(!crate::metrics::render().contains(group));
    }

    #[test]
    fn statuses_filter_by_group() {
        let a = GroupHealth::register("ledger", "unit-groups-a", Duration::from_secs(30));
        let _b = GroupHealth::register("analytics", "unit-groups-b", Duration::from_secs(30));
        a.assigned(2);
        let s = statuses(&["unit-groups-a"]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].pipeline, "ledger");
        assert_eq!(s[0].assigned_partitions, 2);
        assert_eq!(statuses(&["unit-groups-a", "unit-groups-b"]).len(), 2);
    }
}
