//! Waiting for a backend that does not answer: one back-off and one retry loop for every
//! stage, instead of a hand-written loop at each call site.
//!
//! A retried operation reports to a [`Readiness`] when it is given one (not ready while it
//! fails, ready again once it works), logs each failure with what was being done, and gives
//! up only when the shutdown token fires (`Ok(None)`) or the error is one no retry mends.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;

/// Exponential back-off: `first`, doubled after each failure, never more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// What a stage waits between attempts at an unreachable backend.
    pub const BACKEND: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The pauses of one run of attempts.
    pub fn pauses(self) -> Pauses {
        Pauses {
            next: self.first,
            backoff: self,
        }
    }
}

/// The pauses of one run of failing attempts (see [`Backoff`]).
#[derive(Debug, Clone)]
pub struct Pauses {
    backoff: Backoff,
    next: Duration,
}

impl Pauses {
    /// The pause before the next attempt; the one after it is twice as long, up to the maximum.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.backoff.max);
        pause
    }

    /// After a success: the next failure waits the first pause again.
    pub fn reset(&mut self) {
        self.next = self.backoff.first;
    }

    /// Whether the pauses have reached their maximum (failures in a row for a while).
    pub fn at_max(&self) -> bool {
        self.next >= self.backoff.max
    }

    /// Sleeps the next pause; `false` when `stop` fired first.
    pub async fn sleep(&mut self, stop: &CancellationToken) -> bool {
        let pause = self.next_pause();
        stop.run_until_cancelled(tokio::time::sleep(pause))
            .await
            .is_some()
    }
}

/// One operation retried with back-off until it succeeds: see the module documentation.
#[derive(Clone)]
pub struct Retry<'a> {
    what: &'a str,
    stop: &'a CancellationToken,
    backoff: Backoff,
    readiness: Option<&'a Readiness>,
    give_up_after: Option<Duration>,
}

/// Why a [`Retry`] ended without a result.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The shutdown token fired between attempts.
    Stopped,
    /// An error no retry mends (the operation's classifier said so).
    Failed(E),
    /// Still failing when the time limit passed: the last error, and how long it was tried.
    TimedOut { error: E, waited: Duration },
}

impl<'a> Retry<'a> {
    /// Retries with [`Backoff::BACKEND`] until `stop` fires; `what` names the operation in logs.
    pub fn new(what: &'a str, stop: &'a CancellationToken) -> Self {
        Self {
            what,
            stop,
            backoff: Backoff::BACKEND,
            readiness: None,
            give_up_after: None,
        }
    }

    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Not ready (with the error as reason) while attempts fail, ready once one succeeds.
    pub fn reporting_to(mut self, readiness: &'a Readiness) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// Gives up once failures have gone on this long (see [`GaveUp::TimedOut`]).
    pub fn give_up_after(mut self, limit: Duration) -> Self {
        self.give_up_after = Some(limit);
        self
    }

    /// Retries every error: `Ok(None)` when `stop` fired first.
    pub async fn run<T, E, F, Fut>(self, attempt: F) -> Option<T>
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_while(|_| true, attempt).await.ok()
    }

    /// Retries the errors `retryable` accepts; another error ends it at once.
    pub async fn run_while<T, E, F, Fut>(
        self,
        retryable: impl Fn(&E) -> bool,
        mut attempt: F,
    ) -> Result<T, GaveUp<E>>
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut pauses = self.backoff.pauses();
        loop {
            let error = match attempt().await {
                Ok(value) => {
                    if let Some(readiness) = self.readiness {
                        readiness.set_ready();
                    }
                    return Ok(value);
                }
                Err(error) if !retryable(&error) => return Err(GaveUp::Failed(error)),
                Err(error) => error,
            };
            if let Some(readiness) = self.readiness {
                readiness.set_not_ready(error.to_string());
            }
            if let Some(limit) = self.give_up_after {
                if started.elapsed() >= limit {
                    return Err(GaveUp::TimedOut {
                        error,
                        waited: started.elapsed(),
                    });
                }
            }
            let pause = pauses.next_pause();
            tracing::warn!(%error, what = self.what, retry_in = ?pause, "failed; retrying");
            if self
                .stop
                .run_until_cancelled(tokio::time::sleep(pause))
                .await
                .is_none()
            {
                return Err(GaveUp::Stopped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn pauses_double_up_to_the_maximum_and_reset() {
        let mut pauses =
            Backoff::new(Duration::from_millis(10), Duration::from_millis(35)).pauses();
        let seen: Vec<u64> = (0..4)
            .map(|_| pauses.next_pause().as_millis() as u64)
            .collect();
        assert_eq!(seen, [10, 20, 35, 35]);
        assert!(pauses.at_max());
        pauses.reset();
        assert_eq!(pauses.next_pause(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_and_reports_readiness() {
        let health = crate::Health::default();
        let ready = health.register("backend");
        let stop = CancellationToken::new();
        let attempts = AtomicU32::new(0);
        let got = Retry::new("test", &stop)
            .reporting_to(&ready)
            .run(|| async {
                match attempts.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err("down"),
                    n => Ok(n),
                }
            })
            .await;
        assert_eq!(got, Some(2));
        assert!(health.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn stops_on_shutdown_and_on_errors_no_retry_mends() {
        let stop = CancellationToken::new();
        stop.cancel();
        let stopped = Retry::new("test", &stop)
            .run(|| async { Err::<(), _>("down") })
            .await;
        assert_eq!(stopped, None);
        let live = CancellationToken::new();
        let failed = Retry::new("test", &live)
            .run_while(
                |e: &&str| *e != "refused",
                || async { Err::<(), _>("refused") },
            )
            .await;
        assert!(matches!(failed, Err(GaveUp::Failed("refused"))));
        let timed_out = Retry::new("test", &live)
            .give_up_after(Duration::from_secs(1))
            .run_while(|_| true, || async { Err::<(), _>("down") })
            .await;
        assert!(matches!(
            timed_out,
            Err(GaveUp::TimedOut { error: "down", .. })
        ));
    }
}
