fn main() -> std::process::ExitCode {
    instream_stage::service_main(instream_core::Service::DbSource, instream_db_source::run)
}
