use async_trait::async_trait;
use instream_core::config::RefDataConfig;
use instream_pipeline::RecordShape;
use redis::aio::ConnectionManager;
use redis::Value;
use serde_json::Value as Json;

use crate::{Found, RefDataError, RefRecord, RefStore};

/// Reference data in Redis: hashes (HGETALL) or strings holding JSON (GET). A batch is one
/// pipelined round trip. The connection manager reconnects by itself after a failure.
pub struct RedisRefStore {
    connection: ConnectionManager,
    timeout: std::time::Duration,
}

fn unavailable(e: impl std::fmt::Display) -> RefDataError {
    RefDataError::Unavailable(e.to_string())
}

impl RedisRefStore {
    pub async fn connect(cfg: &RefDataConfig) -> Result<Self, RefDataError> {
        // The URL may hold a password: errors name the failure, never the URL.
        let client = redis::Client::open(cfg.redis_url.as_str())
            .map_err(|e| RefDataError::Unavailable(format!("refdata.redis_url: {:?}", e.kind())))?;
        let connection = tokio::time::timeout(cfg.timeout, client.get_connection_manager())
            .await
            .map_err(|_| unavailable("connect timed out"))?
            .map_err(unavailable)?;
        Ok(Self {
            connection,
            timeout: cfg.timeout,
        })
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// HGETALL's answer: RESP2 gives a flat array, RESP3 a map; empty means no such key.
fn hash_record(v: Value) -> Found {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(f), Some(v)) = (it.next(), it.next()) {
                pairs.push((f, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        Value::Nil => Vec::new(),
        Value::ServerError(e) => return Found::Malformed(format!("not a hash: {e:?}")),
        other => return Found::Malformed(format!("expected a hash, got {other:?}")),
    };
    if pairs.is_empty() {
        return Found::Missing;
    }
    let mut record = RefRecord::new();
    for (f, v) in pairs {
        if let (Some(f), Some(v)) = (text(&f), text(&v)) {
            record.insert(f, Json::String(v));
        }
    }
    Found::Record(record)
}

fn json_record(v: Value) -> Found {
    match v {
        Value::Nil => Found::Missing,
        Value::BulkString(bytes) => match serde_json::from_slice::<Json>(&bytes) {
            Ok(Json::Object(map)) => Found::Record(map),
            Ok(_) => Found::Malformed("holds JSON that is not an object".into()),
            Err(e) => Found::Malformed(format!("holds no JSON: {e}")),
        },
        Value::ServerError(e) => Found::Malformed(format!("not a string: {e:?}")),
        other => Found::Malformed(format!("expected a string, got {other:?}")),
    }
}

#[async_trait]
impl RefStore for RedisRefStore {
    async fn lookup_many(
        &self,
        lookups: &[(String, RecordShape)],
    ) -> Result<Vec<Found>, RefDataError> {
        if lookups.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        // A wrong-type key answers with an error of its own, not a failed pipeline.
        pipe.ignore_errors();
        for (key, shape) in lookups {
            match shape {
                RecordShape::Hash => pipe.cmd("HGETALL").arg(key),
                RecordShape::Json => pipe.cmd("GET").arg(key),
            };
        }
        let mut connection = self.connection.clone();
        let answers: Vec<Value> =
            tokio::time::timeout(self.timeout, pipe.query_async(&mut connection))
                .await
                .map_err(|_| unavailable("lookup timed out"))?
                .map_err(unavailable)?;
        if answers.len() != lookups.len() {
            return Err(unavailable(format!(
                "{} answers for {} lookups",
                answers.len(),
                lookups.len()
            )));
        }
        // Only a wrong-type key is that key's problem; any other error reply (LOADING after a
        // restart, BUSY, NOAUTH…) is the server's, and the whole batch is retried.
        if let Some(Value::ServerError(e)) = answers
            .iter()
            .find(|v| matches!(v, Value::ServerError(e) if e.code() != "WRONGTYPE"))
        {
            return Err(unavailable(format!("redis answered {}", e.code())));
        }
        Ok(lookups
            .iter()
            .zip(answers)
            .map(|((_, shape), v)| match shape {
                RecordShape::Hash => hash_record(v),
                RecordShape::Json => json_record(v),
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), RefDataError> {
        let mut connection = self.connection.clone();
        let _: String = tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async(&mut connection),
        )
        .await
        .map_err(|_| unavailable("ping timed out"))?
        .map_err(unavailable)?;
        Ok(())
    }
}
