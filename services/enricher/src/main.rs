fn main() -> std::process::ExitCode {
    instream_core::service_main("enricher", instream_enricher::run)
}
