//! query-api over real HTTP: authentication, parameters, pagination, against the embedded
//! store (the store trait's conformance suite covers ScyllaDB and the local file).

use std::sync::Arc;

use instream_core::config::Config;
use instream_core::Health;
use instream_query_api::QueryApi;
use instream_store::{AggregateStore, EmbeddedStore, WindowAggregate};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const KEY: &str = "s3cret-key";
/// `printf %s s3cret-key | sha256sum`
const KEY_SHA256: &str = "817b823905cc7853f381992575a9041fcdb17fc70e776707abfb4d7c59ecbf3f";
const T0: i64 = 1_714_564_800_000; // 2024-05-01T12:00:00Z

async fn start(keys: Vec<String>, anonymous: bool) -> Result<(String, CancellationToken), String> {
    start_with(keys, anonymous, None).await
}

async fn start_with(
    keys: Vec<String>,
    anonymous: bool,
    tls: Option<instream_core::config::TlsFiles>,
) -> Result<(String, CancellationToken), String> {
    let store = Arc::new(EmbeddedStore::default());
    let rows: Vec<WindowAggregate> = (0..5)
        .map(|i| WindowAggregate {
            pipeline: "orders".into(),
            aggregation: "per_minute".into(),
            group_key: "c1".into(),
            window_start: T0 + i * 60_000,
            window_end: T0 + (i + 1) * 60_000,
            definition_version: 1,
            count: i + 1,
            values: json!({"sum_amount": (i + 1) * 10})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            // The oldest windows are final, the newest still open.
            is_final: i < 3,
        })
        .chain(std::iter::once(WindowAggregate {
            pipeline: "orders".into(),
            aggregation: "per_level".into(),
            group_key: r#"["c1","1"]"#.into(),
            window_start: T0,
            window_end: T0 + 60_000,
            definition_version: 1,
            count: 7,
            values: Default::default(),
            is_final: false,
        }))
        .collect();
    store.upsert(&rows).await.map_err(|e| e.to_string())?;
    let mut config = Config::default();
    config.query_api.listen = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    config.query_api.api_key_sha256 = keys;
    config.query_api.allow_anonymous = anonymous;
    config.query_api.tls = tls;
    // No broker here to audit (tests/audit.rs runs the periodic audit).
    config.query_api.audit_every = std::time::Duration::ZERO;
    let token = CancellationToken::new();
    let definitions = instream_pipeline::parse_document(
        "[[pipelines]]\nname = \"orders\"\nkey_field = \"c\"\ntime_field = \"t\"\n\
         [[pipelines.aggregations]]\nname = \"per_minute\"\nwindow = { kind = \"tumbling\", size = \"1m\" }\n\
         [[pipelines.aggregations]]\nname = \"per_level\"\ngroup_by = [\"key\", \"payload.level\"]\n\
         window = { kind = \"tumbling\", size = \"1m\" }\n",
    )
    .map_err(|e| e.to_string())?;
    // A receiver keeps the last value after its sender is gone.
    let (_, catalog) = tokio::sync::watch::channel(std::sync::Arc::new(
        instream_pipeline::Catalog::new(definitions.pipelines),
    ));
    let api = QueryApi::start(
        &instream_coord::service_context(
            config,
            Health::default(),
            token.clone(),
            "127.0.0.1:0".parse().unwrap(),
        ),
        store,
        catalog,
    )
    .await
    .map_err(|e| e.to_string())?;
    let base = format!("http://{}", api.local_addr().map_err(|e| e.to_string())?);
    tokio::spawn(api.serve(token.clone()));
    Ok((base, token))
}

async fn get(url: &str, key: Option<&str>) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("query-api answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        headers,
    )
}

#[tokio::test]
async fn keys_are_checked_and_pages_walk_the_range() {
    assert_eq!(
        KEY_SHA256,
        sha2_check::digest_hex(KEY),
        "the fixture's digest is the key's"
    );
    let (base, token) = start(vec![KEY_SHA256.into()], false).await.unwrap();
    let url = format!(
        "{base}/v1/pipelines/orders/aggregates/per_minute?key=c1&from=2024-05-01T12:00:00Z&to={}",
        T0 + 3_600_000
    );

    let (status, body, headers) = get(&url, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "missing_api_key");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, body, _) = get(&url, Some("wrong")).await;
    assert_eq!(status, 403, "{body}");

    let (status, body, _) = get(&url, Some(KEY)).await;
    assert_eq!(status, 200, "{body}");
    let windows = body["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 5);
    assert_eq!(windows[0]["window_start"], "2024-05-01T12:00:00Z");
    assert_eq!(windows[4]["count"], 5);
    assert_eq!(windows[4]["values"]["sum_amount"], 50);
    assert_eq!(windows[0]["final"], true);
    assert_eq!(windows[4]["final"], false);
    assert!(body.get("next_page_token").is_none());

    // Two per page: 2 + 2 + 1, each page continuing where the last ended.
    let mut seen = Vec::new();
    let mut page_url = format!("{url}&limit=2");
    for expected in [2, 2, 1] {
        let (status, body, _) = get(&page_url, Some(KEY)).await;
        assert_eq!(status, 200, "{body}");
        let windows = body["windows"].as_array().unwrap();
        assert_eq!(windows.len(), expected, "{body}");
        seen.extend(windows.iter().map(|w| w["count"].as_i64().unwrap()));
        if let Some(next) = body["next_page_token"].as_str() {
            page_url = format!("{url}&limit=2&page_token={next}");
        }
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);

    for (query, error) in [
        ("from=yesterday&key=c1", "bad_time"),
        ("from=2024-05-01T12:00:00Z", "missing_key"),
        (
            "key=c1&from=2024-05-01T13:00:00Z&to=2024-05-01T12:00:00Z",
            "empty_range",
        ),
        ("key=c1&limit=100000", "bad_limit"),
        ("key=c1&page_token=x", "bad_page_token"),
    ] {
        let (status, body, _) = get(
            &format!("{base}/v1/pipelines/orders/aggregates/per_minute?{query}"),
            Some(KEY),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(error)),
            "{query}: {body}"
        );
    }
    token.cancel();
}

#[tokio::test]
async fn a_key_of_several_fields_is_read_as_the_json_array_it_is() {
    let (base, token) = start(vec![KEY_SHA256.into()], false).await.unwrap();
    let url = |key: &str| {
        format!(
            "{base}/v1/pipelines/orders/aggregates/per_level?from={T0}&to={}&key={}",
            T0 + 60_000,
            percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC)
        )
    };
    // Spaces and a number's other spelling find the window stored as `["c1","1"]`.
    let (status, body, _) = get(&url(r#"[ "c1", 1.0 ]"#), Some(KEY)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["windows"][0]["count"], 7, "{body}");
    // Not an array of two values: refused, saying what is expected.
    for wrong in ["c1|1", r#"["c1"]"#, r#"["c1","1","x"]"#] {
        let (status, body, _) = get(&url(wrong), Some(KEY)).await;
        assert_eq!(status, 400, "{wrong}: {body}");
        assert_eq!(body["error"], "bad_key", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("JSON array of 2 values"),
            "{body}"
        );
    }
    token.cancel();
}

#[tokio::test]
async fn without_keys_it_refuses_to_start_unless_anonymous_is_allowed() {
    let refused = start(Vec::new(), false).await.unwrap_err();
    assert!(refused.contains("api_key_sha256"), "{refused}");
    let (base, token) = start(Vec::new(), true).await.unwrap();
    let (status, body, _) = get(
        &format!("{base}/v1/pipelines/orders/aggregates/per_minute?key=c1&from=0"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["windows"].as_array().unwrap().len(), 5);
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_bad_queries_and_idle_clients_get_precise_answers() {
    let (base, token) = start(vec![KEY_SHA256.into()], false).await.unwrap();
    let url = |path: &str| format!("{base}/v1/pipelines/{path}");
    // Unknown pipeline or aggregation: 404, not an empty page; a long name is not echoed.
    for (path, error) in [
        ("nope/aggregates/per_minute?key=c1", "unknown_pipeline"),
        ("orders/aggregates/nope?key=c1", "unknown_aggregation"),
    ] {
        let (status, body, _) = get(&url(path), Some(KEY)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some(error)),
            "{body}"
        );
    }
    // A cache-buster is ignored; an escape in a name names nothing (after the key check).
    let (status, _, _) = get(&url("orders/aggregates/per_minute?key=c1&_=123"), Some(KEY)).await;
    assert_eq!(status, 200);
    let (status, body, _) = get(&url("%FFrders/aggregates/per_minute?key=c1"), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_api_key"))
    );
    let (status, body, _) = get(&url("%FFrders/aggregates/per_minute?key=c1"), Some(KEY)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_pipeline"))
    );
    let long = "x".repeat(4_000);
    let (status, body, _) = get(&url(&format!("{long}/aggregates/a?key=c1")), Some(KEY)).await;
    assert_eq!(status, 404);
    assert!(body["message"].as_str().unwrap().len() < 200, "{body}");
    // The key is checked before the query string; query errors are JSON.
    let (status, body, _) = get(&url("orders/aggregates/per_minute?limit=abc"), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_api_key"))
    );
    for query in ["limit=abc&key=c1", "key=%FF", "key=a&key=b"] {
        let (status, body, _) = get(
            &url(&format!("orders/aggregates/per_minute?{query}")),
            Some(KEY),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_query")),
            "{query}: {body}"
        );
    }
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_lock_out_a_query() {
    let store = Arc::new(EmbeddedStore::default());
    let mut config = Config::default();
    config.query_api.listen = "127.0.0.1:0".parse().unwrap();
    config.query_api.allow_anonymous = true;
    config.query_api.max_connections = 50;
    config.query_api.header_read_timeout = std::time::Duration::from_secs(30);
    let token = CancellationToken::new();
    let (_, catalog) = tokio::sync::watch::channel(Arc::new(instream_pipeline::Catalog::default()));
    let api = QueryApi::start(
        &instream_coord::service_context(
            config,
            Health::default(),
            token.clone(),
            "127.0.0.1:0".parse().unwrap(),
        ),
        store,
        catalog,
    )
    .await
    .unwrap();
    let addr = api.local_addr().unwrap();
    tokio::spawn(api.serve(token.clone()));
    let idle: Vec<std::net::TcpStream> = (0..500)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    assert!(idle.len() > 50);
    let asked = std::time::Instant::now();
    let (status, _, _) = get(
        &format!("http://{addr}/v1/pipelines/orders/aggregates/a?key=c1"),
        None,
    )
    .await;
    assert_eq!(
        status, 404,
        "answered although 500 idle connections were open"
    );
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    drop(idle);
    token.cancel();
}

mod sha2_check {
    /// The digest the way an operator makes it, to keep the fixture honest.
    pub fn digest_hex(key: &str) -> String {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(key.as_bytes())?;
                child.wait_with_output()
            })
            .expect("sha256sum runs");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

#[tokio::test]
async fn query_api_tls_serves_https_with_its_certificate_and_names_an_unreadable_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let files = |key: &str| instream_core::config::TlsFiles {
        cert_file: dir.path().join("cert.pem"),
        key_file: dir.path().join(key),
    };
    let err = start_with(vec![KEY_SHA256.into()], false, Some(files("missing.pem")))
        .await
        .unwrap_err();
    assert!(err.contains("query_api.tls.key_file"), "{err}");

    let (base, token) = start_with(vec![KEY_SHA256.into()], false, Some(files("key.pem")))
        .await
        .unwrap();
    let addr = base.trim_start_matches("http://").to_owned();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(certified.cert.pem().as_bytes()).unwrap())
        .unwrap();
    let client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("handshake with the configured certificate");
    let request = format!(
        "GET /v1/pipelines/orders/aggregates/per_minute?key=c1 HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"windows\""), "{answer}");
    token.cancel();
}
