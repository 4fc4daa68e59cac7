//! The loader's request handler on a small dataset: the bytes are decoded as a `BatchRequest`
//! (as tonic would), checked against the dataset and the limits, and gathered. Any request gets
//! rows or a named error, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use conveyor_proto::{DType, npy_header, v1::BatchRequest};
use libfuzzer_sys::fuzz_target;
use loader_server::{Config, LoaderState};
use prost::Message;

fn state() -> &'static Arc<LoaderState> {
    static STATE: OnceLock<(tempfile::TempDir, Arc<LoaderState>)> = OnceLock::new();
    &STATE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            // Two fields: 100 float32 rows of 3, and a big-endian int16 field in two shards.
            let mut x = npy_header(DType::Float32, &[100, 3]);
            x.extend((0..300u32).flat_map(|v| (v as f32).to_le_bytes()));
            std::fs::write(dir.path().join("x.npy"), x).expect("x");
            for (shard, rows) in [(0u64, 60u64), (1, 40)] {
                let mut header = npy_header(DType::Int16, &[rows]);
                let at = header.windows(3).position(|w| w == b"<i2").expect("descr");
                header[at] = b'>';
                header.extend((0..rows as u16).flat_map(|v| v.to_be_bytes()));
                std::fs::write(dir.path().join(format!("y-{shard:05}.npy")), header).expect("y");
            }
            let mut config = Config::for_datasets([format!("d={}", dir.path().display())]);
            config.max_batch_samples = 64;
            let state = loader_server::open(config).expect("dataset opens");
            (dir, state)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = BatchRequest::decode(data) else { return };
    let num = request.indices.len();
    let response = state().answer_blocking(request);
    match &response.error {
        None => {
            assert_eq!(response.indices.len(), num);
            assert!(response.tensors.iter().all(|t| t.data.len() == num * if t.field == "x" { 12 } else { 2 }));
        }
        Some(error) => assert!(!error.message.is_empty()),
    }
});
