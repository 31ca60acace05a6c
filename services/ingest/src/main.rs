fn main() -> std::process::ExitCode {
    instream_core::service_main("ingest", instream_ingest::run)
}
