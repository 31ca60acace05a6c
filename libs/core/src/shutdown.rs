//! Graceful shutdown: signals in, one cancellation token out, and a supervisor that stops every
//! task of a process together.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

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

/// Spawns a background task of a library that has no [`Tasks`] handle (a ZooKeeper session
/// keeper, a version follower): its owner learns of its end through the channel it drops, and
/// a panic is not silent — an ERROR line naming the task and
/// `instream_task_panics_total{task}`, which the chart alerts on.
pub fn spawn_watched<F>(name: &'static str, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let inner = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(join) = inner.await {
            if join.is_panic() {
                crate::events::task_panicked(name, join, "what it kept is no longer kept");
            }
        }
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

/// How a supervised task ended.
struct Report {
    id: u64,
    name: String,
    result: Result<(), Ending>,
    /// Whether shutdown had begun when it ended.
    stopping: bool,
}

enum Ending {
    Failed(String),
    Panicked,
}

/// The tasks spawned and not yet reported as ended: id, name, and how to abort it.
type Running = std::sync::Mutex<Vec<(u64, String, tokio::task::AbortHandle)>>;

/// A handle every part of a service spawns its tasks through (a clone per part): each task is
/// watched, and when one ends — an error, a panic, or a return before shutdown — the whole
/// service is asked to stop and the task is named. The [`Supervisor`] holding the other end
/// waits for all of them on shutdown and names the ones that do not stop.
#[derive(Clone)]
pub struct Tasks {
    token: CancellationToken,
    running: std::sync::Arc<Running>,
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
}

impl Tasks {
    /// A handle no supervisor waits on (a service run by a test): its tasks are watched the
    /// same way, and a failing one stops the service, but nobody waits for them to drain.
    pub fn detached(token: CancellationToken) -> Self {
        let (reports, _) = tokio::sync::mpsc::unbounded_channel();
        Self::with_reports(token, reports)
    }

    fn with_reports(
        token: CancellationToken,
        reports: tokio::sync::mpsc::UnboundedSender<Report>,
    ) -> Self {
        Self {
            token,
            running: Default::default(),
            next_id: Default::default(),
            reports,
        }
    }

    /// The token the tasks watch to know when to stop.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// [`Self::spawn`] for a task that cannot fail (one that ends only at shutdown).
    pub fn spawn_infallible<F>(&self, name: impl Into<String>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Runs `task` until it ends; it is expected to run until the token is cancelled.
    pub fn spawn<F, E>(&self, name: impl Into<String>, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let name = name.into();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inner = tokio::spawn(async move { task.await.map_err(|e| format!("{e:#}")) });
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, name.clone(), inner.abort_handle()));
        let (token, running, reports) = (
            self.token.clone(),
            self.running.clone(),
            self.reports.clone(),
        );
        tokio::spawn(async move {
            let result = match inner.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(Ending::Failed(error)),
                Err(join) if join.is_panic() => {
                    crate::events::task_panicked(name.clone(), join, "stopping the process");
                    Err(Ending::Panicked)
                }
                // Aborted by the supervisor, which already named it a straggler.
                Err(_) => return,
            };
            // Stop the others at once, even before anyone waits on the supervisor (a
            // start-up that waits for readiness sees it), and remember whether this task
            // ended because of shutdown or on its own.
            let stopping = token.is_cancelled();
            token.cancel();
            let report = Report {
                id,
                name,
                result,
                stopping,
            };
            if let Err(unsent) = reports.send(report) {
                // Detached: nobody waits, so the ending is told here.
                forget(&running, id);
                record(unsent.0);
            }
        });
    }
}

fn forget(running: &Running, id: u64) {
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(running, ..)| *running != id);
}

/// Logs how a task ended; the error it means for the process, if any.
fn record(report: Report) -> Option<SupervisorError> {
    let task = report.name;
    match report.result {
        Ok(()) if report.stopping => {
            tracing::info!(%task, "stopped");
            None
        }
        Ok(()) => {
            tracing::error!(%task, "ended before shutdown; stopping the process");
            Some(SupervisorError::EndedEarly { task })
        }
        Err(Ending::Failed(error)) => {
            tracing::error!(%task, %error, "failed; stopping the process");
            Some(SupervisorError::TaskFailed { task, error })
        }
        // Logged and counted where the panic was seen.
        Err(Ending::Panicked) => Some(SupervisorError::TaskPanicked { task }),
    }
}

/// Runs the tasks of one process. When any task ends — an error, a panic, or an unexpected
/// return — or the shared token is cancelled, every task is asked to stop; the supervisor then
/// waits for them up to the drain timeout and names the ones that did not stop.
pub struct Supervisor {
    tasks: Tasks,
    reports: tokio::sync::mpsc::UnboundedReceiver<Report>,
}

impl Supervisor {
    pub fn new(token: CancellationToken) -> Self {
        let (sender, reports) = tokio::sync::mpsc::unbounded_channel();
        Self {
            tasks: Tasks::with_reports(token, sender),
            reports,
        }
    }

    /// The token tasks watch to know when to stop.
    pub fn token(&self) -> CancellationToken {
        self.tasks.token()
    }

    /// A handle that spawns tasks this supervisor watches.
    pub fn tasks(&self) -> Tasks {
        self.tasks.clone()
    }

    pub fn spawn<F, E>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        self.tasks.spawn(name, task);
    }

    /// Waits until shutdown or the first task ends, then drains the rest.
    pub async fn wait(mut self, drain_timeout: Duration) -> Result<(), SupervisorError> {
        let token = self.tasks.token();
        let mut first_error = None;
        tokio::select! {
            _ = token.cancelled() => {}
            Some(report) = self.reports.recv() => {
                forget(&self.tasks.running, report.id);
                first_error = record(report);
                token.cancel();
            }
        }
        let running = self.tasks.running.clone();
        let is_empty = || running.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        let drain = async {
            while !is_empty() {
                let Some(report) = self.reports.recv().await else {
                    break;
                };
                forget(&running, report.id);
                let error = record(report);
                first_error = first_error.take().or(error);
            }
        };
        if tokio::time::timeout(drain_timeout, drain).await.is_err() {
            let stragglers: Vec<(String, tokio::task::AbortHandle)> = running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
                .map(|(_, name, abort)| (name, abort))
                .collect();
            let names: Vec<String> = stragglers.iter().map(|(n, _)| n.clone()).collect();
            tracing::error!(stragglers = ?names, "tasks did not stop in time; aborting them");
            for (_, abort) in stragglers {
                abort.abort();
            }
            return Err(first_error.unwrap_or(SupervisorError::Stragglers(names)));
        }
        first_error.map_or(Ok(()), Err)
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

    fn token_is_fresh() -> bool {
        !CancellationToken::new().is_cancelled()
    }

    #[tokio::test]
    async fn a_panicking_task_is_named() {
        let token = CancellationToken::new();
        let sup = Supervisor::new(token.clone());
        sup.tasks().spawn("panics", async {
            if token_is_fresh() {
                panic!("a test's panic");
            }
            Ok::<(), String>(())
        });
        let err = sup.wait(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, SupervisorError::TaskPanicked { ref task } if task == "panics"));
    }

    #[tokio::test]
    async fn a_detached_task_failing_stops_the_service() {
        let token = CancellationToken::new();
        Tasks::detached(token.clone()).spawn("fails", async { Err::<(), _>("boom") });
        tokio::time::timeout(Duration::from_secs(5), token.cancelled())
            .await
            .expect("the token is cancelled");
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

    /// A panic in a library's background task is counted (and logged), and its owner learns
    /// of the end through the channel the task held.
    #[test]
    fn a_panicking_watched_task_is_counted_and_its_owner_told() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
            spawn_watched("test task", async move {
                let _held = tx;
                panic!("boom");
            });
            assert!(rx.recv().await.is_none(), "the owner sees the end");
            let counted = || {
                handle
                    .render()
                    .contains("instream_task_panics_total{task=\"test task\"} 1")
            };
            for _ in 0..100 {
                if counted() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert!(counted(), "{}", handle.render());
        });
    }
}
