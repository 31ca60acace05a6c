//! [`InstanceInfo`]: what the registry says about a running instance, written by the
//! instance and read by `instream status` — one type on both sides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceInfo {
    pub service: String,
    pub role: String,
    pub host: String,
    pub pid: u32,
    /// The admin server's address (`/metrics`, `/healthz`, `/readyz`).
    pub admin: String,
    /// Named ports: `admin`, and `http` for a service that serves one.
    pub ports: BTreeMap<String, u16>,
    pub version: String,
    /// A consumer's group, once it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The partitions assigned to the consumer now, as `<topic>/<partition>`.
    pub partitions: Vec<String>,
    /// The version of each pipeline definition this instance runs.
    pub definitions: BTreeMap<String, u64>,
    /// A serving instance's address and scheme (`http` or `https`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
}

impl InstanceInfo {
    /// This process, as `service`, with its admin server at `admin`.
    pub fn of_this_process(service: &str, admin: std::net::SocketAddr) -> Self {
        Self {
            service: service.to_owned(),
            role: service.to_owned(),
            host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            pid: std::process::id(),
            admin: admin.to_string(),
            ports: BTreeMap::from([("admin".to_owned(), admin.port())]),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Self::default()
        }
    }

    /// The JSON stored in the registry node.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
