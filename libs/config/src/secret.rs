//! Secrets in the configuration: one convention for every password and key.
//!
//! Each secret is a named key (`kafka.sasl_password`, `store.password`, …) with a `<key>_file`
//! twin. The value comes from the environment (`INSTREAM__KAFKA__SASL_PASSWORD`), from a
//! mounted file (`kafka.sasl_password_file = "/var/run/secrets/kafka/password"`, read at start,
//! one trailing newline dropped) or, discouraged, from the config file itself. A [`Secret`]
//! prints and serializes as `***` wherever it goes (`{:?}`, `check-config`, logs), so the only
//! way to its text is [`Secret::expose`], at the client that sends it.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize, Serializer};

use super::Problems;

#[derive(Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret's text, for the client that authenticates with it; never for a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Always `***`: a configuration printed or serialized anywhere never carries the secret.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// Every named secret's key. Their environment variables are taken as they are (no quotes
/// stripped, no escapes read), and a test checks the list against the sections' slots.
pub const SECRET_KEYS: [&str; 9] = [
    "kafka.sasl_password",
    "kafka.ssl_key_password",
    "kafka.sasl_oauthbearer_client_secret",
    "zookeeper.auth",
    "refdata.redis_password",
    "refdata.sentinel_password",
    "store.password",
    "db_source.password",
    "aggregator.webhook_secret",
];

/// Why a `<key>_file` gave no secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{key}_file {path}: {reason}")]
    Unreadable {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}: give {0} or {0}_file, not both")]
    Both(&'static str),
}

/// A secret setting and its `_file` twin, as the sections hold them.
pub(super) struct SecretSlot<'a> {
    pub key: &'static str,
    pub value: &'a mut Option<Secret>,
    pub file: &'a Option<PathBuf>,
}

impl SecretSlot<'_> {
    /// Reads the file into the value; both given is refused. An empty path is no file (so
    /// `INSTREAM__KAFKA__SASL_PASSWORD_FILE=` unsets one a config file gives).
    pub(super) fn read_file(self) -> Result<(), SecretFileError> {
        let Some(path) = self.file.as_ref().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(());
        };
        if self.value.is_some() {
            return Err(SecretFileError::Both(self.key));
        }
        *self.value = Some(read_secret_file(self.key, path)?);
        Ok(())
    }

    pub(super) fn validate(&self, p: &mut Problems) {
        if let Some(value) = self.value.as_ref() {
            p.check(!value.expose().is_empty(), self.key, || {
                "is empty (an unset secret is left out, not given as \"\")".into()
            });
        }
    }
}

fn read_secret_file(key: &'static str, path: &Path) -> Result<Secret, SecretFileError> {
    let unreadable = |reason: String| SecretFileError::Unreadable {
        key,
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
    // Files made with `echo` end in a newline that is not part of the secret.
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(unreadable("is empty".into()));
    }
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_or_serializes_its_text() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"***\"");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "p@ss word \n").unwrap();
        let secret = read_secret_file("kafka.sasl_password", &path).unwrap();
        assert_eq!(secret.expose(), "p@ss word ");
        std::fs::write(&path, "\n").unwrap();
        let err = read_secret_file("kafka.sasl_password", &path).unwrap_err();
        assert!(
            err.to_string().contains("kafka.sasl_password_file"),
            "{err}"
        );
        let missing = read_secret_file("store.password", &dir.path().join("nope")).unwrap_err();
        assert!(
            missing.to_string().starts_with("store.password_file "),
            "{missing}"
        );
    }
}
