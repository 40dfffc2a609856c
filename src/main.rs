/// mimalloc: refold allocates and frees many small objects per event (decoded
/// envelopes, keys, batch effects) from several threads, which glibc's malloc
/// serves slowly (a third of a replay's CPU went to it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    refold::cli::main()
}
