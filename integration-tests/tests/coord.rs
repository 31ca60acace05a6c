//! ZooKeeper as the control plane, on a real ZooKeeper 3.8: definitions reach every
//! subscriber without a restart, an invalid stored definition is ignored with the last good
//! version kept, an invalid or lower version is refused, registry nodes live exactly as long
//! as their owner, digest ACLs keep other identities out, an expired session recovers
//! (re-registered, re-watched, re-elected), and a leader cut off from ZooKeeper gives up its
//! duty before a standby takes it.

use instream_testkit::wait_for;
use std::time::Duration;

use instream_coord::{campaign, publish_definition, register_instance, ZkDefinitionSource};
use instream_core::config::ZooKeeperConfig;
use instream_pipeline::{parse_document, DefinitionSource, PipelineDefinition};
use instream_testkit::{unique, TcpProxy, TestPki, TlsProxy, TlsProxySettings, ZooKeeperServer};
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

fn definition(name: &str, version: u64, partitions: i32) -> PipelineDefinition {
    let mut doc = parse_document(&format!(
        "[[pipelines]]\nname = \"{name}\"\nversion = {version}\nkey_field = \"k\"\ntime_field = \"t\"\npartitions = {partitions}\n"
    ))
    .unwrap();
    doc.pipelines.remove(0)
}

fn config(zk: &ZooKeeperServer) -> ZooKeeperConfig {
    ZooKeeperConfig {
        connect: zk.connect_string(),
        root: format!("/{}", unique("instream")),
        session_timeout: Duration::from_secs(4),
        auth: None,
        auth_file: None,
        tls: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definition_changes_reach_subscribers_and_bad_ones_are_ignored() {
    let server = ZooKeeperServer::start().unwrap();
    let cfg = config(&server);
    publish_definition(&cfg, &definition("orders", 1, 4))
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    // Three subscribers, each with its own session, as three services would have.
    let mut others = Vec::new();
    for _ in 0..2 {
        others.push(
            ZkDefinitionSource::new(cfg.clone())
                .subscribe(shutdown.clone())
                .await
                .unwrap(),
        );
    }
    let mut rx = ZkDefinitionSource::new(cfg.clone())
        .subscribe(shutdown.clone())
        .await
        .unwrap();
    assert_eq!(rx.borrow_and_update().get("orders").unwrap().version, 1);

    // A new version arrives within 2 s at every subscriber, with no restart.
    publish_definition(&cfg, &definition("orders", 2, 8))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("the change arrives within 2 s")
        .unwrap();
    let current = rx.borrow_and_update().get("orders").unwrap().clone();
    assert_eq!((current.version, current.partitions), (2, 8));
    for other in &mut others {
        tokio::time::timeout(
            Duration::from_secs(2),
            other.wait_for(|c| c.get("orders").is_some_and(|d| d.version == 2)),
        )
        .await
        .expect("every subscriber has the change within 2 s")
        .unwrap();
    }

    // An invalid definition is refused before it is stored, naming the problem.
    let mut bad = definition("orders", 3, 8);
    bad.partitions = 0;
    let err = publish_definition(&cfg, &bad).await.unwrap_err();
    assert!(err.to_string().contains("partitions"), "{err}");

    // A second pipeline appears.
    publish_definition(&cfg, &definition("clicks", 1, 2))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("a new pipeline arrives within 2 s")
        .unwrap();
    assert_eq!(rx.borrow_and_update().len(), 2);

    // A version that is not higher is refused at publish.
    let err = publish_definition(&cfg, &definition("orders", 2, 3))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not above the stored version"),
        "{err}"
    );

    // Garbage written behind publish's back is ignored; the last good version stays, and it is
    // reported (`instream_definition_invalid{pipeline}` = 1 while it is stored).
    let snapshotter = {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test binary");
        snapshotter
    };
    let client = zk::Client::connect(&cfg.connect).await.unwrap();
    client
        .set_data(
            &format!("{}/pipelines/orders", cfg.root),
            b"{not json",
            None,
        )
        .await
        .unwrap();
    // A valid change to another pipeline after it: once that arrives, the reload that met
    // the garbage has run.
    publish_definition(&cfg, &definition("clicks", 2, 2))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|c| c.get("clicks").is_some_and(|d| d.version == 2)),
    )
    .await
    .expect("the later change arrives")
    .unwrap();
    assert_eq!(
        rx.borrow().get("orders").unwrap().version,
        2,
        "an invalid definition must not replace the last good one"
    );
    let invalid = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .any(|(key, _, _, value)| {
            key.key().name() == "instream_definition_invalid"
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "pipeline" && l.value() == "orders")
                && value == metrics_util::debugging::DebugValue::Gauge(1.0.into())
        });
    assert!(invalid, "the invalid definition is reported in a metric");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_nodes_live_as_long_as_their_session() {
    let server = ZooKeeperServer::start().unwrap();
    let cfg = config(&server);
    let info = instream_coord::InstanceInfo {
        admin: "127.0.0.1:9464".into(),
        ..Default::default()
    };
    let registration = register_instance(&cfg, "enricher", "host-1", info.clone())
        .await
        .unwrap();
    let client = zk::Client::connect(&cfg.connect).await.unwrap();
    let folder = format!("{}/services/enricher", cfg.root);
    assert_eq!(client.list_children(&folder).await.unwrap(), ["host-1"]);
    let path = format!("{}{}", cfg.root, registration.path());
    let (data, _) = client.get_data(&path).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<instream_coord::InstanceInfo>(&data).unwrap(),
        info
    );
    // An update (a new assignment, say) reaches the node.
    registration.update(|info| info.partitions = vec!["orders.raw/0".into()]);
    wait_for(
        "the updated registry node",
        Duration::from_secs(5),
        || async {
            let (data, _) = client.get_data(&path).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&data).unwrap()["partitions"][0]
                == "orders.raw/0"
        },
    )
    .await;
    let listed = instream_coord::instances(&cfg).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].service, "enricher");
    assert_eq!(listed[0].info["admin"], "127.0.0.1:9464");
    drop(registration);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !client.list_children(&folder).await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node outlived its session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_acls_keep_other_identities_out() {
    let server = ZooKeeperServer::start().unwrap();
    let mut cfg = config(&server);
    cfg.auth = Some("instream:s3cret".into());
    publish_definition(&cfg, &definition("orders", 1, 4))
        .await
        .unwrap();
    // The same identity reads it back as a service would.
    let shutdown = CancellationToken::new();
    let rx = ZkDefinitionSource::new(cfg.clone())
        .subscribe(shutdown.clone())
        .await
        .unwrap();
    assert_eq!(rx.borrow().get("orders").unwrap().version, 1);
    shutdown.cancel();

    let path = format!("{}/pipelines/orders", cfg.root);
    let anonymous = zk::Client::connect(&cfg.connect).await.unwrap();
    assert!(matches!(
        anonymous.get_data(&path).await,
        Err(zk::Error::NoAuth)
    ));
    assert!(matches!(
        anonymous.set_data(&path, b"{}", None).await,
        Err(zk::Error::NoAuth)
    ));
    let intruder = zk::Client::connector()
        .with_auth("digest", b"instream:wrong")
        .connect(&cfg.connect)
        .await
        .unwrap();
    assert!(matches!(
        intruder.get_data(&path).await,
        Err(zk::Error::NoAuth)
    ));
    // A publisher with the wrong password cannot overwrite it either.
    let mut wrong = cfg.clone();
    wrong.auth = Some("instream:wrong".into());
    assert!(publish_definition(&wrong, &definition("orders", 2, 4))
        .await
        .is_err());
}

/// A session expires while the client is cut off from ZooKeeper for longer than the session
/// timeout; when the connection returns, the registration is made again, the definitions are
/// watched again and the election is joined again — by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_recovers_everything_it_held() {
    let server = ZooKeeperServer::start().unwrap();
    let direct = config(&server);
    let proxy = TcpProxy::start(server.connect_string().parse().unwrap()).unwrap();
    let cut_off = ZooKeeperConfig {
        connect: proxy.addr().to_string(),
        session_timeout: Duration::from_secs(2),
        ..direct.clone()
    };
    publish_definition(&direct, &definition("orders", 1, 4))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let mut definitions = ZkDefinitionSource::new(cut_off.clone())
        .subscribe(shutdown.clone())
        .await
        .unwrap();
    let registration = register_instance(&cut_off, "aggregator", "agg-1", Default::default())
        .await
        .unwrap();
    let mut leadership = campaign(&cut_off, "retention", "agg-1").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), leadership.acquired())
        .await
        .expect("the only contender leads")
        .expect("the election goes on");

    let observer = zk::Client::connect(&direct.connect).await.unwrap();
    let node = format!("{}{}", direct.root, registration.path());
    proxy.cut();
    // The leader gives up at once, not when the session is gone.
    tokio::time::timeout(Duration::from_secs(5), leadership.lost())
        .await
        .expect("leadership is suspended when the connection goes");
    // The server expires the session: its ephemeral node goes.
    wait_for("the session to expire", Duration::from_secs(15), || async {
        observer.check_stat(&node).await.unwrap().is_none()
    })
    .await;
    // A change made while it was away.
    publish_definition(&direct, &definition("orders", 2, 4))
        .await
        .unwrap();
    proxy.restore();

    wait_for(
        "the registration to come back",
        Duration::from_secs(15),
        || async { observer.check_stat(&node).await.unwrap().is_some() },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(15), leadership.acquired())
        .await
        .expect("the election is joined again and won")
        .expect("the election goes on");
    tokio::time::timeout(
        Duration::from_secs(15),
        definitions.wait_for(|c| c.get("orders").is_some_and(|d| d.version == 2)),
    )
    .await
    .expect("the change made during the outage arrives")
    .unwrap();
    // And the watches are armed again: the next change arrives within 2 s.
    publish_definition(&direct, &definition("orders", 3, 4))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(2),
        definitions.wait_for(|c| c.get("orders").is_some_and(|d| d.version == 3)),
    )
    .await
    .expect("a later change arrives within 2 s")
    .unwrap();
    shutdown.cancel();
}

/// The leader is cut off from ZooKeeper. It stops leading as soon as it notices (a closed
/// connection at once; a silent one when its own read timeout passes, before the server's
/// session timeout); the standby leads once the leader's session has expired (within the
/// session timeout, plus a tick); at no moment do both lead. When the old leader's connection
/// returns it stays a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_hands_over_and_never_leads_beside_the_standby() {
    cut_off_leader_hands_over(|proxy| proxy.cut()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_partitioned_leader_hands_over_and_never_leads_beside_the_standby() {
    cut_off_leader_hands_over(|proxy| proxy.blackhole()).await;
}

async fn cut_off_leader_hands_over(partition: impl Fn(&TcpProxy)) {
    let server = ZooKeeperServer::start().unwrap();
    let direct = ZooKeeperConfig {
        session_timeout: Duration::from_secs(2),
        ..config(&server)
    };
    let proxy = TcpProxy::start(server.connect_string().parse().unwrap()).unwrap();
    let cut_off = ZooKeeperConfig {
        connect: proxy.addr().to_string(),
        ..direct.clone()
    };
    let mut first = campaign(&cut_off, "db-poll", "a").await.unwrap();
    let first_term = tokio::time::timeout(Duration::from_secs(10), first.acquired())
        .await
        .expect("the first contender leads")
        .unwrap();
    let mut second = campaign(&direct, "db-poll", "b").await.unwrap();

    // Both leaderships, sampled every millisecond from here on.
    let (a, b) = (first.watch(), second.watch());
    let sampling = CancellationToken::new();
    let done = sampling.clone();
    let overlap = tokio::spawn(async move {
        let mut both = 0u32;
        while !done.is_cancelled() {
            if a.borrow().is_some() && b.borrow().is_some() {
                both += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        both
    });
    assert!(!second.is_leader());
    let cut_at = std::time::Instant::now();
    partition(&proxy);
    tokio::time::timeout(Duration::from_secs(5), first.lost())
        .await
        .expect("the cut-off leader gives up");
    let second_term = tokio::time::timeout(Duration::from_secs(20), second.acquired())
        .await
        .expect("the standby takes over")
        .unwrap();
    let took = cut_at.elapsed();
    eprintln!("the standby led {took:?} after the cut");
    assert!(
        second_term > first_term,
        "terms grow: {first_term} then {second_term}"
    );
    assert!(
        took <= direct.session_timeout + Duration::from_secs(3),
        "the standby took {took:?} to take over"
    );
    proxy.restore();
    // The old leader comes back as a standby.
    wait_for(
        "the old leader to rejoin",
        Duration::from_secs(15),
        || async {
            let contenders = zk::Client::connect(&direct.connect)
                .await
                .unwrap()
                .list_children(&format!("{}/elections/db-poll", direct.root))
                .await
                .unwrap();
            contenders.len() == 2
        },
    )
    .await;
    assert!(!first.is_leader());
    assert!(second.is_leader());
    drop(second);
    tokio::time::timeout(Duration::from_secs(10), first.acquired())
        .await
        .expect("a withdrawn leader hands over at once")
        .expect("the election goes on");
    sampling.cancel();
    assert_eq!(overlap.await.unwrap(), 0, "two leaders at once");
}

const CONTENDER_ENV: &str = "INSTREAM_TEST_CONTENDER";

/// Not a test of its own: the body of a contender process that the kill test starts (it
/// returns at once unless `INSTREAM_TEST_CONTENDER` is set). Prints `leading <term>` when it
/// leads, and then holds the duty until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contender_process() {
    let Ok(spec) = std::env::var(CONTENDER_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (Some(connect), Some(root), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("{CONTENDER_ENV} must be connect|root|name");
    };
    let cfg = ZooKeeperConfig {
        connect: connect.into(),
        root: root.into(),
        session_timeout: Duration::from_secs(3),
        auth: None,
        auth_file: None,
        tls: None,
    };
    let mut leadership = campaign(&cfg, "retention", name).await.unwrap();
    let term = leadership.acquired().await.unwrap();
    println!("leading {term}");
    leadership.lost().await;
    println!("lost");
}

fn spawn_contender(
    cfg: &ZooKeeperConfig,
    name: &str,
) -> (
    instream_testkit::ChildGuard,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "contender_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CONTENDER_ENV,
            format!("{}|{}|{name}", cfg.connect, cfg.root),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // libtest may print the test's name on the same line first.
            if let Some(at) = line.find("leading ").or_else(|| line.find("lost")) {
                let _ = tx.send(line[at..].to_owned());
            }
        }
    });
    (instream_testkit::ChildGuard::new(child), rx)
}

/// The leading process is killed with -9: the standby process leads within the session
/// timeout (plus a tick), and not before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_process_hands_over_within_the_session_timeout() {
    let server = ZooKeeperServer::start().unwrap();
    let cfg = config(&server);
    let session_timeout = Duration::from_secs(3);
    let (leader, leader_says) = spawn_contender(&cfg, "first");
    let said = tokio::task::spawn_blocking(move || {
        let said = leader_says.recv_timeout(Duration::from_secs(30));
        (said, leader_says)
    })
    .await
    .unwrap();
    assert!(said.0.unwrap().starts_with("leading"));
    let (_standby, standby_says) = spawn_contender(&cfg, "second");
    let observer = zk::Client::connect(&cfg.connect).await.unwrap();
    let dir = format!("{}/elections/retention", cfg.root);
    wait_for(
        "the standby to contend",
        Duration::from_secs(30),
        || async {
            observer
                .list_children(&dir)
                .await
                .is_ok_and(|c| c.len() == 2)
        },
    )
    .await;
    assert!(
        standby_says.try_recv().is_err(),
        "the standby led while the leader lived"
    );
    let killed_at = std::time::Instant::now();
    drop(leader); // SIGKILL
    let took = tokio::task::spawn_blocking(move || {
        let line = standby_says
            .recv_timeout(session_timeout + Duration::from_secs(5))
            .expect("the standby takes over");
        assert!(line.starts_with("leading"), "{line}");
        let took = killed_at.elapsed();
        eprintln!("the standby led {took:?} after the kill");
        took
    })
    .await
    .unwrap();
    assert!(
        took <= session_timeout + Duration::from_secs(2),
        "the standby took {took:?}; the session timeout is {session_timeout:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duty_progress_is_fenced_by_term() {
    use instream_coord::{stored_position, CoordError, Progress};
    use serde_json::json;

    let server = ZooKeeperServer::start().unwrap();
    let cfg = config(&server);
    let name = unique("source");
    assert!(stored_position(&cfg, &name).await.unwrap().is_none());

    let mut first = Progress::claim(&cfg, &name, 5).await.unwrap();
    assert!(first.position().is_null(), "nothing stored yet");
    first.save(json!({"id": 10})).await.unwrap();

    // A lower term cannot claim it; a higher one takes over with the stored position.
    let lower = Progress::claim(&cfg, &name, 3).await;
    assert!(
        matches!(lower, Err(CoordError::Fenced { term: 3, .. })),
        "{:?}",
        lower.err()
    );
    let mut second = Progress::claim(&cfg, &name, 7).await.unwrap();
    assert_eq!(second.position(), &json!({"id": 10}));

    // The deposed holder's late save fails and moves nothing.
    let late = first.save(json!({"id": 99})).await;
    assert!(
        matches!(late, Err(CoordError::Fenced { term: 5, .. })),
        "{late:?}"
    );
    second.save(json!({"id": 20})).await.unwrap();
    assert_eq!(
        stored_position(&cfg, &name).await.unwrap(),
        Some((7, json!({"id": 20})))
    );
}

/// ZooKeeper over TLS, through a TLS-terminating proxy (Debian's `stunnel4`) in front of the
/// ensemble — the client side is what instream owns; a ZooKeeper `secureClientPort` speaks
/// the same TLS. Definitions are published and read through it; with mutual TLS the client
/// presents its certificate, and is refused without one; an unknown authority is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_over_tls_and_mutual_tls() {
    use instream_core::config::ClientTls;
    let server = ZooKeeperServer::start().unwrap();
    let port: u16 = server
        .connect_string()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let pki = TestPki::new("unused").unwrap();
    let settings = |client_ca_pem| TlsProxySettings {
        cert_pem: &pki.server_cert_pem,
        key_pem: &pki.server_key_pem,
        client_ca_pem,
    };
    let over = |proxy: &TlsProxy, tls: ClientTls| ZooKeeperConfig {
        connect: format!("127.0.0.1:{}", proxy.port()),
        tls: Some(tls),
        ..config(&server)
    };
    let trusting = ClientTls {
        ca_file: Some(pki.ca_file.clone()),
        ..Default::default()
    };

    let tls = TlsProxy::start(port, &settings(None)).unwrap();
    let cfg = over(&tls, trusting.clone());
    publish_definition(&cfg, &definition("orders", 1, 4))
        .await
        .unwrap();
    let version = |cfg: ZooKeeperConfig| async move {
        let shutdown = CancellationToken::new();
        let rx = ZkDefinitionSource::new(cfg)
            .subscribe(shutdown.clone())
            .await
            .unwrap();
        let version = rx.borrow().get("orders").unwrap().version;
        shutdown.cancel();
        version
    };
    assert_eq!(version(cfg.clone()).await, 1);

    let mutual = TlsProxy::start(port, &settings(Some(&pki.ca_pem))).unwrap();
    let with_cert = ClientTls {
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client-plain.key")),
        ..trusting.clone()
    };
    let cfg = over(&mutual, with_cert);
    publish_definition(&cfg, &definition("orders", 2, 4))
        .await
        .unwrap();
    let without_cert = over(&mutual, trusting);
    let error = publish_definition(&without_cert, &definition("orders", 3, 4))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("no client certificate: {error}");
    assert!(
        error.contains("received fatal alert"),
        "names the cause: {error}"
    );

    let stranger = TestPki::new("unused").unwrap();
    let unknown = over(
        &tls,
        ClientTls {
            ca_file: Some(stranger.ca_file.clone()),
            ..Default::default()
        },
    );
    let error = publish_definition(&unknown, &definition("orders", 3, 4))
        .await
        .unwrap_err()
        .to_string();
    // The stranger's authority has the same name: the signature does not check.
    assert!(
        error.contains("TLS handshake with 127.0.0.1")
            && error.contains("invalid peer certificate"),
        "names the cause: {error}"
    );
    // Still version 2: neither refused client wrote.
    assert_eq!(version(cfg).await, 2);

    // Nothing listening is an outage, not a TLS problem.
    let nobody = ZooKeeperConfig {
        connect: "127.0.0.1:1".into(),
        ..over(
            &tls,
            ClientTls {
                ca_file: Some(pki.ca_file.clone()),
                ..Default::default()
            },
        )
    };
    let error = publish_definition(&nobody, &definition("orders", 3, 4))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("zookeeper at 127.0.0.1:1"), "{error}");

    // A missing file is named.
    let missing = over(
        &tls,
        ClientTls {
            ca_file: Some("/nowhere/ca.pem".into()),
            ..Default::default()
        },
    );
    let error = publish_definition(&missing, &definition("orders", 3, 4))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("zookeeper.tls: ca_file: reading /nowhere/ca.pem"),
        "{error}"
    );
}
