use std::net::TcpListener;
use std::process::Child;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("`{program}` could not be started ({source}); is it installed? `bash scripts/test.sh` installs it")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{what} was not ready within {timeout:?}{detail}")]
    Timeout {
        what: String,
        timeout: Duration,
        detail: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Broker(String),
}

/// A port free on 127.0.0.1 right now. The listener is dropped before the server binds, so a
/// race is possible in principle; servers are started right after and fail loudly if it hits.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<(), TestkitError> {
    let start = Instant::now();
    loop {
        if condition() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(TestkitError::Timeout {
                what: what.to_owned(),
                timeout,
                detail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a service binary with `--config <config>`, its output discarded (its /metrics and
/// exit status are what tests look at).
pub fn spawn_service(binary: &str, config: &std::path::Path) -> std::io::Result<ChildGuard> {
    std::process::Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(ChildGuard)
}

/// A child process killed (SIGKILL) and reaped on drop, so a failing test never leaves a
/// server or a service running.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, TestkitError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                return Err(TestkitError::Timeout {
                    what: "process exit".into(),
                    timeout,
                    detail: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM (a graceful stop request).
    pub fn terminate(&self) -> std::io::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "kill -TERM failed: {status}"
            )))
        }
    }

    /// Whether the process already exited (then it will never become ready).
    pub fn exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
