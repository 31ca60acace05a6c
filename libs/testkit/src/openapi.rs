//! Checks an OpenAPI document against the handlers' sources: every route the router declares
//! is a documented path (and every documented path a route), every HTTP status the sources
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
    let documented_paths: Vec<&str> = doc["paths"]
        .as_object()
        .map(|paths| paths.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let mut missing = Vec::new();
    let mut routes = Vec::new();
    for path in rust_files(src) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for (at, _) in text.match_indices(".route(") {
            // `.route("/path", post(handler))`: the path, then the method's function.
            let Some(rest) = text[at + 7..].trim_start().strip_prefix('"') else {
                continue;
            };
            let Some((route, after)) = rest.split_once('"') else {
                continue;
            };
            let method: String = after
                .trim_start_matches(|c: char| c == ',' || c.is_whitespace())
                .trim_start_matches("axum::routing::")
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            routes.push((route.to_owned(), method));
        }
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
    for (route, method) in &routes {
        if !documented_paths.contains(&route.as_str()) {
            missing.push(format!("path {route}"));
        } else if doc["paths"][route.as_str()][method.as_str()].is_null() {
            missing.push(format!("method {method} of {route}"));
        }
    }
    for path in documented_paths {
        if !routes.iter().any(|(r, _)| r == path) {
            missing.push(format!("no route for the documented path {path}"));
        }
    }
    missing.sort();
    missing.dedup();
    missing
}

/// The `.rs` files under `dir`, its subdirectories included.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
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
        std::fs::create_dir(dir.path().join("api")).unwrap();
        std::fs::write(
            dir.path().join("api/handler.rs"),
            "fn f() { failure(StatusCode::TOO_MANY_REQUESTS, \"rate_limited\", m);\n\
             refuse(StatusCode::NOT_FOUND,\n    \"unknown_pipeline\", m) }\n\
             fn r() { Router::new().route(\"/x\", post(h)).route(\n  \"/y\", get(h)) }\n",
        )
        .unwrap();
        let doc = r#"{"paths": {"/x": {"get": {"responses": {"404": {}}}}},
            "components": {"schemas": {"Failure": {"properties": {"error": {"enum": ["unknown_pipeline"]}}}}}}"#;
        assert_eq!(
            super::undocumented(doc, dir.path()),
            [
                "error code `rate_limited`",
                "method post of /x",
                "path /y",
                "status 429 (TOO_MANY_REQUESTS)"
            ]
        );
    }
}
