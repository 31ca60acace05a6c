//! The archive conformance suite against a real HDFS. No HDFS can be installed on the CI
//! machine, so these tests are ignored unless `INSTREAM_TEST_HDFS` is given
//! (`scripts/test.sh` then runs them with `--ignored`). The configuration tests below need
//! no server.

use instream_archive::{conformance, Archive, HdfsArchive};
use instream_config::ArchiveConfig;

fn config(url: &str) -> ArchiveConfig {
    ArchiveConfig {
        hdfs_url: url.into(),
        root: "/instream-test".into(),
        ..ArchiveConfig::default()
    }
}

#[tokio::test]
#[ignore = "needs INSTREAM_TEST_HDFS=hdfs://host:port"]
async fn hdfs_archive_passes_the_conformance_suite() {
    let url = std::env::var("INSTREAM_TEST_HDFS")
        .expect("INSTREAM_TEST_HDFS=hdfs://host:port must be set to run this suite");
    let archive = HdfsArchive::connect(&config(&url)).unwrap();
    conformance::run(&archive, &instream_testkit::unique("suite")).await;
}

/// An HA nameservice spelled out in `archive.hdfs_config`: the client reaches its namenodes
/// (the first refuses, the second is a bare TCP listener) rather than resolving the
/// nameservice as a host name, and the failover settings bound how long it tries.
#[tokio::test]
async fn an_ha_nameservice_is_resolved_through_its_namenodes() {
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listening = listener.local_addr().unwrap();
    let accepted = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
    let mut config = config("hdfs://instream-ns");
    config.hdfs_config = [
        ("dfs.ha.namenodes.instream-ns", "nn1,nn2".to_owned()),
        (
            "dfs.namenode.rpc-address.instream-ns.nn1",
            refused.to_string(),
        ),
        (
            "dfs.namenode.rpc-address.instream-ns.nn2",
            listening.to_string(),
        ),
        ("dfs.client.failover.max.attempts", "2".to_owned()),
        ("dfs.client.failover.sleep.base.millis", "10".to_owned()),
        ("dfs.client.failover.sleep.max.millis", "50".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let archive = HdfsArchive::connect(&config).unwrap();
    let pinged = tokio::time::timeout(std::time::Duration::from_secs(30), archive.ping());
    let (pinged, accepted) = tokio::join!(pinged, accepted);
    accepted
        .unwrap()
        .expect("the client connects to the second namenode");
    let pinged = pinged.expect("the ping gives up within the failover settings");
    assert!(pinged.is_err(), "no namenode answers");
}

#[cfg(not(feature = "kerberos"))]
#[test]
fn kerberos_settings_are_refused_without_the_feature() {
    let mut config = config("hdfs://127.0.0.1:9000");
    config.kerberos_principal = Some("archiver@EXAMPLE.COM".into());
    match HdfsArchive::connect(&config) {
        Err(instream_archive::ArchiveError::Unsupported(message)) => {
            assert!(message.contains("kerberos"))
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("accepted Kerberos settings it cannot use"),
    }
}
