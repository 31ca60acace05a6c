fn main() -> std::process::ExitCode {
    instream_coord::service_main(instream_core::Service::QueryApi, instream_query_api::run)
}
