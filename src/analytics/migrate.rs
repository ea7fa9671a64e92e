//! Versioned ClickHouse migrations (schemas/clickhouse/NNNN_name.sql), recorded in a
//! `schema_migrations` table. Every statement is `IF NOT EXISTS`, so running `migrate` twice,
//! concurrently, or after a half-applied migration is harmless (ClickHouse has no
//! transactional DDL: re-running is the recovery).

use clickhouse::Row;
use serde::Deserialize;

use super::sink::{client, run_timed, QUERY_TIMEOUT};
use super::AnalyticsError;
use super::ClickHouseConfig;

/// (version, name, SQL with `{database}` placeholders), embedded at build time.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "rated_events",
        include_str!("../../schemas/clickhouse/0001_rated_events.sql"),
    ),
    (
        2,
        "usage_rollups",
        include_str!("../../schemas/clickhouse/0002_usage_rollups.sql"),
    ),
    (
        3,
        "late_usage",
        include_str!("../../schemas/clickhouse/0003_late_usage.sql"),
    ),
    (
        4,
        "convergent_rollups",
        include_str!("../../schemas/clickhouse/0004_convergent_rollups.sql"),
    ),
    (
        5,
        "identity_hash",
        include_str!("../../schemas/clickhouse/0005_identity_hash.sql"),
    ),
    (
        6,
        "usage_voids",
        include_str!("../../schemas/clickhouse/0006_usage_voids.sql"),
    ),
];

/// The statements that precede every migration: the database and the table recording the
/// applied versions (both idempotent).
pub fn bootstrap(database: &str) -> [String; 2] {
    [
        format!("CREATE DATABASE IF NOT EXISTS {database}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.schema_migrations \
             (version UInt32, name String, applied_at DateTime('UTC')) \
             ENGINE = ReplacingMergeTree ORDER BY version"
        ),
    ]
}

/// Creates the database and applies the migrations not yet recorded; returns the versions
/// applied now (empty when the schema is up to date).
pub async fn migrate(cfg: &ClickHouseConfig) -> Result<Vec<u32>, AnalyticsError> {
    let db = &cfg.database;
    if !crate::names::valid_identifier(db) {
        return Err(AnalyticsError::InvalidDatabase(db.clone()));
    }
    // No default database: it may not exist yet. Every name below is qualified.
    let ch = client(cfg, None);
    let ddl = |sql: String| {
        let ch = ch.clone();
        async move { run_timed("migrate", QUERY_TIMEOUT, ch.query(&sql).execute()).await }
    };
    for statement in bootstrap(db) {
        ddl(statement).await?;
    }

    #[derive(Row, Deserialize)]
    struct Version {
        version: u32,
    }
    let done: Vec<u32> = run_timed(
        "read schema_migrations",
        QUERY_TIMEOUT,
        ch.query(&format!(
            "SELECT DISTINCT version FROM {db}.schema_migrations"
        ))
        .fetch_all::<Version>(),
    )
    .await?
    .into_iter()
    .map(|v| v.version)
    .collect();

    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        for (i, statement) in statements(sql, db).into_iter().enumerate() {
            let run = run_timed("migrate", QUERY_TIMEOUT, ch.query(&statement).execute()).await;
            if let Err(AnalyticsError::ClickHouse { source, .. }) = run {
                return Err(AnalyticsError::Migration {
                    version,
                    statement: i + 1,
                    source,
                });
            }
            run?;
        }
        ddl(format!(
            "INSERT INTO {db}.schema_migrations (version, name, applied_at) \
             VALUES ({version}, '{name}', now())"
        ))
        .await?;
        tracing::info!(version, name, database = %db, "applied ClickHouse migration");
        applied.push(version);
    }
    Ok(applied)
}

/// The statements of a migration file: full-line `--` comments dropped, split on `;`,
/// `{database}` replaced.
pub fn statements(sql: &str, database: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("{database}", database))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements() {
        let st = statements(MIGRATIONS[0].2, "tally_x");
        assert_eq!(st.len(), 4);
        assert!(st[0].starts_with("CREATE TABLE IF NOT EXISTS tally_x.rated_events"));
        for s in &st {
            assert!(
                !s.contains("{database}") && !s.contains("--") && !s.contains('?'),
                "{s}"
            );
            assert!(s.contains("IF NOT EXISTS"), "{s}");
        }
    }

    #[test]
    fn rollup_statements_are_idempotent() {
        let st = statements(MIGRATIONS[1].2, "tally_x");
        assert_eq!(st.len(), 6);
        for s in &st {
            assert!(!s.contains("{database}") && !s.contains("--"), "{s}");
            // DDL is IF NOT EXISTS; a backfill only fills an empty roll-up.
            assert!(s.contains("IF NOT EXISTS") || s.contains(") = 0"), "{s}");
        }
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, (version, _, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
        }
    }
}
