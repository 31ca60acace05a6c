//! Webhook notifications through the `instream-aggregator` binary, to a local HTTP receiver
//! that fails, is slow, refuses and succeeds on cue: each notification is signed with the
//! secret from `aggregator.webhook_secret_file`, retried with one id until taken, and
//! dead-lettered with the HTTP status when refused; one owed when the aggregator is killed
//! (-9) is sent by the restarted one, with the same id. Against a real Kafka-protocol broker
//! (the embedded one, or `INSTREAM_TEST_KAFKA`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use instream_testkit::{
    free_port, metric_sum, process_config_toml, unique, wait_for, ChildGuard, KafkaBroker,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_instream-aggregator");
const SECRET: &str = "webhook s3cret";
/// 2024-05-01T12:00:00Z.
const T0: i64 = 1_714_564_800_000;

/// What the receiver does with one request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// Answers 200 after this long (past the webhook's timeout).
    Slow(Duration),
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    hook: String,
    id: String,
    timestamp: String,
    signature: String,
    body: serde_json::Value,
    raw: Vec<u8>,
    answer: Answer,
}

#[derive(Default)]
struct Script {
    /// Answers per webhook path, in order; then `otherwise`.
    queued: HashMap<String, VecDeque<Answer>>,
    otherwise: HashMap<String, Answer>,
    got: Vec<Got>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Script>>);

impl Receiver {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = self.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hooks")
    }

    /// The receiver over HTTPS, with a certificate of `pki`'s private authority.
    async fn start_tls(&self, pki: &instream_testkit::TestPki) -> String {
        let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
        std::fs::write(&cert, &pki.server_cert_pem).unwrap();
        std::fs::write(&key, &pki.server_key_pem).unwrap();
        let acceptor = instream_http::tls::acceptor("test", &cert, &key).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = instream_http::Limits {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(5),
        };
        tokio::spawn(instream_http::serve(
            instream_http::Server("test_receiver"),
            listener,
            Some(acceptor),
            self.router(),
            limits,
            tokio_util::sync::CancellationToken::new(),
        ));
        format!("https://{addr}/hooks")
    }

    fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/hooks/{hook}", axum::routing::post(receive))
            .with_state(self.clone())
    }

    fn script(&self, hook: &str, queued: &[Answer], otherwise: Answer) {
        let mut script = self.0.lock().unwrap();
        script
            .queued
            .insert(hook.into(), queued.iter().copied().collect());
        script.otherwise.insert(hook.into(), otherwise);
    }

    fn got(&self, hook: &str) -> Vec<Got> {
        let script = self.0.lock().unwrap();
        script
            .got
            .iter()
            .filter(|g| g.hook == hook)
            .cloned()
            .collect()
    }

    /// Requests of `hook` answered 2xx in time.
    fn taken(&self, hook: &str) -> Vec<Got> {
        self.got(hook)
            .into_iter()
            .filter(|g| matches!(g.answer, Answer::Status(200)))
            .collect()
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(hook): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let answer = {
        let mut script = receiver.0.lock().unwrap();
        let answer = script
            .queued
            .get_mut(&hook)
            .and_then(VecDeque::pop_front)
            .or_else(|| script.otherwise.get(&hook).copied())
            .unwrap_or(Answer::Status(200));
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        script.got.push(Got {
            hook,
            id: header("x-instream-notification-id"),
            timestamp: header("x-instream-timestamp"),
            signature: header("x-instream-signature"),
            body: serde_json::from_slice(&body).unwrap_or_default(),
            raw: body.to_vec(),
            answer,
        });
        answer
    };
    match answer {
        Answer::Status(code) => StatusCode::from_u16(code).unwrap(),
        Answer::Slow(pause) => {
            tokio::time::sleep(pause).await;
            StatusCode::OK
        }
    }
}

/// What the receiver checks: HMAC-SHA256 of `<timestamp>.<raw body>` under the secret.
fn hmac_hex(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

struct Scenario {
    broker: KafkaBroker,
    _dir: tempfile::TempDir,
    pipeline: String,
    config: std::path::PathBuf,
    admin: u16,
}

/// A pipeline with 2-second windows closed by idleness after 2 s, one partition, and the
/// webhooks given (TOML tables), all under `url`.
fn scenario(hooks: &str) -> Scenario {
    scenario_with(hooks, "")
}

/// [`scenario`] with more `[aggregator]` settings.
fn scenario_with(hooks: &str, aggregator: &str) -> Scenario {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("hooks");
    broker.create_pipeline_topics(&pipeline, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("definitions.toml");
    std::fs::write(
        &defs,
        format!(
            r#"
[[pipelines]]
name = "{pipeline}"
key_field = "k"
time_field = "t"
partitions = 1
max_out_of_orderness = "0s"
idle_timeout = "2s"
[[pipelines.aggregations]]
name = "per_key"
window = {{ kind = "tumbling", size = "2s" }}
allowed_lateness = "0s"
{hooks}
"#
        ),
    )
    .unwrap();
    let secret = dir.path().join("webhook-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let admin = free_port().unwrap();
    let config = dir.path().join("instream.toml");
    std::fs::write(
        &config,
        format!(
            r#"{process}
[store]
backend = "local"
path = "{store}"
[aggregator]
flush_interval = "100ms"
early_results_every = "200ms"
webhook_secret_file = "{secret}"
{aggregator}
"#,
            process =
                process_config_toml(admin, &broker.bootstrap_servers(), &defs, "500ms", 16_384),
            store = dir.path().join("aggregates.redb").display(),
            secret = secret.display(),
        ),
    )
    .unwrap();
    Scenario {
        broker,
        _dir: dir,
        pipeline,
        config,
        admin,
    }
}

impl Scenario {
    /// Sends enriched events: (key, ms after T0) each.
    async fn send(&self, events: &[(&str, i64)]) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap_servers())
            .create()
            .unwrap();
        let topic = format!("{}.enriched", self.pipeline);
        let now = instream_event::now_millis();
        for (i, (key, at)) in events.iter().enumerate() {
            let envelope = serde_json::json!({
                "event_id": format!("e{i}"), "pipeline": self.pipeline, "key": key,
                "event_time": T0 + at, "ingest_time": now, "payload": {},
            })
            .to_string();
            producer
                .send(
                    FutureRecord::to(&topic).key(*key).payload(&envelope),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }

    /// The sum of a metric's series; `None` when the aggregator does not answer (so that a
    /// scrape that failed never reads as a zero).
    async fn metric(&self, metric: &str, filter: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        Some(metric_sum(&text, metric, filter).0)
    }

    async fn dead_letters(&self) -> Vec<instream_kafka::ops::StoredDeadLetter> {
        let kafka = instream_core::config::KafkaConfig {
            bootstrap_servers: self.broker.bootstrap_servers(),
            ..Default::default()
        };
        let topic = format!("{}.dlq", self.pipeline);
        instream_kafka::ops::read_dead_letters(&kafka, &topic, HashMap::new(), None, false)
            .await
            .map(|(letters, _)| letters)
            .unwrap_or_default()
    }

    fn start(&self) -> ChildGuard {
        instream_testkit::spawn_service(BIN, &self.config).unwrap()
    }
}

fn hook(url: &str, name: &str, extra: &str) -> String {
    format!(
        "[[pipelines.outputs]]\nkind = \"webhook\"\nname = \"{name}\"\naggregation = \"per_key\"\nurl = \"{url}/{name}\"\n{extra}\n"
    )
}

/// `flaky` (final windows of 3 events or more) meets two 503s and one answer slower than its
/// timeout before it is taken; `early` (2 events or more, early values) is taken at once,
/// while its window is open; `refused` (every final window) gets 400s, which no retry mends:
/// each of its two notifications is dead-lettered after one attempt, the status in the
/// reason. Every request is signed over its body, and a notification keeps its id through
/// its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_signed_retried_with_one_id_and_dead_lettered_when_refused() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    receiver.script(
        "flaky",
        &[
            Answer::Status(503),
            Answer::Status(503),
            Answer::Slow(Duration::from_secs(3)),
        ],
        Answer::Status(200),
    );
    receiver.script("refused", &[], Answer::Status(400));
    receiver.script("exhausted", &[], Answer::Status(503));
    let hooks = [
        hook(
            &url,
            "flaky",
            "when = { field = \"count\", op = \"gte\", value = 3 }\ntimeout = \"500ms\"\nretries = 5",
        ),
        hook(
            &url,
            "early",
            "on = \"early\"\nwhen = { field = \"count\", op = \"gte\", value = 2 }",
        ),
        hook(&url, "refused", "retries = 3"),
        hook(
            &url,
            "exhausted",
            "when = { field = \"count\", op = \"gte\", value = 3 }\nretries = 1",
        ),
        // Nothing listens on port 9 here: connections are refused.
        "[[pipelines.outputs]]\nkind = \"webhook\"\nname = \"gone\"\naggregation = \"per_key\"\nurl = \"http://127.0.0.1:9/hooks\"\nwhen = { field = \"count\", op = \"gte\", value = 3 }\nretries = 1\n".to_owned(),
    ]
    .concat();
    let s = scenario(&hooks);
    let run = s.start();
    s.send(&[("k0", 100), ("k0", 200), ("k0", 300), ("k1", 150)])
        .await;
    wait_for("flaky taken", Duration::from_secs(60), || async {
        !receiver.taken("flaky").is_empty()
    })
    .await;
    wait_for(
        "four notifications dead-lettered",
        Duration::from_secs(60),
        || async { s.dead_letters().await.len() >= 4 },
    )
    .await;
    wait_for("nothing waiting", Duration::from_secs(30), || async {
        s.metric("instream_notifications_pending", "").await == Some(0.0)
            && s.metric("instream_notifications_sent_total", "").await == Some(2.0)
    })
    .await;

    let flaky = receiver.got("flaky");
    let answers: Vec<String> = flaky.iter().map(|g| format!("{:?}", g.answer)).collect();
    assert_eq!(
        answers,
        ["Status(503)", "Status(503)", "Slow(3s)", "Status(200)"]
    );
    for got in receiver
        .got("flaky")
        .iter()
        .chain(&receiver.got("early"))
        .chain(&receiver.got("refused"))
    {
        assert_eq!(got.signature, hmac_hex(&got.timestamp, &got.raw), "{got:?}");
        let signed_at: i64 = got.timestamp.parse().expect("a Unix time");
        assert!((signed_at - instream_event::now_millis() / 1_000).abs() < 120);
        assert_eq!(
            got.body["id"],
            got.id.as_str(),
            "the id header is the body's"
        );
    }
    assert!(
        flaky.iter().all(|g| g.id == flaky[0].id),
        "one id through the retries"
    );
    let taken = &flaky[3].body;
    assert_eq!(
        (taken["group"].as_str(), taken["count"].as_i64()),
        (Some("k0"), Some(3))
    );
    assert_eq!(taken["final"], true);
    assert_eq!(taken["condition"], "count >= 3");
    assert_eq!(taken["window_start"], "2024-05-01T12:00:00Z");
    assert_eq!(taken["window_end"], "2024-05-01T12:00:02Z");

    let early = receiver.got("early");
    assert_eq!(early.len(), 1, "once per window: {early:?}");
    assert_eq!(
        early[0].body["final"], false,
        "sent while the window was open"
    );
    assert_eq!(early[0].body["group"], "k0");

    let refused = receiver.got("refused");
    assert_eq!(refused.len(), 2, "a 400 is not retried: {refused:?}");
    let letters = s.dead_letters().await;
    assert_eq!(letters.len(), 4);
    let mut reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    reasons.sort();
    assert!(
        reasons[0].starts_with("webhook `exhausted` POST http://127.0.0.1:"),
        "{reasons:?}"
    );
    assert!(
        reasons[0].ends_with("/… failed after 2 attempt(s): HTTP 503 Service Unavailable"),
        "{reasons:?}"
    );
    assert!(
        reasons[1]
            .starts_with("webhook `gone` POST http://127.0.0.1:9/… failed after 2 attempt(s): "),
        "{reasons:?}"
    );
    assert!(
        !reasons[1].contains("/hooks"),
        "no path in a reason: {reasons:?}"
    );
    for refused in &reasons[2..] {
        assert!(
            refused.starts_with("webhook `refused` POST")
                && refused.ends_with("after 1 attempt(s): HTTP 400 Bad Request"),
            "{refused}"
        );
    }
    for letter in &letters {
        assert_eq!(letter.code, "webhook_failed");
        assert_eq!(letter.service, "aggregator");
        let body: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
        assert_eq!(
            letter.key.as_deref(),
            body["id"].as_str().map(str::as_bytes)
        );
    }

    let output = |name: &str| format!("output=\"{name}\"");
    assert_eq!(
        s.metric("instream_notifications_sent_total", &output("flaky"))
            .await,
        Some(1.0)
    );
    assert_eq!(
        s.metric("instream_notifications_sent_total", &output("early"))
            .await,
        Some(1.0)
    );
    assert_eq!(
        s.metric("instream_notifications_failed_total", &output("refused"))
            .await,
        Some(2.0)
    );
    assert_eq!(
        s.metric(
            "instream_notification_attempt_failures_total",
            "output=\"gone\",reason=\"connect\""
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        s.metric(
            "instream_notification_attempt_failures_total",
            "reason=\"timeout\""
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        s.metric(
            "instream_notification_attempt_failures_total",
            "reason=\"status\""
        )
        .await,
        Some(6.0),
        "two 503s and two 400s to flaky and refused, two 503s to exhausted"
    );
    drop(run);
}

/// A receiver down (503) while the aggregator closes a window: the notification is owed in
/// the checkpoint that dropped the window. The aggregator is killed (-9) and the receiver
/// recovers; the restarted aggregator, which has nothing to read again, sends the owed
/// notification with the id the first one tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_owed_at_a_kill_is_sent_after_the_restart_with_the_same_id() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    receiver.script("down", &[], Answer::Status(503));
    let s = scenario(&hook(&url, "down", "retries = 20"));
    let mut run = s.start();
    s.send(&[("k0", 100)]).await;
    wait_for(
        "an attempt, and the window closed and checkpointed",
        Duration::from_secs(60),
        || async {
            !receiver.got("down").is_empty()
                && s.metric("instream_open_windows", "service=\"aggregator\"")
                    .await
                    == Some(0.0)
                && s.metric("instream_window_writes_total", "")
                    .await
                    .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    let tried = receiver.got("down")[0].id.clone();
    run.0.kill().unwrap();
    run.0.wait().unwrap();
    receiver.script("down", &[], Answer::Status(200));
    let restarted = s.start();
    wait_for(
        "the owed notification taken",
        Duration::from_secs(60),
        || async { !receiver.taken("down").is_empty() },
    )
    .await;
    let taken = receiver.taken("down");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].id, tried, "the same notification, by its id");
    assert_eq!(taken[0].body["count"], 1);
    wait_for(
        "the restarted aggregator counts it sent",
        Duration::from_secs(30),
        || async {
            s.metric("instream_notifications_sent_total", "output=\"down\"")
                .await
                == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        s.metric("instream_window_writes_total", "").await,
        Some(0.0),
        "the restarted aggregator wrote nothing again: the notification came from the checkpoint"
    );
    drop(restarted);
}

/// Over HTTPS to a receiver whose certificate comes from a private authority: taken once the
/// aggregator trusts that authority (`aggregator.webhook_tls_ca_file`); without it the
/// certificate is refused, and the dead letter says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_go_over_https_to_a_receiver_of_a_private_authority() {
    let pki = instream_testkit::TestPki::new("unused").unwrap();
    let receiver = Receiver::default();
    let url = receiver.start_tls(&pki).await;
    let trusted = format!("webhook_tls_ca_file = \"{}\"", pki.ca_file.display());
    for (trust, expect_taken) in [(trusted.as_str(), true), ("", false)] {
        let s = scenario_with(&hook(&url, "secure", "retries = 0"), trust);
        let run = s.start();
        s.send(&[("k0", 100)]).await;
        if expect_taken {
            wait_for("taken over HTTPS", Duration::from_secs(60), || async {
                !receiver.taken("secure").is_empty()
            })
            .await;
            let got = &receiver.taken("secure")[0];
            assert_eq!(got.signature, hmac_hex(&got.timestamp, &got.raw));
        } else {
            wait_for(
                "refused and dead-lettered",
                Duration::from_secs(60),
                || async { !s.dead_letters().await.is_empty() },
            )
            .await;
            let reason = s.dead_letters().await[0].reason.clone();
            assert!(
                reason.contains("webhook `secure` POST https://127.0.0.1:")
                    && reason.contains("certificate"),
                "{reason}"
            );
            assert_eq!(receiver.taken("secure").len(), 1, "nothing more reached it");
        }
        drop(run);
    }
}
