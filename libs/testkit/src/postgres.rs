use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{free_port, ChildGuard, TestkitError};
use crate::servers::{spawn, wait_ready};

/// A real PostgreSQL server (Debian's `postgresql` package) on a free loopback port, with a
/// fresh cluster in a temp dir and `trust` authentication. `initdb` refuses to run as root,
/// so under root the cluster belongs to the `postgres` user and the server runs as it.
pub struct PostgresServer {
    port: u16,
    guard: ChildGuard,
    _dir: TempDir,
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> Result<PathBuf, TestkitError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| TestkitError::Spawn {
            program: "postgres (apt-get install postgresql)".into(),
            source: e,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| TestkitError::Spawn {
            program: "postgres".into(),
            source: std::io::Error::other("no version under /usr/lib/postgresql"),
        })
}

/// The uid and gid to run PostgreSQL as: `postgres` under root, else ourselves (None).
fn run_as() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn as_user(command: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command
}

impl PostgresServer {
    pub fn start() -> Result<PostgresServer, TestkitError> {
        let bin = bin_dir()?;
        let user = run_as();
        let dir = tempfile::tempdir()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let init = as_user(
            Command::new(bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
                .arg("-D")
                .arg(&data)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
            user,
        )
        .status()
        .map_err(|source| TestkitError::Spawn {
            program: "initdb".into(),
            source,
        })?;
        if !init.success() {
            return Err(TestkitError::Spawn {
                program: "initdb".into(),
                source: std::io::Error::other(format!("initdb failed: {init}")),
            });
        }
        let port = free_port()?;
        let mut guard = spawn(
            as_user(
                Command::new(bin.join("postgres"))
                    .arg("-D")
                    .arg(&data)
                    .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
                    .arg(dir.path())
                    .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                    .args(["-c", "full_page_writes=off", "-c", "max_connections=50"]),
                user,
            ),
            &log,
        )?;
        wait_ready("postgres", &mut guard, &log, || ready(&log))?;
        Ok(PostgresServer {
            port,
            guard,
            _dir: dir,
        })
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

fn ready(log: &Path) -> bool {
    std::fs::read_to_string(log)
        .is_ok_and(|l| l.contains("database system is ready to accept connections"))
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Immediate shutdown, so the server's children and shared memory go with it (a
        // SIGKILL of the postmaster alone would leave them behind for a moment).
        let pid = self.guard.0.id().to_string();
        if Command::new("kill").args(["-QUIT", &pid]).status().is_ok() {
            let _ = self.guard.wait_exit(Duration::from_secs(10));
        }
    }
}
