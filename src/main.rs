/// jemalloc for Rust's allocations (see Cargo.toml); the C libraries (librdkafka)
/// keep the system allocator.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    refold::cli::main()
}
