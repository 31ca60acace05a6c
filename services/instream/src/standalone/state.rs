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
}

/// The lock a running standalone holds on `<data_dir>/standalone.lock` for as long as it runs
/// (the operating system releases it when the process ends, also on kill -9).
pub struct RunLock(#[allow(dead_code)] std::fs::File);

fn lock_file(config: &Config) -> PathBuf {
    config.standalone.data_dir.join("standalone.lock")
}

/// Whether a standalone runs with `config`'s data directory (it holds the lock).
pub fn running(config: &Config) -> bool {
    match std::fs::File::open(lock_file(config)) {
        Ok(file) => matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// Takes the data directory for a run starting now, and its number: one more than any run
/// before it (the state file's, or an archive folder `run-<n>` left by one). Refuses when
/// another standalone runs there.
pub fn claim(config: &Config) -> anyhow::Result<(RunLock, u64)> {
    let dir = &config.standalone.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating standalone.data_dir {}", dir.display()))?;
    let path = lock_file(config);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
        let pid = RunState::read(&config.standalone.state_file())
            .ok()
            .flatten()
            .map_or_else(|| "?".to_owned(), |s| s.pid.to_string());
        bail!(
            "another instream standalone (pid {pid}) runs with standalone.data_dir {}; stop it \
             first, or give this one another data directory",
            dir.display()
        );
    }
    let last = RunState::read(&config.standalone.state_file())?.map_or(0, |s| s.run);
    let archived = std::fs::read_dir(&config.archive.root)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_prefix("run-")?
                        .parse()
                        .ok()
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    Ok((RunLock(file), last.max(archived) + 1))
}

/// This run's archive folder: `<archive.root>/run-<n>`.
pub fn run_archive_root(config: &Config, run: u64) -> PathBuf {
    Path::new(&config.archive.root).join(format!("run-{run}"))
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
    let running = state.as_ref().filter(|_| running(&config));
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
