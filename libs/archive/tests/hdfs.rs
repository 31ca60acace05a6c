//! The archive conformance suite against a real HDFS. No HDFS can be installed on the CI
//! machine, so these tests are ignored unless `INSTREAM_TEST_HDFS` is given
//! (`scripts/test.sh` then runs them with `--ignored`).

use instream_archive::{conformance, HdfsArchive};

#[tokio::test]
#[ignore = "needs INSTREAM_TEST_HDFS=hdfs://host:port"]
async fn hdfs_archive_passes_the_conformance_suite() {
    let url = std::env::var("INSTREAM_TEST_HDFS")
        .expect("INSTREAM_TEST_HDFS=hdfs://host:port must be set to run this suite");
    let archive = HdfsArchive::connect(&url, "/instream-test").unwrap();
    conformance::run(&archive, &instream_testkit::unique("suite")).await;
}
