//! The bound on freed memory the allocator keeps for reuse (`--allocator-retain-bytes`).
//!
//! The loader's allocator is jemalloc (`main.rs`). Freed batch, block and encode buffers stay in
//! its arenas as dirty pages for up to 10 s, so the next batch reuses them instead of faulting in
//! fresh pages: that is the loader's pool of batch buffers. Each arena keeps its own, though, and
//! with a dozen threads freeing multi-MiB buffers their sum grew to ~400 MiB above the live peak
//! in the Zarr benchmark. [`run`] reads jemalloc's counters every [`CHECK_INTERVAL`] and gives
//! the dirty pages back to the kernel when they exceed the bound.
//!
//! Where jemalloc is not the global allocator (tests, MSVC builds) the counters describe an
//! unused jemalloc and the bound has nothing to do.

use std::{
    ffi::{CStr, c_void},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// How often [`run`] reads the counters.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

#[cfg(not(target_env = "msvc"))]
/// Dirty pages of every arena merged (4096 is jemalloc's `MALLCTL_ARENAS_ALL`).
const DIRTY_PAGES: &CStr = c"stats.arenas.4096.pdirty";

#[cfg(not(target_env = "msvc"))]
/// Purges every arena's dirty pages (4096: every arena, as above).
const PURGE_ALL: &CStr = c"arena.4096.purge";

/// What the allocator holds, as jemalloc counted it at the last refresh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in live allocations.
    pub allocated_bytes: u64,
    /// Bytes of freed pages kept for reuse (dirty pages of every arena).
    pub retained_bytes: u64,
}

/// Counters of the bound's work, for `/metrics`.
#[derive(Debug, Default)]
pub struct RetainStats {
    /// Retained bytes at the last check.
    pub retained_bytes: AtomicU64,
    /// Live bytes at the last check.
    pub allocated_bytes: AtomicU64,
    /// Times the retained pages were given back.
    pub purges: AtomicU64,
}

/// Refreshes jemalloc's counters and reads them; `None` where jemalloc is not built in or
/// answers an error.
pub fn usage() -> Option<Usage> {
    #[cfg(not(target_env = "msvc"))]
    {
        refresh()?;
        let page_bytes = read_usize(c"arenas.page")? as u64;
        let allocated_bytes = read_usize(c"stats.allocated")? as u64;
        let dirty_pages = read_usize(DIRTY_PAGES)? as u64;
        Some(Usage { allocated_bytes, retained_bytes: dirty_pages * page_bytes })
    }
    #[cfg(target_env = "msvc")]
    None
}

/// Gives every arena's retained pages back to the kernel; false when jemalloc refused.
pub fn purge() -> bool {
    #[cfg(not(target_env = "msvc"))]
    {
        // SAFETY: "arena.<i>.purge" reads and writes nothing: every pointer is null, lengths 0.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                PURGE_ALL.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        status == 0
    }
    #[cfg(target_env = "msvc")]
    false
}

/// Whether to purge: the retained bytes exceed the bound.
pub fn over_bound(usage: Usage, limit_bytes: u64) -> bool {
    usage.retained_bytes > limit_bytes
}

/// Checks every [`CHECK_INTERVAL`] until `shutdown` resolves, purging when the retained bytes
/// exceed `limit_bytes`; records what it saw in `stats`.
pub async fn run(limit_bytes: u64, stats: &RetainStats, shutdown: impl Future<Output = ()>) {
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        // A few µs of mallctl calls: no need to leave the runtime.
        let Some(usage) = usage() else { continue };
        if over_bound(usage, limit_bytes) {
            // Purging returns pages with madvise: about 1 µs per MiB, kept off the runtime.
            if tokio::task::spawn_blocking(purge).await.unwrap_or(false) {
                stats.purges.fetch_add(1, Relaxed);
            }
        }
        stats.retained_bytes.store(usage.retained_bytes, Relaxed);
        stats.allocated_bytes.store(usage.allocated_bytes, Relaxed);
    }
}

/// Reads a `size_t` statistic.
#[cfg(not(target_env = "msvc"))]
fn read_usize(name: &CStr) -> Option<usize> {
    let mut value: usize = 0;
    let mut len = std::mem::size_of::<usize>();
    // SAFETY: `value` is a valid size_t and `len` its size; nothing is written to jemalloc.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&raw mut value).cast::<c_void>(),
            &raw mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (status == 0 && len == std::mem::size_of::<usize>()).then_some(value)
}

/// Makes jemalloc refresh the statistics [`read_usize`] reads (a write to "epoch").
#[cfg(not(target_env = "msvc"))]
fn refresh() -> Option<()> {
    let mut epoch: u64 = 1;
    let mut len = std::mem::size_of::<u64>();
    let mut new: u64 = 1;
    // SAFETY: "epoch" is a u64 control; every pointer is valid for a u64 and the lengths say so.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"epoch".as_ptr(),
            (&raw mut epoch).cast::<c_void>(),
            &raw mut len,
            (&raw mut new).cast::<c_void>(),
            std::mem::size_of::<u64>(),
        )
    };
    (status == 0).then_some(())
}

#[cfg(test)]
mod tests {
    use std::alloc::GlobalAlloc;

    use super::*;

    #[test]
    fn the_counters_are_read_and_a_purge_leaves_nothing_retained() {
        // The test binary's allocator is the system one: jemalloc here serves only what is
        // allocated through it directly.
        let before = usage().expect("jemalloc answers");
        assert!(before.allocated_bytes > 0, "jemalloc's own metadata at least: {before:?}");
        let layout = std::alloc::Layout::from_size_align(4 << 20, 4096).expect("layout");
        let mut most_retained = 0;
        for round in 0..16 {
            // SAFETY: allocated and freed with jemalloc's own functions, with the same layout.
            unsafe {
                let pointers: Vec<*mut u8> = (0..4).map(|_| tikv_jemallocator::Jemalloc.alloc(layout)).collect();
                for &ptr in &pointers {
                    assert!(!ptr.is_null());
                    std::ptr::write_bytes(ptr, round, layout.size());
                }
                for ptr in pointers {
                    tikv_jemallocator::Jemalloc.dealloc(ptr, layout);
                }
            }
            most_retained = most_retained.max(usage().expect("jemalloc answers").retained_bytes);
        }
        assert!(most_retained >= 4 << 20, "freed pages are kept for reuse");
        assert!(over_bound(Usage { allocated_bytes: 0, retained_bytes: most_retained }, 1 << 20));
        assert!(purge());
        assert_eq!(usage().expect("jemalloc answers").retained_bytes, 0, "purged");
    }
}
