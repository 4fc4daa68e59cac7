//! `--pipeline` text, as an operator writes it: parsed and fitted to a small image-like and an
//! EEG-like field; a pipeline that fits runs on a batch of two samples. Hostile text gets an
//! error naming the problem, never a panic, an out-of-bounds copy or a huge allocation.
#![no_main]

use conveyor_proto::DType;
use libfuzzer_sys::fuzz_target;
use loader_server::transform::{FieldRows, FieldSchema, ops::Pipeline};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let source = [
        FieldSchema {
            name: "image".into(),
            dtype: DType::Uint8,
            sample_shape: vec![3, 6, 5],
            ragged: false,
            utf8: false,
        },
        FieldSchema { name: "eeg".into(), dtype: DType::Float32, sample_shape: vec![2, 9], ragged: false, utf8: false },
        FieldSchema { name: "label".into(), dtype: DType::Int64, sample_shape: vec![], ragged: false, utf8: false },
    ];
    // Image sizes up to 65535 x 65535 parse; the pixel bound keeps what a run allocates small.
    let Ok(pipeline) = Pipeline::new(text, &source, 1 << 16) else { return };
    let columns: Vec<FieldRows> = source
        .iter()
        .map(|f| FieldRows { data: (0..2 * f.bytes_per_sample()).map(|i| i as u8).collect(), offsets: None })
        .collect();
    let Ok(out) = pipeline.apply(columns, &[7, 3], 1, 2) else { panic!("fixed-shape samples are never bad: {text}") };
    for (field, data) in pipeline.schema().iter().zip(&out) {
        assert_eq!(data.len(), 2 * field.bytes_per_sample(), "{text}");
    }
});
