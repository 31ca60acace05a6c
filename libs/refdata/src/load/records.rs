//! The records of a file to load: CSV with a header row or JSON lines.

use std::io::BufRead;
use std::path::Path;

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

/// Reads every record of `path`, calling `each` with (line number, record).
pub(super) fn read_records(
    path: &Path,
    mut each: impl FnMut(usize, Map<String, Value>) -> Result<(), LoadError>,
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
                let record = headers
                    .iter()
                    .zip(row.iter())
                    .map(|(h, v)| (h.to_owned(), Value::String(v.to_owned())))
                    .collect();
                each(line, record)?;
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
                    Ok(Value::Object(record)) => each(line, record)?,
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
