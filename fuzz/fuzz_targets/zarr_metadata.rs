//! Opening a Zarr array or group whose metadata is these bytes (the first byte picks format 3
//! `zarr.json`, format 2 `.zarray` or `.zgroup` + a child `.zarray`): an error or a dataset,
//! never a panic, hang or abort.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loader_server::dataset::zarr::{MissingChunks, open};

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, metadata)) = data.split_first() else { return };
    let root = dir();
    let _ = std::fs::remove_dir_all(root.join("node"));
    let node = root.join("node");
    std::fs::create_dir_all(node.join("child")).expect("dirs");
    match selector % 3 {
        0 => std::fs::write(node.join("zarr.json"), metadata),
        1 => std::fs::write(node.join(".zarray"), metadata),
        _ => std::fs::write(node.join(".zgroup"), br#"{"zarr_format": 2}"#)
            .and_then(|()| std::fs::write(node.join("child/.zarray"), metadata)),
    }
    .expect("write metadata");
    let _ = open("d", &node, "x", MissingChunks::Error, None);
});
