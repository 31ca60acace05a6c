//! The enricher's two-level lookup: an in-process cache (quick_cache: a size bound in bytes;
//! a TTL, negative entries with their own shorter one) in front of the [`RefStore`]. A batch's misses
//! go to the store as one pipelined request; a key already being fetched for another batch is
//! waited for, not fetched again (single flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use instream_pipeline::RecordShape;
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use tokio::sync::watch;

use crate::{Found, RefDataError, RefStore};

/// How the cache is sized and how long entries live.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Upper bound of the cache's memory (estimated bytes of keys and records); 0 disables it.
    pub max_bytes: u64,
    /// How long a found record is served from the cache.
    pub ttl: Duration,
    /// How long "no such key" is served from the cache.
    pub negative_ttl: Duration,
}

/// A fetch in progress: `None` until it ends; `Some(None)` when it failed.
type Flight = watch::Receiver<Option<Option<Arc<Found>>>>;

/// Where a fetch tells its waiters how it ended.
type Sender = watch::Sender<Option<Option<Arc<Found>>>>;

/// The caches' hasher: keys come from event fields, so seeded per process, but much cheaper
/// than SipHash for the short keys of lookups.
type KeyHasher = foldhash::fast::RandomState;

/// Found records and "no such key" answers are cached apart, each with its own time to live
/// and size bound (the negative one an eighth of `max_bytes`), so a flood of unknown keys can
/// push out only other unknown keys.
///
/// An entry carries the instant it expires, checked against a clock read once per batch. moka
/// (before) did the same bookkeeping per read: a clock read, a hit recorded in a channel for
/// its eviction policy, a concurrent map. In the enricher on a broker that was ~10% of the
/// stage's CPU (issue 28's profile); quick_cache reads under a sharded lock.
struct Caches {
    found: Cache<String, (Arc<Found>, Instant), FoundWeight, KeyHasher>,
    missing: Cache<String, Instant, KeyWeight, KeyHasher>,
    ttl: Duration,
    negative_ttl: Duration,
    /// The one answer every negative entry stands for.
    missing_answer: Arc<Found>,
}

/// Estimated bytes a found record's entry holds, for the size bound.
#[derive(Clone)]
struct FoundWeight;

impl Weighter<String, (Arc<Found>, Instant)> for FoundWeight {
    fn weight(&self, key: &String, (value, _): &(Arc<Found>, Instant)) -> u64 {
        let record = match &**value {
            Found::Record(r) => r
                .iter()
                .map(|(k, v)| k.len() + 16 + v.as_str().map_or(16, str::len))
                .sum::<usize>(),
            Found::Missing => 0,
            Found::Malformed(why) => why.len(),
        };
        (64 + key.len() + record) as u64
    }
}

/// Estimated bytes a negative entry holds.
#[derive(Clone)]
struct KeyWeight;

impl Weighter<String, Instant> for KeyWeight {
    fn weight(&self, key: &String, _: &Instant) -> u64 {
        (64 + key.len()) as u64
    }
}

/// When an entry written at `now` expires; a TTL too long for the clock never does.
fn expiry(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// How many entries of ~`ENTRY_BYTES` a cache of `bytes` is expected to hold: quick_cache
/// picks its shard count and its memory of recently evicted keys from it. The size bound is
/// per shard (`bytes` / shards), so an entry larger than a shard's part is never cached: only
/// possible with a tiny `refdata.cache_max_bytes`.
fn estimated_entries(bytes: u64) -> usize {
    const ENTRY_BYTES: u64 = 256;
    usize::try_from((bytes / ENTRY_BYTES).clamp(16, 1 << 20)).unwrap_or(1 << 20)
}

pub struct CachedRefStore {
    inner: Arc<dyn RefStore>,
    cache: Option<Caches>,
    in_flight: Mutex<HashMap<String, Flight>>,
}

/// Where each lookup's answer comes from.
enum Source {
    Ready(Arc<Found>),
    /// Index into this call's own fetch.
    Fetched(usize),
    /// Another caller's fetch.
    Waiting(Flight),
}

/// The keys this call fetches for others too (single flight). Dropped without an answer, it
/// tells their waiters the fetch failed, so they retry instead of waiting forever.
struct FlightsGuard<'a> {
    in_flight: &'a Mutex<HashMap<String, Flight>>,
    keys: Vec<String>,
    senders: Vec<Sender>,
}

impl FlightsGuard<'_> {
    fn answer(&mut self, found: &[Arc<Found>]) {
        for (tx, value) in self.senders.drain(..).zip(found) {
            tx.send_replace(Some(Some(value.clone())));
        }
    }
}

impl Drop for FlightsGuard<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            in_flight.remove(key);
        }
        drop(in_flight);
        for tx in self.senders.drain(..) {
            tx.send_replace(Some(None));
        }
    }
}

impl CachedRefStore {
    pub fn new(inner: Arc<dyn RefStore>, settings: &CacheSettings) -> Self {
        let cache = (settings.max_bytes > 0).then(|| {
            let negative_bytes = settings.max_bytes / 8;
            let found_bytes = settings.max_bytes - negative_bytes;
            let negative_bytes = negative_bytes.max(1);
            Caches {
                found: Cache::with(
                    estimated_entries(found_bytes),
                    found_bytes,
                    FoundWeight,
                    KeyHasher::default(),
                    Default::default(),
                ),
                missing: Cache::with(
                    estimated_entries(negative_bytes),
                    negative_bytes,
                    KeyWeight,
                    KeyHasher::default(),
                    Default::default(),
                ),
                ttl: settings.ttl,
                negative_ttl: settings.negative_ttl,
                missing_answer: Arc::new(Found::Missing),
            }
        });
        Self {
            inner,
            cache,
            in_flight: Mutex::default(),
        }
    }

    /// The cached answer for `key`, found or not, unless it expired by `now`.
    fn cached(&self, key: &str, now: Instant) -> Option<Arc<Found>> {
        let caches = self.cache.as_ref()?;
        if let Some((found, expires)) = caches.found.get(key) {
            if now < expires {
                return Some(found);
            }
        }
        // `get`, not `contains_key`: a read counts for the entry's popularity.
        match caches.missing.get(key) {
            Some(expires) if now < expires => Some(caches.missing_answer.clone()),
            _ => None,
        }
    }

    /// The store behind the cache (versions, readiness).
    pub fn store(&self) -> &Arc<dyn RefStore> {
        &self.inner
    }

    /// Forgets `keys` (a retry that must see the store's current answer).
    pub fn invalidate(&self, keys: &[(String, RecordShape)]) {
        if let Some(caches) = &self.cache {
            for (key, _) in keys {
                caches.found.remove(key);
                caches.missing.remove(key);
            }
        }
    }

    /// One answer per lookup, in order: from the cache, from another batch's fetch in
    /// flight, or from one request to the store for the rest. `Err` when the store failed
    /// (the caller retries; nothing is cached from a failure).
    pub async fn lookup_many(
        &self,
        lookups: &[(String, RecordShape)],
    ) -> Result<Vec<Arc<Found>>, RefDataError> {
        let Planned {
            sources,
            fetch,
            senders,
        } = self.plan(lookups);
        let fetched = if fetch.is_empty() {
            Vec::new()
        } else {
            self.fetch(fetch, senders).await?
        };
        let mut out = Vec::with_capacity(lookups.len());
        for source in sources {
            out.push(match source {
                Source::Ready(found) => found,
                Source::Fetched(i) => fetched[i].clone(),
                Source::Waiting(mut flight) => {
                    let outcome = flight
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|v| v.clone())
                        .flatten();
                    match outcome {
                        Some(found) => found,
                        // The other fetch failed or was abandoned: this batch retries.
                        None => {
                            return Err(RefDataError::Unavailable("a shared lookup failed".into()))
                        }
                    }
                }
            });
        }
        Ok(out)
    }

    /// Where each lookup's answer comes from; the keys no one fetches yet join the in-flight
    /// map as this call's fetch.
    fn plan(&self, lookups: &[(String, RecordShape)]) -> Planned {
        let mut planned = Planned {
            sources: Vec::with_capacity(lookups.len()),
            fetch: Vec::new(),
            senders: Vec::new(),
        };
        let mut fetch_index: HashMap<&str, usize> = HashMap::new();
        let (mut local_hits, mut waits) = (0u64, 0u64);
        // One clock read per call: an entry that expires during a batch serves that batch.
        let now = Instant::now();
        for (key, shape) in lookups {
            if let Some(found) = self.cached(key, now) {
                local_hits += 1;
                planned.sources.push(Source::Ready(found));
                continue;
            }
            if let Some(&i) = fetch_index.get(key.as_str()) {
                planned.sources.push(Source::Fetched(i));
                continue;
            }
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(flight) = in_flight.get(key) {
                waits += 1;
                planned.sources.push(Source::Waiting(flight.clone()));
                continue;
            }
            let (tx, rx) = watch::channel(None);
            in_flight.insert(key.clone(), rx);
            drop(in_flight);
            planned.senders.push(tx);
            fetch_index.insert(key, planned.fetch.len());
            planned.sources.push(Source::Fetched(planned.fetch.len()));
            planned.fetch.push((key.clone(), *shape));
        }
        metrics::counter!("instream_refdata_lookups_total", "level" => "local", "outcome" => "hit")
            .increment(local_hits);
        metrics::counter!("instream_refdata_lookups_total", "level" => "local", "outcome" => "miss")
            .increment(lookups.len() as u64 - local_hits);
        metrics::counter!("instream_refdata_single_flight_waits_total").increment(waits);
        planned
    }

    /// Asks the store for `fetch` in one request, caches and shares the answers.
    async fn fetch(
        &self,
        fetch: Vec<(String, RecordShape)>,
        senders: Vec<Sender>,
    ) -> Result<Vec<Arc<Found>>, RefDataError> {
        // Whatever ends this fetch — an answer, an error, or this future dropped half-way —
        // the keys leave the in-flight map and their waiters hear of it.
        let mut flights = FlightsGuard {
            in_flight: &self.in_flight,
            keys: fetch.iter().map(|(k, _)| k.clone()).collect(),
            senders,
        };
        let started = Instant::now();
        let answer = self.inner.lookup_many(&fetch).await;
        metrics::histogram!("instream_refdata_lookup_seconds")
            .record(started.elapsed().as_secs_f64());
        // On an error the guard tells the waiters it failed.
        let found: Vec<Arc<Found>> = answer?.into_iter().map(Arc::new).collect();
        let hits = found
            .iter()
            .filter(|f| matches!(***f, Found::Record(_)))
            .count();
        metrics::counter!("instream_refdata_lookups_total", "level" => "redis", "outcome" => "hit")
            .increment(hits as u64);
        metrics::counter!("instream_refdata_lookups_total", "level" => "redis", "outcome" => "miss")
            .increment((found.len() - hits) as u64);
        self.remember(&fetch, &found);
        flights.answer(&found);
        Ok(found)
    }

    /// Caches the store's answers for `fetch`.
    fn remember(&self, fetch: &[(String, RecordShape)], found: &[Arc<Found>]) {
        let Some(caches) = &self.cache else {
            return;
        };
        let now = Instant::now();
        for ((key, _), value) in fetch.iter().zip(found) {
            match &**value {
                Found::Record(_) => {
                    let expires = expiry(now, caches.ttl);
                    caches.found.insert(key.clone(), (value.clone(), expires));
                }
                Found::Missing => {
                    // The expired record this answer replaces does not keep its room.
                    caches.found.remove(key.as_str());
                    let expires = expiry(now, caches.negative_ttl);
                    caches.missing.insert(key.clone(), expires);
                }
                // A malformed key is fixed by hand; do not hide the fix for a TTL.
                Found::Malformed(_) => {}
            }
        }
    }
}

/// One call's lookups: where each answer comes from, the keys it fetches itself, and the
/// senders that share those answers with other calls.
struct Planned {
    sources: Vec<Source>,
    fetch: Vec<(String, RecordShape)>,
    senders: Vec<Sender>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store that counts the keys it is asked for and answers after a pause.
    struct Counting {
        asked: AtomicUsize,
        requests: AtomicUsize,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl RefStore for Counting {
        async fn lookup_many(
            &self,
            lookups: &[(String, RecordShape)],
        ) -> Result<Vec<Found>, RefDataError> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.asked.fetch_add(lookups.len(), Ordering::SeqCst);
            let _permit = self.gate.acquire().await;
            Ok(lookups
                .iter()
                .map(|(k, _)| {
                    if k.starts_with("known") {
                        let mut r = crate::RefRecord::new();
                        r.insert("k".into(), k.clone().into());
                        Found::Record(r)
                    } else {
                        Found::Missing
                    }
                })
                .collect())
        }
        async fn ping(&self) -> Result<(), RefDataError> {
            Ok(())
        }
    }

    fn settings() -> CacheSettings {
        CacheSettings {
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_millis(200),
        }
    }

    fn keys(names: &[&str]) -> Vec<(String, RecordShape)> {
        names
            .iter()
            .map(|n| (n.to_string(), RecordShape::Hash))
            .collect()
    }

    #[tokio::test]
    async fn a_batch_asks_once_per_distinct_key_and_the_cache_answers_next_time() {
        let store = Arc::new(Counting {
            asked: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(100),
        });
        let cached = CachedRefStore::new(store.clone(), &settings());
        let found = cached
            .lookup_many(&keys(&["known1", "known1", "gone", "known2", "gone"]))
            .await
            .unwrap();
        assert_eq!(store.asked.load(Ordering::SeqCst), 3, "distinct keys only");
        assert_eq!(store.requests.load(Ordering::SeqCst), 1, "one request");
        assert!(matches!(*found[1], Found::Record(ref r) if r["k"] == "known1"));
        assert_eq!(*found[4], Found::Missing);
        cached
            .lookup_many(&keys(&["known1", "gone", "known2"]))
            .await
            .unwrap();
        assert_eq!(
            store.requests.load(Ordering::SeqCst),
            1,
            "all from the cache"
        );
        // The negative entry expires sooner than the positive ones.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cached
            .lookup_many(&keys(&["known1", "gone"]))
            .await
            .unwrap();
        assert_eq!(
            store.asked.load(Ordering::SeqCst),
            4,
            "only `gone` asked again"
        );
    }

    /// Each kind keeps its own TTL, also when "not found" is kept longer than records.
    #[tokio::test]
    async fn a_longer_negative_ttl_keeps_misses_and_lets_records_expire() {
        let store = Arc::new(Counting {
            asked: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(100),
        });
        let cached = CachedRefStore::new(
            store.clone(),
            &CacheSettings {
                max_bytes: 1 << 20,
                ttl: Duration::from_millis(200),
                negative_ttl: Duration::from_secs(60),
            },
        );
        let both = keys(&["known1", "gone"]);
        cached.lookup_many(&both).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let found = cached.lookup_many(&both).await.unwrap();
        assert_eq!(*found[1], Found::Missing);
        assert_eq!(
            store.asked.load(Ordering::SeqCst),
            3,
            "only the expired record asked again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_for_one_key_make_one_request() {
        let store = Arc::new(Counting {
            asked: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let cached = Arc::new(CachedRefStore::new(store.clone(), &settings()));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let cached = cached.clone();
            tasks.push(tokio::spawn(async move {
                cached.lookup_many(&keys(&["known-hot"])).await.unwrap()
            }));
        }
        // Every task has either asked the store or joined the one flight.
        tokio::time::timeout(Duration::from_secs(5), async {
            while cached.in_flight.lock().unwrap().is_empty()
                || store.requests.load(Ordering::SeqCst) == 0
            {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        store.gate.add_permits(100);
        for task in tasks {
            let found = task.await.unwrap();
            assert!(matches!(*found[0], Found::Record(_)));
        }
        assert_eq!(store.requests.load(Ordering::SeqCst), 1, "single flight");
    }

    #[tokio::test]
    async fn an_abandoned_fetch_frees_its_keys_and_its_waiters() {
        let store = Arc::new(Counting {
            asked: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let cached = CachedRefStore::new(store.clone(), &settings());
        let wanted = keys(&["known-a"]);
        // The owner starts the fetch and waits on the store; the waiter joins its flight.
        let mut owner = Box::pin(cached.lookup_many(&wanted));
        assert!(futures::poll!(owner.as_mut()).is_pending());
        let mut waiter = Box::pin(cached.lookup_many(&wanted));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        assert_eq!(store.requests.load(Ordering::SeqCst), 1);
        drop(owner);
        // The waiter hears the fetch was abandoned (and its batch retries), not hangs.
        let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter is told");
        assert!(matches!(waited, Err(RefDataError::Unavailable(_))));
        assert!(
            cached.in_flight.lock().unwrap().is_empty(),
            "the key was freed"
        );
        // A new lookup asks the store itself.
        store.gate.add_permits(10);
        let found = cached.lookup_many(&wanted).await.unwrap();
        assert!(matches!(*found[0], Found::Record(_)));
        assert_eq!(store.requests.load(Ordering::SeqCst), 2);
    }
}
