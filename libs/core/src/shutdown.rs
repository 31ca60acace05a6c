//! Graceful shutdown: signals in, one cancellation token out, and a supervisor that stops every
//! task of a process together.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT. A second signal means "stop now": the
/// process exits at once with code 130, without draining.
pub fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining (a second signal stops at once)");
        token.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is all that is left.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("task `{task}` failed: {error}")]
    TaskFailed { task: String, error: String },
    #[error("task `{task}` panicked")]
    TaskPanicked { task: String },
    #[error("task `{task}` ended before shutdown was requested")]
    EndedEarly { task: String },
    #[error("tasks did not stop within the drain timeout: {0:?}")]
    Stragglers(Vec<String>),
}

/// Runs the tasks of one process. When any task ends — an error, a panic, or an unexpected
/// return — or the shared token is cancelled, every task is asked to stop; the supervisor then
/// waits for them up to the drain timeout and names the ones that did not stop.
pub struct Supervisor {
    token: CancellationToken,
    /// Each task's name, result, and whether shutdown had begun when it ended.
    tasks: JoinSet<(String, Result<(), String>, bool)>,
    names: Vec<String>,
}

impl Supervisor {
    pub fn new(token: CancellationToken) -> Self {
        Self {
            token,
            tasks: JoinSet::new(),
            names: Vec::new(),
        }
    }

    /// The token tasks watch to know when to stop.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub fn spawn<F, E>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let name = name.into();
        self.names.push(name.clone());
        let token = self.token.clone();
        self.tasks.spawn(async move {
            let result = task.await.map_err(|e| format!("{e:#}"));
            // Stop the others at once, even before anyone waits on the supervisor (a
            // start-up that waits for readiness sees it), and remember whether this task
            // ended because of shutdown or on its own.
            let stopping = token.is_cancelled();
            token.cancel();
            (name, result, stopping)
        });
    }

    /// Waits until shutdown or the first task ends, then drains the rest.
    pub async fn wait(mut self, drain_timeout: Duration) -> Result<(), SupervisorError> {
        let mut first_error = None;
        tokio::select! {
            _ = self.token.cancelled() => {}
            Some(joined) = self.tasks.join_next() => {
                first_error = Self::record(joined, &mut self.names);
                self.token.cancel();
            }
        }
        let drain = async {
            while let Some(joined) = self.tasks.join_next().await {
                let error = Self::record(joined, &mut self.names);
                first_error = first_error.take().or(error);
            }
        };
        if tokio::time::timeout(drain_timeout, drain).await.is_err() {
            tracing::error!(stragglers = ?self.names, "tasks did not stop in time; aborting them");
            self.tasks.abort_all();
            return Err(first_error.unwrap_or(SupervisorError::Stragglers(self.names)));
        }
        first_error.map_or(Ok(()), Err)
    }

    fn record(
        joined: Result<(String, Result<(), String>, bool), tokio::task::JoinError>,
        running: &mut Vec<String>,
    ) -> Option<SupervisorError> {
        match joined {
            Ok((task, result, stopping)) => {
                running.retain(|n| n != &task);
                match result {
                    Ok(()) if stopping => {
                        tracing::info!(%task, "stopped");
                        None
                    }
                    Ok(()) => {
                        tracing::error!(%task, "ended before shutdown; stopping the process");
                        Some(SupervisorError::EndedEarly { task })
                    }
                    Err(error) => {
                        tracing::error!(%task, %error, "failed; stopping the process");
                        Some(SupervisorError::TaskFailed { task, error })
                    }
                }
            }
            Err(join_error) => {
                // The JoinSet does not tell which task panicked; the panic message was logged.
                tracing::error!(error = %join_error, "a task panicked; stopping the process");
                Some(SupervisorError::TaskPanicked {
                    task: "unknown".into(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_task_stops_the_others() {
        let token = CancellationToken::new();
        let mut sup = Supervisor::new(token.clone());
        let t = token.clone();
        sup.spawn("waits", async move {
            t.cancelled().await;
            Ok::<(), String>(())
        });
        sup.spawn("fails", async { Err::<(), _>("boom") });
        let err = sup.wait(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, SupervisorError::TaskFailed { ref task, .. } if task == "fails"));
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn a_task_ending_early_is_an_error() {
        let token = CancellationToken::new();
        let mut sup = Supervisor::new(token.clone());
        sup.spawn("quits", async { Ok::<(), String>(()) });
        let err = sup.wait(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, SupervisorError::EndedEarly { ref task } if task == "quits"));
    }

    #[tokio::test]
    async fn stragglers_are_named() {
        let token = CancellationToken::new();
        let mut sup = Supervisor::new(token.clone());
        sup.spawn("stuck", async {
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        });
        token.cancel();
        let err = sup.wait(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, SupervisorError::Stragglers(ref n) if n == &["stuck"]));
    }
}
