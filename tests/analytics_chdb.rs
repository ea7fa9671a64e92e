//! The ClickHouse DDL and every analytics query also run on a current ClickHouse: chDB (PyPI
//! `chdb-core`, ClickHouse 26.x in-process, driven by tests/chdb/run.py), with the same
//! results as the local 18.16 server, as text.
//!
//! chDB comes from TALLY_TEST_CHDB_PYTHON (a Python that can `import chdb`; `scripts/test`
//! installs chdb-core into `.services/chdb-venv` and sets it), else from that venv, installed
//! on first use (PyPI must be reachable; about 900 MB). In CI (the `CI` variable set and not
//! `false` or `0`; `.ci/run` sets it) a chDB that cannot be had fails the test; elsewhere the
//! test says why and passes without running.
//!
//! Steps, in order, on both servers: the migrations (twice on chDB: idempotent), the same
//! rated events (inserted through the sink on 18.16, as VALUES on chDB), then every report
//! statement of `UsageQueries`, `tally reconcile`'s roll-up and rated-event statements, the
//! sink's stored-identities query, and every example of docs/analytics.md (the repair steps
//! included).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use rust_decimal_macros::dec;
use serde_json::Value;

use common::analytics::{clickhouse_config, day, doc_examples, docs_dataset, tsv, DOC_ACCOUNT};
use tally::analytics::migrate::{bootstrap, statements, MIGRATIONS};
use tally::analytics::queries::{report_sql, Cycle, DateRange, ReportRequest};
use tally::analytics::reconcile::{rated_days_sql, rollup_days_sql};
use tally::analytics::sink::{
    batch_copies_sql, batch_ranges, block_ranges, copies_sql, counted_events_sql, rollup_daily_sql,
    rollup_hourly_sql, shared_identities_sql,
};
use tally::analytics::{migrate, AnalyticsSink, RatedRow};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Running in CI: there the check must run, never skip.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn can_import_chdb(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import chdb.session"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(format!(
        "{cmd:?} failed ({}): {}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    ))
}

/// A Python that imports chdb, installing chdb-core into .services/chdb-venv if needed.
fn chdb_python() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("TALLY_TEST_CHDB_PYTHON") {
        let p = PathBuf::from(p);
        return if can_import_chdb(&p) {
            Ok(p)
        } else {
            Err(format!(
                "TALLY_TEST_CHDB_PYTHON={} cannot import chdb",
                p.display()
            ))
        };
    }
    let venv = root().join(".services/chdb-venv");
    let python = venv.join("bin/python");
    if can_import_chdb(&python) {
        return Ok(python);
    }
    // Built aside and renamed into place, so a concurrent run never sees half an install.
    std::fs::create_dir_all(root().join(".services")).map_err(|e| e.to_string())?;
    let building = root().join(format!(".services/chdb-venv.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    eprintln!("installing chdb-core into {} (once)", venv.display());
    run(Command::new("python3").arg("-m").arg("venv").arg(&building))?;
    let result = run(Command::new(building.join("bin/pip")).args([
        "install",
        "--disable-pip-version-check",
        "--quiet",
        "chdb-core",
    ]));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e);
    }
    if std::fs::rename(&building, &venv).is_err() {
        // Another run installed it meanwhile.
        let _ = std::fs::remove_dir_all(&building);
    }
    if can_import_chdb(&python) {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import chdb after installing",
            python.display()
        ))
    }
}

/// The statements compared on both servers, named, in order.
fn compared_queries(rows: &[RatedRow], hashes: &[u64]) -> Vec<(String, String)> {
    let today = day("2025-06-20");
    let june = Cycle {
        start: day("2025-06-01"),
        reset: day("2025-07-01"),
        allowance: Some(dec!(1000)),
    };
    let mut out = Vec::new();
    let requests = [
        ReportRequest::for_cycle(june, today, Some(dec!(500))).unwrap(),
        ReportRequest {
            range: DateRange::new(day("2025-03-01"), today).unwrap(),
            top: 10,
            ..ReportRequest::for_cycle(Cycle::calendar_month(today), today, None).unwrap()
        },
    ];
    for (i, request) in requests.iter().enumerate() {
        for account in [DOC_ACCOUNT, "acct-7", "nobody"] {
            for (name, sql) in report_sql(account, request).unwrap() {
                out.push((format!("report {i} {account} {name}"), sql));
            }
        }
    }
    // `tally reconcile`'s two ClickHouse sides, every account and one.
    let range = DateRange::new(day("2025-03-01"), today).unwrap();
    for account in [None, Some(DOC_ACCOUNT)] {
        out.push((
            format!("reconcile roll-up {account:?}"),
            rollup_days_sql(&range, account),
        ));
        out.push((
            format!("reconcile rated events {account:?}"),
            rated_days_sql(&range, account),
        ));
    }
    // The sink's reads: the copies of some identities, and the counting rows of their blocks.
    let probe: Vec<(&str, u32, u64)> = rows
        .iter()
        .step_by(7)
        .map(|r| (r.topic.as_str(), r.partition, r.offset))
        .collect();
    let ranges = batch_ranges(probe);
    // The identity hash the server computes (MATERIALIZED): the same on both.
    out.push((
        "identity hashes".into(),
        "SELECT DISTINCT event_source, event_id, id_hash FROM usage_copies \
         ORDER BY event_source, event_id"
            .into(),
    ));
    out.push((
        "shared identities".into(),
        format!(
            "SELECT id_hash FROM ({}) ORDER BY id_hash",
            shared_identities_sql(&ranges)
        ),
    ));
    out.push((
        "batch copies".into(),
        format!(
            "SELECT DISTINCT * FROM ({}) ORDER BY event_source, event_id, topic, `partition`, `offset`",
            batch_copies_sql(&ranges)
        ),
    ));
    out.push((
        "identity copies".into(),
        format!(
            // DISTINCT: a current server collapses the copies of a position when they are
            // inserted together (optimize_on_insert), 18.16 at its next merge.
            "SELECT DISTINCT * FROM ({}) ORDER BY event_source, event_id, topic, `partition`, `offset`",
            copies_sql(hashes)
        ),
    ));
    out.push((
        "counted events".into(),
        format!(
            "SELECT event_source, event_id, topic, `partition`, `offset`, counted FROM ({}) \
             ORDER BY topic, `partition`, `offset`",
            counted_events_sql(Some(&ranges))
        ),
    ));
    for e in doc_examples() {
        for (i, s) in e.statements.iter().enumerate() {
            out.push((format!("docs {} {i}", e.name), s.clone()));
        }
    }
    // After the repair, the check again.
    let check = doc_examples()
        .into_iter()
        .find(|e| e.name == "check_rollups")
        .unwrap();
    out.push((
        "docs check_rollups after rebuild".into(),
        check.statements[0].clone(),
    ));
    out
}

#[tokio::test]
async fn ddl_and_queries_run_on_current_clickhouse() {
    let python = match chdb_python() {
        Ok(p) => p,
        Err(why) if in_ci() => panic!(
            "analytics_chdb: CI is set and chdb-core (current ClickHouse) cannot be had: {why}"
        ),
        Err(why) => {
            let msg = format!(
                "SKIPPED analytics_chdb (not in CI): chdb-core (current ClickHouse) cannot be installed here: {why}"
            );
            println!("{msg}");
            eprintln!("{msg}");
            return;
        }
    };

    // 18.16: the real path (migrate, then the sink).
    let cfg = clickhouse_config("chdb");
    migrate(&cfg)
        .await
        .expect("ClickHouse is up (run scripts/services up)");
    let rows = docs_dataset();
    let sink = AnalyticsSink::new(&cfg);
    sink.insert(&rows[..rows.len() / 2]).await.unwrap();
    sink.insert(&rows).await.unwrap();
    let client = clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_database(&cfg.database);
    // One row per position, as a current server keeps them after one INSERT: the copies
    // written twice above (the first half) would otherwise count twice in `shared identities`.
    client
        .query("OPTIMIZE TABLE usage_copies FINAL")
        .execute()
        .await
        .unwrap();
    let hashes: Vec<u64> = client
        .clone()
        .with_validation(false)
        .query("SELECT DISTINCT id_hash FROM usage_copies ORDER BY id_hash")
        .fetch_all()
        .await
        .unwrap();
    let values = {
        let mut cursor = client
            .query_raw("SELECT * FROM usage_events ORDER BY topic, `partition`, `offset`")
            .fetch_bytes("Values")
            .unwrap();
        String::from_utf8(cursor.collect().await.unwrap().to_vec()).unwrap()
    };
    let losers = {
        let mut cursor = client
            .query_raw("SELECT * FROM usage_losers ORDER BY topic, `partition`, `offset`")
            .fetch_bytes("Values")
            .unwrap();
        String::from_utf8(cursor.collect().await.unwrap().to_vec()).unwrap()
    };
    let identities = {
        let mut cursor = client
            .query_raw(
                "SELECT * FROM usage_copies \
                 ORDER BY event_id, event_source, topic, `partition`, `offset`",
            )
            .fetch_bytes("Values")
            .unwrap();
        String::from_utf8(cursor.collect().await.unwrap().to_vec()).unwrap()
    };

    // chDB: the migrations from scratch, the same rows, then the queries.
    let db = &cfg.database;
    let mut steps: Vec<(String, String)> = Vec::new();
    // Each migration twice in a row (as `migrate` runs one again until it is recorded): a
    // later migration may change what an earlier one created, so they are not run again
    // after it.
    for _ in 0..2 {
        for (i, s) in bootstrap(db).into_iter().enumerate() {
            steps.push((format!("bootstrap {i}"), s));
        }
    }
    for (version, name, sql) in MIGRATIONS {
        for _ in 0..2 {
            for (i, s) in statements(sql, db).into_iter().enumerate() {
                steps.push((format!("migration {version} {name} statement {}", i + 1), s));
            }
        }
    }
    steps.push(("use".into(), format!("USE {db}")));
    steps.push((
        "insert".into(),
        format!("INSERT INTO usage_events VALUES {values}"),
    ));
    steps.push((
        "insert identities".into(),
        format!("INSERT INTO usage_copies VALUES {identities}"),
    ));
    if !losers.is_empty() {
        steps.push((
            "insert losers".into(),
            format!("INSERT INTO usage_losers VALUES {losers}"),
        ));
    }
    // The roll-ups computed in one go there, batch by batch on 18.16: the same figures.
    steps.push(("recompute daily".into(), rollup_daily_sql(None)));
    steps.push(("recompute hourly".into(), rollup_hourly_sql(None)));
    // And by blocks, as the sink does (PREWHERE on the positions with FINAL): the same rows
    // again, so the figures compared below do not change.
    let blocks = block_ranges(
        rows.iter()
            .map(|r| (r.topic.as_str(), r.partition, r.offset)),
    );
    steps.push((
        "recompute daily blocks".into(),
        rollup_daily_sql(Some(&blocks)),
    ));
    steps.push((
        "recompute hourly blocks".into(),
        rollup_hourly_sql(Some(&blocks)),
    ));
    let compared = compared_queries(&rows, &hashes);
    let first_compared = steps.len();
    steps.extend(compared.iter().cloned());

    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.json");
    let result = dir.path().join("result.json");
    let job_steps: Vec<Value> = steps
        .iter()
        .map(|(name, sql)| serde_json::json!({"name": name, "sql": sql}))
        .collect();
    std::fs::write(
        &job,
        serde_json::to_vec(&serde_json::json!({"steps": job_steps})).unwrap(),
    )
    .unwrap();
    let out = Command::new(&python)
        .arg(root().join("tests/chdb/run.py"))
        .arg(&job)
        .arg(&result)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    let version = result["version"].as_str().unwrap().to_owned();
    assert!(
        version.split('.').next().unwrap().parse::<u32>().unwrap() >= 23,
        "chDB runs a current ClickHouse: {version}"
    );
    let chdb = result["steps"].as_array().unwrap();
    assert_eq!(chdb.len(), steps.len());
    let failed: Vec<String> = chdb
        .iter()
        .zip(&steps)
        .filter(|(r, _)| !r["ok"].as_bool().unwrap())
        .map(|(r, (name, sql))| format!("{name}: {}\n{sql}", r["error"]))
        .collect();
    assert!(
        failed.is_empty(),
        "on ClickHouse {version}:\n{}",
        failed.join("\n\n")
    );

    // The same statements on 18.16, in the same order: the same text.
    let mut compared_rows = 0;
    for ((name, sql), r) in compared.iter().zip(&chdb[first_compared..]) {
        let local = tsv(&client, sql)
            .await
            .unwrap_or_else(|e| panic!("{name} on 18.16: {e}\n{sql}"));
        let current = r["tsv"].as_str().unwrap();
        assert_eq!(
            local, current,
            "{name}: ClickHouse 18.16 (left) and {version} (right) differ\n{sql}"
        );
        compared_rows += local.lines().count();
    }
    assert!(compared_rows > 300, "{compared_rows} rows compared");
    println!(
        "analytics_chdb: {} statements run on ClickHouse {version}, {} compared with 18.16 ({compared_rows} rows)",
        steps.len(),
        compared.len()
    );

    clickhouse::Client::default()
        .with_url(&cfg.url)
        .query(&format!("DROP DATABASE IF EXISTS {}", cfg.database))
        .execute()
        .await
        .unwrap();
}
