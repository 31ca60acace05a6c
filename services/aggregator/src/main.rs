// mimalloc: the aggregator allocates per record (event ids, window state); it measured
// faster than the system allocator in benches/windows.rs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Fail points (kill tests) come from FAILPOINTS; unset, they do nothing.
    let _failpoints = fail::FailScenario::setup();
    instream_stage::service_main(instream_core::Service::Aggregator, instream_aggregator::run)
}
