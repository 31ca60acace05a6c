//! TLS to ScyllaDB/Cassandra (`store.tls`): an OpenSSL client context from the configured
//! PEM files, built at start so a wrong path or a key that does not match its certificate is
//! refused before the first connection, naming the key.

use instream_config::ClientTls;
use openssl::ssl::{SslContext, SslContextBuilder, SslFiletype, SslMethod, SslVerifyMode};

use crate::StoreError;

pub fn context(tls: &ClientTls) -> Result<SslContext, StoreError> {
    let refused = |key: &str, path: &std::path::Path, e: openssl::error::ErrorStack| {
        StoreError::Rejected(format!("store.tls.{key} {}: {e}", path.display()))
    };
    let mut builder = SslContextBuilder::new(SslMethod::tls_client())
        .map_err(|e| StoreError::Rejected(format!("store.tls: {e}")))?;
    match &tls.ca_file {
        Some(ca) => builder
            .set_ca_file(ca)
            .map_err(|e| refused("ca_file", ca, e))?,
        None => builder
            .set_default_verify_paths()
            .map_err(|e| StoreError::Rejected(format!("store.tls: system trust store: {e}")))?,
    }
    builder.set_verify(SslVerifyMode::PEER);
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        builder
            .set_certificate_chain_file(cert)
            .map_err(|e| refused("cert_file", cert, e))?;
        builder
            .set_private_key_file(key, SslFiletype::PEM)
            .map_err(|e| refused("key_file", key, e))?;
        builder
            .check_private_key()
            .map_err(|e| refused("key_file", key, e))?;
    }
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_client_certificate_and_its_key_make_a_context_and_a_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["client".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["other".into()]).unwrap();
        let tls = ClientTls {
            ca_file: Some(write(dir.path(), "ca.pem", &ca.cert.pem())),
            cert_file: Some(write(dir.path(), "client.pem", &client.cert.pem())),
            key_file: Some(write(
                dir.path(),
                "client.key",
                &client.signing_key.serialize_pem(),
            )),
        };
        assert!(context(&tls).is_ok());
        let mismatched = ClientTls {
            key_file: Some(write(
                dir.path(),
                "other.key",
                &other.signing_key.serialize_pem(),
            )),
            ..tls.clone()
        };
        let err = context(&mismatched).unwrap_err().to_string();
        assert!(err.contains("store.tls.key_file"), "{err}");
        let missing = ClientTls {
            ca_file: Some(dir.path().join("missing.pem")),
            ..ClientTls::default()
        };
        let err = context(&missing).unwrap_err().to_string();
        assert!(err.contains("store.tls.ca_file"), "{err}");
    }
}
