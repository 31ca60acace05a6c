fn main() -> std::process::ExitCode {
    instream_core::service_main("aggregator", instream_aggregator::run)
}
