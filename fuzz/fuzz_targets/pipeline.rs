//! `--pipeline` text, as an operator writes it: parsed and fitted to a small image-like and an
//! EEG-like field; a pipeline that fits runs on a batch of two samples. Hostile text gets an
//! error naming the problem, never a panic, an out-of-bounds copy or a huge allocation.
#![no_main]

use conveyor_proto::DType;
use libfuzzer_sys::fuzz_target;
use loader_server::transform::{FieldSchema, ops::Pipeline};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let source = [
        FieldSchema { name: "image".into(), dtype: DType::Uint8, sample_shape: vec![3, 6, 5] },
        FieldSchema { name: "eeg".into(), dtype: DType::Float32, sample_shape: vec![2, 9] },
        FieldSchema { name: "label".into(), dtype: DType::Int64, sample_shape: vec![] },
    ];
    let Ok(pipeline) = Pipeline::new(text, &source) else { return };
    let columns: Vec<Vec<u8>> = source.iter().map(|f| (0..2 * f.bytes_per_sample()).map(|i| i as u8).collect()).collect();
    let out = pipeline.apply(columns, &[7, 3], 1, 2);
    for (field, data) in pipeline.schema().iter().zip(&out) {
        assert_eq!(data.len(), 2 * field.bytes_per_sample(), "{text}");
    }
});
