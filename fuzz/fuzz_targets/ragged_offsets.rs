//! A ragged field's offsets check, on any bytes: the first byte picks the byte order, the next
//! eight the values' row count, the rest are the offsets. Accepted offsets always start at 0,
//! never decrease and end at the row count, so no sample can point outside the values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loader_server::dataset::ragged::check_offset_bytes;

fuzz_target!(|data: &[u8]| {
    let Some((&order, rest)) = data.split_first() else { return };
    let Some((rows, offsets)) = rest.split_first_chunk::<8>() else { return };
    let (big_endian, rows) = (order & 1 == 1, u64::from_le_bytes(*rows) % 4096);
    if check_offset_bytes(offsets, big_endian, rows, std::path::Path::new("v.npy")).is_ok() {
        let read = |c: &[u8]| {
            let raw: [u8; 8] = c.try_into().expect("8 bytes");
            if big_endian { i64::from_be_bytes(raw) } else { i64::from_le_bytes(raw) }
        };
        let values: Vec<i64> = offsets.chunks_exact(8).map(read).collect();
        assert_eq!(values.first(), Some(&0));
        assert!(values.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(values.last().copied(), i64::try_from(rows).ok());
    }
});
