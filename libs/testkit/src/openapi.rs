//! Checks an OpenAPI document against the handlers' sources: every HTTP status the sources
//! answer with is a documented response, and every error code they give is in the document's
//! `Failure.error` enum. Reading the sources (not a running server) catches a status or code
//! that only a rare path returns.

use std::path::Path;

/// What the sources under `src` answer that `doc` (OpenAPI JSON) does not describe; empty
/// when the document covers them.
pub fn undocumented(doc: &str, src: &Path) -> Vec<String> {
    let doc: serde_json::Value = match serde_json::from_str(doc) {
        Ok(d) => d,
        Err(e) => return vec![format!("the document is not JSON: {e}")],
    };
    let mut documented_statuses = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for operation in paths
            .values()
            .filter_map(|p| p.as_object())
            .flat_map(|p| p.values())
        {
            if let Some(responses) = operation["responses"].as_object() {
                documented_statuses.extend(responses.keys().cloned());
            }
        }
    }
    let documented_codes: Vec<&str> = doc["components"]["schemas"]["Failure"]["properties"]
        ["error"]["enum"]
        .as_array()
        .map(|codes| codes.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    let mut missing = Vec::new();
    for file in std::fs::read_dir(src).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(file.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (at, line) in lines.iter().enumerate() {
            for (start, _) in line.match_indices("StatusCode::") {
                let name: String = line[start + 12..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                if let Some(number) = status_number(&name) {
                    if !documented_statuses.iter().any(|s| s == number) {
                        missing.push(format!("status {number} ({name})"));
                    }
                }
                // The error code given with it: a literal on this or the next two lines.
                for near in lines.iter().skip(at).take(3) {
                    for code in literals(near) {
                        if !documented_codes.contains(&code.as_str()) {
                            missing.push(format!("error code `{code}`"));
                        }
                    }
                }
            }
            // `fn code(&self)` of an error enum: `Variant => "code",`.
            if line.contains("=> \"")
                && line.trim_end().ends_with("\",")
                && text.contains("fn code(")
            {
                for code in literals(line) {
                    if !documented_codes.contains(&code.as_str()) {
                        missing.push(format!("error code `{code}`"));
                    }
                }
            }
        }
    }
    missing.sort();
    missing.dedup();
    missing
}

/// The snake_case string literals of a line that look like error codes.
fn literals(line: &str) -> Vec<String> {
    line.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.len() > 2
                && s.contains('_')
                && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                && !s.starts_with("instream_")
        })
        .map(str::to_owned)
        .collect()
}

fn status_number(name: &str) -> Option<&'static str> {
    Some(match name {
        "OK" => "200",
        "BAD_REQUEST" => "400",
        "UNAUTHORIZED" => "401",
        "FORBIDDEN" => "403",
        "NOT_FOUND" => "404",
        "REQUEST_TIMEOUT" => "408",
        "PAYLOAD_TOO_LARGE" => "413",
        "UNSUPPORTED_MEDIA_TYPE" => "415",
        "UNPROCESSABLE_ENTITY" => "422",
        "TOO_MANY_REQUESTS" => "429",
        "INTERNAL_SERVER_ERROR" => "500",
        "SERVICE_UNAVAILABLE" => "503",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_or_code_the_document_lacks_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("handler.rs"),
            "fn f() { failure(StatusCode::TOO_MANY_REQUESTS, \"rate_limited\", m);\n\
             refuse(StatusCode::NOT_FOUND,\n    \"unknown_pipeline\", m) }\n",
        )
        .unwrap();
        let doc = r#"{"paths": {"/x": {"post": {"responses": {"404": {}}}}},
            "components": {"schemas": {"Failure": {"properties": {"error": {"enum": ["unknown_pipeline"]}}}}}}"#;
        assert_eq!(
            super::undocumented(doc, dir.path()),
            [
                "error code `rate_limited`",
                "status 429 (TOO_MANY_REQUESTS)"
            ]
        );
    }
}
