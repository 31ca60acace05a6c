// mimalloc: the enricher's hot path allocates per record; it measured ~15% more events/s than
// the system allocator (benches/enrich.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    instream_stage::service_main(instream_core::Service::Enricher, instream_enricher::run)
}
