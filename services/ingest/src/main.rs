fn main() -> std::process::ExitCode {
    instream_core::service_main(instream_core::Service::Ingest, instream_ingest::run)
}
