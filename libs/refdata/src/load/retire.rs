//! Retiring the versions before the one in use: their keys get a grace period to live, found
//! by scanning the one server or every master of a cluster.

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::{LoadError, CHUNK, RETIRED_VERSION_GRACE};
use crate::versions::version_of_key;

/// The keys of `rule`'s versions (one node's, on a cluster), a page at a time.
fn scan_versions(pipeline: &str, rule: &str, cursor: u64) -> redis::Cmd {
    let mut scan = redis::cmd("SCAN");
    scan.arg(cursor)
        .arg("MATCH")
        .arg(format!("instream:refdata:{pipeline}:{rule}:v*"))
        .arg("COUNT")
        .arg(CHUNK);
    scan
}

/// The keys among `keys` of versions before `keep_from`.
fn older_than<'k>(
    keys: &'k [String],
    pipeline: &'k str,
    rule: &'k str,
    keep_from: u64,
) -> impl Iterator<Item = &'k String> {
    keys.iter()
        .filter(move |k| version_of_key(pipeline, rule, k).is_some_and(|v| v < keep_from))
}

/// Gives a retired key [`RETIRED_VERSION_GRACE`] to live; NX: a key already retired keeps its
/// earlier deadline.
fn retire(key: &str) -> redis::Cmd {
    let mut expire = redis::cmd("EXPIRE");
    expire
        .arg(key)
        .arg(RETIRED_VERSION_GRACE.as_secs())
        .arg("NX");
    expire
}

pub(super) async fn retire_versions_before<C: ConnectionLike + Send>(
    connection: &mut C,
    pipeline: &str,
    rule: &str,
    keep_from: u64,
) -> Result<u64, LoadError> {
    let mut cursor: u64 = 0;
    let mut retired = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = scan_versions(pipeline, rule, cursor)
            .query_async(connection)
            .await
            .map_err(|e| LoadError::Redis(e.to_string()))?;
        let mut pipe = redis::pipe();
        for key in older_than(&keys, pipeline, rule, keep_from) {
            pipe.add_command(retire(key));
        }
        if !pipe.is_empty() {
            let set: Vec<u64> = pipe
                .query_async(connection)
                .await
                .map_err(|e| LoadError::Redis(e.to_string()))?;
            retired += set.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(retired);
        }
        cursor = next;
    }
}

/// [`retire_versions_before`] on a cluster: SCAN walks one node's keys, so every master is
/// scanned on its own, and each old key's EXPIRE goes to its slot's node.
pub(super) async fn retire_in_cluster(
    connection: &mut ClusterConnection,
    pipeline: &str,
    rule: &str,
    keep_from: u64,
) -> Result<u64, LoadError> {
    let redis_err = |e: redis::RedisError| LoadError::Redis(e.to_string());
    let slots: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(connection)
        .await
        .map_err(redis_err)?;
    let mut retired = 0;
    for (host, port) in cluster_masters(&slots)? {
        let mut cursor: u64 = 0;
        loop {
            let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port,
            });
            let page = connection
                .route_command(scan_versions(pipeline, rule, cursor), node)
                .await
                .map_err(redis_err)?;
            let (next, keys): (u64, Vec<String>) = redis::from_redis_value(page)
                .map_err(|e| LoadError::Redis(format!("SCAN on {host}:{port}: {e}")))?;
            let set = futures::future::try_join_all(
                older_than(&keys, pipeline, rule, keep_from).map(|key| {
                    let mut connection = connection.clone();
                    let expire = retire(key);
                    async move { expire.query_async::<u64>(&mut connection).await }
                }),
            )
            .await
            .map_err(redis_err)?;
            retired += set.iter().sum::<u64>();
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(retired)
}

/// The distinct masters (host, port) in a `CLUSTER SLOTS` answer: per slot range, its start,
/// its end, then its master's node and its replicas' nodes, each `[host, port, id, …]`.
fn cluster_masters(slots: &redis::Value) -> Result<Vec<(String, u16)>, LoadError> {
    let malformed = || LoadError::Redis(format!("unexpected CLUSTER SLOTS answer: {slots:?}"));
    let redis::Value::Array(ranges) = slots else {
        return Err(malformed());
    };
    let mut masters = Vec::new();
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            return Err(malformed());
        };
        let Some(redis::Value::Array(node)) = parts.get(2) else {
            return Err(malformed());
        };
        let host: String = node
            .first()
            .and_then(|h| redis::from_redis_value_ref(h).ok())
            .ok_or_else(malformed)?;
        // "" or "?": the node does not announce an address (cluster-preferred-endpoint-type).
        if host.is_empty() || host == "?" {
            return Err(LoadError::Redis(format!(
                "CLUSTER SLOTS gives a master without an address (`{host}`); set the nodes' cluster-announce settings"
            )));
        }
        let port: u16 = node
            .get(1)
            .and_then(|p| redis::from_redis_value_ref(p).ok())
            .ok_or_else(malformed)?;
        if !masters.contains(&(host.clone(), port)) {
            masters.push((host, port));
        }
    }
    Ok(masters)
}
