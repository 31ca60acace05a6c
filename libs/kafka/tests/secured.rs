//! Kafka behind TLS and SASL, as a platform team runs it.
//!
//! TLS: librdkafka's embedded broker behind a TLS-terminating proxy (Debian `stunnel4`), the
//! broker advertising the proxy's port. Runs everywhere the test command runs.
//! SASL/SCRAM: tansu with SQLite storage (its memory storage forgets SCRAM users), run only when
//! `INSTREAM_TEST_TANSU` names a tansu 0.6 binary (building tansu takes ~10 minutes, so CI does
//! not); listed as ignored otherwise.

use std::path::Path;
use std::time::Duration;

use instream_core::config::{KafkaConfig, Secret};
use instream_core::Health;
use instream_kafka::KafkaError;
use instream_testkit::{TestPki, TlsBroker};
use tokio_util::sync::CancellationToken;

/// Longest a refusal may take to be reported: the probe's patience before a first answer
/// (15 s of refusals) and a probe round; a refusal that surfaced only as "timed out" would
/// still have to name its cause.
const REFUSED_WITHIN: Duration = Duration::from_secs(45);

const KEY_PASSWORD: &str = "key pass phrase";

fn tls_config(bootstrap: &str, ca: &Path) -> KafkaConfig {
    let mut kafka = KafkaConfig {
        bootstrap_servers: bootstrap.to_owned(),
        ..KafkaConfig::default()
    };
    for (k, v) in [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca.to_str().unwrap()),
    ] {
        kafka.properties.insert(k.into(), v.into());
    }
    kafka
}

fn with_client_certificate(mut kafka: KafkaConfig, pki: &TestPki) -> KafkaConfig {
    for (k, v) in [
        ("ssl.certificate.location", pki.path("client.pem")),
        ("ssl.key.location", pki.path("client.key")),
    ] {
        kafka
            .properties
            .insert(k.into(), v.to_str().unwrap().to_owned());
    }
    kafka.ssl_key_password = Some(Secret::new(KEY_PASSWORD));
    kafka
}

/// What the broker probe every service runs says of `kafka`: ready, or its error.
async fn probe(case: &str, kafka: KafkaConfig) -> Result<(), KafkaError> {
    let health = Health::default();
    let readiness = health.register("kafka");
    let shutdown = CancellationToken::new();
    let watching = tokio::spawn(instream_kafka::admin::watch_broker(
        kafka,
        readiness.clone(),
        Duration::from_millis(200),
        shutdown.clone(),
    ));
    let outcome = tokio::time::timeout(REFUSED_WITHIN, async {
        loop {
            if readiness.is_ready() {
                return Ok(());
            }
            if watching.is_finished() {
                return Err(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{case}: the probe neither became ready nor failed in time"));
    shutdown.cancel();
    match outcome {
        Ok(()) => Ok(()),
        Err(()) => watching.await.unwrap(),
    }
}

/// Produces one record and waits for the broker's acknowledgement: the whole path (metadata,
/// then the partition leader at its advertised address) works.
async fn produce_one(kafka: &KafkaConfig, topic: &str) {
    let producer = instream_kafka::client::producer(kafka, "secured-test").unwrap();
    let delivery = instream_kafka::client::send(
        &producer,
        instream_kafka::Outgoing::to(topic).key(b"k").payload(b"{}"),
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), delivery)
        .await
        .expect("delivery timed out")
        .expect("delivery future dropped")
        .expect("the broker refused the record");
}

#[tokio::test]
async fn tls_and_mutual_tls_connect_and_an_unknown_authority_or_missing_certificate_is_refused_by_name(
) {
    let pki = TestPki::new(KEY_PASSWORD).unwrap();
    let tls = TlsBroker::start(&pki).unwrap();
    tls.broker.create_topic("secured", 1).unwrap();
    let bootstrap = tls.bootstrap_servers();

    // Mutual TLS with the client key's password given as a named secret.
    let good = with_client_certificate(tls_config(&bootstrap, &pki.ca_file), &pki);
    probe("mutual TLS", good.clone())
        .await
        .expect("mutual TLS connects");
    produce_one(&good, "secured").await;

    // The cluster's certificate is from an authority the client was not told of.
    let other = TestPki::new(KEY_PASSWORD).unwrap();
    let unknown_ca = with_client_certificate(tls_config(&bootstrap, &other.ca_file), &pki);
    let err = probe("unknown authority", unknown_ca).await.unwrap_err();
    assert!(matches!(err, KafkaError::Refused(_)), "{err}");
    assert!(
        err.to_string().contains("certificate verify failed"),
        "the refusal names the cause: {err}"
    );

    // TLS without client certificates (the broker asks for none).
    let server_only = TlsBroker::start_with(&pki, false).unwrap();
    server_only.broker.create_topic("tls-only", 1).unwrap();
    let plain_tls = tls_config(&server_only.bootstrap_servers(), &pki.ca_file);
    probe("TLS", plain_tls.clone()).await.expect("TLS connects");
    produce_one(&plain_tls, "tls-only").await;

    // No client certificate where the cluster asks for one.
    let err = probe(
        "no client certificate",
        tls_config(&bootstrap, &pki.ca_file),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, KafkaError::Refused(_)), "{err}");
    assert!(err.to_string().contains("SSL"), "{err}");

    // A wrong password for the client's key is refused when the client is made.
    let mut wrong_key_password = good.clone();
    wrong_key_password.ssl_key_password = Some(Secret::new("not it"));
    let err = probe("wrong key password", wrong_key_password)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("ssl.key") || err.to_string().contains("private key"),
        "{err}"
    );
}

/// tansu with SQLite storage on a free port, started from `INSTREAM_TEST_TANSU`, requiring
/// SASL of every client.
struct Tansu {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts tansu open to make the `users` (`tansu user create` talks to the broker, which
    /// must not ask it to log in yet), then again on the same storage with authentication.
    /// `advertised`: the port clients are told to use (a TLS proxy's); default its own.
    fn start_with_users(
        binary: &str,
        users: &[(&str, &str, &str)],
        port: u16,
        advertised: u16,
    ) -> Tansu {
        let dir = tempfile::tempdir().unwrap();
        let own = instream_testkit::free_port().unwrap();
        let mut open = Tansu::spawn(binary, dir, &[], own, own);
        for (mechanism, name, password) in users {
            let status = std::process::Command::new(binary)
                .args(["user", "create", "--broker"])
                .arg(format!("tcp://127.0.0.1:{}", open.port))
                .args(["--mechanism", mechanism, name, password])
                .status()
                .unwrap();
            assert!(status.success(), "tansu user create: {status}");
        }
        let _ = open.child.kill();
        let _ = open.child.wait();
        let dir = std::mem::replace(&mut open._dir, tempfile::tempdir().unwrap());
        Tansu::spawn(binary, dir, &["--authentication"], port, advertised)
    }

    fn spawn(
        binary: &str,
        dir: tempfile::TempDir,
        extra: &[&str],
        port: u16,
        advertised: u16,
    ) -> Tansu {
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).unwrap();
        let child = std::process::Command::new(binary)
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            // Relative: tansu puts the path below its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let tansu = Tansu {
            child,
            port,
            _dir: dir,
        };
        instream_testkit::wait_until("tansu listening", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .expect("tansu did not start listening");
        tansu
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scram_config(port: u16, mechanism: &str, user: &str, password: &str) -> KafkaConfig {
    let mut kafka = KafkaConfig {
        bootstrap_servers: format!("127.0.0.1:{port}"),
        replication_factor: 1,
        ..KafkaConfig::default()
    };
    for (k, v) in [
        ("security.protocol", "sasl_plaintext"),
        ("sasl.mechanism", mechanism),
        ("sasl.username", user),
    ] {
        kafka.properties.insert(k.into(), v.into());
    }
    kafka.sasl_password = Some(Secret::new(password));
    kafka
}

#[tokio::test]
#[ignore = "needs INSTREAM_TEST_TANSU=<path of a tansu 0.6 binary> (SCRAM users need its SQLite storage)"]
async fn scram_logs_in_and_a_wrong_password_is_refused_by_name() {
    let binary =
        std::env::var("INSTREAM_TEST_TANSU").expect("INSTREAM_TEST_TANSU names the tansu binary");
    for (mechanism, tansu_mechanism) in
        [("SCRAM-SHA-512", "scram512"), ("SCRAM-SHA-256", "scram256")]
    {
        let user = format!("instream-{tansu_mechanism}");
        let port = instream_testkit::free_port().unwrap();
        let tansu = Tansu::start_with_users(
            &binary,
            &[(tansu_mechanism, &user, "s3cret pass")],
            port,
            port,
        );
        let good = scram_config(tansu.port, mechanism, &user, "s3cret pass");
        probe(mechanism, good.clone()).await.expect("SCRAM logs in");
        instream_kafka::admin::ensure_topics(
            &good,
            &[instream_kafka::admin::TopicSpec {
                name: format!("scram-{tansu_mechanism}"),
                partitions: 1,
            }],
        )
        .await
        .unwrap();
        produce_one(&good, &format!("scram-{tansu_mechanism}")).await;

        let wrong = scram_config(tansu.port, mechanism, &user, "not the password");
        let err = probe("wrong password", wrong).await.unwrap_err();
        assert!(matches!(err, KafkaError::Refused(_)), "{err}");
        assert!(
            err.to_string().contains("SASL authentication error"),
            "the refusal names the cause: {err}"
        );
    }
}

#[tokio::test]
#[ignore = "needs INSTREAM_TEST_TANSU=<path of a tansu 0.6 binary> (SCRAM users need its SQLite storage)"]
async fn sasl_ssl_scram_over_tls_to_tansu_logs_in_and_an_unknown_authority_is_refused() {
    let binary =
        std::env::var("INSTREAM_TEST_TANSU").expect("INSTREAM_TEST_TANSU names the tansu binary");
    let pki = TestPki::new(KEY_PASSWORD).unwrap();
    // TLS in front of tansu (which does not speak it), tansu advertising the proxy's port.
    let port = instream_testkit::free_port().unwrap();
    let proxy = instream_testkit::TlsProxy::start(
        port,
        &instream_testkit::TlsProxySettings {
            cert_pem: &pki.server_cert_pem,
            key_pem: &pki.server_key_pem,
            client_ca_pem: None,
        },
    )
    .unwrap();
    let _tansu = Tansu::start_with_users(
        &binary,
        &[("scram512", "instream", "s3cret pass")],
        port,
        proxy.port(),
    );
    let secured = |ca: &Path| {
        let mut kafka = scram_config(proxy.port(), "SCRAM-SHA-512", "instream", "s3cret pass");
        kafka
            .properties
            .insert("security.protocol".into(), "sasl_ssl".into());
        kafka
            .properties
            .insert("ssl.ca.location".into(), ca.to_str().unwrap().into());
        kafka
    };
    let good = secured(&pki.ca_file);
    probe("SASL_SSL", good.clone())
        .await
        .expect("SASL_SSL logs in");
    instream_kafka::admin::ensure_topics(
        &good,
        &[instream_kafka::admin::TopicSpec {
            name: "sasl-ssl".into(),
            partitions: 1,
        }],
    )
    .await
    .unwrap();
    produce_one(&good, "sasl-ssl").await;
    let other = TestPki::new(KEY_PASSWORD).unwrap();
    let err = probe("unknown authority", secured(&other.ca_file))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("certificate verify failed"),
        "{err}"
    );
}
