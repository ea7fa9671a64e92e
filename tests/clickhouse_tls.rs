//! ClickHouse over `https://`: a private Debian clickhouse-server (18.16) of the test's own,
//! given a certificate made here with `openssl` (its `https_port` only: no plain HTTP), and
//! Tally's ClickHouse client (the `clickhouse` crate's `native-tls` feature) trusting the
//! test's authority the way OpenSSL programs do (`SSL_CERT_FILE`). The migrations and a
//! query run over TLS; a plain `http://` URL to the TLS port fails.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tally::config::{ClickHouseConfig, Secret};

use common::servers::ClickHouseFiles;

struct Server {
    child: Child,
    _files: ClickHouseFiles,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// clickhouse-server with only an HTTPS port (and its native port, unused): the server, its
/// port and the authority's certificate.
fn start_server() -> (Server, u16, String) {
    let files = ClickHouseFiles::new(true);
    let child = files
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("clickhouse-server (scripts/services installs it)");
    let (port, ca) = (files.port, files.file("ca.crt"));
    (
        Server {
            child,
            _files: files,
        },
        port,
        ca,
    )
}

fn config(url: String) -> ClickHouseConfig {
    ClickHouseConfig {
        url,
        database: "tally_tls_test".into(),
        user: "default".into(),
        password: Secret::default(),
    }
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analytics_store_works_over_https() {
    let (_server, port, ca) = start_server();
    // OpenSSL's default trust store is the file SSL_CERT_FILE names: the test's authority.
    // Set before any TLS client of this process exists.
    std::env::set_var("SSL_CERT_FILE", &ca);

    let https = config(format!("https://127.0.0.1:{port}"));
    let started = Instant::now();
    let applied = loop {
        match tally::analytics::migrate(&https).await {
            Ok(applied) => break applied,
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                eprintln!("waiting for clickhouse-server: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("ClickHouse over https: {e}"),
        }
    };
    assert!(!applied.is_empty());
    // Again: nothing left to apply, read over TLS.
    assert_eq!(
        tally::analytics::migrate(&https).await.unwrap(),
        Vec::<u32>::new()
    );

    // Plain HTTP to the TLS port: refused.
    let plain = config(format!("http://127.0.0.1:{port}"));
    assert!(tally::analytics::migrate(&plain).await.is_err());
}
