//! The records of a file to load: CSV with a header row or JSON lines.

use std::io::BufRead;
use std::path::Path;

use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::LoadError;

/// Where the records come from: CSV with a header row (every value a string) or JSON lines
/// (one object per line), told apart by the extension.
enum Format {
    Csv,
    JsonLines,
}

fn format_of(path: &Path) -> Result<Format, LoadError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => Ok(Format::Csv),
        Some("jsonl" | "ndjson" | "json") => Ok(Format::JsonLines),
        _ => Err(LoadError::File {
            path: path.display().to_string(),
            reason: "expected a .csv or .jsonl file".into(),
        }),
    }
}

/// One record of the file: its fields, and the key text of each of the key fields asked for
/// (`None` when missing or not a key: see [`instream_event::key_text`]).
pub(super) struct Loaded {
    pub fields: Map<String, Value>,
    pub keys: Vec<Option<String>>,
}

/// Reads every record of `path`, calling `each` with (line number, record). Keys are the
/// text an event's field gives its lookup: a JSON number canonical from its text (so `1.0`
/// finds the event whose field is `1`, and no digit of a long number is lost); in CSV, whose
/// values have no type, a value written as a JSON number is taken as one.
pub(super) fn read_records(
    path: &Path,
    key_fields: &[String],
    mut each: impl FnMut(usize, Loaded) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let shown = path.display().to_string();
    let file_err = |reason: String| LoadError::File {
        path: shown.clone(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
    match format_of(path)? {
        Format::Csv => {
            let mut reader = csv::Reader::from_reader(std::io::BufReader::new(file));
            let headers = reader
                .headers()
                .map_err(|e| file_err(format!("header row: {e}")))?
                .clone();
            for (n, row) in reader.records().enumerate() {
                let line = n + 2;
                let row = row.map_err(|e| LoadError::Record {
                    path: shown.clone(),
                    line,
                    reason: e.to_string(),
                })?;
                let fields: Map<String, Value> = headers
                    .iter()
                    .zip(row.iter())
                    .map(|(h, v)| (h.to_owned(), Value::String(v.to_owned())))
                    .collect();
                let keys = key_fields
                    .iter()
                    .map(|field| {
                        let text = fields.get(field)?.as_str()?;
                        let key = instream_event::canonical_number(text)
                            .unwrap_or_else(|| text.to_owned());
                        (!key.is_empty()).then_some(key)
                    })
                    .collect();
                each(line, Loaded { fields, keys })?;
            }
        }
        Format::JsonLines => {
            for (n, text) in std::io::BufReader::new(file).lines().enumerate() {
                let line = n + 1;
                let text = text.map_err(|e| file_err(e.to_string()))?;
                if text.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(fields)) => {
                        // Read raw again for the keys: a number's key is made from its text,
                        // before a float sees it.
                        let raw: HashMap<String, &RawValue> =
                            serde_json::from_str(&text).unwrap_or_default();
                        let keys = key_fields
                            .iter()
                            .map(|field| raw.get(field).and_then(|v| instream_event::key_text(v)))
                            .collect();
                        each(line, Loaded { fields, keys })?
                    }
                    Ok(_) => {
                        return Err(LoadError::Record {
                            path: shown.clone(),
                            line,
                            reason: "not a JSON object".into(),
                        })
                    }
                    Err(e) => {
                        return Err(LoadError::Record {
                            path: shown.clone(),
                            line,
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
    }
    Ok(())
}

pub(super) fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(name: &str, text: &str) -> Vec<Vec<Option<String>>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut keys = Vec::new();
        read_records(&path, &["id".to_owned()], |_, loaded| {
            keys.push(loaded.keys);
            Ok(())
        })
        .unwrap();
        keys
    }

    /// The key a record is stored under is the one an event's field looks up: the
    /// enricher renders `{id}` from the event with `instream_event::key_text`.
    #[test]
    fn numeric_keys_are_the_text_events_look_up() {
        let event_key = |raw: &str| {
            let raw: Box<RawValue> = serde_json::from_str(raw).unwrap();
            instream_event::key_text(&raw)
        };
        let lines = "{\"id\":1.0}\n{\"id\":123456789012345678901234567891}\n{\"id\":\"c1\"}\n{\"id\":true}\n";
        let stored = keys_of("records.jsonl", lines);
        assert_eq!(
            stored,
            [
                vec![event_key("1")],
                vec![event_key("123456789012345678901234567891")],
                vec![event_key("\"c1\"")],
                vec![None],
            ]
        );
        assert_eq!(
            stored[1][0].as_deref(),
            Some("123456789012345678901234567891")
        );
        // CSV values have no type: one written as a JSON number is one.
        let csv = keys_of("records.csv", "id,tier\n1.0,gold\n007,silver\n,none\n");
        assert_eq!(
            csv,
            [
                vec![Some("1".to_owned())],
                vec![Some("007".to_owned())],
                vec![None]
            ]
        );
    }
}
