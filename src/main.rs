/// jemalloc for Rust's allocations (see Cargo.toml); the C libraries (librdkafka)
/// keep the system allocator.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the
/// environment adds to them). One arena: a projection's reader allocates what
/// its worker frees, on other threads, and with jemalloc's default of four
/// arenas per core each arena kept its own peak (a replay of 3,000,000 demo
/// events held 445 MiB more than before it with 8 arenas, 171 MiB with one, at
/// the same speed on two cores). Threads keep their own caches, so the arena's
/// lock is rarely taken.
#[cfg(not(target_env = "msvc"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf = MallocConf(c"narenas:1".as_ptr());

/// A C string pointer that may live in a static.
#[cfg(not(target_env = "msvc"))]
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a constant string, never written.
#[cfg(not(target_env = "msvc"))]
unsafe impl Sync for MallocConf {}

fn main() -> std::process::ExitCode {
    refold::cli::main()
}
