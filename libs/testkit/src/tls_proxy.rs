//! A TLS-terminating proxy (Debian's `stunnel4`) in front of a plain-text server: how the
//! tests reach a Kafka-protocol broker over TLS, since neither librdkafka's embedded broker nor
//! tansu 0.6 speaks TLS itself.

use std::net::TcpStream;
use std::process::Command;

use tempfile::TempDir;

use crate::pki::TestPki;
use crate::process::{free_port, ChildGuard, TestkitError};
use crate::servers::{spawn, wait_ready};

/// stunnel accepting TLS on a loopback port and forwarding plain text to `target`.
pub struct TlsProxy {
    port: u16,
    _guard: ChildGuard,
    _dir: TempDir,
}

/// What the proxy presents and whom it lets in.
pub struct TlsProxySettings<'a> {
    /// The server certificate chain (PEM) and its key.
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
    /// With an authority: mutual TLS, a client must present a certificate it signed.
    pub client_ca_pem: Option<&'a str>,
}

impl TlsProxy {
    pub fn start(
        target_port: u16,
        settings: &TlsProxySettings<'_>,
    ) -> Result<TlsProxy, TestkitError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        std::fs::write(&cert, settings.cert_pem)?;
        std::fs::write(&key, settings.key_pem)?;
        let mut conf = format!(
            "foreground = yes\npid =\ndebug = notice\n[tls]\naccept = 127.0.0.1:{port}\n\
             connect = 127.0.0.1:{target_port}\ncert = {}\nkey = {}\n",
            cert.display(),
            key.display()
        );
        if let Some(ca) = settings.client_ca_pem {
            let ca_file = dir.path().join("clients-ca.pem");
            std::fs::write(&ca_file, ca)?;
            conf.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                ca_file.display()
            ));
        }
        let conf_file = dir.path().join("stunnel.conf");
        std::fs::write(&conf_file, conf)?;
        let log = dir.path().join("stunnel.log");
        let mut guard = spawn(Command::new("stunnel4").arg(&conf_file), &log)?;
        wait_ready("stunnel4", &mut guard, &log, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(TlsProxy {
            port,
            _guard: guard,
            _dir: dir,
        })
    }

    /// The TLS port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// librdkafka's embedded broker reached only through TLS: stunnel in front of it, and the
/// broker advertising stunnel's port, so every connection a client makes (bootstrap and
/// partition leader) is TLS. With [`TlsBroker::start`] clients must present a certificate of
/// `pki` (mutual TLS).
pub struct TlsBroker {
    pub broker: instream_kafka::EmbeddedBroker,
    proxy: TlsProxy,
}

impl TlsBroker {
    pub fn start(pki: &TestPki) -> Result<TlsBroker, TestkitError> {
        Self::start_with(pki, true)
    }

    /// `mutual`: whether clients must present a certificate.
    pub fn start_with(pki: &TestPki, mutual: bool) -> Result<TlsBroker, TestkitError> {
        let broker = instream_kafka::EmbeddedBroker::start(1)
            .map_err(|e| TestkitError::Broker(e.to_string()))?;
        let port = broker
            .bootstrap_servers()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| TestkitError::Broker("the broker's address has no port".into()))?;
        let proxy = TlsProxy::start(
            port,
            &TlsProxySettings {
                cert_pem: &pki.server_cert_pem,
                key_pem: &pki.server_key_pem,
                client_ca_pem: mutual.then_some(pki.ca_pem.as_str()),
            },
        )?;
        broker
            .advertise(1, "127.0.0.1", proxy.port())
            .map_err(|e| TestkitError::Broker(e.to_string()))?;
        Ok(TlsBroker { broker, proxy })
    }

    /// `127.0.0.1:<TLS port>`.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port())
    }
}
