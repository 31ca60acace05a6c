//! What went wrong with TLS to ZooKeeper. The ZooKeeper client retries a failed handshake
//! until the session timeout and then says only "timeout"; when a TLS connect fails, one
//! handshake of our own with the first host names the cause (an unknown authority, a refused
//! client certificate). Only what TLS itself refused is named: a host that does not answer
//! at all is an outage, not a TLS problem.

use std::sync::Arc;

use instream_core::config::ClientTls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Why a TLS handshake with the first host of `connect` fails, if it does.
pub(crate) async fn handshake_failure(connect: &str, tls: &ClientTls) -> Option<String> {
    let first = connect.split(',').next()?.trim();
    // `[::1]:2281`, `host:2281`, or a host alone on ZooKeeper's default port.
    let (host, port) = match first.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => {
            (host, port.parse::<u16>().ok()?)
        }
        _ => (first, 2181),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let config = match client_config(tls) {
        Ok(config) => config,
        Err(reason) => return Some(reason),
    };
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let timeout = std::time::Duration::from_secs(5);
    // What rustls refused comes as `InvalidData`; anything else (refused, reset, closed) is
    // not a TLS cause.
    let refused = |e: &std::io::Error| e.kind() == std::io::ErrorKind::InvalidData;
    let attempt = async {
        let Ok(tcp) = tokio::net::TcpStream::connect((host, port)).await else {
            return Ok(());
        };
        let mut stream = match tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        {
            Ok(stream) => stream,
            Err(e) if refused(&e) => return Err(format!("TLS handshake with {host}:{port}: {e}")),
            Err(_) => return Ok(()),
        };
        // A server refusing the client's certificate says so only after the handshake (TLS
        // 1.3), as an alert the first read meets. Nothing is written: the server would take
        // any bytes as a request.
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        match tokio::time::timeout(std::time::Duration::from_millis(500), stream.read(&mut buf))
            .await
        {
            Ok(Err(e)) if refused(&e) => Err(format!("TLS with {host}:{port}: {e}")),
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
