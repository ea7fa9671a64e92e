//! ClickHouse over `https://`: a private Debian clickhouse-server (18.16) of the test's own,
//! given a certificate made here with `openssl` (its `https_port` only: no plain HTTP), and
//! Tally's ClickHouse client (the `clickhouse` crate's `native-tls` feature) trusting the
//! test's authority the way OpenSSL programs do (`SSL_CERT_FILE`). The migrations and a
//! query run over TLS; a plain `http://` URL to the TLS port fails.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tally::config::{ClickHouseConfig, Secret};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An authority and a server certificate for 127.0.0.1 it signs, in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509", "-days", "2", "-subj", "/CN=tally-test-ca"];
    args.extend(ec);
    args.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(&args);
    let mut args = vec!["req", "-subj", "/CN=127.0.0.1"];
    args.extend(ec);
    args.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&args);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
}

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// clickhouse-server with only an HTTPS port (and its native port, unused).
fn start_server(https: u16) -> (Server, String) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_certificates(root);
    for sub in ["data", "tmp", "user_files", "format_schemas", "logs"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let r = root.display();
    let tcp = free_port();
    std::fs::write(
        root.join("config.xml"),
        format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{r}/logs/server.log</log><errorlog>{r}/logs/err.log</errorlog></logger>
    <listen_host>127.0.0.1</listen_host>
    <https_port>{https}</https_port>
    <tcp_port>{tcp}</tcp_port>
    <openSSL>
        <server>
            <certificateFile>{r}/server.crt</certificateFile>
            <privateKeyFile>{r}/server.key</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
    <max_connections>64</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>20</max_concurrent_queries>
    <mark_cache_size>67108864</mark_cache_size>
    <path>{r}/data/</path>
    <tmp_path>{r}/tmp/</tmp_path>
    <user_files_path>{r}/user_files/</user_files_path>
    <format_schema_path>{r}/format_schemas/</format_schema_path>
    <users_config>{r}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"#
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("users.xml"),
        r#"<?xml version="1.0"?>
<yandex>
    <profiles><default><allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#,
    )
    .unwrap();
    let child = Command::new("clickhouse-server")
        .current_dir(root)
        .arg(format!("--config-file={}/config.xml", r))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("clickhouse-server (scripts/services installs it)");
    let ca = root.join("ca.crt").display().to_string();
    (Server { child, _dir: dir }, ca)
}

fn config(url: String) -> ClickHouseConfig {
    ClickHouseConfig {
        url,
        database: "tally_tls_test".into(),
        user: "default".into(),
        password: Secret::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analytics_store_works_over_https() {
    let port = free_port();
    let (_server, ca) = start_server(port);
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
