fn main() -> std::process::ExitCode {
    instream_stage::service_main(instream_core::Service::Ingest, instream_ingest::run)
}
