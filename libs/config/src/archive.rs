//! The archive's settings: which file system, and how to reach HDFS.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Problems;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveBackend {
    /// HDFS at `archive.hdfs_url`.
    Hdfs,
    /// A directory on the local file system.
    Local,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Which file system the archiver writes to.
    pub backend: ArchiveBackend,
    /// `hdfs://namenode:port` or `hdfs://nameservice` (HA).
    pub hdfs_url: String,
    /// The archive's root: a path on HDFS or a local directory.
    pub root: String,
    /// Hadoop client properties, over those read from `hdfs_config_dir`. For an HA
    /// nameservice `ns`: `dfs.ha.namenodes.ns = "nn1,nn2"` and
    /// `dfs.namenode.rpc-address.ns.nn1 = "host1:8020"` (one per namenode).
    pub hdfs_config: BTreeMap<String, String>,
    /// A Hadoop configuration directory (core-site.xml, hdfs-site.xml); unset: the
    /// `HADOOP_CONF_DIR` environment variable, if any.
    pub hdfs_config_dir: Option<String>,
    /// The HDFS user; unset: `HADOOP_USER_NAME`, else the OS user.
    pub hdfs_user: Option<String>,
    /// Kerberos principal (needs instream built with the `kerberos` feature and
    /// `hadoop.security.authentication = kerberos` in the Hadoop configuration).
    pub kerberos_principal: Option<String>,
    /// Kerberos keytab file for `kerberos_principal`.
    pub kerberos_keytab: Option<String>,
    /// Kerberos credential cache (e.g. `FILE:/tmp/krb5cc_1000`), instead of a keytab.
    pub kerberos_cache: Option<String>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            backend: ArchiveBackend::Hdfs,
            hdfs_url: "hdfs://127.0.0.1:9000".into(),
            root: "/instream/archive".into(),
            hdfs_config: BTreeMap::new(),
            hdfs_config_dir: None,
            hdfs_user: None,
            kerberos_principal: None,
            kerberos_keytab: None,
            kerberos_cache: None,
        }
    }
}

impl ArchiveConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if self.backend == ArchiveBackend::Hdfs {
            p.check(
                self.hdfs_url.starts_with("hdfs://") || self.hdfs_url.starts_with("viewfs://"),
                "archive.hdfs_url",
                || "must start with hdfs:// or viewfs://".into(),
            );
            p.check(self.root.starts_with('/'), "archive.root", || {
                "must be an absolute HDFS path".into()
            });
            // An HA nameservice is a URL without a port; spelled out here (rather than in a
            // configuration directory), its namenodes must be listed.
            let authority = self
                .hdfs_url
                .split_once("://")
                .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
            let spells_out_ha = self
                .hdfs_config
                .keys()
                .any(|k| k.starts_with("dfs.ha.namenodes.") || k == "dfs.nameservices");
            if !authority.contains(':') && spells_out_ha && self.hdfs_config_dir.is_none() {
                let key = format!("dfs.ha.namenodes.{authority}");
                p.check(
                    self.hdfs_config.contains_key(&key),
                    "archive.hdfs_config",
                    || format!("the nameservice `{authority}` needs `{key}` and an rpc-address per namenode"),
                );
            }
            p.check(
                self.kerberos_keytab.is_none() || self.kerberos_principal.is_some(),
                "archive.kerberos_keytab",
                || "needs archive.kerberos_principal".into(),
            );
        }
        p.non_empty(&self.root, "archive.root");
    }
}
