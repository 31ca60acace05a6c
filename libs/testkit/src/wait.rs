//! Waiting on a condition in an async test: never a sleep as synchronization.

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 50 ms until it holds; panics naming `what` once `timeout` has passed.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
