use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Problems;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// `instream standalone`: every service in one process on the embedded broker.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StandaloneConfig {
    /// Where a running standalone says where it is (`standalone.json`: the embedded broker's
    /// address, for the CLI's commands given the same `--config`), and keeps dead letters and
    /// quality records (`topics/<topic>.jsonl`, copied from the broker as they come).
    pub data_dir: PathBuf,
    /// Most bytes a topic may hold that a stage has not read yet (summed over its partitions,
    /// uncompressed, with a per-record overhead). The embedded broker keeps 5 MB a partition
    /// and deletes the oldest beyond, read or not; past this bound ingest answers 503 with
    /// `Retry-After` and the other stages wait, so nothing accepted is deleted unread. Also
    /// the largest request body ingest takes in standalone mode.
    pub max_unread_bytes: u64,
    /// Each run archives into `<archive.root>/run-<n>` (each run's broker numbers offsets
    /// from 0 again, so one run's files must not be taken for another's). `false` only when
    /// every run starts from an empty archive root (as `instream demo` does).
    pub archive_per_run: bool,
    /// On SIGTERM or Ctrl-C ingest closes and the stages go on until every topic is read and
    /// committed to its end, for at most this long (what is left then is lost with the
    /// embedded broker, and said so); then they stop within `shutdown.drain_timeout`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub stop_timeout: std::time::Duration,
}

impl Default for StandaloneConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("instream-data"),
            max_unread_bytes: 2 * MIB,
            archive_per_run: true,
            stop_timeout: std::time::Duration::from_secs(60),
        }
    }
}

impl StandaloneConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.non_zero_duration(self.stop_timeout, "standalone.stop_timeout");
        p.check(
            !self.data_dir.as_os_str().is_empty(),
            "standalone.data_dir",
            || "must not be empty".into(),
        );
        p.check(
            (64 * KIB..=4 * MIB).contains(&self.max_unread_bytes),
            "standalone.max_unread_bytes",
            || {
                format!(
                    "{} is outside 64 KiB..=4 MiB (the embedded broker keeps 5 MB a partition)",
                    self.max_unread_bytes
                )
            },
        );
    }

    /// Where a running standalone writes its addresses.
    pub fn state_file(&self) -> PathBuf {
        self.data_dir.join("standalone.json")
    }
}
