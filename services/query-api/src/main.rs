fn main() -> std::process::ExitCode {
    instream_core::service_main("query-api", instream_query_api::run)
}
