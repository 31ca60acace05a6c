fn main() -> std::process::ExitCode {
    // Fail points (kill tests) come from FAILPOINTS; without the `failpoints` feature of
    // instream-archive this does nothing.
    let _failpoints = fail::FailScenario::setup();
    instream_stage::service_main(instream_core::Service::Archiver, instream_archiver::run)
}
