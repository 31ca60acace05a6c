use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::error::KafkaError;

enum Command {
    CreateTopic {
        name: String,
        partitions: i32,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// Disconnects one broker and refuses new connections (`up: false`), or lets it serve
    /// again (`up: true`): an outage as clients see it.
    SetBrokerUp {
        broker: i32,
        up: bool,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// Pushes errors that the next requests of `api` answer, one each (`errors` empty: clears
    /// the ones not used yet).
    RequestErrors {
        api: RDKafkaApiKey,
        errors: Vec<RDKafkaRespErr>,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// Makes the broker name another address in metadata than the one it listens on: a
    /// proxy's (TLS in front of the broker) that clients then reach it through.
    Advertise {
        broker: i32,
        host: String,
        port: u16,
        reply: mpsc::Sender<Result<(), String>>,
    },
    Stop,
}

/// librdkafka's in-process Kafka-protocol broker, reachable over loopback TCP by any Kafka
/// client. It supports consumer groups and transactions, keeps everything in memory and
/// nothing across a restart, and serves small volumes (thousands of records per second).
///
/// The mock cluster handle is not `Send`, so it lives on a thread of its own; this handle talks
/// to that thread. Dropping it stops the broker.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    pub fn start(brokers: i32) -> Result<EmbeddedBroker, KafkaError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, inbox) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                // A client holding the cluster, rather than rdkafka's `MockCluster::new`: the
                // advertised address can only be changed through the client's raw handle.
                let owner: BaseProducer = match ClientConfig::new()
                    .set("test.mock.num.brokers", brokers.to_string())
                    .create()
                {
                    Ok(o) => o,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let Some(cluster) = owner.client().mock_cluster() else {
                    let _ = ready_tx.send(Err("the client holds no mock cluster".into()));
                    return;
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                while let Ok(command) = inbox.recv() {
                    match command {
                        Command::CreateTopic {
                            name,
                            partitions,
                            reply,
                        } => {
                            let result = cluster
                                .create_topic(&name, partitions, 1)
                                .map_err(|e| e.to_string());
                            let _ = reply.send(result);
                        }
                        Command::SetBrokerUp { broker, up, reply } => {
                            let result = if up {
                                cluster.broker_up(broker)
                            } else {
                                cluster.broker_down(broker)
                            };
                            let _ = reply.send(result.map_err(|e| e.to_string()));
                        }
                        Command::RequestErrors { api, errors, reply } => {
                            if errors.is_empty() {
                                cluster.clear_request_errors(api);
                            } else {
                                cluster.request_errors(api, &errors);
                            }
                            let _ = reply.send(Ok(()));
                        }
                        Command::Advertise {
                            broker,
                            host,
                            port,
                            reply,
                        } => {
                            let _ = reply.send(advertise(&owner, broker, &host, port));
                        }
                        Command::Stop => break,
                    }
                }
            })
            .map_err(|e| KafkaError::Embedded(e.to_string()))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| KafkaError::Embedded("broker thread died".into()))?
            .map_err(KafkaError::Embedded)?;
        tracing::info!(%bootstrap, "embedded Kafka-protocol broker started");
        Ok(EmbeddedBroker {
            bootstrap,
            commands,
            thread: Some(thread),
        })
    }

    /// `host:port,…` for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic (the embedded broker has no CreateTopics API; unknown topics are
    /// otherwise auto-created with 4 partitions on first use).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        self.ask(|reply| Command::CreateTopic {
            name: name.to_owned(),
            partitions,
            reply,
        })
    }

    /// Takes broker `broker` (numbered from 1) down — its connections closed, new ones
    /// refused — or brings it back up.
    pub fn set_broker_up(&self, broker: i32, up: bool) -> Result<(), KafkaError> {
        self.ask(|reply| Command::SetBrokerUp { broker, up, reply })
    }

    /// Makes the next `errors.len()` requests of `api` fail, each with its error (an error
    /// the client cannot recover from, or one it retries), to test what a client does then.
    pub fn fail_requests(
        &self,
        api: RDKafkaApiKey,
        errors: &[RDKafkaRespErr],
    ) -> Result<(), KafkaError> {
        self.ask(|reply| Command::RequestErrors {
            api,
            errors: errors.to_vec(),
            reply,
        })
    }

    /// Forgets the errors [`fail_requests`](Self::fail_requests) pushed that no request used.
    pub fn clear_request_errors(&self, api: RDKafkaApiKey) -> Result<(), KafkaError> {
        self.ask(|reply| Command::RequestErrors {
            api,
            errors: Vec::new(),
            reply,
        })
    }

    /// Makes broker `broker` (numbered from 1) name `host:port` in metadata instead of its
    /// own listener, so that clients reach it through a proxy there (TLS in front of it).
    /// [`bootstrap_servers`](Self::bootstrap_servers) stays the broker's own address.
    pub fn advertise(&self, broker: i32, host: &str, port: u16) -> Result<(), KafkaError> {
        self.ask(|reply| Command::Advertise {
            broker,
            host: host.to_owned(),
            port,
            reply,
        })
    }

    fn ask(
        &self,
        command: impl FnOnce(mpsc::Sender<Result<(), String>>) -> Command,
    ) -> Result<(), KafkaError> {
        let (reply, answer) = mpsc::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| KafkaError::Embedded("broker thread is gone".into()))?;
        answer
            .recv()
            .map_err(|_| KafkaError::Embedded("broker thread is gone".into()))?
            .map_err(KafkaError::Embedded)
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn advertise(owner: &BaseProducer, broker: i32, host: &str, port: u16) -> Result<(), String> {
    let host = std::ffi::CString::new(host).map_err(|e| e.to_string())?;
    // SAFETY: `owner` holds the mock cluster (created with `test.mock.num.brokers`) and outlives
    // this call; the cluster copies `host`, which is a valid C string for the call's duration.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
        if cluster.is_null() {
            return Err("the client holds no mock cluster".into());
        }
        rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
            cluster,
            broker,
            host.as_ptr(),
            i32::from(port),
        );
    }
    Ok(())
}
