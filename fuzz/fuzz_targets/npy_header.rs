//! The `.npy` header parser, on any bytes: it returns a header or an error, never panics, and a
//! header it accepts describes a byte size that fits in 64 bits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = conveyor_proto::npy::parse_header(data) {
        let elements = header.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let bytes = elements.and_then(|n| n.checked_mul(header.dtype.size_bytes() as u64));
        assert!(bytes.is_some(), "accepted a header whose size overflows: {:?}", header.shape);
        assert!(header.data_offset <= data.len().max(header.data_offset));
    }
});
