use std::process::ExitCode;

use clap::Parser;

/// See the note on `mimalloc` in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc gives freed pages back to the system only after `purge_delay` (1 s by default),
/// and only when the thread that freed them calls the allocator again: after a flood, on
/// workers that then sit idle, never (measured: 114 MiB of 30 stalled 1 MB uploads still
/// held 10 s after they closed, 59 MiB with a delay of 0). Freed at once, it comes back.
fn return_freed_memory_at_once() {
    // `mi_option_purge_delay` in mimalloc.h (v3, the version libmimalloc-sys builds by
    // default), which the Rust bindings do not name.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of mimalloc's options, an integer it reads with relaxed atomics;
    // no pointer is involved and any value is valid for this option.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[tokio::main]
async fn main() -> ExitCode {
    // Arenas committed on demand and no transparent huge pages: compiled in
    // (.cargo/config.toml), as mimalloc reads its options before `main`.
    return_freed_memory_at_once();
    let cli = atlas_stripe::cli::Cli::parse();
    match atlas_stripe::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atlas-stripe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
