use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::mocking::MockCluster;
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
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
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
