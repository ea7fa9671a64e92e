//! Shared by tests/api.rs and tests/dashboard.rs: the API served in-process on 127.0.0.1:0
//! with known tokens, a plain HTTP/1.1 client (hyper), and the OpenAPI document — every
//! answer the client sees must be a status `schemas/openapi.yaml` declares for that route.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

use tally::api::auth::sha256_hex;
use tally::config::{ApiRole, ApiToken, Config, Secret};
use tally::rating::PriceTable;

pub const ADMIN: &str = "test-admin-7f3c2a";
pub const ACME: &str = "test-acme-91b0d4";
pub const GLOBEX: &str = "test-globex-5e6a1c";
/// An ingest token for any source, and one for `//chat.test` only.
pub const INGEST: &str = "test-ingest-2d8e44";
pub const INGEST_CHAT: &str = "test-ingest-chat-a17c03";

/// The tokens the tests use: an admin, account tokens for `acme` and `globex`, and the
/// ingest tokens.
pub fn with_tokens(mut cfg: Config) -> Config {
    let token = |t: &str, role, account: Option<&str>| ApiToken {
        name: Some(format!("test-{role:?}")),
        sha256: Secret::new(sha256_hex(t)),
        role,
        account_id: account.map(str::to_owned),
        sources: None,
    };
    cfg.api.tokens = vec![
        token(ADMIN, ApiRole::Admin, None),
        token(ACME, ApiRole::Account, Some("acme")),
        token(GLOBEX, ApiRole::Account, Some("globex")),
        token(INGEST, ApiRole::Ingest, None),
        ApiToken {
            sources: Some(vec!["//chat.test".into()]),
            ..token(INGEST_CHAT, ApiRole::Ingest, None)
        },
    ];
    cfg.api.listen = "127.0.0.1:0".into();
    cfg.api.max_body_bytes = 1024;
    cfg.validate().expect("valid API test config");
    cfg
}

/// The API running on its own task until dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub async fn start(cfg: Arc<Config>, prices: Arc<PriceTable>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = tally::api::Api::new(cfg, prices).unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(tally::api::serve(listener, api, rx));
        Server {
            addr,
            stop,
            task: Some(task),
        }
    }

    pub fn client(&self) -> Client {
        Client { addr: self.addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Graceful stop: the serve future returns.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `field` of a JSON error answer.
    pub fn field(&self) -> String {
        self.json()["error"]["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

#[derive(Clone, Copy)]
pub struct Client {
    pub addr: SocketAddr,
}

impl Client {
    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None, Vec::new()).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        self.send(
            Method::POST,
            path,
            token,
            Some("application/json"),
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        self.send(
            Method::PUT,
            path,
            token,
            Some("application/json"),
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    /// One request on a fresh connection; the status is checked against the OpenAPI document.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let reply = self
            .raw(
                method.clone(),
                path,
                token.map(|t| format!("Bearer {t}")),
                content_type,
                body,
            )
            .await;
        OPENAPI.assert_declared(method.as_str(), path, reply.status);
        reply
    }

    /// A request with an exact Authorization header value (or none).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        authorization: Option<String>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string());
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let response = sender
            .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }
}

/// The routes and statuses of `schemas/openapi.yaml`.
pub struct OpenApi {
    /// (METHOD, path template) -> declared statuses.
    pub routes: BTreeMap<(String, String), BTreeSet<u16>>,
}

pub static OPENAPI: LazyLock<OpenApi> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/openapi.yaml");
    OpenApi::parse(&std::fs::read_to_string(path).unwrap())
});

impl OpenApi {
    pub fn parse(text: &str) -> OpenApi {
        use yaml_rust2::{Yaml, YamlLoader};
        let docs = YamlLoader::load_from_str(text).expect("openapi.yaml is YAML");
        let doc = &docs[0];
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "an OpenAPI 3 document"
        );
        let mut routes = BTreeMap::new();
        let paths = doc["paths"].as_hash().expect("paths");
        for (path, item) in paths {
            let path = path.as_str().expect("path keys are strings");
            for (method, op) in item.as_hash().expect("path item") {
                let method = method.as_str().unwrap().to_ascii_uppercase();
                if !["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
                    .contains(&method.as_str())
                {
                    continue;
                }
                let statuses = op["responses"]
                    .as_hash()
                    .unwrap_or_else(|| panic!("{method} {path}: responses"))
                    .keys()
                    .map(|k| match k {
                        Yaml::String(s) => s.parse::<u16>().unwrap(),
                        Yaml::Integer(i) => u16::try_from(*i).unwrap(),
                        other => panic!("{method} {path}: status {other:?}"),
                    })
                    .collect();
                routes.insert((method, path.to_owned()), statuses);
            }
        }
        OpenApi { routes }
    }

    /// The template a concrete path matches (`{x}` matches one segment).
    pub fn template(&self, method: &str, path: &str) -> Option<&str> {
        let path = path.split('?').next().unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        self.routes
            .keys()
            .filter(|(m, _)| m == method)
            .map(|(_, t)| t.as_str())
            .find(|t| {
                let parts: Vec<&str> = t.split('/').collect();
                parts.len() == segments.len()
                    && parts
                        .iter()
                        .zip(&segments)
                        .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
            })
    }

    /// Panics unless `status` is declared for the route `path` matches (paths matching no
    /// route are not checked: they answer the router's 404/405).
    pub fn assert_declared(&self, method: &str, path: &str, status: u16) {
        if let Some(t) = self.template(method, path) {
            let declared = &self.routes[&(method.to_owned(), t.to_owned())];
            assert!(
                declared.contains(&status),
                "{method} {path} answered {status}, which schemas/openapi.yaml does not declare for {t} ({declared:?})"
            );
        }
    }
}
