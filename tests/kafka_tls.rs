//! Kafka TLS and SASL: librdkafka is built with OpenSSL (rdkafka's `ssl` feature), so
//! `security.protocol` SSL / SASL_SSL with SASL PLAIN and SCRAM are accepted, and pointed at
//! the real broker's plaintext listener they fail with an error that says why (a TLS
//! handshake against a plaintext listener), never printing the SASL password. Tally passes
//! `[kafka.properties]` to librdkafka verbatim.

mod common;

use rdkafka::config::ClientConfig;
use tally::config::Config;

use common::kafka_brokers as brokers;

#[test]
fn the_client_is_built_with_tls_and_sasl() {
    let native = ClientConfig::new().create_native_config().unwrap();
    let features = native.get("builtin.features").unwrap();
    let features: Vec<&str> = features.split(',').collect();
    for needed in ["ssl", "sasl_plain", "sasl_scram"] {
        assert!(
            features.contains(&needed),
            "{needed} missing from {features:?}"
        );
    }
    // Each protocol and mechanism is a configuration librdkafka accepts.
    for (protocol, mechanism) in [
        ("SSL", None),
        ("SASL_SSL", Some("PLAIN")),
        ("SASL_SSL", Some("SCRAM-SHA-256")),
        ("SASL_SSL", Some("SCRAM-SHA-512")),
        ("SASL_PLAINTEXT", Some("SCRAM-SHA-512")),
    ] {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", "127.0.0.1:1")
            .set("security.protocol", protocol);
        if let Some(m) = mechanism {
            cc.set("sasl.mechanism", m)
                .set("sasl.username", "u")
                .set("sasl.password", "p");
        }
        let created: Result<rdkafka::producer::BaseProducer, _> = cc.create();
        assert!(
            created.is_ok(),
            "{protocol} {mechanism:?}: {:?}",
            created.err()
        );
    }
}

/// `ensure_topics` (what `tally migrate` and `tally run` start with) with TLS, and with
/// SASL_SSL + SCRAM, against the plaintext listener: the error names the TLS handshake.
async fn refused(sasl: bool) -> String {
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers();
    let p = &mut cfg.kafka.properties;
    // A plaintext listener may hold a TLS handshake open: librdkafka gives up on the
    // connection after this (default 30 s) and logs why.
    p.insert("socket.connection.setup.timeout.ms".into(), "3000".into());
    // The admin request gives up after this (default 60 s).
    p.insert("socket.timeout.ms".into(), "5000".into());
    if sasl {
        p.insert("security.protocol".into(), "SASL_SSL".into());
        p.insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
        p.insert("sasl.username".into(), "tally".into());
        p.insert("sasl.password".into(), "hunter2-secret".into());
    } else {
        p.insert("security.protocol".into(), "SSL".into());
    }
    cfg.validate().unwrap();
    assert!(!format!("{cfg:?}").contains("hunter2-secret"));
    tally::kafka::ensure_topics(&cfg.kafka, &["tally.tls-probe"], 1)
        .await
        .unwrap_err()
        .to_string()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_against_a_plaintext_listener_fails_clearly() {
    let (tls, sasl_ssl) = tokio::join!(refused(false), refused(true));
    for shown in [tls, sasl_ssl] {
        eprintln!("{shown}");
        assert!(shown.contains("in state SSL_HANDSHAKE"), "{shown}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
    }
}
