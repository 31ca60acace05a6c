use std::net::TcpListener;
use std::path::PathBuf;
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
    #[error("redis: {0}")]
    Redis(String),
    #[error("test certificates: {0}")]
    Pki(String),
}

/// A port free on 127.0.0.1 right now, for a server the test starts next. Taken below the
/// kernel's ephemeral range (32768–60999 by default), not with `bind(0)`: a port picked there
/// and released can be taken at once as the local port of any outgoing connection (the many
/// a broker client opens), and the server then fails with "address already in use" (seen in
/// CI). 10000–21999, so that a Redis cluster node's bus port (its port + 10000) is below that
/// range too. Successive calls of one process walk the range from a start that differs per
/// process.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FROM: u32 = 10_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos) % SPAN
    });
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FROM + start.wrapping_add(step) % SPAN;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return Ok(listener.local_addr()?.port());
        }
    }
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

/// Starts a service binary with `--config <config>`. Its log goes to a file next to the
/// config (`<config>.<n>.log`), whose last lines are printed if the test fails while the
/// process is still held: a CI failure then shows what the service itself said.
pub fn spawn_service(binary: &str, config: &std::path::Path) -> std::io::Result<ChildGuard> {
    spawn_service_with(binary, &[], config)
}

/// [`spawn_service`] with arguments before `--config` (`instream run enricher`).
pub fn spawn_service_with(
    binary: &str,
    args: &[&str],
    config: &std::path::Path,
) -> std::io::Result<ChildGuard> {
    static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = config.with_extension(format!("{n}.log"));
    let file = std::fs::File::create(&log)?;
    let child = std::process::Command::new(binary)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()?;
    Ok(ChildGuard(child, Some(log)))
}

/// A child process killed (SIGKILL) and reaped on drop, so a failing test never leaves a
/// server or a service running. With a log file, its last lines are printed when the
/// guard is dropped during a panic.
pub struct ChildGuard(pub Child, pub Option<PathBuf>);

impl ChildGuard {
    /// Guards a process whose output is handled elsewhere.
    pub fn new(child: Child) -> Self {
        Self(child, None)
    }

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

    /// The line of an instream service's log saying it stopped with an error (with the
    /// error); panics, showing the log, when there is none.
    pub fn stopped_with_an_error(&self) -> String {
        let path = self.1.as_ref().expect("a service started with a log");
        let log = std::fs::read_to_string(path).unwrap_or_default();
        log.lines()
            .find(|l| l.contains("stopped with an error"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("the service does not say it stopped with an error: {log}"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let (true, Some(log)) = (std::thread::panicking(), &self.1) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "--- last {} log lines of pid {} ({}) ---\n{}\n---",
                tail.len(),
                self.0.id(),
                log.display(),
                tail.join("\n")
            );
        }
    }
}

/// How much of a failed test's service log is printed.
const LOG_TAIL_LINES: usize = 60;
