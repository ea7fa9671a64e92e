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

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tally::config::{PostgresConfig, Secret};
use tally::ledger::{Store, StoreError};

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
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap().stdout;
    String::from_utf8_lossy(&uid).trim() == "0"
}

/// A command run as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A certificate authority, a server certificate it signs for 127.0.0.1 and `localhost`, and
/// an unrelated authority: PEM files in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, subject) in [("ca", "/CN=tally-test-ca"), ("other-ca", "/CN=not-the-ca")] {
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", subject];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt]);
        openssl(&args);
    }
    let mut args = vec!["req", "-subj", "/CN=127.0.0.1"];
    args.extend(ec);
    args.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
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

/// The private server: TLS only (pg_hba.conf rejects connections without it).
struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl TlsPostgres {
    fn start() -> TlsPostgres {
        let bin = std::env::var("TALLY_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("/usr/lib/postgresql/15/bin"));
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("chmod").arg("755").arg(dir.path()));
        make_certificates(dir.path());
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(dir.path()));
        }
        run(Command::new("chmod")
            .arg("600")
            .arg(dir.path().join("server.key")));
        run(as_postgres(&bin.join("initdb"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
            ])
            .args(["-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null()));
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let pg = TlsPostgres {
            port: free_port(),
            dir,
            bin,
        };
        let d = pg.dir.path().display();
        let options = format!(
            "-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
             -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key",
            pg.port
        );
        let log = pg.dir.path().join("postgres.log");
        run(pg
            .ctl(&[
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
            ])
            .arg("start")
            .stdout(Stdio::null()));
        pg
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut c = as_postgres(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.path().join("data")).args(args);
        c
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn config(&self, url: String) -> PostgresConfig {
        PostgresConfig {
            url: Secret::new(url),
            schema: "tls_test".into(),
        }
    }

    fn key_value(&self, extra: &str) -> PostgresConfig {
        self.config(format!(
            "host=127.0.0.1 port={} user=postgres password='not needed, but secret' dbname=postgres {extra}",
            self.port
        ))
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = self
            .ctl(&["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_connects_over_tls_as_sslmode_says() {
    let pg = TlsPostgres::start();
    let ca = pg.file("ca.crt");

    // verify-full with the authority: encrypted, and the ledger's migrations run over it.
    let full = pg.key_value(&format!("sslmode=verify-full sslrootcert={ca}"));
    assert!(encrypted(&full).await.unwrap());
    let mut store = Store::connect(&full).await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(store.balance("nobody").await.unwrap(), None);

    // The URL form, with the TLS settings in its query.
    let url = pg.config(format!(
        "postgresql://postgres:s3cret@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={ca}",
        pg.port
    ));
    assert!(encrypted(&url).await.unwrap());
    assert!(!format!("{url:?}").contains("s3cret"), "{url:?}");

    // require: encrypted without checking; the default (prefer) encrypts when offered.
    assert!(encrypted(&pg.key_value("sslmode=require")).await.unwrap());
    assert!(encrypted(&pg.key_value("")).await.unwrap());

    // verify-ca checks the chain, not the name: a server reached as db.test passes it and
    // fails verify-full.
    let as_db_test = |mode: &str| {
        pg.config(format!(
            "host=db.test hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode={mode} sslrootcert={ca}",
            pg.port
        ))
    };
    assert!(encrypted(&as_db_test("verify-ca")).await.unwrap());
    let e = encrypted(&as_db_test("verify-full")).await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");

    // Another authority's root: refused.
    let other = pg.file("other-ca.crt");
    let e = encrypted(&pg.key_value(&format!("sslmode=verify-ca sslrootcert={other}")))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("certificate verify failed"), "{e}");
    // require with a root certificate checks it (libpq's rule).
    let e = encrypted(&pg.key_value(&format!("sslmode=require sslrootcert={other}")))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("certificate verify failed"), "{e}");

    // Without TLS the server refuses (pg_hba.conf), and says why.
    let e = encrypted(&pg.key_value("sslmode=disable"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no encryption"), "{e}");

    // A root file that does not exist: a settings error, named, never retried, no secret.
    let e = encrypted(&pg.key_value("sslmode=verify-full sslrootcert=/nonexistent/ca.pem"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    assert!(!e.is_transient());
    let shown = e.to_string();
    assert!(shown.contains("/nonexistent/ca.pem"), "{shown}");
    assert!(!shown.contains("not needed, but secret"), "{shown}");
}
