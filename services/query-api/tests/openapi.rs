//! docs/openapi/query-api.json describes what the handlers answer.

#[test]
fn the_openapi_document_covers_every_status_and_error_code_the_handlers_answer() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let missing = instream_testkit::openapi::undocumented(instream_query_api::OPENAPI, &src);
    assert!(
        missing.is_empty(),
        "docs/openapi/query-api.json lacks {missing:?}"
    );
}
