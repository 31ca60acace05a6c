fn main() -> std::process::ExitCode {
    instream_core::service_main(instream_core::Service::QueryApi, instream_query_api::run)
}
