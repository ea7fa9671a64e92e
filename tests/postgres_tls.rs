//! PostgreSQL over TLS, against a private server of the test's own (initdb into a temporary
//! directory, `ssl=on`, a certificate authority and a server certificate made here with the
//! `openssl` command, and a pg_hba.conf that refuses connections without TLS). Tally
//! connects the way libpq's connection strings say: `sslmode` disable / require /
//! verify-ca / verify-full, `sslrootcert`, in the key/value and the URL forms; the ledger's
//! migrations run over TLS; a wrong root, a wrong server name and a missing root file fail
//! with a clear error, and the settings error is not retried (not transient).
//!
//! Needs PostgreSQL's server binaries (TALLY_TEST_PG_BIN, default /usr/lib/postgresql/15/bin,
//! as tests/outages.rs) and `openssl`.

mod common;

use tally::config::{PostgresConfig, Secret};
use tally::ledger::{Store, StoreError};

use common::servers::PrivatePostgres;

/// The private server's configuration for a connection string.
fn config(url: String) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(url),
        schema: "tls_test".into(),
    }
}

/// A key/value connection string to the private server, with a password (not needed: trust
/// authentication) that must never be shown.
fn key_value(pg: &PrivatePostgres, extra: &str) -> PostgresConfig {
    config(format!(
        "host=127.0.0.1 port={} user=postgres password='not needed, but secret' dbname=postgres {extra}",
        pg.port
    ))
}

/// Whether the session is encrypted, as the server sees it.
async fn encrypted(cfg: &PostgresConfig) -> Result<bool, StoreError> {
    let client = tally::ledger::store::connect(cfg).await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_connects_over_tls_as_sslmode_says() {
    let pg = PrivatePostgres::start_tls();
    let ca = pg.file("ca.crt");

    // verify-full with the authority: encrypted, and the ledger's migrations run over it.
    let full = key_value(&pg, &format!("sslmode=verify-full sslrootcert={ca}"));
    assert!(encrypted(&full).await.unwrap());
    let mut store = Store::connect(&full).await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(store.balance("nobody").await.unwrap(), None);

    // The URL form, with the TLS settings in its query.
    let url = config(format!(
        "postgresql://postgres:s3cret@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={ca}",
        pg.port
    ));
    assert!(encrypted(&url).await.unwrap());
    assert!(!format!("{url:?}").contains("s3cret"), "{url:?}");

    // require: encrypted without checking; the default (prefer) encrypts when offered.
    assert!(encrypted(&key_value(&pg, "sslmode=require")).await.unwrap());
    assert!(encrypted(&key_value(&pg, "")).await.unwrap());

    // verify-ca checks the chain, not the name: a server reached as db.test passes it and
    // fails verify-full.
    let as_db_test = |mode: &str| {
        config(format!(
            "host=db.test hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode={mode} sslrootcert={ca}",
            pg.port
        ))
    };
    assert!(encrypted(&as_db_test("verify-ca")).await.unwrap());
    let e = encrypted(&as_db_test("verify-full")).await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");

    // Another authority's root: refused.
    let other = pg.file("other-ca.crt");
    let e = encrypted(&key_value(
        &pg,
        &format!("sslmode=verify-ca sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("certificate verify failed"), "{e}");
    // require with a root certificate checks it (libpq's rule).
    let e = encrypted(&key_value(
        &pg,
        &format!("sslmode=require sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("certificate verify failed"), "{e}");

    // Without TLS the server refuses (pg_hba.conf), and says why.
    let e = encrypted(&key_value(&pg, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no encryption"), "{e}");

    // A root file that does not exist: a settings error, named, never retried, no secret.
    let e = encrypted(&key_value(
        &pg,
        "sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    assert!(!e.is_transient());
    let shown = e.to_string();
    assert!(shown.contains("/nonexistent/ca.pem"), "{shown}");
    assert!(!shown.contains("not needed, but secret"), "{shown}");
}
