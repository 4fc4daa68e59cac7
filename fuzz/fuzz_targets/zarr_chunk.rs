//! A Zarr chunk's stored bytes, read through each codec chain a loader bounds before decoding
//! (the first byte picks zstd, zstd + crc32c, gzip, zstd inside gzip or blosc): an error or the chunk's rows, never
//! a panic, and never more memory than the chunk's shape holds plus the decoders' buffers (the
//! fuzzer's RSS limit catches a decompression bomb). Trailing bytes, extra frames and members,
//! and lying headers are all inputs.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loader_server::{
    dataset::{Dataset, chunk_cache::ChunkCache, zarr::MissingChunks},
    storage::Location,
};

/// Codec chains: format 3 metadata (`zarr.json`) for the first four, format 2 for blosc.
const CHAINS: [&str; 5] = [
    r#"[{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 0, "checksum": false}}]"#,
    r#"[{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 0, "checksum": false}}, {"name": "crc32c"}]"#,
    r#"[{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 5}}]"#,
    r#"[{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 0, "checksum": false}},
        {"name": "gzip", "configuration": {"level": 5}}]"#,
    "blosc",
];

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, chunk)) = data.split_first() else { return };
    let chain = CHAINS[usize::from(selector) % CHAINS.len()];
    let node = dir().join("array");
    let _ = std::fs::remove_dir_all(&node);
    std::fs::create_dir_all(node.join("c/0")).expect("dirs");
    let chunk_path = if chain == "blosc" {
        let metadata = r#"{"zarr_format": 2, "shape": [16, 4], "chunks": [8, 4], "dtype": "|u1", "fill_value": 0,
            "order": "C", "filters": null,
            "compressor": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}}"#;
        std::fs::write(node.join(".zarray"), metadata).expect("metadata");
        node.join("0.0")
    } else {
        let metadata = format!(
            r#"{{"zarr_format": 3, "node_type": "array", "shape": [16, 4], "data_type": "uint8",
            "chunk_grid": {{"name": "regular", "configuration": {{"chunk_shape": [8, 4]}}}},
            "chunk_key_encoding": {{"name": "default", "configuration": {{"separator": "/"}}}},
            "fill_value": 0, "codecs": {chain}}}"#
        );
        std::fs::write(node.join("zarr.json"), metadata).expect("metadata");
        node.join("c/0/0")
    };
    std::fs::write(chunk_path, chunk).expect("chunk");
    let Ok(dataset) = Dataset::open("d", &Location::Local(node), MissingChunks::Fill, None) else { return };
    let cache = ChunkCache::new(1 << 20, 1);
    if let Ok((fields, _)) = dataset.gather(&[0, 3, 7], &cache) {
        assert_eq!(fields[0].data.len(), 3 * 4, "three rows of four bytes");
    }
});
