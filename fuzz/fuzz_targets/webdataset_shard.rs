//! A WebDataset shard of any bytes: indexing it gives a dataset or a named error, never a panic,
//! and every sample of a dataset it accepts can be read (no member points outside the file).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loader_server::{
    Dataset,
    dataset::{chunk_cache::ChunkCache, zarr::MissingChunks},
    storage::Location,
};

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

fuzz_target!(|data: &[u8]| {
    let shard = dir().join("shard.tar");
    std::fs::write(&shard, data).expect("write the shard");
    let Ok(dataset) = Dataset::open("d", &Location::Local(shard), MissingChunks::Error, None) else { return };
    let cache = ChunkCache::new(1 << 20, 1);
    let all: Vec<u64> = (0..dataset.num_samples.min(64)).collect();
    let (tensors, _) = dataset.select(&all, &cache).expect("an indexed shard reads");
    for tensor in &tensors {
        let _ = tensor.to_vec();
    }
});
