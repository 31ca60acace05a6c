use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// A dotted path into a JSON object: `account_id`, `user.address.city`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FieldPath {
    text: String,
    segments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field path `{path}`: {reason}")]
pub struct FieldPathError {
    pub path: String,
    pub reason: &'static str,
}

impl FieldPath {
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The raw JSON text at this path in `raw` (a JSON object), read without parsing what is
    /// not on the way: numbers keep their exact text.
    pub fn lookup_raw<'v>(&self, raw: &'v RawValue) -> Option<&'v RawValue> {
        self.segments.iter().try_fold(raw, |v, segment| {
            let fields: std::collections::BTreeMap<String, &'v RawValue> =
                serde_json::from_str(v.get()).ok()?;
            fields.get(segment).copied()
        })
    }

    /// The value at this path, if every step is an object holding the next name.
    pub fn lookup<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        self.segments
            .iter()
            .try_fold(value, |v, segment| v.as_object()?.get(segment))
    }
}

impl FromStr for FieldPath {
    type Err = FieldPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason| FieldPathError {
            path: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(error("is empty"));
        }
        let segments: Vec<String> = s.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(error("has an empty segment"));
        }
        if segments.len() > 16 {
            return Err(error("is deeper than 16 segments"));
        }
        Ok(FieldPath {
            text: s.to_owned(),
            segments,
        })
    }
}

impl TryFrom<String> for FieldPath {
    type Error = FieldPathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<FieldPath> for String {
    fn from(p: FieldPath) -> String {
        p.text
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn looks_up_nested_fields() {
        let path: FieldPath = "user.address.city".parse().unwrap();
        let doc = json!({"user": {"address": {"city": "Oslo"}}});
        assert_eq!(path.lookup(&doc), Some(&json!("Oslo")));
        assert_eq!(path.lookup(&json!({"user": 1})), None);
    }

    #[test]
    fn refuses_malformed_paths() {
        assert!("".parse::<FieldPath>().is_err());
        assert!("a..b".parse::<FieldPath>().is_err());
        assert!(".a".parse::<FieldPath>().is_err());
    }
}
