//! A metric handle a service keeps for its whole life must record: the Prometheus recorder
//! is installed when the admin server is bound, before any service task can take a handle.
//! (Its own test binary: the recorder is global to the process.)

use instream_core::{AdminServer, Health};

#[tokio::test]
async fn a_handle_taken_right_after_bind_is_rendered() {
    let _admin = AdminServer::bind("127.0.0.1:0".parse().unwrap(), Health::default())
        .await
        .unwrap();
    // Taken before any scrape and before `serve` ever runs, like a service's leader gauge.
    let kept = metrics::gauge!("instream_test_kept_gauge", "source" => "t");
    kept.set(7.0);
    let rendered = instream_core::telemetry::metrics_handle().render();
    assert!(
        rendered.contains("instream_test_kept_gauge{source=\"t\"} 7"),
        "{rendered}"
    );
}
