//! The `instream-enricher` binary killed with -9 twice mid-stream and restarted, in each
//! delivery mode: every raw record comes out enriched (nothing lost), with the right
//! reference data, and every copy of one record is the same bytes under the same origin
//! partition and offset — so the aggregator, which drops a repeated origin, counts each once.
//! In transactional delivery on a broker with full transactions (a real Kafka via
//! `INSTREAM_TEST_KAFKA`) there are no copies at all. On the embedded broker the transactional
//! path runs (the protocol is accepted) but shows copies: it neither stores the offsets sent
//! in a transaction nor hides aborted ones (README, "Test broker"). And the broker taken
//! down mid-stream, for longer than the producer's configured delivery timeout: the
//! enricher waits for it and loses nothing. Real Redis. (Transactional delivery's failure
//! paths: `transactions.rs`.)

mod common;

use std::time::Duration;

use common::*;

async fn kill_twice_and_check(delivery: &str) {
    let s = scenario(delivery, "").await;
    let (config, admin) = (&s.config, s.admin);
    // Killed twice with -9 while it works, then run to the end.
    for kill_after in [EVENTS as f64 / 4.0, EVENTS as f64 / 4.0] {
        let mut child = spawn(config);
        wait_for_progress(admin, &mut child, kill_after).await;
        drop(child); // SIGKILL
    }
    let repeated = check_output(&s, spawn(config)).await;
    eprintln!("{delivery}: {repeated} repeated copies after two kills");
    if delivery == "transactional" && !s.broker.is_embedded() {
        assert_eq!(repeated, 0, "transactions leave no copies on a real broker");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_in_transactional_delivery_nothing_lost_and_copies_identical() {
    kill_twice_and_check("transactional").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_in_at_least_once_delivery_nothing_lost_and_copies_identical() {
    kill_twice_and_check("at_least_once").await;
}

/// The broker goes away while the enricher writes (longer than the producer's configured
/// `message.timeout.ms`, which at-least-once delivery overrides): deliveries wait for it
/// instead of failing, the enricher stays up, and every event comes out once per origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_stream_holds_deliveries_back_and_loses_none() {
    if skipped_without_the_embedded_broker() {
        return;
    }
    let s = scenario(
        "at_least_once",
        "[kafka.producer]\n\"message.timeout.ms\" = \"1000\"\n",
    )
    .await;
    let mut child = spawn(&s.config);
    wait_for_progress(s.admin, &mut child, EVENTS as f64 / 4.0).await;
    s.broker.set_up(false).unwrap();
    // Down until the enricher's broker probe notices (5 to 10 s): far past the 1 s timeout.
    let readyz = format!("http://127.0.0.1:{}/readyz", s.admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(&readyz).await.map(|r| r.status()).ok()
        != Some(reqwest::StatusCode::SERVICE_UNAVAILABLE)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never turned 503"
        );
        assert!(!child.exited(), "the enricher exited during the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!child.exited(), "the enricher exited during the outage");
    s.broker.set_up(true).unwrap();
    let repeated = check_output(&s, child).await;
    eprintln!(
        "{}: {repeated} repeated copies after the outage",
        s.delivery
    );
}

/// The broker refuses the enricher's writes with an error no retry mends (here: not
/// authorized) in the middle of the stream. Any record after a refused one could leave a gap
/// that origin de-duplication downstream would turn into a loss, so the enricher stops with
/// an error, committing nothing of the batch; restarted once the broker accepts again, it
/// writes everything, and an aggregator de-duplicating by origin counts every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_good_stops_the_enricher_and_a_restart_loses_none() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if skipped_without_the_embedded_broker() {
        return;
    }
    let s = scenario("at_least_once", "").await;
    let mut child = spawn(&s.config);
    wait_for_progress(s.admin, &mut child, EVENTS as f64 / 4.0).await;
    s.broker
        .fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
        )
        .unwrap();
    stops_naming_the_refusal_and_restarts(&s, child, RDKafkaApiKey::Produce).await;
}
