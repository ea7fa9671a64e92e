//! Private servers for the tests that must stop, crash or reconfigure one (tests/outages.rs,
//! tests/postgres_tls.rs, tests/clickhouse_tls.rs): a PostgreSQL cluster (initdb into a
//! temporary directory), a clickhouse-server with a configuration of its own, a certificate
//! authority and server certificates made with the `openssl` command. Each listens on a free
//! port of 127.0.0.1 and is stopped when dropped; the shared services stay untouched.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `port`, failing the test after `timeout`.
pub fn wait_port(port: u16, timeout: Duration, what: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < timeout,
            "{what} does not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command to completion, failing the test with its output when it fails.
pub fn run(cmd: &mut Command) {
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

/// In `dir`: an authority (`ca.crt`), a server certificate it signs for 127.0.0.1 and
/// `localhost` (`server.crt`, `server.key`), and an unrelated authority (`other-ca.crt`).
pub fn make_certificates(dir: &Path) {
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

/// A private PostgreSQL cluster. Needs PostgreSQL's server binaries (TALLY_TEST_PG_BIN,
/// default /usr/lib/postgresql/15/bin). With TLS, its pg_hba.conf refuses connections
/// without it, and its certificates are [`make_certificates`]' (see [`PrivatePostgres::file`]).
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    tls: bool,
}

impl PrivatePostgres {
    /// A plain cluster, started.
    pub fn start() -> PrivatePostgres {
        Self::start_with(false)
    }

    /// A TLS-only cluster, started.
    pub fn start_tls() -> PrivatePostgres {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> PrivatePostgres {
        let bin = std::env::var("TALLY_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("/usr/lib/postgresql/15/bin"));
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("chmod").arg("755").arg(dir.path()));
        if tls {
            make_certificates(dir.path());
        }
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        // The server runs as `postgres`: it writes its data, log and socket here.
        if is_root() {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(dir.path()));
        }
        if tls {
            run(Command::new("chmod")
                .arg("600")
                .arg(dir.path().join("server.key")));
        }
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
        if tls {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all 127.0.0.1/32 reject\n",
            )
            .unwrap();
        }
        let pg = PrivatePostgres {
            port: free_port(),
            dir,
            bin,
            tls,
        };
        pg.up();
        pg
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut c = as_postgres(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.path().join("data")).args(args);
        c
    }

    /// Starts the server (again, on the same data after [`crash`](Self::crash)).
    pub fn up(&self) {
        let d = self.dir.path().display();
        let mut options = format!(
            "-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
            ));
        }
        let log = self.dir.path().join("postgres.log");
        run(self
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
    }

    /// A crash: the server stops at once, clients see their connections cut.
    pub fn crash(&self) {
        run(self
            .ctl(&["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null()));
    }

    /// A libpq key/value connection string to the `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// The path of a file in the server's directory (`ca.crt`, `other-ca.crt`, ...).
    pub fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .ctl(&["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The files of a private clickhouse-server (Debian's, 18.16): its directory, configuration
/// and ports. Start it with [`ClickHouseFiles::command`] (tests/outages.rs restarts it on the
/// same data).
pub struct ClickHouseFiles {
    pub dir: tempfile::TempDir,
    /// The HTTP port, or with TLS the HTTPS port (then there is no plain HTTP port).
    pub port: u16,
    config: PathBuf,
}

impl ClickHouseFiles {
    /// A configuration listening on 127.0.0.1 only; with `tls`, an `https_port` with
    /// [`make_certificates`]' server certificate (`ca.crt` in [`Self::file`]) instead of
    /// the HTTP port.
    pub fn new(tls: bool) -> ClickHouseFiles {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["data", "tmp", "user_files", "format_schemas", "logs"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let r = root.display();
        let (port, tcp) = (free_port(), free_port());
        let listen = if tls {
            make_certificates(root);
            format!(
                r#"<https_port>{port}</https_port>
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
    </openSSL>"#
            )
        } else {
            format!("<http_port>{port}</http_port>")
        };
        let config = root.join("config.xml");
        std::fs::write(
            &config,
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{r}/logs/server.log</log><errorlog>{r}/logs/err.log</errorlog></logger>
    <listen_host>127.0.0.1</listen_host>
    {listen}
    <tcp_port>{tcp}</tcp_port>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
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
        ClickHouseFiles { dir, port, config }
    }

    /// The command that starts the server (scripts/services installs `clickhouse-server`).
    pub fn command(&self) -> Command {
        let mut c = Command::new("clickhouse-server");
        c.current_dir(self.dir.path())
            .arg(format!("--config-file={}", self.config.display()));
        c
    }

    /// The path of a file in the server's directory (`ca.crt`, ...).
    pub fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}
