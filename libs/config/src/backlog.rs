//! What each topic holds that its readers have not received yet, counted inside one process,
//! for a broker that deletes the oldest records of a partition beyond a size whether anyone
//! read them or not (the embedded broker keeps 5 MB a partition): standalone mode, where every
//! producer and every reader of every topic live in the one process. Producers add what they
//! write, readers what they receive; ingest refuses a request, and every other producer waits,
//! before a topic's unread bytes could pass the budget.
//!
//! Bytes are an upper bound of what the broker stores: key, value and headers uncompressed,
//! plus [`RECORD_OVERHEAD`] a record (a batch's header shared by its records included). A
//! topic's unread bytes are summed over its partitions, so they bound each partition's too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Bytes counted for a record besides its key, value and headers: its share of a record
/// batch's header (61 bytes, one batch may hold one record), its own framing and compression's.
pub const RECORD_OVERHEAD: u64 = 128;

/// The bytes a record is counted for.
pub fn record_bytes(key: usize, value: usize, headers: usize) -> u64 {
    (key + value + headers) as u64 + RECORD_OVERHEAD
}

/// Which services read which topic: `(topic, service)` pairs, e.g. `("orders.raw",
/// "enricher")`. A topic no service reads here is not bounded.
pub type Readers = Vec<(String, &'static str)>;

/// The shared account (cheap to clone). See the module's note.
#[derive(Clone)]
pub struct Backlog {
    inner: Arc<Inner>,
}

struct Inner {
    budget: u64,
    readers: Readers,
    topics: Mutex<HashMap<String, TopicAccount>>,
}

#[derive(Default)]
struct TopicAccount {
    written: u64,
    /// Admitted by ingest, not written yet.
    reserved: u64,
    received: HashMap<String, u64>,
}

impl std::fmt::Debug for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backlog")
            .field("budget", &self.inner.budget)
            .finish_non_exhaustive()
    }
}

/// Ingest's admission, given back when the request is done (its records are counted as
/// written by then).
pub struct Reservation {
    backlog: Backlog,
    topic: String,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut topics = self.backlog.topics();
        if let Some(account) = topics.get_mut(&self.topic) {
            account.reserved = account.reserved.saturating_sub(self.bytes);
        }
    }
}

/// A topic whose readers are behind by the budget or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub topic: String,
    pub unread: u64,
    pub budget: u64,
}

impl Backlog {
    /// An account where no topic may hold more than `budget` unread bytes.
    pub fn new(budget: u64, readers: Readers) -> Self {
        Self {
            inner: Arc::new(Inner {
                budget,
                readers,
                topics: Mutex::default(),
            }),
        }
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<String, TopicAccount>> {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn readers_of<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'static str> + 'a {
        self.inner
            .readers
            .iter()
            .filter(move |(read, _)| read == topic)
            .map(|(_, service)| *service)
    }

    /// Whether `service` reads `topic` itself (it must not wait for its own reading).
    pub fn reads(&self, service: &str, topic: &str) -> bool {
        self.readers_of(topic).any(|s| s == service)
    }

    fn unread_of(&self, topic: &str, account: &TopicAccount) -> u64 {
        let slowest = self
            .readers_of(topic)
            .map(|service| account.received.get(service).copied().unwrap_or(0))
            .min();
        match slowest {
            // A topic nobody reads here is not this account's to bound.
            None => 0,
            Some(received) => (account.written + account.reserved).saturating_sub(received),
        }
    }

    /// Most unread bytes a topic may hold.
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// The unread bytes of `topic` now.
    pub fn unread(&self, topic: &str) -> u64 {
        let topics = self.topics();
        topics
            .get(topic)
            .map_or(0, |account| self.unread_of(topic, account))
    }

    /// The topic with the most unread bytes, if any holds some.
    pub fn fullest(&self) -> Option<(String, u64)> {
        let topics = self.topics();
        topics
            .iter()
            .map(|(topic, account)| (topic, self.unread_of(topic, account)))
            .filter(|(_, unread)| *unread > 0)
            .max_by_key(|(_, unread)| *unread)
            .map(|(topic, unread)| (topic.clone(), unread))
    }

    /// The fullest topic, if any is at or over the budget.
    fn full(&self, topics: &HashMap<String, TopicAccount>) -> Option<Full> {
        topics
            .iter()
            .map(|(topic, account)| (topic, self.unread_of(topic, account)))
            .filter(|(_, unread)| *unread >= self.inner.budget)
            .max_by_key(|(_, unread)| *unread)
            .map(|(topic, unread)| Full {
                topic: topic.clone(),
                unread,
                budget: self.inner.budget,
            })
    }

    /// Admits `bytes` more for `topic` (ingest, before it writes a request's events), unless
    /// any topic is full or this would fill `topic`.
    pub fn try_reserve(&self, topic: &str, bytes: u64) -> Result<Reservation, Full> {
        let mut topics = self.topics();
        if let Some(full) = self.full(&topics) {
            return Err(full);
        }
        let account = topics.entry(topic.to_owned()).or_default();
        let unread = self.unread_of(topic, account);
        if unread + bytes > self.inner.budget {
            return Err(Full {
                topic: topic.to_owned(),
                unread: unread + bytes,
                budget: self.inner.budget,
            });
        }
        account.reserved += bytes;
        Ok(Reservation {
            backlog: self.clone(),
            topic: topic.to_owned(),
            bytes,
        })
    }

    /// Counts a record written to `topic`.
    pub fn written(&self, topic: &str, bytes: u64) {
        let mut topics = self.topics();
        match topics.get_mut(topic) {
            Some(account) => account.written += bytes,
            None => {
                topics.insert(
                    topic.to_owned(),
                    TopicAccount {
                        written: bytes,
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// Counts records of `topic` received by `service`.
    pub fn received(&self, service: &str, topic: &str, bytes: u64) {
        let mut topics = self.topics();
        let account = topics.entry(topic.to_owned()).or_default();
        match account.received.get_mut(service) {
            Some(n) => *n += bytes,
            None => {
                account.received.insert(service.to_owned(), bytes);
            }
        }
    }

    /// Waits while `topic` is full, unless `service` reads it itself (waiting for its own
    /// reading would never end).
    pub async fn room_for(&self, service: &str, topic: &str) {
        if self.reads(service, topic) {
            return;
        }
        let mut pause = Duration::from_millis(1);
        while self.unread(topic) >= self.inner.budget {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backlog() -> Backlog {
        Backlog::new(
            1_000,
            [
                ("p.raw", "enricher"),
                ("p.raw", "archiver"),
                ("p.enriched", "aggregator"),
                ("p.by-x", "aggregator"),
                ("p.dlq", "keeper"),
            ]
            .into_iter()
            .map(|(t, s)| (t.to_owned(), s))
            .collect(),
        )
    }

    #[test]
    fn the_slowest_reader_decides_what_is_unread() {
        let b = backlog();
        b.written("p.raw", 900);
        b.received("enricher", "p.raw", 900);
        assert_eq!(b.unread("p.raw"), 900, "the archiver read nothing yet");
        b.received("archiver", "p.raw", 400);
        assert_eq!(b.unread("p.raw"), 500);
        b.written("p.by-x", 300);
        assert_eq!(
            b.unread("p.by-x"),
            300,
            "repartition topics are read by the aggregator"
        );
        b.written("p.other", 5_000);
        assert_eq!(
            b.unread("p.other"),
            0,
            "a topic nobody reads here is not bounded"
        );
    }

    #[test]
    fn ingest_is_refused_while_any_topic_is_full_and_its_reservations_count() {
        let b = backlog();
        let first = b.try_reserve("p.raw", 600).unwrap();
        let refused = b.try_reserve("p.raw", 600).err().unwrap();
        assert_eq!(refused.topic, "p.raw");
        drop(first);
        let _second = b.try_reserve("p.raw", 600).unwrap();
        b.written("p.enriched", 1_000);
        let refused = b.try_reserve("p.raw", 1).err().unwrap();
        assert_eq!(
            refused.topic, "p.enriched",
            "a full downstream topic stops intake"
        );
        b.received("aggregator", "p.enriched", 1_000);
        assert!(b.try_reserve("p.raw", 100).is_ok());
        assert!(
            backlog().try_reserve("p.raw", 5_000).is_err(),
            "never over the budget"
        );
    }

    #[tokio::test]
    async fn a_producer_waits_for_readers_but_never_for_itself() {
        let b = backlog();
        b.written("p.enriched", 2_000);
        b.room_for("aggregator", "p.enriched").await; // its own input: no wait
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.room_for("enricher", "p.enriched").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        b.received("aggregator", "p.enriched", 1_500);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
    }
}
