//! HTTPS for ingest and query-api: the rustls server configuration from the configured PEM
//! files. Errors name the service's key (`ingest.tls.cert_file`, `query_api.tls.key_file`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
pub use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{section}.tls.cert_file {path}: {reason}")]
    Cert {
        section: &'static str,
        path: String,
        reason: String,
    },
    #[error("{section}.tls.key_file {path}: {reason}")]
    Key {
        section: &'static str,
        path: String,
        reason: String,
    },
    #[error("{section}.tls: {source}")]
    Config {
        section: &'static str,
        source: rustls::Error,
    },
}

/// Reads the certificate chain and key of `<section>.tls` (`cert_file`, `key_file`) and
/// builds the server side of TLS 1.2 and 1.3.
pub fn acceptor(
    section: &'static str,
    cert_file: &Path,
    key_file: &Path,
) -> Result<TlsAcceptor, TlsError> {
    let cert_path = cert_file.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Cert {
            section,
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            section,
            path: cert_path,
            reason: "no PEM certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key {
        section,
        path: key_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let refused = |source| TlsError::Config { section, source };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(refused)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(refused)?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
