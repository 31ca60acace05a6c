//! Durable progress of a singleton duty (a SQL table's last row read), fenced by election term.
//!
//! `sources/<name>` holds `{"term": T, "position": …}`. A new leader claims the node by
//! writing its own (higher) term; every later save is a compare-and-set on the node's
//! version, so a deposed leader's late save fails ([`CoordError::Fenced`]) instead of moving
//! the progress back or forward under the new leader.

use async_trait::async_trait;
use instream_core::config::ZooKeeperConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zookeeper_client as zk;

use crate::session::{connect, persistent, CoordError};

pub(crate) const SOURCES: &str = "/sources";

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub(crate) term: u64,
    pub(crate) position: Value,
}

/// The claimed progress node of one duty; saves succeed only while no later leader claimed it.
pub struct Progress {
    client: zk::Client,
    path: String,
    term: u64,
    version: i32,
    position: Value,
}

impl Progress {
    /// Claims `sources/<name>` for `term` and returns it with the stored position (`null`
    /// when nothing was stored yet). Fails with [`CoordError::Fenced`] when a later term
    /// already claimed it.
    pub async fn claim(
        cfg: &ZooKeeperConfig,
        name: &str,
        term: u64,
    ) -> Result<Progress, CoordError> {
        let client = connect(cfg).await?;
        client
            .mkdir(SOURCES, &persistent(cfg))
            .await
            .map_err(CoordError::op("mkdir", SOURCES))?;
        let path = format!("{SOURCES}/{name}");
        loop {
            let (stored, version) = match client.get_data(&path).await {
                Ok((data, stat)) => {
                    let stored: Stored =
                        serde_json::from_slice(&data).map_err(|e| CoordError::Corrupt {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                    (stored, stat.version)
                }
                Err(zk::Error::NoNode) => {
                    let fresh = Stored {
                        term,
                        position: Value::Null,
                    };
                    match client
                        .create(&path, &encode(&fresh), &persistent(cfg))
                        .await
                    {
                        Ok(_) | Err(zk::Error::NodeExists) => continue,
                        Err(e) => return Err(CoordError::op("create", &path)(e)),
                    }
                }
                Err(e) => return Err(CoordError::op("get", &path)(e)),
            };
            if stored.term > term {
                return Err(CoordError::Fenced { path, term });
            }
            let claimed = Stored {
                term,
                position: stored.position,
            };
            match client
                .set_data(&path, &encode(&claimed), Some(version))
                .await
            {
                Ok(stat) => {
                    return Ok(Progress {
                        client,
                        path,
                        term,
                        version: stat.version,
                        position: claimed.position,
                    })
                }
                // Another contender wrote in between: read again and judge its term.
                Err(zk::Error::BadVersion) => continue,
                Err(e) => return Err(CoordError::op("set", &path)(e)),
            }
        }
    }

    /// The position stored when claimed, or last saved.
    pub fn position(&self) -> &Value {
        &self.position
    }

    /// Stores `position`, unless a later leader claimed the node since.
    pub async fn save(&mut self, position: Value) -> Result<(), CoordError> {
        let stored = Stored {
            term: self.term,
            position,
        };
        match self
            .client
            .set_data(&self.path, &encode(&stored), Some(self.version))
            .await
        {
            Ok(stat) => {
                self.version = stat.version;
                self.position = stored.position;
                Ok(())
            }
            Err(zk::Error::BadVersion) | Err(zk::Error::NoNode) => Err(CoordError::Fenced {
                path: self.path.clone(),
                term: self.term,
            }),
            Err(e) => Err(CoordError::op("set", &self.path)(e)),
        }
    }
}

/// How far a singleton source has read, kept where its coordinator keeps its state
/// (ZooKeeper, or files in standalone mode) and fenced by the leadership term it was claimed
/// for.
#[async_trait]
pub trait SourceProgress: Send {
    /// The position stored when claimed, or last saved (`null`: none yet).
    fn position(&self) -> &Value;
    /// Stores `position`, unless a later leader claimed it since ([`CoordError::Fenced`]).
    async fn save(&mut self, position: Value) -> Result<(), CoordError>;
}

#[async_trait]
impl SourceProgress for Progress {
    fn position(&self) -> &Value {
        Progress::position(self)
    }

    async fn save(&mut self, position: Value) -> Result<(), CoordError> {
        Progress::save(self, position).await
    }
}

pub(crate) fn encode(stored: &Stored) -> Vec<u8> {
    // A struct of a number and a JSON value always serialises.
    serde_json::to_vec(stored).unwrap_or_default()
}

/// Reads a duty's stored position without claiming it (for `instream status` and tests).
pub async fn stored_position(
    cfg: &ZooKeeperConfig,
    name: &str,
) -> Result<Option<(u64, Value)>, CoordError> {
    let client = connect(cfg).await?;
    let path = format!("{SOURCES}/{name}");
    match client.get_data(&path).await {
        Ok((data, _)) => {
            let stored: Stored =
                serde_json::from_slice(&data).map_err(|e| CoordError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Some((stored.term, stored.position)))
        }
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(CoordError::op("get", &path)(e)),
    }
}
