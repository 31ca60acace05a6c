fn main() -> std::process::ExitCode {
    instream_core::service_main("archiver", instream_archiver::run)
}
