//! A disk cache entry file's bytes, as a loader reads them after a restart or under bit rot:
//! opened, its header and page table checked, every page read. Hostile files are refused (and
//! deleted), never a panic, a huge allocation or bytes of another length than the header says.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loader_server::storage::disk_cache::{DiskCache, ReadPages};

/// One cache for the whole run (it locks its directory).
fn cache() -> &'static (tempfile::TempDir, DiskCache) {
    static CACHE: OnceLock<(tempfile::TempDir, DiskCache)> = OnceLock::new();
    CACHE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DiskCache::open(dir.path(), 1 << 30, 4).expect("cache");
        (dir, cache)
    })
}

fuzz_target!(|data: &[u8]| {
    let (dir, cache) = cache();
    cache.put("key", &[7; 5_000]);
    let Some(path) = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "entry"))
    else {
        return;
    };
    std::fs::write(&path, data).expect("write");
    if let Some(entry) = cache.entry("key") {
        let len = entry.len();
        let mut pages = ReadPages::default();
        for range in [0..len.min(10), len / 2..len, 0..len] {
            if let Some(bytes) = entry.read(range.clone(), &mut pages) {
                assert_eq!(bytes.len(), range.len());
            }
        }
    }
    if let Some(bytes) = cache.get("key") {
        assert!(bytes.len() <= data.len());
    }
});
