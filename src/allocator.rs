//! The allocator's one setting: how long freed memory stays with the process.
//!
//! Both binaries use mimalloc (see `main.rs`). mimalloc hands memory that has been free for
//! its `purge_delay` (1 s by default) back to the OS, and its arenas ask for transparent huge
//! pages, so reusing purged memory faults in, and zeroes, a whole 2 MiB page. A gateway frees
//! and reallocates frame buffers all the time: in `bench fanout` that churn was 9 % of the
//! gateway's CPU in bursts (`clear_page_erms` under page faults, `docs/benchmarks.md`,
//! session 15). Ten seconds keeps the memory a steady load reuses, and still returns what a
//! spike left behind. `MIMALLOC_PURGE_DELAY` (milliseconds, -1 never) overrides it.

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`, which the Rust
/// bindings do not name).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory is kept before it is returned to the OS, unless the environment says.
pub const KEEP_FREED_MS: i64 = 10_000;

/// Applies [`KEEP_FREED_MS`] unless `MIMALLOC_PURGE_DELAY` is set. Call first thing in `main`.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one integer option of mimalloc's; mimalloc reads options atomically and
    // this one only changes when freed memory is returned.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, KEEP_FREED_MS as std::ffi::c_long) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_is_mimallocs_option_and_is_set() {
        // The position is right if the option reads back what was set, and mimalloc's own
        // default (1,000 ms) before.
        // SAFETY: reads one integer option.
        let before = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(before, 1000);
        }
        keep_freed_memory();
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: as above.
            let after = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
            assert_eq!(after, KEEP_FREED_MS as std::ffi::c_long);
        }
    }
}
