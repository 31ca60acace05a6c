//! Bad input against the `instream-ingest` binary on the embedded broker: each kind gets its
//! precise status and code, a counter moves, the valid events of the same batch are still
//! accepted, and the process stays up throughout. API keys: missing, unknown, for another
//! pipeline, and over its rate.

use std::io::Write;
use std::time::Duration;

use instream_testkit::{spawn_service, unique, KafkaBroker};
use serde_json::Value;

mod common;
use common::{wait_ok, write_config, BIN};

const GOOD: &str = r#"{"account":"a1","ts":1700000000000}"#;

const KEY: &str = "producer-key";
const OTHER_KEY: &str = "other-pipeline-key";
const SLOW_KEY: &str = "slow-key";

fn digest(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Client {
    http: reqwest::Client,
    url: String,
    key: Option<&'static str>,
}

impl Client {
    async fn post(&self, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
        let mut request = self.http.post(&self.url).body(body);
        if let Some(key) = self.key {
            request = request.bearer_auth(key);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        let json = answer.json().await.unwrap_or(Value::Null);
        (status, json)
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_error_and_spares_the_valid_events() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("bad");
    broker.create_pipeline_topics(&pipeline, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, http) = write_config(
        dir.path(),
        &broker.bootstrap_servers(),
        &pipeline,
        &format!(
            "max_body_bytes = 65536\nmax_depth = 16\nmax_string_bytes = 1024\n\
             max_events_per_request = 20\nmax_in_flight_events = 100\n\
             api_keys = [\
             {{ name = \"producer\", sha256 = \"{}\", pipelines = [\"{pipeline}\"] }},\
             {{ name = \"other\", sha256 = \"{}\", pipelines = [\"elsewhere\"] }},\
             {{ name = \"slow\", sha256 = \"{}\", events_per_second = 5 }}]",
            digest(KEY),
            digest(OTHER_KEY),
            digest(SLOW_KEY)
        ),
    );
    // The pipeline's JSON Schema: `qty`, when present, a positive integer.
    let definitions = dir.path().join("definitions.toml");
    let mut text = std::fs::read_to_string(&definitions).unwrap();
    text.push_str(
        "schema = '{\"type\":\"object\",\"properties\":{\"qty\":{\"type\":\"integer\",\"minimum\":1}}}'\n",
    );
    std::fs::write(&definitions, text).unwrap();
    let mut child = spawn_service(BIN, &config).unwrap();
    wait_ok(
        &format!("http://127.0.0.1:{admin}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    let url = format!("http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events");
    let with_key = |key| Client {
        http: reqwest::Client::new(),
        url: url.clone(),
        key,
    };
    let client = with_key(Some(KEY));

    // Keys: none, unknown, for another pipeline; then one over its rate.
    let good = || GOOD.as_bytes().to_vec();
    let (status, a) = with_key(None).post(&[], good()).await;
    assert_eq!((status, a["error"].as_str()), (401, Some("unauthorized")));
    let (status, a) = with_key(Some("guess")).post(&[], good()).await;
    assert_eq!((status, a["error"].as_str()), (401, Some("unauthorized")));
    let (status, a) = with_key(Some(OTHER_KEY)).post(&[], good()).await;
    assert_eq!((status, a["error"].as_str()), (403, Some("forbidden")));
    assert!(a["message"].as_str().unwrap().contains("`other`"), "{a}");
    let slow = with_key(Some(SLOW_KEY));
    let twenty = format!("[{}]", vec![GOOD; 20].join(","));
    let (status, a) = slow.post(&[], twenty.into_bytes()).await;
    assert_eq!(status, 200, "a full request fits the burst: {a}");
    let answer = slow
        .http
        .post(&url)
        .bearer_auth(SLOW_KEY)
        .body(GOOD)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 429);
    let wait: u64 = answer.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&wait), "Retry-After {wait}");

    // One NDJSON batch holding every kind of bad event between good ones.
    let deep = format!(
        r#"{{"account":"a","ts":1,"x":{}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let long = format!(r#"{{"account":"a","ts":1,"x":"{}"}}"#, "y".repeat(2_000));
    let mut ndjson = Vec::new();
    for line in [
        GOOD.as_bytes(),
        b"{\"account\": oops}",                 // 1 malformed JSON
        br#"{"account":["a"],"ts":1}"#,         // 2 wrong type for the key
        br#"{"ts":1}"#,                         // 3 no key
        br#"{"account":"a"}"#,                  // 4 no time
        deep.as_bytes(),                        // 5 10,000 levels deep
        b"{\"account\":\"\xff\xfe\",\"ts\":1}", // 6 invalid UTF-8
        long.as_bytes(),                        // 7 a 2,000-byte string
        br#"{"account":"a","ts":1,"qty":0}"#,   // 8 against the schema
        br#"{"account":"a2","ts":"2024-05-01T12:00:00Z"}"#,
    ] {
        ndjson.extend_from_slice(line);
        ndjson.push(b'\n');
    }
    let (status, answer) = client
        .post(&[("content-type", "application/x-ndjson")], ndjson.clone())
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 2, "{answer}");
    let codes: Vec<(u64, &str)> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        codes,
        [
            (1, "malformed_json"),
            (2, "bad_key"),
            (3, "missing_key"),
            (4, "missing_time"),
            (5, "too_deep"),
            (6, "invalid_utf8"),
            (7, "string_too_long"),
            (8, "schema"),
        ]
    );
    for r in answer["rejected"].as_array().unwrap() {
        assert!(!r["reason"].as_str().unwrap().is_empty(), "{r}");
    }

    // The same events as a JSON array, gzip-compressed: the same answer.
    let mut array = b"[".to_vec();
    for (i, line) in ndjson
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i > 0 {
            array.push(b',');
        }
        array.extend_from_slice(line);
    }
    array.push(b']');
    let (status, gz_answer) = client
        .post(&[("content-encoding", "gzip")], gzip(&array))
        .await;
    assert_eq!(status, 200, "{gz_answer}");
    assert_eq!(gz_answer["rejected"], answer["rejected"]);
    assert_eq!(gz_answer["accepted"], 2);
    // And zstd.
    let zs = zstd::encode_all(GOOD.as_bytes(), 1).unwrap();
    let (status, _) = client.post(&[("content-encoding", "zstd")], zs).await;
    assert_eq!(status, 200);

    // Whole-request refusals.
    let (status, a) = client.post(&[], b"[{}".to_vec()).await;
    assert_eq!((status, a["error"].as_str()), (400, Some("malformed_body")));
    let (status, a) = client.post(&[], vec![b' '; 70_000]).await;
    assert_eq!(
        (status, a["error"].as_str()),
        (413, Some("body_too_large")),
        "an oversized body is refused (and counted) like any other"
    );
    let twenty_one = format!("[{}]", vec![GOOD; 21].join(","));
    let (status, a) = client.post(&[], twenty_one.into_bytes()).await;
    assert_eq!(
        (status, a["error"].as_str()),
        (413, Some("too_many_events"))
    );
    let bomb = gzip(&vec![b' '; 10 << 20]);
    assert!(bomb.len() < 65_536);
    let (status, a) = client.post(&[("content-encoding", "gzip")], bomb).await;
    assert_eq!((status, a["error"].as_str()), (413, Some("body_too_large")));
    let (status, a) = client
        .post(&[("content-encoding", "gzip")], b"not gzip".to_vec())
        .await;
    assert_eq!((status, a["error"].as_str()), (400, Some("corrupt_body")));
    let (status, a) = client
        .post(&[("content-encoding", "br")], GOOD.as_bytes().to_vec())
        .await;
    assert_eq!(
        (status, a["error"].as_str()),
        (415, Some("unsupported_encoding"))
    );
    let unknown = Client {
        http: reqwest::Client::new(),
        url: format!("http://127.0.0.1:{http}/v1/pipelines/nope/events"),
        key: Some(OTHER_KEY),
    };
    let (status, _) = unknown.post(&[], good()).await;
    assert_eq!(
        status, 403,
        "a key that may not write there learns nothing of it"
    );
    let unknown = Client {
        key: Some(SLOW_KEY),
        ..unknown
    };
    let (status, a) = unknown.post(&[], good()).await;
    assert_eq!(
        (status, a["error"].as_str()),
        (404, Some("unknown_pipeline"))
    );

    // Counters moved for each kind, and the process is still up and ready.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for code in [
        "malformed_json",
        "too_deep",
        "invalid_utf8",
        "string_too_long",
        "missing_time",
        "schema",
    ] {
        assert!(
            metrics.contains(&format!("code=\"{code}\"")),
            "no rejection counted for {code}"
        );
    }
    assert!(
        metrics.contains("instream_ingest_rate_limited_total{key=\"slow\"} 1"),
        "the 429 is counted:\n{metrics}"
    );
    for error in [
        "body_too_large",
        "corrupt_body",
        "unsupported_encoding",
        "malformed_body",
        "unauthorized",
        "forbidden",
    ] {
        assert!(
            metrics.contains(&format!(
                "instream_ingest_refused_total{{error=\"{error}\"}}"
            )),
            "no refusal counted for {error}:\n{metrics}"
        );
    }
    wait_ok(
        &format!("http://127.0.0.1:{admin}/readyz"),
        Duration::from_secs(5),
    )
    .await;
    child.terminate().unwrap();
    assert!(child.wait_exit(Duration::from_secs(15)).unwrap().success());
}
