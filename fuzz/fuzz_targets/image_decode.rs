//! Encoded images as a decode_image pipeline meets them: any bytes are refused with a message or
//! decoded, never a panic; an image declaring more than the pixel bound is refused from its
//! header before its pixels are allocated (libFuzzer's RSS limit would catch an allocation), and
//! a JPEG is decoded only when its markers run to the end-of-image marker.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loader_server::transform::image::{Mode, decode, image_header, jpeg_complete};

/// Pixels allowed: 1024 x 1024.
const MAX_PIXELS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let gray = data.first().is_some_and(|b| b & 1 == 1);
    let mode = if gray { Mode::Gray } else { Mode::Rgb };
    match decode(data, mode, MAX_PIXELS) {
        Ok(pixels) => {
            let (_, width, height) = image_header(data).expect("a decoded image has a header");
            assert!(u64::from(width) * u64::from(height) <= MAX_PIXELS);
            let size = (pixels.height as usize) * (pixels.width as usize) * (mode.channels() as usize);
            assert_eq!(pixels.data.len(), size);
            if data.starts_with(&[0xFF, 0xD8]) {
                assert!(jpeg_complete(data).is_ok());
            }
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
