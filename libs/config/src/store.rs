//! The aggregate store section: which store, and how the aggregator talks to ScyllaDB.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::infra::DAY;
use super::secret::{Secret, SecretSlot};
use super::Problems;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// ScyllaDB or Cassandra at `store.scylla_nodes`.
    Scylla,
    /// In-process store (standalone mode and tests); not shared between processes.
    Embedded,
    /// A file on the local disk at `store.path` (one process at a time): survives restarts,
    /// for a single-node deployment and kill tests.
    Local,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Which store the aggregator writes to.
    pub backend: StoreBackend,
    /// Contact points, `host:port`.
    pub scylla_nodes: Vec<String>,
    /// Keyspace of the aggregate tables.
    pub keyspace: String,
    /// Replication factor used when instream creates the keyspace.
    pub replication_factor: u32,
    /// Rows expire this long after their last write (`default_time_to_live`).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub ttl: Duration,
    /// The database file of the local backend (`backend = "local"`).
    pub path: Option<PathBuf>,
    /// User name for password authentication (with `store.password`).
    pub username: Option<String>,
    /// Password for `store.username`: `INSTREAM__STORE__PASSWORD` or `password_file`; never
    /// logged, masked by `check-config`.
    pub password: Option<Secret>,
    /// A file holding `password`, read at start.
    pub password_file: Option<PathBuf>,
    /// TLS to ScyllaDB/Cassandra (their client-encryption port). Unset: plain CQL.
    pub tls: Option<ClientTls>,
    /// Consistency of window and checkpoint writes (ScyllaDB/Cassandra).
    pub write_consistency: StoreConsistency,
    /// Consistency of reads: a restored checkpoint must see the last one written, so
    /// writes + reads must overlap (W + R > replication factor, judged for one data centre);
    /// refused otherwise.
    pub read_consistency: StoreConsistency,
    /// Most windows of one group (one partition key) written as one unlogged batch: a
    /// hopping window's event updates several windows of its group at once. A batch is also
    /// kept under 32 KiB (Cassandra refuses batches above 50 KiB by default).
    pub upsert_batch_rows: usize,
    /// The data centre this instance runs in (ScyllaDB/Cassandra with several): requests go
    /// to its nodes only, token-aware, and `local_*` consistency levels count its replicas.
    /// Unset: any node, as a one-data-centre cluster has.
    pub local_dc: Option<String>,
}

/// A ScyllaDB/Cassandra consistency level instream may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StoreConsistency {
    One,
    LocalOne,
    Two,
    Quorum,
    LocalQuorum,
    EachQuorum,
    All,
}

impl StoreConsistency {
    /// Replicas (in the local data centre, for the local and each-quorum levels) that must
    /// answer, out of `replication` per data centre.
    pub fn replicas(self, replication: u32) -> u32 {
        match self {
            StoreConsistency::One | StoreConsistency::LocalOne => 1,
            StoreConsistency::Two => 2,
            StoreConsistency::Quorum
            | StoreConsistency::LocalQuorum
            | StoreConsistency::EachQuorum => replication / 2 + 1,
            StoreConsistency::All => replication,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Scylla,
            scylla_nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "instream".into(),
            replication_factor: 3,
            ttl: 30 * DAY,
            path: None,
            username: None,
            password: None,
            password_file: None,
            tls: None,
            write_consistency: StoreConsistency::LocalQuorum,
            read_consistency: StoreConsistency::LocalQuorum,
            upsert_batch_rows: 16,
            local_dc: None,
        }
    }
}

/// TLS to a server (`store.tls`, `zookeeper.tls`): the server's certificate is checked
/// against `ca_file`, and a client certificate is sent when the server asks for one (mutual
/// TLS).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    /// PEM certificate(s) of the authority that signed the server's certificate; unset: the
    /// system's trust store (the store; ZooKeeper needs it).
    pub ca_file: Option<PathBuf>,
    /// The client certificate (PEM), with `key_file`, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM, unencrypted).
    pub key_file: Option<PathBuf>,
}

impl ClientTls {
    /// `cert_file` and `key_file` go together; `<section>.tls.<key>` in what is reported.
    pub(super) fn validate(&self, section: &str, p: &mut Problems) {
        p.check(
            self.cert_file.is_some() == self.key_file.is_some(),
            &format!("{section}.tls.cert_file"),
            || format!("{section}.tls.cert_file and {section}.tls.key_file go together"),
        );
    }
}

impl StoreConfig {
    pub(super) fn secret_slots(&mut self) -> [SecretSlot<'_>; 1] {
        [SecretSlot {
            key: "store.password",
            value: &mut self.password,
            file: &self.password_file,
        }]
    }

    pub(super) fn validate(&self, p: &mut Problems) {
        if let Some(tls) = &self.tls {
            tls.validate("store", p);
        }
        if self.backend == StoreBackend::Scylla {
            p.check(!self.scylla_nodes.is_empty(), "store.scylla_nodes", || {
                "needs at least one host:port".into()
            });
        }
        if self.backend == StoreBackend::Local {
            p.check(self.path.is_some(), "store.path", || {
                "the local backend needs the path of its database file".into()
            });
        }
        p.check(
            !self.keyspace.is_empty()
                && self
                    .keyspace
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "store.keyspace",
            || format!("`{}` must be letters, digits and _", self.keyspace),
        );
        p.positive(self.replication_factor.into(), "store.replication_factor");
        p.check(
            self.ttl >= Duration::from_secs(60) && self.ttl.as_secs() <= i32::MAX as u64,
            "store.ttl",
            || "must be between 1m and 68 years".into(),
        );
        p.check(
            self.username.is_some() == (self.password.is_some() || self.password_file.is_some()),
            "store.password",
            || "store.username and store.password go together".into(),
        );
        if self.backend == StoreBackend::Scylla {
            self.validate_consistency(p);
        }
        p.check(
            (1..=50).contains(&self.upsert_batch_rows),
            "store.upsert_batch_rows",
            || "must be between 1 and 50".into(),
        );
    }

    /// Judged for one data centre (`replication_factor` replicas): with several, keep both
    /// levels `local_quorum` and pin each instance to its data centre (`store.local_dc`).
    fn validate_consistency(&self, p: &mut Problems) {
        if let Some(dc) = &self.local_dc {
            p.check(!dc.trim().is_empty(), "store.local_dc", || {
                "must name a data centre, or be left out".into()
            });
        }
        let rf = self.replication_factor;
        let (w, r) = (
            self.write_consistency.replicas(rf),
            self.read_consistency.replicas(rf),
        );
        p.check(w <= rf, "store.write_consistency", || {
            format!("asks more replicas than store.replication_factor {rf} has")
        });
        p.check(r <= rf, "store.read_consistency", || {
            format!("asks more replicas than store.replication_factor {rf} has")
        });
        p.check(
            self.read_consistency != StoreConsistency::EachQuorum,
            "store.read_consistency",
            || "each_quorum is for writes only".into(),
        );
        p.check(w + r > rf, "store.read_consistency", || {
            format!(
                "with store.write_consistency it reads {r} and writes {w} of {rf} replicas: a \
                 restored checkpoint could miss the last one written (W + R must exceed the \
                 replication factor)"
            )
        });
    }
}
