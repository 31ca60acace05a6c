//! Progress of long CLI work (`refdata load`, `archive verify`, `dlq redrive`) on stderr, so
//! an operator sees it is moving: on a terminal one line redrawn at most twice a second, in a
//! log (a Kubernetes Job) a line every 10 s. Stdout keeps only the command's result.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A counter that reports itself. Clones count into the same total. [`Progress::silent`] for
/// callers that want no output (tests, services).
#[derive(Clone)]
pub struct Progress {
    inner: Option<Arc<Shared>>,
}

struct Shared {
    what: String,
    unit: &'static str,
    total: Option<u64>,
    done: AtomicU64,
    started: Instant,
    terminal: bool,
    /// When the last line was printed.
    last: Mutex<Instant>,
}

impl Progress {
    /// Reports `what` in `unit`s (e.g. "records") on stderr; `total`, when known, adds a
    /// percentage.
    pub fn on_stderr(what: impl Into<String>, unit: &'static str, total: Option<u64>) -> Self {
        let now = Instant::now();
        Self {
            inner: Some(Arc::new(Shared {
                what: what.into(),
                unit,
                total,
                done: AtomicU64::new(0),
                started: now,
                terminal: std::io::stderr().is_terminal(),
                last: Mutex::new(now),
            })),
        }
    }

    pub fn silent() -> Self {
        Self { inner: None }
    }

    pub fn add(&self, n: u64) {
        let Some(shared) = &self.inner else { return };
        let done = shared.done.fetch_add(n, Ordering::Relaxed) + n;
        let every = if shared.terminal {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        let Ok(mut last) = shared.last.try_lock() else {
            return;
        };
        if last.elapsed() >= every {
            *last = Instant::now();
            shared.print(done, false);
        }
    }

    /// Prints the final count (ends the redrawn line on a terminal).
    pub fn finish(&self) {
        if let Some(shared) = &self.inner {
            shared.print(shared.done.load(Ordering::Relaxed), true);
        }
    }
}

impl Shared {
    fn print(&self, done: u64, last: bool) {
        let line = self.line(done, self.started.elapsed());
        let mut stderr = std::io::stderr().lock();
        let _ = if self.terminal {
            write!(stderr, "\r\x1b[2K{line}{}", if last { "\n" } else { "" })
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }

    fn line(&self, done: u64, elapsed: Duration) -> String {
        let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
        let share = match self.total {
            Some(total) if total > 0 => {
                format!(" of {total} ({:.0}%)", done as f64 * 100.0 / total as f64)
            }
            _ => String::new(),
        };
        format!(
            "{}: {done}{share} {}, {rate:.0}/s, {:.0?}",
            self.what,
            self.unit,
            Duration::from_secs(elapsed.as_secs())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_how_far_and_how_fast() {
        let progress = Progress::on_stderr("refdata load", "records", Some(200));
        let shared = progress.inner.as_ref().unwrap();
        assert_eq!(
            shared.line(50, Duration::from_secs(5)),
            "refdata load: 50 of 200 (25%) records, 10/s, 5s"
        );
        progress.add(3);
        progress.add(4);
        assert_eq!(shared.done.load(Ordering::Relaxed), 7);
        Progress::silent().add(1);
    }
}
