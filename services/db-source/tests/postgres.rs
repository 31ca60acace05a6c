//! The `instream-db-source` binary against a real PostgreSQL server, a real ZooKeeper and a
//! Kafka-protocol broker: each polling mode, the delay of timestamp modes, dead letters,
//! kill -9 of the leader with a standby taking over, and a restart.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use instream_core::config::KafkaConfig;
use instream_event::Event;
use instream_testkit::{
    free_port, metric_sum, process_config_toml, spawn_service, unique, ChildGuard, KafkaBroker,
    PostgresServer, ZooKeeperServer,
};

const BIN: &str = env!("CARGO_BIN_EXE_instream-db-source");
const PARTITIONS: i32 = 2;

struct Servers {
    postgres: PostgresServer,
    zookeeper: ZooKeeperServer,
    broker: KafkaBroker,
    dir: tempfile::TempDir,
}

impl Servers {
    fn start() -> Servers {
        Servers {
            postgres: PostgresServer::start().unwrap(),
            zookeeper: ZooKeeperServer::start().unwrap(),
            broker: KafkaBroker::start().unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn sql(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.postgres.url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        // Naive `timestamp` values are written and read as UTC, as db-source reads them.
        client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
        client
    }

    fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: self.broker.bootstrap_servers(),
            ..Default::default()
        }
    }

    /// Writes the definitions of `pipelines` (key `account`, time `ts`; their topics created
    /// with [`Servers::create_topics`]) and a db-source config
    /// with `tables` (TOML `[[db_source.tables]]` entries); returns the config and admin port.
    fn create_topics(&self, pipelines: &[&str]) {
        for p in pipelines {
            self.broker.create_pipeline_topics(p, PARTITIONS).unwrap();
        }
    }

    fn config(&self, name: &str, pipelines: &[&str], tables: &str, root: &str) -> (PathBuf, u16) {
        let definitions = self.dir.path().join(format!("{name}-definitions.toml"));
        let defs: String = pipelines
            .iter()
            .map(|p| format!("[[pipelines]]\nname = \"{p}\"\nkey_field = \"account\"\ntime_field = \"ts\"\npartitions = {PARTITIONS}\n"))
            .collect();
        std::fs::write(&definitions, defs).unwrap();
        let admin = free_port().unwrap();
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "{process}\n[zookeeper]\nconnect = \"{zk}\"\nroot = \"{root}\"\nsession_timeout = \"2s\"\n\
                 [db_source]\nurl = \"{url}\"\npoll_interval = \"20ms\"\nbatch_rows = 100\n{tables}\n",
                process = process_config_toml(admin, &self.broker.bootstrap_servers(), &definitions, "1s", 65_536),
                zk = self.zookeeper.connect_string(),
                url = self.postgres.url(),
            ),
        )
        .unwrap();
        (config, admin)
    }
}

/// Every event on `<pipeline>.raw` now, in partition order.
async fn raw_events(kafka: &KafkaConfig, pipeline: &str) -> Vec<Event> {
    let topic = format!("{pipeline}.raw");
    let mut events = Vec::new();
    for p in 0..PARTITIONS {
        let (low, high) = instream_kafka::ops::watermarks(kafka, &topic, p)
            .await
            .unwrap();
        let payloads = instream_kafka::ops::scan_partition(
            kafka,
            &topic,
            p,
            low,
            high,
            false,
            Vec::new(),
            |out: &mut Vec<Vec<u8>>, _, payload| out.push(payload.to_vec()),
        )
        .await
        .unwrap()
        .0;
        events.extend(payloads.iter().map(|b| instream_event::decode(b).unwrap()));
    }
    events
}

/// Waits until `pipeline` holds `n` distinct event ids; returns its events.
async fn wait_distinct(kafka: &KafkaConfig, pipeline: &str, n: usize) -> Vec<Event> {
    let start = Instant::now();
    loop {
        let events = raw_events(kafka, pipeline).await;
        let distinct: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        assert!(
            distinct.len() <= n,
            "{pipeline}: {} distinct ids, expected {n}",
            distinct.len()
        );
        if distinct.len() == n {
            return events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{pipeline}: {} of {n} events after 60 s",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(admin: u16) -> String {
    let url = format!("http://127.0.0.1:{admin}/metrics");
    match reqwest::get(&url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until `metric{filter}` sums to at least `at_least` on one of `admins`; returns its index.
async fn wait_metric(admins: &[u16], metric: &str, filter: &str, at_least: f64) -> usize {
    let start = Instant::now();
    loop {
        let mut seen = Vec::new();
        for (i, admin) in admins.iter().enumerate() {
            let text = metrics(*admin).await;
            let (sum, lines) = metric_sum(&text, metric, filter);
            if sum >= at_least {
                return i;
            }
            seen.push(format!(
                "port {admin}: {sum} on {lines} lines ({} bytes of /metrics)",
                text.len()
            ));
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{metric}{{{filter}}} never reached {at_least}: {}",
            seen.join("; ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn(config: &Path) -> ChildGuard {
    spawn_service(BIN, config).unwrap()
}

fn field(e: &Event) -> serde_json::Value {
    serde_json::from_str(e.payload.get()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mode_reads_every_row_once_and_waits_out_the_delay() {
    let servers = Servers::start();
    let sql = servers.sql().await;
    sql.batch_execute(
        "CREATE SCHEMA shop;
         CREATE TABLE shop.orders (id bigserial PRIMARY KEY, account text, amount numeric, ts timestamptz);
         INSERT INTO shop.orders (account, amount, ts)
           SELECT 'acc-' || (g % 7), g * 1.5, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
           FROM generate_series(1, 250) g;
         INSERT INTO shop.orders (account, amount, ts) VALUES (NULL, 1, now());
         CREATE TABLE prices (sku text, account text, ts timestamp, price int);
         -- 150 rows share one timestamp: more than a batch of 100.
         INSERT INTO prices SELECT 'sku-' || g, 'acc-1', now() - interval '2 hours', g FROM generate_series(1, 150) g;
         INSERT INTO prices SELECT 'sku-x' || g, 'acc-2', now() - interval '2 hours' + g * interval '1 ms', g FROM generate_series(1, 30) g;
         -- Two identical rows: two events.
         INSERT INTO prices SELECT 'sku-twin', 'acc-4', now() - interval '90 minutes', 7 FROM generate_series(1, 2);
         -- Younger than the delay (1 hour): not read.
         INSERT INTO prices VALUES ('sku-young', 'acc-3', now() - interval '10 minutes', 1);
         CREATE TABLE stock (id int PRIMARY KEY, account text, ts timestamptz, updated timestamptz);
         INSERT INTO stock SELECT g, 'acc-' || (g % 3), now(), now() - interval '3 hours' FROM generate_series(1, 120) g;",
    )
    .await
    .unwrap();
    let (orders, prices, stock) = (unique("orders"), unique("prices"), unique("stock"));
    let tables = format!(
        "[[db_source.tables]]\nname = \"{orders}\"\npipeline = \"{orders}\"\ntable = \"shop.orders\"\nmode = \"incrementing\"\nincrementing_column = \"id\"\n\
         [[db_source.tables]]\nname = \"{prices}\"\npipeline = \"{prices}\"\ntable = \"prices\"\nmode = \"timestamp\"\ntimestamp_column = \"ts\"\ndelay = \"1h\"\n\
         [[db_source.tables]]\nname = \"{stock}\"\npipeline = \"{stock}\"\ntable = \"stock\"\nmode = \"timestamp+incrementing\"\ntimestamp_column = \"updated\"\nincrementing_column = \"id\"\ndelay = \"1s\"\n\
         [[db_source.tables]]\nname = \"missing\"\npipeline = \"{orders}\"\ntable = \"nope\"\nmode = \"incrementing\"\nincrementing_column = \"id\"\n"
    );
    let root = format!("/{}", unique("dbsrc"));
    servers.create_topics(&[&orders, &prices, &stock]);
    let (config, admin) = servers.config("modes", &[&orders, &prices, &stock], &tables, &root);
    let _child = spawn(&config);
    let kafka = servers.kafka();

    // incrementing: 250 rows in three batches, in id order per key; the keyless row is a
    // dead letter with its reason.
    let events = wait_distinct(&kafka, &orders, 250).await;
    assert_eq!(events.len(), 250, "no row twice");
    let mut last_by_key: HashMap<String, i64> = HashMap::new();
    for e in &events {
        let id = field(e)["id"].as_i64().unwrap();
        assert!(
            last_by_key
                .insert(e.key.clone(), id)
                .is_none_or(|prev| prev < id),
            "per-key order"
        );
        assert_eq!(e.headers["source"], format!("db-source/{orders}"));
        assert!(e.event_time >= 1_767_225_600_000);
    }
    assert_eq!(
        field(&events[0])["amount"].as_f64().map(|a| a > 0.0),
        Some(true)
    );
    let dead = instream_kafka::ops::read_dead_letters(
        &kafka,
        &format!("{orders}.dlq"),
        HashMap::new(),
        None,
        false,
    )
    .await
    .unwrap()
    .0;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].code, "missing_key");
    assert!(
        dead[0].reason.contains("shop.orders at 251"),
        "{}",
        dead[0].reason
    );

    // timestamp: the 150 rows of one timestamp are read together, the young row is not.
    let events = wait_distinct(&kafka, &prices, 182).await;
    assert_eq!(events.len(), 182);
    // A `timestamp` column comes out as UTC with its offset, so it parses as event time.
    assert!(field(&events[0])["ts"]
        .as_str()
        .unwrap()
        .ends_with("+00:00"));
    // timestamp+incrementing: an update is a new event with a new id.
    wait_distinct(&kafka, &stock, 120).await;
    sql.execute(
        "UPDATE stock SET updated = now() - interval '2 seconds', ts = now() WHERE id <= 5",
        &[],
    )
    .await
    .unwrap();
    let events = wait_distinct(&kafka, &stock, 125).await;
    assert_eq!(events.len(), 125);

    // The young price row stays unread while the poller goes on polling past it.
    let polled = metric_sum(
        &metrics(admin).await,
        "instream_db_source_query_seconds_count",
        &prices,
    )
    .0;
    wait_metric(
        &[admin],
        "instream_db_source_query_seconds_count",
        &prices,
        polled + 20.0,
    )
    .await;
    let events = raw_events(&kafka, &prices).await;
    assert_eq!(events.len(), 182, "a row younger than the delay was read");
    assert!(events.iter().all(|e| field(e)["sku"] != "sku-young"));

    let stored = instream_coord::stored_position(
        &instream_core::config::ZooKeeperConfig {
            connect: servers.zookeeper.connect_string(),
            root: root.clone(),
            ..Default::default()
        },
        &orders,
    )
    .await
    .unwrap()
    .expect("progress stored");
    assert_eq!(stored.1["id"], 251);

    // A table that is not there: its poller says why in /readyz, the others go on.
    let ready = reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let report: serde_json::Value = ready.json().await.unwrap();
    let missing = report
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "db-source.table.missing")
        .expect("the missing table's component");
    assert!(
        missing["reason"]
            .as_str()
            .unwrap()
            .contains("no such table"),
        "{missing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_by_the_standby_and_no_row_is_skipped() {
    let servers = Servers::start();
    let sql = servers.sql().await;
    sql.batch_execute(
        "CREATE TABLE events (id bigserial PRIMARY KEY, account text, ts bigint);
         INSERT INTO events (account, ts) SELECT 'a' || (g % 11), 1700000000000 + g FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    let pipeline = unique("failover");
    let tables = format!(
        "[[db_source.tables]]\nname = \"{pipeline}\"\npipeline = \"{pipeline}\"\ntable = \"events\"\nmode = \"incrementing\"\nincrementing_column = \"id\"\n"
    );
    let root = format!("/{}", unique("dbsrc"));
    servers.create_topics(&[&pipeline]);
    let (first_config, first_admin) = servers.config("first", &[&pipeline], &tables, &root);
    let (second_config, second_admin) = servers.config("second", &[&pipeline], &tables, &root);
    let mut children = [spawn(&first_config), spawn(&second_config)];
    let admins = [first_admin, second_admin];
    let kafka = servers.kafka();

    let leader = wait_metric(&admins, "instream_db_source_leader", &pipeline, 1.0).await;
    let standby = 1 - leader;
    wait_distinct(&kafka, &pipeline, 300).await;
    let standby_rows = metric_sum(
        &metrics(admins[standby]).await,
        "instream_db_source_rows_total",
        &pipeline,
    )
    .0;
    assert_eq!(standby_rows, 0.0, "the standby polled too");

    // Rows keep arriving while the leader is killed mid-stream.
    let writer = {
        let sql = servers.sql().await;
        tokio::spawn(async move {
            for chunk in 0..20 {
                let from = 1000 + chunk * 50;
                sql.execute(
                    "INSERT INTO events (account, ts) SELECT 'a' || (g % 11), 1700000000000 + g FROM generate_series($1::int, $2::int) g",
                    &[&from, &(from + 49)],
                )
                .await
                .unwrap();
                // Paced over about a second, so that the kill below lands mid-stream.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    wait_metric(
        &[admins[leader]],
        "instream_db_source_rows_total",
        &pipeline,
        400.0,
    )
    .await;
    let at_kill = metric_sum(
        &metrics(admins[leader]).await,
        "instream_db_source_rows_total",
        &pipeline,
    )
    .0;
    children[leader].0.kill().unwrap();
    children[leader].0.wait().unwrap();
    assert!(
        at_kill < 1300.0,
        "the leader had read everything before the kill: {at_kill}"
    );
    writer.await.unwrap();

    wait_metric(
        &[admins[standby]],
        "instream_db_source_leader",
        &pipeline,
        1.0,
    )
    .await;
    let events = wait_distinct(&kafka, &pipeline, 1300).await;
    let ids: HashSet<i64> = events
        .iter()
        .map(|e| field(e)["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=1300).collect::<HashSet<_>>(),
        "every row, none skipped"
    );
    // Only the batch in flight at the kill can repeat, with the same event ids.
    assert!(
        events.len() - 1300 <= 100,
        "{} repeats",
        events.len() - 1300
    );
    let taken_over = metric_sum(
        &metrics(admins[standby]).await,
        "instream_db_source_rows_total",
        &pipeline,
    )
    .0;
    assert!(
        taken_over > 0.0,
        "the standby read nothing after the takeover"
    );
    let mut by_id: HashMap<i64, &str> = HashMap::new();
    for e in &events {
        let id = field(e)["id"].as_i64().unwrap();
        assert_eq!(
            *by_id.entry(id).or_insert(&e.event_id),
            e.event_id,
            "a repeat got a new id"
        );
    }

    // The killed instance restarts as the standby; when the survivor dies too, it takes over
    // from the stored position and reads nothing again.
    children[leader] = spawn(if leader == 0 {
        &first_config
    } else {
        &second_config
    });
    // Up and standing by: its leader gauge is there, at 0.
    let start = Instant::now();
    loop {
        let text = metrics(admins[leader]).await;
        if metric_sum(&text, "instream_db_source_leader", &pipeline) == (0.0, 1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the restarted instance never stood by; its /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    children[standby].0.kill().unwrap();
    children[standby].0.wait().unwrap();
    wait_metric(
        &[admins[leader]],
        "instream_db_source_leader",
        &pipeline,
        1.0,
    )
    .await;
    let before = raw_events(&kafka, &pipeline).await.len();
    sql.execute(
        "INSERT INTO events (account, ts) VALUES ('late', 1700000009999)",
        &[],
    )
    .await
    .unwrap();
    let events = wait_distinct(&kafka, &pipeline, 1301).await;
    assert_eq!(events.len(), before + 1);

    // SIGTERM: the leader gives the table up and exits cleanly.
    children[leader].terminate().unwrap();
    let status = children[leader]
        .wait_exit(Duration::from_secs(15))
        .expect("exit within 15 s of SIGTERM");
    assert!(status.success(), "clean shutdown exits 0, got {status}");
}
