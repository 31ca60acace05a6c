//! What went wrong with TLS to ZooKeeper. The ZooKeeper client retries a failed handshake
//! until the session timeout and then says only "timeout"; when a TLS connect fails, one
//! handshake of our own with the first host names the cause (an unknown authority, a refused
//! client certificate).

use std::sync::Arc;

use instream_core::config::ClientTls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Why a TLS handshake with the first host of `connect` fails, if it does.
pub(crate) async fn handshake_failure(connect: &str, tls: &ClientTls) -> Option<String> {
    let first = connect.split(',').next()?.trim();
    let host_port = first.strip_prefix("tcp+tls://").unwrap_or(first);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().ok()?),
        None => (host_port, 2281),
    };
    let config = match client_config(tls) {
        Ok(config) => config,
        Err(reason) => return Some(reason),
    };
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let timeout = std::time::Duration::from_secs(5);
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
        // A server refusing the client's certificate says so only after the handshake, on
        // the first read (TLS 1.3): read a little to hear it.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = stream.write_all(&[0, 0, 0, 0]).await;
        let mut buf = [0u8; 1];
        match tokio::time::timeout(std::time::Duration::from_millis(500), stream.read(&mut buf))
            .await
        {
            Ok(Err(e)) => Err(format!("TLS with {host}:{port}: {e}")),
            _ => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Err(reason)) => Some(reason),
        _ => None,
    }
}

fn client_config(tls: &ClientTls) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &tls.ca_file {
        for cert in
            CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?
        {
            roots
                .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
