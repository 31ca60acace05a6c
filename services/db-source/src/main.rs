fn main() -> std::process::ExitCode {
    instream_core::service_main("db-source", instream_db_source::run)
}
