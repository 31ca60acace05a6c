//! Producers' API keys: which pipelines each may write to, and its rate.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use instream_core::config::IngestConfig;

pub struct ApiKey {
    pub name: String,
    /// Whose events: the scope of the ids its events carry or get.
    pub producer: String,
    /// `None`: every pipeline.
    pipelines: Option<Vec<String>>,
    limiter: Option<DefaultDirectRateLimiter>,
}

pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    keys: Vec<ApiKey>,
    anonymous: bool,
}

/// Why a request is refused before its events are looked at.
pub enum Denied {
    /// No key, or one not configured: 401.
    Unauthenticated(&'static str),
    /// A key not allowed on this pipeline: 403.
    Forbidden(String),
}

impl ApiKeys {
    /// `None` when there is no key and anonymous access is off: ingest must not start open.
    pub fn from_config(config: &IngestConfig) -> Option<ApiKeys> {
        if config.api_keys.is_empty() && !config.allow_anonymous {
            return None;
        }
        let mut digests = Vec::new();
        let mut keys = Vec::new();
        for k in &config.api_keys {
            // Validated with the config; a bad digest here would simply never match.
            let Some(digest) = instream_core::auth::decode_digest(&k.sha256) else {
                continue;
            };
            // One second's worth, and never less than one full request, so a full request
            // can always pass once the bucket is full.
            let limiter = NonZeroU32::new(k.events_per_second).map(|rate| {
                let burst =
                    rate.max(NonZeroU32::new(config.max_events_per_request as u32).unwrap_or(rate));
                RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
            });
            digests.push(digest);
            keys.push(ApiKey {
                name: k.name.clone(),
                producer: k.producer.clone().unwrap_or_else(|| k.name.clone()),
                pipelines: (!k.pipelines.is_empty()).then(|| k.pipelines.clone()),
                limiter,
            });
        }
        Some(ApiKeys {
            digests,
            keys,
            anonymous: config.allow_anonymous,
        })
    }

    /// The key the request is made with (`None`: anonymous, where allowed).
    pub fn authorize(&self, headers: &HeaderMap, pipeline: &str) -> Result<Option<usize>, Denied> {
        let Some(token) = instream_core::auth::bearer(headers) else {
            if self.anonymous {
                return Ok(None);
            }
            return Err(Denied::Unauthenticated(
                "send `Authorization: Bearer <api key>`",
            ));
        };
        let Some(index) = instream_core::auth::find_key(&self.digests, token) else {
            return Err(Denied::Unauthenticated("the API key is not accepted"));
        };
        let key = &self.keys[index];
        match &key.pipelines {
            Some(allowed) if !allowed.iter().any(|p| p == pipeline) => Err(Denied::Forbidden(
                format!("the key `{}` may not write to `{pipeline}`", key.name),
            )),
            _ => Ok(Some(index)),
        }
    }

    pub fn get(&self, index: usize) -> &ApiKey {
        &self.keys[index]
    }
}

impl ApiKey {
    /// Takes `events` from the key's rate; `Err(wait)` when it must wait that long first.
    pub fn take(&self, events: usize) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(events).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))),
            // More than a burst: cannot pass at once, whatever the wait.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }
}
