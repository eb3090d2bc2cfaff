//! Tuning of the C heap (glibc's malloc, which Rust's global allocator uses here). A walk
//! leaves one node per entry for as long as the kernel holds it, so how malloc packs those
//! small, long-lived objects between a request's temporaries is most of the daemon's memory.
//! Elsewhere (another C library) these do nothing.

/// Keeps every thread's allocations in one malloc arena. Nodes are allocated by whichever
/// worker served the lookup, so with an arena per worker each arena keeps its own partly
/// used pages: a walk of 36k entries took about 2.5 MiB more that way (~75 bytes per
/// inode). Small allocations mostly come from the per-thread cache, so the shared arena's
/// lock is rarely contended. Only arenas made later are affected: call this before the
/// workers start.
///
/// Also turns off malloc's fastbins. A freed small chunk that the thread's cache has no
/// room for waits in a fastbin, unmerged, until the next large allocation merges every
/// waiting chunk at once: after the kernel forgot a walk's nodes (160k of them), that was
/// the first directory listing's 64 KiB buffer, 14.7 ms inside a READDIRPLUS. Without
/// fastbins each free merges its own chunk, spread over the FORGETs that free them.
pub fn one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets malloc tunables.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MXFAST, 0);
    }
}

/// Gives whole free pages inside the heap back to the system. malloc only shrinks the heap
/// from its top, so a large temporary freed below live nodes would stay resident otherwise.
/// It walks the free lists: call it after freeing much, not per request.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory malloc does not use.
    unsafe {
        libc::malloc_trim(0);
    }
}
