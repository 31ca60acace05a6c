//! A private certificate authority for TLS tests: a server certificate for 127.0.0.1 and a
//! client certificate, both signed by it, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::process::TestkitError;

pub struct TestPki {
    dir: tempfile::TempDir,
    /// `ca.pem`: the authority's certificate.
    pub ca_file: PathBuf,
    pub ca_pem: String,
    /// The server's certificate (for 127.0.0.1) and key, PEM.
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl TestPki {
    /// An authority, a server certificate, and a client certificate (`client.pem`) whose key
    /// (`client.key`, PKCS#8) is encrypted with `client_key_password` — and written plain too
    /// (`client-plain.key`) for clients that read no encrypted keys (rustls).
    pub fn new(client_key_password: &str) -> Result<TestPki, TestkitError> {
        let pki_error = |e: rcgen::Error| TestkitError::Pki(e.to_string());
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(pki_error)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Each certificate its own subject: one equal to its issuer's reads as self-signed.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "instream test authority");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(pki_error)?)
            .map_err(pki_error)?;
        let server_key = KeyPair::generate().map_err(pki_error)?;
        let server_cert = leaf("127.0.0.1")?
            .signed_by(&server_key, &ca)
            .map_err(pki_error)?;
        let dir = tempfile::tempdir()?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        let client_key = KeyPair::generate().map_err(pki_error)?;
        let client_cert = leaf("instream-client")?
            .signed_by(&client_key, &ca)
            .map_err(pki_error)?;
        std::fs::write(dir.path().join("client.pem"), client_cert.pem())?;
        std::fs::write(
            dir.path().join("client-plain.key"),
            client_key.serialize_pem(),
        )?;
        let encrypted =
            openssl::pkey::PKey::private_key_from_pem(client_key.serialize_pem().as_bytes())
                .and_then(|key| {
                    key.private_key_to_pem_pkcs8_passphrase(
                        openssl::symm::Cipher::aes_256_cbc(),
                        client_key_password.as_bytes(),
                    )
                })
                .map_err(|e| TestkitError::Pki(e.to_string()))?;
        std::fs::write(dir.path().join("client.key"), encrypted)?;
        Ok(TestPki {
            ca_file,
            ca_pem: ca.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            dir,
        })
    }

    /// A file of this authority's directory (`client.pem`, `client.key`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn leaf(name: &str) -> Result<CertificateParams, TestkitError> {
    let mut params = CertificateParams::new(vec![name.to_owned()])
        .map_err(|e| TestkitError::Pki(e.to_string()))?;
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(params)
}
