use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use instream_kafka::EmbeddedBroker;
use tempfile::TempDir;

use crate::process::{free_port, ChildGuard, TestkitError};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `AUTH user password` as an inline command to put before a request to a server with ACL
/// users (the test credentials hold no spaces); empty without.
pub(crate) fn auth_prefix(credentials: Option<(&str, &str)>) -> String {
    credentials.map_or_else(String::new, |(u, p)| format!("AUTH {u} {p}\r\n"))
}

/// `user:password@` for a URL to a server with ACL users; empty without.
pub(crate) fn login(credentials: &Option<(String, String)>) -> String {
    credentials
        .as_ref()
        .map_or_else(String::new, |(u, p)| format!("{u}:{p}@"))
}

/// Sends `request` and reads the reply until `expect` appears or the peer closes.
pub(crate) fn ask(port: u16, request: &[u8], expect: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(request).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(expect.len()).any(|w| w == expect) {
                    return true;
                }
            }
        }
    }
}

/// `redis-server` arguments for TLS only on `port` with `cert` (also the authority trusted)
/// and `key`; clients are not asked for a certificate.
pub(crate) fn tls_only<'c>(
    command: &'c mut Command,
    port: u16,
    cert: &Path,
    key: &Path,
) -> &'c mut Command {
    command
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(cert)
        .arg("--tls-key-file")
        .arg(key)
        .arg("--tls-ca-cert-file")
        .arg(cert)
        .args(["--tls-auth-clients", "no"])
}

pub(crate) fn spawn(command: &mut Command, log: &Path) -> Result<ChildGuard, TestkitError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map(ChildGuard::new)
        .map_err(|source| TestkitError::Spawn { program, source })
}

pub(crate) fn wait_ready(
    what: &str,
    guard: &mut ChildGuard,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), TestkitError> {
    let start = std::time::Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if guard.exited() || start.elapsed() > START_TIMEOUT {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(TestkitError::Timeout {
                what: what.to_owned(),
                timeout: START_TIMEOUT,
                detail: format!("; its log ends:\n{tail}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real `redis-server` on a free loopback port.
pub struct RedisServer {
    port: u16,
    tls: bool,
    /// The ACL user and password of [`RedisServer::start_acl`].
    credentials: Option<(String, String)>,
    guard: ChildGuard,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> Result<RedisServer, TestkitError> {
        Self::start_with(&[], None)
    }

    /// A server whose `default` user is off: only `user` with `password` may connect, and
    /// may run every command. Its [`RedisServer::url`] carries them.
    pub fn start_acl(user: &str, password: &str) -> Result<RedisServer, TestkitError> {
        let password_rule = format!(">{password}");
        Self::start_with(
            &[
                "--user",
                "default",
                "off",
                "--user",
                user,
                "on",
                &password_rule,
                "~*",
                "&*",
                "+@all",
            ],
            Some((user, password)),
        )
    }

    /// A replica of the server on `master_port` (read-only, following it).
    pub fn start_replica_of(master_port: u16) -> Result<RedisServer, TestkitError> {
        Self::start_with(
            &["--replicaof", "127.0.0.1", &master_port.to_string()],
            None,
        )
    }

    fn start_with(
        extra: &[&str],
        credentials: Option<(&str, &str)>,
    ) -> Result<RedisServer, TestkitError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("redis.log");
        let mut guard = spawn(
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .args(extra)
                .arg("--dir")
                .arg(dir.path()),
            &log,
        )?;
        let ping = format!("{}PING\r\n", auth_prefix(credentials));
        wait_ready("redis-server", &mut guard, &log, || {
            ask(port, ping.as_bytes(), b"+PONG")
        })?;
        Ok(RedisServer {
            port,
            tls: false,
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            guard,
            _dir: dir,
        })
    }

    /// Kills the server with SIGKILL and waits for it to be gone: a crash, not a shutdown.
    pub fn kill(&mut self) -> Result<(), TestkitError> {
        self.guard.0.kill()?;
        self.guard.0.wait()?;
        Ok(())
    }

    /// A server that speaks only TLS, with the certificate and key given (PEM); clients are
    /// not asked for a certificate. Its [`RedisServer::url`] is `rediss://`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<RedisServer, TestkitError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("redis.log");
        let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert, cert_pem)?;
        std::fs::write(&key, key_pem)?;
        let mut guard = spawn(
            tls_only(
                Command::new("redis-server").args(["--bind", "127.0.0.1"]),
                port,
                &cert,
                &key,
            )
            .args(["--save", "", "--appendonly", "no"])
            .arg("--logfile")
            .arg(&log)
            .arg("--dir")
            .arg(dir.path()),
            &dir.path().join("redis.out"),
        )?;
        wait_ready("redis-server (TLS)", &mut guard, &log, || {
            std::fs::read_to_string(&log)
                .is_ok_and(|text| text.contains("Ready to accept connections"))
        })?;
        Ok(RedisServer {
            port,
            tls: true,
            credentials: None,
            guard,
            _dir: dir,
        })
    }

    /// `redis://[user:password@]127.0.0.1:<port>` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let login = login(&self.credentials);
        format!("{scheme}://{login}127.0.0.1:{}", self.port)
    }

    /// The ACL user and password of [`RedisServer::start_acl`].
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A real ZooKeeper 3.8 standalone server on a free loopback port.
pub struct ZooKeeperServer {
    port: u16,
    _guard: ChildGuard,
    _dir: TempDir,
}

impl ZooKeeperServer {
    pub fn start() -> Result<ZooKeeperServer, TestkitError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let cfg = dir.path().join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\n\
                 clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=ruok,srvr\nmaxSessionTimeout=60000\nminSessionTimeout=1000\n",
                data.display()
            ),
        )?;
        let log = dir.path().join("zookeeper.log");
        let classpath = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/*";
        let mut guard = spawn(
            Command::new("java")
                .args(["-Xmx256m", "-XX:+UseSerialGC", "-cp", classpath])
                .arg("-Dzookeeper.log.dir=".to_string() + &dir.path().display().to_string())
                .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                .arg(&cfg),
            &log,
        )?;
        wait_ready("zookeeper", &mut guard, &log, || {
            ask(port, b"ruok", b"imok")
        })?;
        Ok(ZooKeeperServer {
            port,
            _guard: guard,
            _dir: dir,
        })
    }

    /// `127.0.0.1:port`.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The Kafka-protocol broker of a test.
pub enum KafkaBroker {
    /// A cluster given by `INSTREAM_TEST_KAFKA`; topics are created through the admin API.
    External(String),
    /// librdkafka's in-process broker.
    Embedded(EmbeddedBroker),
}

impl KafkaBroker {
    pub fn start() -> Result<KafkaBroker, TestkitError> {
        match std::env::var("INSTREAM_TEST_KAFKA") {
            Ok(addr) if !addr.trim().is_empty() => Ok(KafkaBroker::External(addr)),
            _ => EmbeddedBroker::start(1)
                .map(KafkaBroker::Embedded)
                .map_err(|e| TestkitError::Broker(e.to_string())),
        }
    }

    pub fn bootstrap_servers(&self) -> String {
        match self {
            KafkaBroker::External(addr) => addr.clone(),
            KafkaBroker::Embedded(b) => b.bootstrap_servers().to_owned(),
        }
    }

    /// Creates a topic: through the admin API on an external cluster (replication 1), through
    /// the mock's own call on the embedded broker (it has no CreateTopics API).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), TestkitError> {
        match self {
            KafkaBroker::External(addr) => create_external_topic(addr, name, partitions),
            KafkaBroker::Embedded(b) => b
                .create_topic(name, partitions)
                .map_err(|e| TestkitError::Broker(e.to_string())),
        }
    }

    /// Creates a pipeline's topics `<pipeline>.raw`, `.enriched`, `.dlq` and `.quality`.
    pub fn create_pipeline_topics(
        &self,
        pipeline: &str,
        partitions: i32,
    ) -> Result<(), TestkitError> {
        for t in ["raw", "enriched", "dlq", "quality"] {
            self.create_topic(&format!("{pipeline}.{t}"), partitions)?;
        }
        Ok(())
    }

    /// Every record of `topic` now (`(partition, payload)`, each partition in order), read
    /// with the same scan the services use; a range the read skipped fails it.
    pub async fn read_topic(&self, topic: &str) -> Result<Vec<(i32, Vec<u8>)>, TestkitError> {
        let kafka = instream_core::config::KafkaConfig {
            bootstrap_servers: self.bootstrap_servers(),
            ..Default::default()
        };
        let (records, lost) = instream_kafka::ops::scan_topic_since(
            &kafka,
            topic,
            0,
            false,
            Vec::new(),
            |records: &mut Vec<(i32, Vec<u8>)>, partition, payload| {
                records.push((partition, payload.to_vec()));
            },
        )
        .await
        .map_err(|e| TestkitError::Broker(e.to_string()))?;
        match lost.first() {
            Some(lost) => Err(TestkitError::Broker(format!("{topic}: skipped {lost:?}"))),
            None => Ok(records),
        }
    }

    /// Takes the embedded broker down (connections closed, new ones refused) or back up; an
    /// external cluster cannot be, and answers an error.
    pub fn set_up(&self, up: bool) -> Result<(), TestkitError> {
        match self {
            KafkaBroker::External(_) => Err(TestkitError::Broker(
                "an external cluster cannot be taken down by the test".into(),
            )),
            KafkaBroker::Embedded(b) => b
                .set_broker_up(1, up)
                .map_err(|e| TestkitError::Broker(e.to_string())),
        }
    }

    /// Makes the next requests of `api` to the embedded broker fail, one per error given;
    /// an external cluster cannot be made to, and answers an error.
    pub fn fail_requests(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: &[rdkafka::types::RDKafkaRespErr],
    ) -> Result<(), TestkitError> {
        match self {
            KafkaBroker::External(_) => Err(TestkitError::Broker(
                "an external cluster cannot be made to fail requests by the test".into(),
            )),
            KafkaBroker::Embedded(b) => b
                .fail_requests(api, errors)
                .map_err(|e| TestkitError::Broker(e.to_string())),
        }
    }

    /// Forgets the errors [`fail_requests`](Self::fail_requests) pushed that no request used.
    pub fn clear_request_errors(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
    ) -> Result<(), TestkitError> {
        match self {
            KafkaBroker::External(_) => Ok(()),
            KafkaBroker::Embedded(b) => b
                .clear_request_errors(api)
                .map_err(|e| TestkitError::Broker(e.to_string())),
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, KafkaBroker::Embedded(_))
    }
}

fn create_external_topic(addr: &str, name: &str, partitions: i32) -> Result<(), TestkitError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .map_err(|e| TestkitError::Broker(e.to_string()))?;
    let topic =
        NewTopic::new(name, partitions, TopicReplication::Fixed(1)).set("retention.ms", "86400000");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // The admin future is driven by librdkafka's own thread; any executor can wait on it.
    let results = futures::executor::block_on(admin.create_topics([&topic], &options))
        .map_err(|e| TestkitError::Broker(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(TestkitError::Broker(format!("creating `{topic}`: {code}")))
            }
        }
    }
    Ok(())
}
