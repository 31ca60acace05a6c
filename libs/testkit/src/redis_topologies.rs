//! Redis in the shapes production runs it: a three-master Cluster and a master watched by a
//! Sentinel, all on loopback, torn down on drop.

use std::process::Command;

use tempfile::TempDir;

use crate::process::{free_port, wait_until, ChildGuard, TestkitError};
use crate::servers::{ask, auth_prefix, login, spawn, tls_only, wait_ready, RedisServer};

/// Three `redis-server`s in cluster mode, the slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    ports: Vec<u16>,
    tls: bool,
    /// The ACL user and password of [`RedisCluster::start_acl`], the same on every node.
    credentials: Option<(String, String)>,
    _nodes: Vec<ChildGuard>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> Result<RedisCluster, TestkitError> {
        Self::start_with(None, None)
    }

    /// A cluster whose nodes' `default` users are off: only `user` with `password` may
    /// connect. Its [`RedisCluster::urls`] carry them.
    pub fn start_acl(user: &str, password: &str) -> Result<RedisCluster, TestkitError> {
        Self::start_with(None, Some((user, password)))
    }

    /// A cluster whose nodes speak only TLS, to clients and to each other on the cluster bus,
    /// with the certificate and key given (PEM; the certificate is also the authority they
    /// trust). Clients are not asked for a certificate. Its [`RedisCluster::urls`] are
    /// `rediss://`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<RedisCluster, TestkitError> {
        Self::start_with(Some((cert_pem, key_pem)), None)
    }

    fn start_with(
        tls: Option<(&str, &str)>,
        acl: Option<(&str, &str)>,
    ) -> Result<RedisCluster, TestkitError> {
        let dir = tempfile::tempdir()?;
        let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        if let Some((cert_pem, key_pem)) = tls {
            std::fs::write(&cert, cert_pem)?;
            std::fs::write(&key, key_pem)?;
        }
        // redis-cli's TLS and login arguments, for the commands run against the nodes.
        let mut cli_access: Vec<std::ffi::OsString> = if tls.is_some() {
            vec!["--tls".into(), "--cacert".into(), cert.clone().into()]
        } else {
            Vec::new()
        };
        if let Some((user, password)) = acl {
            cli_access.extend([
                "--user".into(),
                user.into(),
                "--pass".into(),
                password.into(),
            ]);
            cli_access.push("--no-auth-warning".into());
        }
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..3 {
            // A cluster node also listens on its port + 10000 (the cluster bus).
            let port = loop {
                let port = free_port()?;
                if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                    break port;
                }
            };
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir)?;
            let log = node_dir.join("redis.log");
            let mut command = Command::new("redis-server");
            command
                .args(["--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--logfile")
                .arg(&log)
                .arg("--dir")
                .arg(&node_dir);
            if tls.is_some() {
                tls_only(&mut command, port, &cert, &key).args(["--tls-cluster", "yes"]);
            } else {
                command.args(["--port", &port.to_string()]);
            }
            if let Some((user, password)) = acl {
                let password_rule = format!(">{password}");
                command.args(["--user", "default", "off", "--user", user, "on"]);
                command.args([password_rule.as_str(), "~*", "&*", "+@all"]);
            }
            let mut guard = spawn(&mut command, &node_dir.join("redis.out"))?;
            wait_ready("redis-server (cluster node)", &mut guard, &log, || {
                std::fs::read_to_string(&log)
                    .is_ok_and(|text| text.contains("Ready to accept connections"))
            })?;
            ports.push(port);
            nodes.push(guard);
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(&cli_access)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|source| TestkitError::Spawn {
                program: "redis-cli".into(),
                source,
            })?;
        if !created.status.success() {
            return Err(TestkitError::Broker(format!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            )));
        }
        for &port in &ports {
            wait_until(
                "the cluster to agree",
                std::time::Duration::from_secs(30),
                || {
                    if tls.is_none() {
                        let request = format!("{}CLUSTER INFO\r\n", auth_prefix(acl));
                        return ask(port, request.as_bytes(), b"cluster_state:ok");
                    }
                    Command::new("redis-cli")
                        .args(&cli_access)
                        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                        .args(["CLUSTER", "INFO"])
                        .output()
                        .is_ok_and(|out| {
                            String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
                        })
                },
            )?;
        }
        Ok(RedisCluster {
            ports,
            tls: tls.is_some(),
            credentials: acl.map(|(u, p)| (u.to_owned(), p.to_owned())),
            _nodes: nodes,
            _dir: dir,
        })
    }

    /// `redis://[user:password@]127.0.0.1:<port>` (`rediss://` with TLS) of every node.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let login = login(&self.credentials);
        self.ports
            .iter()
            .map(|p| format!("{scheme}://{login}127.0.0.1:{p}"))
            .collect()
    }
}

/// A master (with a replica, if asked for) and one Sentinel monitoring it as `mymaster`.
pub struct RedisSentinel {
    master: RedisServer,
    replica: Option<RedisServer>,
    port: u16,
    tls: bool,
    /// The ACL user and password of [`RedisSentinel::start_acl`], the same on the master
    /// and the sentinel.
    credentials: Option<(String, String)>,
    _guard: ChildGuard,
    _dir: TempDir,
}

impl RedisSentinel {
    pub fn start() -> Result<RedisSentinel, TestkitError> {
        Self::start_with(false, None, None)
    }

    /// A master and a sentinel whose `default` users are off: only `user` with `password`
    /// may connect to either, and the sentinel logs in to the master as that user. Its URLs
    /// carry them.
    pub fn start_acl(user: &str, password: &str) -> Result<RedisSentinel, TestkitError> {
        Self::start_with(false, None, Some((user, password)))
    }

    /// A master and a sentinel that speak only TLS (the sentinel to its clients and to the
    /// master), with the certificate and key given (PEM; the certificate is also the authority
    /// they trust). Clients are not asked for a certificate.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<RedisSentinel, TestkitError> {
        Self::start_with(false, Some((cert_pem, key_pem)), None)
    }

    /// With a replica the sentinel knows of before this returns, so that it can promote it
    /// when the master fails ([`RedisSentinel::kill_master`]).
    pub fn start_with_replica() -> Result<RedisSentinel, TestkitError> {
        Self::start_with(true, None, None)
    }

    fn start_with(
        with_replica: bool,
        tls: Option<(&str, &str)>,
        acl: Option<(&str, &str)>,
    ) -> Result<RedisSentinel, TestkitError> {
        let master = match (tls, acl) {
            (Some((cert, key)), _) => RedisServer::start_tls(cert, key)?,
            (None, Some((user, password))) => RedisServer::start_acl(user, password)?,
            (None, None) => RedisServer::start()?,
        };
        let replica = if with_replica {
            let replica = RedisServer::start_replica_of(master.port())?;
            wait_until(
                "the replica to follow its master",
                std::time::Duration::from_secs(30),
                || {
                    ask(
                        replica.port(),
                        b"INFO replication\r\n",
                        b"master_link_status:up",
                    )
                },
            )?;
            Some(replica)
        } else {
            None
        };
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let config = dir.path().join("sentinel.conf");
        let listen = match tls {
            Some((cert_pem, key_pem)) => {
                let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
                std::fs::write(&cert, cert_pem)?;
                std::fs::write(&key, key_pem)?;
                format!(
                    "port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {cert}\ntls-auth-clients no\ntls-replication yes\n",
                    cert = cert.display(),
                    key = key.display()
                )
            }
            None => format!("port {port}\n"),
        };
        let (users, master_login) = match acl {
            Some((user, password)) => (
                format!("user default off\nuser {user} on >{password} ~* &* +@all\n"),
                format!(
                    "sentinel auth-user mymaster {user}\nsentinel auth-pass mymaster {password}\n"
                ),
            ),
            None => (String::new(), String::new()),
        };
        std::fs::write(
            &config,
            format!(
                "{listen}{users}bind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n{master_login}sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n",
                dir.path().display(),
                master.port()
            ),
        )?;
        let log = dir.path().join("sentinel.log");
        let mut guard = spawn(
            Command::new("redis-server").arg(&config).arg("--sentinel"),
            &log,
        )?;
        let auth = auth_prefix(acl);
        wait_ready("redis-sentinel", &mut guard, &log, || {
            if tls.is_some() {
                // Not reachable in plain text: its log says when it watches the master.
                return std::fs::read_to_string(&log)
                    .is_ok_and(|text| text.contains("+monitor master mymaster"));
            }
            ask(
                port,
                format!("{auth}SENTINEL get-master-addr-by-name mymaster\r\n").as_bytes(),
                master.port().to_string().as_bytes(),
            )
        })?;
        if let Some(replica) = &replica {
            let seen = format!("{}", replica.port());
            wait_until(
                "the sentinel to know the replica",
                std::time::Duration::from_secs(30),
                || ask(port, b"SENTINEL replicas mymaster\r\n", seen.as_bytes()),
            )?;
        }
        Ok(RedisSentinel {
            master,
            replica,
            port,
            tls: tls.is_some(),
            credentials: acl.map(|(u, p)| (u.to_owned(), p.to_owned())),
            _guard: guard,
            _dir: dir,
        })
    }

    /// `redis://[user:password@]127.0.0.1:<port>` (`rediss://` with TLS) of the sentinel.
    pub fn sentinel_url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let login = login(&self.credentials);
        format!("{scheme}://{login}127.0.0.1:{}", self.port)
    }

    /// The master, to write test data to directly.
    pub fn master(&self) -> &RedisServer {
        &self.master
    }

    /// Reference-data settings that find this master through the sentinel.
    pub fn refdata_config(&self) -> instream_core::config::RefDataConfig {
        instream_core::config::RefDataConfig {
            redis_mode: instream_core::config::RedisMode::Sentinel,
            redis_nodes: vec![self.sentinel_url()],
            sentinel_master: "mymaster".into(),
            // The master's URL gives its TLS (the address is the sentinel's to say).
            redis_url: self.master.url(),
            ..Default::default()
        }
    }

    /// The replica of [`RedisSentinel::start_with_replica`].
    pub fn replica(&self) -> Option<&RedisServer> {
        self.replica.as_ref()
    }

    /// Kills the master with SIGKILL; the sentinel then promotes the replica.
    pub fn kill_master(&mut self) -> Result<(), TestkitError> {
        self.master.kill()
    }

    /// Whether the sentinel names the server on `port` as the master now.
    pub fn names_master(&self, port: u16) -> bool {
        let login = self
            .credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()));
        ask(
            self.port,
            format!(
                "{}SENTINEL get-master-addr-by-name mymaster\r\n",
                auth_prefix(login)
            )
            .as_bytes(),
            format!("\r\n{port}\r\n").as_bytes(),
        )
    }
}
