// mimalloc: the service allocates and frees many small buffers (events, JSON,
// index postings) across threads; it is faster than glibc's malloc at that and
// returns freed memory to the system sooner.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    refold::cli::main()
}
