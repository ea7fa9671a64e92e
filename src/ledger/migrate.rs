//! Versioned PostgreSQL migrations (schemas/postgres/NNNN_name.sql), applied once each,
//! in order, inside the configured schema, under an advisory lock so concurrent
//! `tally migrate` runs do not race.

use tokio_postgres::Client;

/// (version, name, SQL), embedded at build time so the binary carries its schema.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "ledger",
        include_str!("../../schemas/postgres/0001_ledger.sql"),
    ),
    (
        2,
        "plans_cycles_alerts",
        include_str!("../../schemas/postgres/0002_plans_cycles_alerts.sql"),
    ),
    (
        3,
        "outbox_lease",
        include_str!("../../schemas/postgres/0003_outbox_lease.sql"),
    ),
    (
        4,
        "event_time_books",
        include_str!("../../schemas/postgres/0004_event_time_books.sql"),
    ),
    (
        5,
        "dedupe_scope",
        include_str!("../../schemas/postgres/0005_dedupe_scope.sql"),
    ),
    (
        6,
        "entry_event_time",
        include_str!("../../schemas/postgres/0006_entry_event_time.sql"),
    ),
    (
        7,
        "checkpoint_apart",
        include_str!("../../schemas/postgres/0007_checkpoint_apart.sql"),
    ),
    (
        8,
        "grants_hot_updates",
        include_str!("../../schemas/postgres/0008_grants_hot_updates.sql"),
    ),
    (
        9,
        "open_events_compact",
        include_str!("../../schemas/postgres/0009_open_events_compact.sql"),
    ),
    (
        10,
        "books_as_json",
        include_str!("../../schemas/postgres/0010_books_as_json.sql"),
    ),
    (
        11,
        "entry_fk_checks",
        include_str!("../../schemas/postgres/0011_entry_fk_checks.sql"),
    ),
    (
        12,
        "corrections",
        include_str!("../../schemas/postgres/0012_corrections.sql"),
    ),
    (
        13,
        "holds",
        include_str!("../../schemas/postgres/0013_holds.sql"),
    ),
    (
        15,
        "usage_voids",
        include_str!("../../schemas/postgres/0015_usage_voids.sql"),
    ),
];

/// Applies the migrations not yet recorded; returns the versions applied now.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<Vec<i32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // A fixed key: one migrator at a time per database.
    tx.execute("SELECT pg_advisory_xact_lock(7421001)", &[])
        .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         SET LOCAL search_path TO {schema};
         CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tracing::info!(version, name, schema, "applied PostgreSQL migration");
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}
