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

/// Idle RSS on SQLite was 25.6–29.9 MB, 12.2 MB before mimalloc: on a kernel with
/// transparent huge pages `always`, mimalloc's arenas (committed eagerly on Linux) are
/// faulted in 2 MiB pages, so a few small allocations made whole huge pages resident.
/// Measured with mimalloc's own switches from the environment: 29.4–30.0 MB by default,
/// 18.9 MB with `MIMALLOC_ARENA_EAGER_COMMIT=0`, 19.5 MB with `MIMALLOC_ALLOW_THP=0`.
/// Those are read before `main`; here the process turns THP off for the pages it faults
/// from now on (the flag mimalloc's `allow_thp=0` sets), and later arenas are committed on
/// demand: 22.5–23.0 MB (the pages faulted before `main` stay huge; with THP off from the
/// start, by a wrapper's prctl before exec, 19.0 MB).
fn keep_small_pages() {
    // `mi_option_arena_eager_commit` in mimalloc.h (v3).
    const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: as in `return_freed_memory_at_once`: an integer option, any value valid.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    #[cfg(target_os = "linux")]
    {
        const PR_SET_THP_DISABLE: std::ffi::c_int = 41;
        extern "C" {
            fn prctl(option: std::ffi::c_int, ...) -> std::ffi::c_int;
        }
        // SAFETY: prctl(2) with PR_SET_THP_DISABLE takes integer arguments only and
        // changes one flag of this process; a failure (an old kernel) leaves THP as it was,
        // which costs memory, not correctness, so its result is not checked.
        let (on, unused): (std::ffi::c_ulong, std::ffi::c_ulong) = (1, 0);
        unsafe { prctl(PR_SET_THP_DISABLE, on, unused, unused, unused) };
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    keep_small_pages();
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
