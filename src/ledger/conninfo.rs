//! PostgreSQL connection strings as libpq reads them — key/value (`host=db password='a b'`)
//! and URLs (`postgresql://user:pw@db:5432/tally?sslmode=verify-full`) — read into
//! parameters once, for two uses: the TLS settings tokio-postgres does not take itself
//! (`sslmode` `verify-ca` / `verify-full`, `sslrootcert`, `sslcert`, `sslkey`) are split off
//! for the TLS connector, and every spelling of a secret (`password`, `sslpassword`, in
//! either form: spaces around `=`, quoted, percent-encoded, in the URL's user info or its
//! query) is replaced for display. Pure: no IO.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::percent_decode_str;

/// Parameters whose values are secrets.
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];
/// What a secret is shown as.
pub const REDACTED: &str = "***";

/// A connection string that libpq would not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PostgreSQL connection string: {0}")]
pub struct ConnInfoError(String);

/// How the server's certificate is checked (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, certificate not checked (`allow` and `prefer`; libpq's
    /// default).
    Prefer,
    /// TLS required, certificate not checked (unless `sslrootcert` is given: then `VerifyCa`,
    /// as libpq does).
    Require,
    /// TLS, the certificate chain checked against `sslrootcert` (or the system's roots).
    VerifyCa,
    /// As `VerifyCa`, and the server's name must match its certificate.
    VerifyFull,
}

/// The TLS half of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// PEM file of the trusted root certificate(s); `system` (or absent): the system's.
    pub root_cert: Option<String>,
    /// Client certificate and its key (PEM, the key PKCS#8), for servers that ask for one.
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

/// A connection string read: the parameters tokio-postgres takes, as a key/value string
/// (its own parser reads it), and the TLS settings.
pub struct ConnInfo {
    /// For `tokio_postgres::Config::from_str`; holds the password: never display it.
    pub postgres: String,
    pub tls: TlsSettings,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("postgres", &redact(&self.postgres))
            .field("tls", &self.tls)
            .finish()
    }
}

/// Reads a connection string (either form).
pub fn parse(text: &str) -> Result<ConnInfo, ConnInfoError> {
    let params = params(text)?;
    let mut tls = TlsSettings {
        mode: SslMode::Prefer,
        root_cert: None,
        client_cert: None,
        client_key: None,
    };
    let mut rest = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => {
                tls.mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(ConnInfoError(format!(
                            "sslmode {other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                        )))
                    }
                }
            }
            "sslrootcert" => tls.root_cert = Some(value),
            "sslcert" => tls.client_cert = Some(value),
            "sslkey" => tls.client_key = Some(value),
            _ => rest.push((key, value)),
        }
    }
    if tls.mode == SslMode::Require && tls.root_cert.is_some() {
        tls.mode = SslMode::VerifyCa;
    }
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(ConnInfoError(
            "sslcert and sslkey go together (a client certificate and its key)".into(),
        ));
    }
    // tokio-postgres knows disable, prefer and require; it negotiates TLS, the connector
    // checks the certificate as the mode says.
    let negotiated = match tls.mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    };
    rest.push(("sslmode".into(), negotiated.into()));
    let postgres = rest
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(ConnInfo { postgres, tls })
}

/// The connection string for display: secrets replaced by `***`, in whichever form and
/// spelling they came. A string that does not parse is not shown at all.
pub fn redact(text: &str) -> String {
    if is_url(text) {
        return redact_url(text).unwrap_or_else(|| unreadable(text));
    }
    match key_values(text) {
        Ok(pairs) => pairs
            .iter()
            .map(|(k, v)| {
                if SECRET_KEYS.contains(&k.as_str()) {
                    format!("{k}={REDACTED}")
                } else {
                    format!("{k}={}", quote(v))
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => unreadable(text),
    }
}

fn unreadable(text: &str) -> String {
    format!(
        "(a PostgreSQL connection string of {} bytes that does not parse; not shown)",
        text.len()
    )
}

fn is_url(text: &str) -> bool {
    let t = text.trim_start();
    t.starts_with("postgres://") || t.starts_with("postgresql://")
}

/// libpq's key/value quoting: bare when it is plain, else single-quoted with `\` and `'`
/// escaped.
fn quote(value: &str) -> Cow<'_, str> {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '\'' | '\\' | '='));
    if plain {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(format!(
            "'{}'",
            value.replace('\\', "\\\\").replace('\'', "\\'")
        ))
    }
}

/// Every parameter, in order, from either form.
fn params(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    if is_url(text) {
        url_params(text.trim())
    } else {
        key_values(text)
    }
}

/// libpq's key/value form: `key = value` pairs separated by whitespace; a value is
/// single-quoted (`\'` and `\\` inside) or runs to the next whitespace (`\` escapes the next
/// character).
fn key_values(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The keyword is not echoed: it may be a misplaced secret.
            return Err(ConnInfoError(
                "a keyword without \"=\" (expected keyword=value pairs)".into(),
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    Some('\'') => {
                        out.push((key, value));
                        break;
                    }
                    Some(c) => value.push(c),
                    None => {
                        return Err(ConnInfoError(format!(
                            "unterminated quoted value of {key:?}"
                        )))
                    }
                }
            }
            continue;
        }
        while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
            if c == '\\' {
                if let Some(next) = chars.next() {
                    value.push(next);
                }
            } else {
                value.push(c);
            }
        }
        out.push((key, value));
    }
}

/// The parts of a `postgresql://` URL: (user, password, hosts, dbname, query pairs), each
/// as written (percent-encoded).
struct UrlParts<'a> {
    scheme: &'a str,
    user: Option<&'a str>,
    password: Option<&'a str>,
    hosts: &'a str,
    path: Option<&'a str>,
    query: Vec<(&'a str, &'a str)>,
}

fn split_url(text: &str) -> Option<UrlParts<'_>> {
    let (scheme, rest) = text.split_once("://")?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // The user info ends at the last '@' (a password may hold '@' or '/', percent-encoded
    // or not: all of it stays user info, so none of it is shown as a host or path).
    let (userinfo, after) = match before_query.rsplit_once('@') {
        Some((u, rest)) => (Some(u), rest),
        None => (None, before_query),
    };
    let (hosts, path) = match after.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (after, None),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, pw)) => (Some(user), Some(pw)),
            None => (Some(u), None),
        },
        None => (None, None),
    };
    let query = query
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect()
        })
        .unwrap_or_default();
    Some(UrlParts {
        scheme,
        user,
        password,
        hosts,
        path,
        query,
    })
}

fn decode(s: &str) -> Result<String, ConnInfoError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| ConnInfoError("a percent-encoded part is not UTF-8".into()))
}

fn url_params(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let parts = split_url(text).ok_or_else(|| ConnInfoError("not a URL".into()))?;
    let mut out = Vec::new();
    if let Some(user) = parts.user.filter(|u| !u.is_empty()) {
        out.push(("user".into(), decode(user)?));
    }
    if let Some(password) = parts.password {
        out.push(("password".into(), decode(password)?));
    }
    if !parts.hosts.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for host in parts.hosts.split(',') {
            // [v6]:port, host:port, host
            let (h, p) = if let Some(v6) = host.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| ConnInfoError("unterminated [IPv6 address]".into()))?;
                (h, after.strip_prefix(':'))
            } else {
                match host.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (host, None),
                }
            };
            hosts.push(decode(h)?);
            ports.push(p.unwrap_or("").to_owned());
        }
        out.push(("host".into(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            let ports: Vec<&str> = ports
                .iter()
                .map(|p| if p.is_empty() { "5432" } else { p })
                .collect();
            out.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = parts.path.filter(|p| !p.is_empty()) {
        out.push(("dbname".into(), decode(db)?));
    }
    for (k, v) in parts.query {
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

/// The URL with its user-info password and any secret query parameter replaced.
fn redact_url(text: &str) -> Option<String> {
    let parts = split_url(text.trim())?;
    let mut out = format!("{}://", parts.scheme);
    if let Some(user) = parts.user {
        out.push_str(user);
        if parts.password.is_some() {
            out.push(':');
            out.push_str(REDACTED);
        }
        out.push('@');
    }
    out.push_str(parts.hosts);
    if let Some(path) = parts.path {
        out.push('/');
        out.push_str(path);
    }
    if !parts.query.is_empty() {
        let query: Vec<String> = parts
            .query
            .iter()
            .map(|(k, v)| {
                let key = decode(k).unwrap_or_default();
                if SECRET_KEYS.contains(&key.as_str()) {
                    format!("{k}={REDACTED}")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        out.push('?');
        out.push_str(&query.join("&"));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_password_is_redacted() {
        let cases = [
            ("host=db user=t password=x", "host=db user=t password=***"),
            ("host=db user=t password = x", "host=db user=t password=***"),
            (
                "host=db password  =  x  user=t",
                "host=db password=*** user=t",
            ),
            (
                "host=db password='my s3cret phrase' user=t",
                "host=db password=*** user=t",
            ),
            (r"password='it\'s secret' host=db", "password=*** host=db"),
            (r"password=a\ b host=db", "password=*** host=db"),
            ("sslpassword=keypass host=db", "sslpassword=*** host=db"),
            (
                "postgres://tally:s3cret@db/tally",
                "postgres://tally:***@db/tally",
            ),
            (
                "postgresql://tally:s%40cret@db:5432/tally",
                "postgresql://tally:***@db:5432/tally",
            ),
            (
                "postgresql://tally:p@ss@db/tally",
                "postgresql://tally:***@db/tally",
            ),
            ("postgres://u:a/b@db/x", "postgres://u:***@db/x"),
            (
                "postgresql://db/tally?user=t&password=s3cret&sslmode=require",
                "postgresql://db/tally?user=t&password=***&sslmode=require",
            ),
            (
                "postgresql://db/tally?pass%77ord=s3cret",
                "postgresql://db/tally?pass%77ord=***",
            ),
            ("postgresql://tally@db/tally", "postgresql://tally@db/tally"),
        ];
        for (given, shown) in cases {
            assert_eq!(redact(given), shown, "{given}");
        }
        for secret in [
            "s3cret", "phrase", "keypass", "it's", "p@ss", "s%40cret", "a/b",
        ] {
            for (given, _) in cases {
                assert!(!redact(given).contains(secret), "{given}");
            }
        }
        // What does not parse is not shown.
        let shown = redact("host=db password='never closed");
        assert!(!shown.contains("never"), "{shown}");
        let shown = redact("host=db password");
        assert!(!shown.contains("password"), "{shown}");
    }

    #[test]
    fn tls_settings_are_split_off() {
        let info = parse(
            "host=127.0.0.1 port=5433 user=postgres password='a b' dbname=tally sslmode=verify-full sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(info.tls.mode, SslMode::VerifyFull);
        assert_eq!(info.tls.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(
            info.postgres,
            "host=127.0.0.1 port=5433 user=postgres password='a b' dbname=tally sslmode=require"
        );
        let pg: tokio_postgres::Config = info.postgres.parse().unwrap();
        assert_eq!(pg.get_password(), Some(&b"a b"[..]));
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert!(!format!("{info:?}").contains("a b"));

        // require + a root certificate: verify-ca, as libpq does.
        let info = parse("host=db sslmode=require sslrootcert=ca.pem").unwrap();
        assert_eq!(info.tls.mode, SslMode::VerifyCa);
        // libpq's default: prefer.
        let info = parse("host=db").unwrap();
        assert_eq!(info.tls.mode, SslMode::Prefer);
        assert_eq!(info.postgres, "host=db sslmode=prefer");

        let info = parse(
            "postgresql://us%40er:p%20w@[::1]:5433,db2/tal%6Cy?sslmode=disable&application_name=x",
        )
        .unwrap();
        assert_eq!(info.tls.mode, SslMode::Disable);
        assert_eq!(
            info.postgres,
            "user=us@er password='p w' host=::1,db2 port=5433,5432 dbname=tally application_name=x sslmode=disable"
        );
        let pg: tokio_postgres::Config = info.postgres.parse().unwrap();
        assert_eq!(pg.get_user(), Some("us@er"));
        assert_eq!(pg.get_ports(), &[5433, 5432]);

        for bad in [
            "host=db sslmode=sometimes",
            "host=db sslcert=c.pem",
            "host=db password='open",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
