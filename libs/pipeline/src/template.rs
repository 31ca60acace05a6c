use std::fmt;
use std::str::FromStr;

use instream_event::FieldPath;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A reference-data key built from event fields: `airport:{origin}`, `fx:{from}:{to}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(FieldPath),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("key template `{0}`: unbalanced `{{` or `}}`")]
    Unbalanced(String),
    #[error("key template `{0}`: names no field; every event would share one key")]
    NoField(String),
    #[error("key template `{template}`: {source}")]
    Field {
        template: String,
        source: instream_event::FieldPathError,
    },
}

impl KeyTemplate {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The fields the template reads.
    pub fn fields(&self) -> impl Iterator<Item = &FieldPath> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f),
            Part::Literal(_) => None,
        })
    }

    /// Writes the key whose fields have the values `values` (in the template's order) into
    /// `out`: the key a reference record must be stored under for events with those values.
    /// `Err(n)` when `values` does not hold exactly one value per field (`n` fields).
    pub fn render_values(&self, values: &[&str], out: &mut String) -> Result<(), usize> {
        let fields = self.fields().count();
        if values.len() != fields {
            return Err(fields);
        }
        out.clear();
        let mut values = values.iter();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(_) => out.push_str(values.next().copied().unwrap_or_default()),
            }
        }
        Ok(())
    }

    /// As [`KeyTemplate::render_values`], from an iterator of exactly one value per field (extra
    /// values are ignored, missing ones render empty: callers count first).
    pub fn render_iter<'v>(&self, mut values: impl Iterator<Item = &'v str>, out: &mut String) {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(_) => out.push_str(values.next().unwrap_or_default()),
            }
        }
    }

    /// Writes the key for `payload` into `out`; `Err` names the first field that is missing or
    /// not a scalar.
    pub fn render<'t>(&'t self, payload: &Value, out: &mut String) -> Result<(), &'t FieldPath> {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(path) => match path.lookup(payload) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Number(n)) => {
                        let text = n.to_string();
                        out.push_str(&instream_event::canonical_number(&text).unwrap_or(text));
                    }
                    Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
                    _ => return Err(path),
                },
            }
        }
        Ok(())
    }
}

impl FromStr for KeyTemplate {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(TemplateError::Unbalanced(s.to_owned()))
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].to_owned()));
                    }
                    let close = rest[i..]
                        .find('}')
                        .ok_or_else(|| TemplateError::Unbalanced(s.to_owned()))?;
                    let name = &rest[i + 1..i + close];
                    let path = name.parse().map_err(|source| TemplateError::Field {
                        template: s.to_owned(),
                        source,
                    })?;
                    parts.push(Part::Field(path));
                    rest = &rest[i + close + 1..];
                }
            }
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(TemplateError::NoField(s.to_owned()));
        }
        Ok(KeyTemplate {
            text: s.to_owned(),
            parts,
        })
    }
}

impl TryFrom<String> for KeyTemplate {
    type Error = TemplateError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<KeyTemplate> for String {
    fn from(t: KeyTemplate) -> String {
        t.text
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_fields_and_literals() {
        let t: KeyTemplate = "fx:{from}:{to.code}".parse().unwrap();
        let mut out = String::new();
        t.render(&json!({"from": "EUR", "to": {"code": 978}}), &mut out)
            .unwrap();
        assert_eq!(out, "fx:EUR:978");
        let missing = t.render(&json!({"from": "EUR"}), &mut out).unwrap_err();
        assert_eq!(missing.as_str(), "to.code");
    }

    #[test]
    fn refuses_bad_templates() {
        assert!(matches!(
            "a:{b".parse::<KeyTemplate>(),
            Err(TemplateError::Unbalanced(_))
        ));
        assert!(matches!(
            "a:}b".parse::<KeyTemplate>(),
            Err(TemplateError::Unbalanced(_))
        ));
        assert!(matches!(
            "constant".parse::<KeyTemplate>(),
            Err(TemplateError::NoField(_))
        ));
        assert!("a:{}".parse::<KeyTemplate>().is_err());
    }

    #[test]
    fn renders_from_given_values_in_field_order() {
        let t: KeyTemplate = "fx:{from}:{to.code}".parse().unwrap();
        let mut out = String::new();
        t.render_values(&["EUR", "978"], &mut out).unwrap();
        assert_eq!(out, "fx:EUR:978");
        assert_eq!(t.render_values(&["EUR"], &mut out), Err(2));
    }
}
