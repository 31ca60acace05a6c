//! `<standalone.data_dir>/standalone.json`: where a running standalone is (its embedded
//! broker's address, its ports, this run's archive folder), so that the CLI given the same
//! `--config` finds it; and which run this is (the embedded broker starts empty each time, so
//! what outlives a run must be told apart from what the next one writes).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use instream_core::config::{BrokerMode, Config};
use serde::{Deserialize, Serialize};

/// What a standalone run says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// The run's number in this data directory, from 1.
    pub run: u64,
    pub pid: u32,
    /// The embedded broker's `host:port`.
    pub broker: String,
    pub ingest: String,
    pub admin: String,
    pub query: Option<String>,
    /// Where this run archives (`<archive.root>/run-<n>`: each run's broker numbers offsets
    /// from 0 again).
    pub archive_root: Option<PathBuf>,
    pub started_at_ms: i64,
    /// Set when the run stopped cleanly.
    pub stopped_at_ms: Option<i64>,
}

impl RunState {
    pub fn read(path: &Path) -> anyhow::Result<Option<RunState>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written whole under another name, then renamed: a reader never sees half of it.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, serde_json::to_vec_pretty(self)?)
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Whether the process that wrote this still runs.
    pub fn running(&self) -> bool {
        self.stopped_at_ms.is_none() && Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// The number of the run starting now in `config`'s data directory; refuses when another
/// standalone runs there.
pub fn next_run(config: &Config) -> anyhow::Result<u64> {
    let path = config.standalone.state_file();
    match RunState::read(&path)? {
        Some(last) if last.running() && last.pid != std::process::id() => bail!(
            "another instream standalone (pid {}) runs with standalone.data_dir {}; stop it \
             first, or give this one another data directory",
            last.pid,
            config.standalone.data_dir.display()
        ),
        Some(last) => Ok(last.run + 1),
        None => Ok(1),
    }
}

/// This run's archive folder: `<archive.root>/run-<n>`.
pub fn run_archive_root(config: &Config, run: u64) -> PathBuf {
    Path::new(&config.archive.root).join(format!("run-{run}"))
}

/// Whether a standalone runs for `config` (its state file names a live process).
pub fn running(config: &Config) -> bool {
    RunState::read(&config.standalone.state_file())
        .ok()
        .flatten()
        .is_some_and(|state| state.running())
}

/// `config` as the CLI needs it: with `kafka.broker = "embedded"` the broker lives inside a
/// standalone process, so its address (and the run's archive folder) comes from the state file
/// that process wrote. `need_running`: the command talks to the broker (else only the archive
/// folder of the last run is taken, running or not).
pub fn cli_config(path: Option<&Path>, need_running: bool) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    if config.kafka.broker != BrokerMode::Embedded {
        return Ok(config);
    }
    let file = config.standalone.state_file();
    let state = RunState::read(&file)?;
    let running = state.as_ref().filter(|s| s.running());
    match (running, &state) {
        (Some(run), _) => config.kafka.bootstrap_servers = run.broker.clone(),
        (None, _) if need_running => bail!(
            "kafka.broker is `embedded`: the broker lives inside `instream standalone`, and none \
             runs for standalone.data_dir {} (no live process in {}); start it with the same \
             --config",
            config.standalone.data_dir.display(),
            file.display()
        ),
        (None, _) => {}
    }
    if let Some(root) = state.as_ref().and_then(|last| last.archive_root.as_ref()) {
        config.archive.root = root.display().to_string();
    }
    Ok(config)
}
