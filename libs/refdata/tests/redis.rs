//! RedisRefStore against a real redis-server: one pipelined batch answers hashes, JSON
//! strings, missing keys and wrong-type keys one by one; a dead server is an error to retry.

use instream_core::config::RefDataConfig;
use instream_pipeline::RecordShape;
use instream_refdata::{Found, RedisRefStore, RefDataError, RefStore};
use instream_testkit::RedisServer;

fn config(url: String) -> RefDataConfig {
    RefDataConfig {
        redis_url: url,
        timeout: std::time::Duration::from_secs(2),
        ..RefDataConfig::default()
    }
}

async fn run(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query_async(conn).await.unwrap();
}

#[tokio::test]
async fn a_batch_answers_each_key_on_its_own() {
    let server = RedisServer::start().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    run(
        &mut conn,
        &["HSET", "customer:1", "tier", "gold", "region", "eu"],
    )
    .await;
    run(
        &mut conn,
        &["SET", "airport:OSL", r#"{"city":"Oslo","elevation":208}"#],
    )
    .await;
    run(&mut conn, &["SET", "airport:BAD", "not json"]).await;
    run(&mut conn, &["SET", "customer:str", "a string, not a hash"]).await;

    let store = RedisRefStore::connect(&config(server.url())).await.unwrap();
    store.ping().await.unwrap();
    let answers = store
        .lookup_many(&[
            ("customer:1".into(), RecordShape::Hash),
            ("customer:404".into(), RecordShape::Hash),
            ("airport:OSL".into(), RecordShape::Json),
            ("airport:BAD".into(), RecordShape::Json),
            ("customer:str".into(), RecordShape::Hash),
            ("airport:404".into(), RecordShape::Json),
        ])
        .await
        .unwrap();
    assert_eq!(answers.len(), 6);
    match &answers[0] {
        Found::Record(r) => {
            assert_eq!(r["tier"], "gold");
            assert_eq!(r["region"], "eu");
        }
        other => panic!("customer:1: {other:?}"),
    }
    assert_eq!(answers[1], Found::Missing);
    match &answers[2] {
        Found::Record(r) => assert_eq!(r["elevation"], 208),
        other => panic!("airport:OSL: {other:?}"),
    }
    assert!(
        matches!(answers[3], Found::Malformed(_)),
        "{:?}",
        answers[3]
    );
    assert!(
        matches!(answers[4], Found::Malformed(_)),
        "{:?}",
        answers[4]
    );
    assert_eq!(answers[5], Found::Missing);
}

#[tokio::test]
async fn a_stopped_server_is_an_error_to_retry_not_a_miss() {
    let server = RedisServer::start().unwrap();
    let store = RedisRefStore::connect(&config(server.url())).await.unwrap();
    drop(server);
    let err = store
        .lookup_many(&[("customer:1".into(), RecordShape::Hash)])
        .await
        .unwrap_err();
    assert!(matches!(err, RefDataError::Unavailable(_)), "{err}");
}

/// Cluster mode: a batch whose keys fall in every node's slots is answered key by key, a
/// wrong-type key is that key's problem, and a version pointer is read like on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_answers_keys_spread_over_every_node() {
    let cluster = instream_testkit::RedisCluster::start().unwrap();
    let nodes = cluster.urls();
    let writer = redis::cluster::ClusterClient::new(nodes.clone()).unwrap();
    let mut w = writer.get_async_connection().await.unwrap();
    for i in 0..300 {
        let _: () = redis::cmd("HSET")
            .arg(format!("customer:{i}"))
            .arg("tier")
            .arg(format!("t{i}"))
            .query_async(&mut w)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg("customer:str")
        .arg("not a hash")
        .query_async(&mut w)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(instream_refdata::versions::pointer_key(
            "orders", "customer",
        ))
        .arg(4)
        .query_async(&mut w)
        .await
        .unwrap();
    let store = RedisRefStore::connect(&RefDataConfig {
        redis_mode: instream_core::config::RedisMode::Cluster,
        redis_nodes: nodes,
        ..config("redis://unused:1".into())
    })
    .await
    .unwrap();
    store.ping().await.unwrap();
    let mut lookups: Vec<(String, RecordShape)> = (0..300)
        .map(|i| (format!("customer:{i}"), RecordShape::Hash))
        .collect();
    lookups.push(("customer:none".into(), RecordShape::Hash));
    lookups.push(("customer:str".into(), RecordShape::Hash));
    let found = store.lookup_many(&lookups).await.unwrap();
    for (i, f) in found.iter().take(300).enumerate() {
        match f {
            Found::Record(r) => assert_eq!(r["tier"], format!("t{i}")),
            other => panic!("customer:{i}: {other:?}"),
        }
    }
    assert_eq!(found[300], Found::Missing);
    assert!(
        matches!(found[301], Found::Malformed(_)),
        "{:?}",
        found[301]
    );
    store
        .track(&[("orders".into(), "customer".into())])
        .await
        .unwrap();
    assert_eq!(store.version("orders", "customer"), Some(4));
}

/// Sentinel mode: the master is found through the sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_mode_finds_the_master_through_the_sentinel() {
    let sentinel = instream_testkit::RedisSentinel::start().unwrap();
    let client = redis::Client::open(sentinel.master().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    run(&mut conn, &["HSET", "customer:1", "tier", "gold"]).await;
    let store = RedisRefStore::connect(&RefDataConfig {
        timeout: std::time::Duration::from_secs(2),
        ..sentinel.refdata_config()
    })
    .await
    .unwrap();
    let found = store
        .lookup_many(&[
            ("customer:1".into(), RecordShape::Hash),
            ("customer:2".into(), RecordShape::Hash),
        ])
        .await
        .unwrap();
    assert!(matches!(&found[0], Found::Record(r) if r["tier"] == "gold"));
    assert_eq!(found[1], Found::Missing);
    // A name no sentinel knows is an error to retry, not a panic.
    let unknown = RedisRefStore::connect(&RefDataConfig {
        sentinel_master: "other".into(),
        timeout: std::time::Duration::from_secs(2),
        ..sentinel.refdata_config()
    })
    .await;
    assert!(matches!(unknown, Err(RefDataError::Unavailable(_))));
}

/// Why connecting with `cfg` fails (the test fails if it does not).
async fn refused(cfg: &RefDataConfig) -> RefDataError {
    match RedisRefStore::connect(cfg).await {
        Ok(_) => panic!("connected, though it should not have"),
        Err(error) => error,
    }
}

/// A certificate for 127.0.0.1 signed by itself (the private authority the servers' clients
/// must be told of), as PEM certificate and key, and the authority written to a file.
fn private_authority() -> (String, String, tempfile::TempDir, std::path::PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let cert = certified.cert.pem();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    (cert, certified.signing_key.serialize_pem(), dir, ca)
}

#[tokio::test]
async fn tls_with_a_private_authority_and_plain_text_refused() {
    let (cert, key, dir, ca) = private_authority();
    let server = RedisServer::start_tls(&cert, &key).unwrap();
    let tls = RefDataConfig {
        tls_ca_file: Some(ca.clone()),
        ..config(server.url())
    };
    assert!(server.url().starts_with("rediss://"));
    let store = RedisRefStore::connect(&tls).await.unwrap();
    // Written and read back over TLS (the load path's connection and the lookup path).
    let mut conn = store.connection().unwrap();
    let _: () = redis::cmd("HSET")
        .arg("customer:tls")
        .arg("tier")
        .arg("gold")
        .query_async(&mut conn)
        .await
        .unwrap();
    let found = store
        .lookup_many(&[("customer:tls".into(), RecordShape::Hash)])
        .await
        .unwrap();
    assert!(
        matches!(&found[0], Found::Record(r) if r.get("tier") == Some(&serde_json::json!("gold")))
    );
    store.ping().await.unwrap();
    // Without the authority the certificate is not trusted; without TLS the server does not
    // answer; an unreadable authority file is a setting to fix, not an outage to wait out.
    let untrusted = RedisRefStore::connect(&config(server.url())).await;
    assert!(matches!(untrusted, Err(RefDataError::Unavailable(_))));
    let plain = RedisRefStore::connect(&config(server.url().replace("rediss", "redis"))).await;
    assert!(matches!(plain, Err(RefDataError::Unavailable(_))));
    let missing = refused(&RefDataConfig {
        tls_ca_file: Some(dir.path().join("nope.pem")),
        ..config(server.url())
    })
    .await;
    assert!(matches!(missing, RefDataError::Settings(_)), "{missing}");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let garbage = refused(&RefDataConfig {
        tls_ca_file: Some(garbage),
        ..config(server.url())
    })
    .await;
    assert!(matches!(garbage, RefDataError::Settings(_)), "{garbage}");
}

/// Sentinel failover: the master killed with -9, the sentinel promotes its replica, and the
/// same store answers again from the new master without a restart; in between, lookups fail
/// as an outage to retry (the enricher holds its batch), never as a missing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_without_a_restart() {
    let mut sentinel = instream_testkit::RedisSentinel::start_with_replica().unwrap();
    let client = redis::Client::open(sentinel.master().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    run(&mut conn, &["HSET", "customer:1", "tier", "gold"]).await;
    let acknowledged: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acknowledged, 1, "the replica did not take the write");
    let store = RedisRefStore::connect(&RefDataConfig {
        timeout: std::time::Duration::from_secs(2),
        ..sentinel.refdata_config()
    })
    .await
    .unwrap();
    let lookup = [("customer:1".to_string(), RecordShape::Hash)];
    let gold = |found: &[Found]| matches!(&found[0], Found::Record(r) if r["tier"] == "gold");
    assert!(gold(&store.lookup_many(&lookup).await.unwrap()));

    let replica = sentinel.replica().unwrap().port();
    sentinel.kill_master().unwrap();
    let killed = std::time::Instant::now();
    let mut outages = 0;
    loop {
        match store.lookup_many(&lookup).await {
            Ok(found) => {
                assert!(gold(&found), "{found:?}");
                break;
            }
            Err(RefDataError::Unavailable(_)) => outages += 1,
            Err(other) => panic!("not an outage to retry: {other}"),
        }
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(60),
            "no answer 60 s after the master was killed ({outages} failed lookups)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The only server left is the promoted replica, and the sentinel names it.
    assert!(outages > 0, "the kill was not noticed");
    assert!(sentinel.names_master(replica));
    eprintln!(
        "failover followed {:.1} s after the kill ({outages} failed lookups)",
        killed.elapsed().as_secs_f64()
    );
    store.ping().await.unwrap();
}

/// `refdata load` into a cluster: each record lands on its slot's node (a pipelined chunk
/// would span slots, which a cluster refuses), the pointer switches, a cluster-mode store
/// reads the new version, and the load after next retires the oldest version's keys on every
/// master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_loads_versions_and_retires_old_ones_on_every_master() {
    let cluster = instream_testkit::RedisCluster::start().unwrap();
    loads_versions_and_retires_old_ones_on_every_master(cluster.urls()).await;
}

/// The same with ACL users only (`default` off on every node): the load, the retirement's
/// scan of every master and the lookups all log in as the user of the node URLs; a wrong
/// password is refused, and the error does not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_logs_in_as_an_acl_user() {
    let cluster = instream_testkit::RedisCluster::start_acl("loader", "Cluster-Pass-5").unwrap();
    let nodes = cluster.urls();
    assert!(nodes.iter().all(|u| u.contains("loader:Cluster-Pass-5@")));
    loads_versions_and_retires_old_ones_on_every_master(nodes.clone()).await;
    let error = refused(&RefDataConfig {
        redis_mode: instream_core::config::RedisMode::Cluster,
        redis_nodes: nodes
            .iter()
            .map(|u| u.replace("Cluster-Pass-5", "Wrong-Pass-1"))
            .collect(),
        ..config("redis://unused:1".into())
    })
    .await;
    assert!(
        error.to_string().contains("authentication failed"),
        "{error}"
    );
    assert!(!error.to_string().contains("Wrong-Pass-1"), "{error}");
}

async fn loads_versions_and_retires_old_ones_on_every_master(nodes: Vec<String>) {
    const ROWS: usize = 500;
    let cfg = RefDataConfig {
        redis_mode: instream_core::config::RedisMode::Cluster,
        redis_nodes: nodes.clone(),
        ..config("redis://unused:1".into())
    };
    let doc = instream_pipeline::parse_document(instream_testkit::BIDS_PIPELINE).unwrap();
    let rule = doc.pipelines[0].enrichments[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let store = RedisRefStore::connect(&cfg).await.unwrap();
    let connection = store.cluster_connection().expect("a cluster link");
    for version in 1..=3u64 {
        let csv = dir.path().join(format!("v{version}.csv"));
        let mut text = String::from("id,name\n");
        for i in 0..ROWS {
            text.push_str(&format!("{i},Bidder {i} v{version}\n"));
        }
        std::fs::write(&csv, text).unwrap();
        let report = instream_refdata::load::load_file_to_cluster(
            connection.clone(),
            cfg.timeout,
            "bids",
            &rule,
            &["id".to_owned()],
            &csv,
            &instream_core::Progress::silent(),
        )
        .await
        .unwrap();
        assert_eq!(
            (report.version, report.records, report.switched),
            (version, ROWS as u64, true)
        );
        // Version 3 retires version 1 (version 2 stays for enrichers not yet switched).
        let retired = if version == 3 { ROWS as u64 } else { 0 };
        assert_eq!(report.retired, retired, "keys retired by version {version}");
    }

    // Spread over the masters: every node holds some of the records.
    for url in &nodes {
        let mut node = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        // Records only: the pointer and the version counter are keys too.
        let records: Vec<String> = redis::cmd("KEYS")
            .arg("instream:refdata:bids:bidder:v*")
            .query_async(&mut node)
            .await
            .unwrap();
        assert!(!records.is_empty(), "{url} holds none of the records");
    }
    // A cluster-mode store follows the pointer to version 3 and finds every record there.
    store
        .track(&[("bids".into(), "bidder".into())])
        .await
        .unwrap();
    assert_eq!(store.version("bids", "bidder"), Some(3));
    let prefix = |v| instream_refdata::versions::version_prefix("bids", "bidder", v);
    let lookups: Vec<(String, RecordShape)> = (0..ROWS)
        .map(|i| (format!("{}person:{i}", prefix(3)), RecordShape::Hash))
        .collect();
    let found = store.lookup_many(&lookups).await.unwrap();
    for (i, f) in found.iter().enumerate() {
        match f {
            Found::Record(r) => assert_eq!(r["name"], format!("Bidder {i} v3")),
            other => panic!("person:{i}: {other:?}"),
        }
    }
    // Version 1's keys expire after the grace; version 2's do not.
    let mut c = connection.clone();
    for (version, expiring) in [(1, true), (2, false)] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("{}person:7", prefix(version)))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(ttl > 0, expiring, "version {version}: TTL {ttl}");
    }
}

/// A cluster speaking only TLS (clients and cluster bus), trusted through
/// `refdata.tls_ca_file`: a version is loaded into it and looked up from it; without the
/// authority the nodes' certificate is not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_over_tls_with_a_private_authority() {
    let (cert, key, dir, ca) = private_authority();
    let cluster = instream_testkit::RedisCluster::start_tls(&cert, &key).unwrap();
    let nodes = cluster.urls();
    assert!(
        nodes.iter().all(|u| u.starts_with("rediss://")),
        "{nodes:?}"
    );
    let cfg = RefDataConfig {
        redis_mode: instream_core::config::RedisMode::Cluster,
        redis_nodes: nodes,
        tls_ca_file: Some(ca),
        ..config("redis://unused:1".into())
    };
    let store = RedisRefStore::connect(&cfg).await.unwrap();
    store.ping().await.unwrap();
    let doc = instream_pipeline::parse_document(instream_testkit::BIDS_PIPELINE).unwrap();
    let rule = doc.pipelines[0].enrichments[0].clone();
    let csv = dir.path().join("bidders.csv");
    let mut text = String::from("id,name\n");
    for i in 0..200 {
        text.push_str(&format!("{i},Bidder {i}\n"));
    }
    std::fs::write(&csv, text).unwrap();
    let report = instream_refdata::load::load_file_to_cluster(
        store.cluster_connection().expect("a cluster link"),
        cfg.timeout,
        "bids",
        &rule,
        &["id".to_owned()],
        &csv,
        &instream_core::Progress::silent(),
    )
    .await
    .unwrap();
    assert_eq!((report.version, report.records), (1, 200));
    store
        .track(&[("bids".into(), "bidder".into())])
        .await
        .unwrap();
    let prefix = instream_refdata::versions::version_prefix("bids", "bidder", 1);
    let lookups: Vec<(String, RecordShape)> = (0..200)
        .map(|i| (format!("{prefix}person:{i}"), RecordShape::Hash))
        .collect();
    let found = store.lookup_many(&lookups).await.unwrap();
    for (i, f) in found.iter().enumerate() {
        match f {
            Found::Record(r) => assert_eq!(r["name"], format!("Bidder {i}")),
            other => panic!("person:{i}: {other:?}"),
        }
    }
    let untrusted = refused(&RefDataConfig {
        tls_ca_file: None,
        ..cfg.clone()
    })
    .await;
    assert!(
        matches!(untrusted, RefDataError::Unavailable(_)),
        "{untrusted}"
    );
}

/// Through a sentinel-mode store with `cfg`: `key` written (a hash) on the connection to the
/// master that `refdata load` uses, then found by a lookup.
async fn written_to_the_master_and_looked_up(cfg: &RefDataConfig, key: &str) {
    let store = RedisRefStore::connect(cfg).await.unwrap();
    store.ping().await.unwrap();
    let mut master = store
        .master_connection()
        .await
        .unwrap()
        .expect("sentinel mode");
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg("tier")
        .arg("gold")
        .query_async(&mut master)
        .await
        .unwrap();
    let found = store
        .lookup_many(&[(key.into(), RecordShape::Hash)])
        .await
        .unwrap();
    assert!(
        matches!(&found[0], Found::Record(r) if r.get("tier") == Some(&serde_json::json!("gold"))),
        "{found:?}"
    );
}

/// A master and a sentinel speaking only TLS, trusted through `refdata.tls_ca_file`: the
/// sentinel is asked over TLS, the master it names is reached over TLS (written to through the
/// connection `refdata load` uses, and read by lookups); without the authority, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_mode_over_tls_with_a_private_authority() {
    let (cert, key, _dir, ca) = private_authority();
    let sentinel = instream_testkit::RedisSentinel::start_tls(&cert, &key).unwrap();
    assert!(sentinel.sentinel_url().starts_with("rediss://"));
    let cfg = RefDataConfig {
        tls_ca_file: Some(ca),
        timeout: std::time::Duration::from_secs(2),
        ..sentinel.refdata_config()
    };
    written_to_the_master_and_looked_up(&cfg, "customer:tls").await;
    let untrusted = refused(&RefDataConfig {
        tls_ca_file: None,
        ..cfg.clone()
    })
    .await;
    assert!(
        matches!(untrusted, RefDataError::Unavailable(_)),
        "{untrusted}"
    );
}

/// A master and a sentinel with ACL users only (`default` off): the sentinel is asked as the
/// user of the sentinel URL, the master it names is reached as the user of
/// `refdata.redis_url` (written to through the connection `refdata load` uses, read by
/// lookups); a wrong password for either is refused, and the error does not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_mode_logs_in_as_acl_users() {
    let sentinel =
        instream_testkit::RedisSentinel::start_acl("enricher", "Sentinel-Pass-9").unwrap();
    let cfg = RefDataConfig {
        timeout: std::time::Duration::from_secs(2),
        ..sentinel.refdata_config()
    };
    assert!(cfg.redis_nodes[0].contains("enricher:Sentinel-Pass-9@"));
    assert!(cfg.redis_url.contains("enricher:Sentinel-Pass-9@"));
    written_to_the_master_and_looked_up(&cfg, "customer:acl").await;
    let wrong = |url: &str| url.replace("Sentinel-Pass-9", "Wrong-Pass-3");
    for bad in [
        RefDataConfig {
            redis_nodes: cfg.redis_nodes.iter().map(|u| wrong(u)).collect(),
            ..cfg.clone()
        },
        RefDataConfig {
            redis_url: wrong(&cfg.redis_url),
            ..cfg.clone()
        },
    ] {
        let error = refused(&bad).await;
        assert!(matches!(error, RefDataError::Unavailable(_)), "{error}");
        assert!(
            error.to_string().contains("authentication failed"),
            "{error}"
        );
        assert!(!error.to_string().contains("Wrong-Pass-3"), "{error}");
    }
}
