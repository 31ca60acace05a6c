//! In-process enrichment with a warm local cache: plan (envelope read, key fields picked from
//! the payload), look up in the cache, write the enriched records. Realistic ~300-byte
//! Nexmark-shaped bid events, 10,000 bidders, batches of 2,000.
//!
//! `cargo bench -p instream-enricher --bench enrich`

use std::collections::BTreeMap;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use instream_enricher::transform::{plan, render, Outcomes, Quality};
use instream_kafka::Record;
use instream_pipeline::Catalog;
use instream_refdata::{CacheSettings, CachedRefStore, MemoryRefStore, RefStore};

// As in the service binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 2_000;
const BIDDERS: usize = 10_000;

fn catalog() -> Catalog {
    let doc = instream_pipeline::parse_document(instream_testkit::BIDS_PIPELINE).unwrap();
    Catalog::new(doc.pipelines)
}

fn batch(round: usize) -> Vec<Record> {
    (0..BATCH)
        .map(|i| {
            let n = round * BATCH + i;
            let payload = format!(
                r#"{{"auction":{a},"bidder":{b},"price":{p},"channel":"channel-{c}","url":"https://www.nexmark.com/{a}/item.htm?query=1&channel_id={c}","date_time":"2026-11-25T10:{m:02}:{s:02}.000Z","extra":"{x}"}}"#,
                a = 1000 + n % 977,
                b = (n * 7919) % BIDDERS,
                p = 100 + n % 9000,
                c = n % 50,
                m = (n / 60) % 60,
                s = n % 60,
                x = "x".repeat(40),
            );
            let event = instream_event::Event {
                event_id: format!("bid-{n}"),
                pipeline: "bids".into(),
                key: format!("{}", 1000 + n % 977),
                event_time: 1_795_600_800_000 + n as i64,
                ingest_time: 1_795_600_800_000 + n as i64,
                headers: BTreeMap::new(),
                payload: serde_json::value::RawValue::from_string(payload).unwrap(),
                enrichment: None,
            };
            Record {
                topic: "bids.raw".into(),
                partition: 0,
                offset: n as i64,
                key: Some(event.key.clone().into_bytes()),
                payload: instream_event::encode(&event).to_vec(),
                headers: Vec::new(),
                generation: 0,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let memory = MemoryRefStore::default();
    for b in 0..BIDDERS {
        let mut r = instream_refdata::RefRecord::new();
        r.insert("name".into(), format!("Bidder {b}").into());
        r.insert("city".into(), "Portland".into());
        r.insert("state".into(), "OR".into());
        r.insert("email".into(), format!("b{b}@example.com").into());
        memory.insert(format!("person:{b}"), r);
    }
    let store: Arc<dyn RefStore> = Arc::new(memory);
    let cached = CachedRefStore::new(
        store,
        &CacheSettings {
            max_bytes: 256 << 20,
            ttl: std::time::Duration::from_secs(3600),
            negative_ttl: std::time::Duration::from_secs(60),
        },
    );
    let catalog = catalog();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let batches: Vec<Vec<Record>> = (0..5).map(batch).collect();
    let avg: usize = batches[0].iter().map(|r| r.payload.len()).sum::<usize>() / BATCH;
    eprintln!("average encoded event: {avg} bytes");
    let one = |records: &[Record]| {
        let plans = plan(&catalog, &|_, _| None, records);
        let answers = runtime
            .block_on(cached.lookup_many(&plans.lookups))
            .unwrap();
        let mut outcomes = Outcomes::default();
        let mut arena = Vec::with_capacity(records.len() * 512);
        let mut quality = Quality::new(0);
        let outputs = render(
            plans,
            records,
            &answers,
            &mut outcomes,
            &mut quality,
            &mut arena,
        );
        (outputs, arena)
    };
    // Warm the cache with every bidder.
    for records in &batches {
        one(records);
    }
    let mut group = c.benchmark_group("enrich");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut i = 0;
    group.bench_function("warm cache, 1 rule, 300-byte events", |b| {
        b.iter(|| {
            i += 1;
            one(&batches[i % batches.len()])
        })
    });
    group.finish();
}

/// With Redis on loopback and one lookup in ten missing the local cache: 90% of the events
/// name one of 1,000 hot bidders (cached), 10% a bidder seen once (looked up in Redis, one
/// pipelined request per batch). Starts its own `redis-server`.
fn bench_redis(c: &mut Criterion) {
    const HOT: usize = 1_000;
    const BATCHES: usize = 50;
    let redis = instream_testkit::RedisServer::start().expect("redis-server (scripts/setup.sh)");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = instream_core::config::RefDataConfig {
        redis_url: redis.url(),
        ..Default::default()
    };
    let store: Arc<dyn RefStore> = Arc::new(
        runtime
            .block_on(instream_refdata::RedisRefStore::connect(&config))
            .unwrap(),
    );
    // Every bidder the batches name, hot and cold, is in Redis.
    let batches: Vec<Vec<Record>> = (0..BATCHES)
        .map(|round| {
            let mut records = batch(round);
            for (i, r) in records.iter_mut().enumerate() {
                let bidder = if i % 10 == 0 {
                    format!("cold-{round}-{i}")
                } else {
                    format!("{}", (round * BATCH + i) % HOT)
                };
                let mut event = instream_event::decode(&r.payload).unwrap();
                let mut payload: serde_json::Value =
                    serde_json::from_str(event.payload.get()).unwrap();
                payload["bidder"] = bidder.into();
                event.payload =
                    serde_json::value::RawValue::from_string(payload.to_string()).unwrap();
                r.payload = instream_event::encode(&event).to_vec();
            }
            records
        })
        .collect();
    runtime.block_on(async {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut pipe = redis::pipe();
        let mut keys: Vec<String> = (0..HOT).map(|b| format!("person:{b}")).collect();
        for round in 0..BATCHES {
            for i in (0..BATCH).step_by(10) {
                keys.push(format!("person:cold-{round}-{i}"));
            }
        }
        for key in &keys {
            pipe.cmd("HSET")
                .arg(key)
                .arg("name")
                .arg("Some Bidder")
                .arg("city")
                .arg("Portland")
                .arg("state")
                .arg("OR")
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    });
    let cached = CachedRefStore::new(
        store,
        &CacheSettings {
            max_bytes: 256 << 20,
            ttl: std::time::Duration::from_secs(3600),
            negative_ttl: std::time::Duration::from_secs(60),
        },
    );
    let catalog = catalog();
    let mut arena = Vec::with_capacity(BATCH * 512);
    let mut run = |records: &[Record], evict_cold: bool| {
        let plans = plan(&catalog, &|_, _| None, records);
        if evict_cold {
            // The cold tenth is looked up in Redis every time.
            let cold: Vec<_> = plans
                .lookups
                .iter()
                .filter(|(k, _)| k.starts_with("person:cold"))
                .cloned()
                .collect();
            cached.invalidate(&cold);
        }
        let answers = runtime
            .block_on(cached.lookup_many(&plans.lookups))
            .unwrap();
        render(
            plans,
            records,
            &answers,
            &mut Outcomes::default(),
            &mut Quality::new(0),
            &mut arena,
        )
        .len()
    };
    for records in &batches {
        run(records, false);
    }
    let mut group = c.benchmark_group("enrich");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut i = 0;
    group.bench_function("Redis on loopback, 10% local misses", |b| {
        b.iter(|| {
            i += 1;
            run(&batches[i % BATCHES], true)
        })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_redis);
criterion_main!(benches);
