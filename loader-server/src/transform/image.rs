//! Images on the loaders: the head of a pipeline chain that turns a ragged field of encoded
//! images (JPEG, PNG, WebP bytes, as image folders and WebDataset shards hold them) into one
//! fixed-shape `uint8[H, W, C]` sample each, with torchvision's semantics:
//!
//! ```text
//! image: decode_image(mode=rgb) | random_resized_crop(224) | flip(axis=1) | to_chw | cast(float32, scale=1/255)
//! image: decode_image | resize(256) | center_crop(224)
//! ```
//!
//! Decoding reads the header first and refuses an image that declares more pixels than
//! `--max-image-pixels` before anything is allocated for it (a 60000x60000 "decompression bomb"
//! costs nothing); the decoders then run under the same allocation limit. EXIF orientation is
//! applied, as a photo viewer shows the picture. Resizing uses Pillow's convolution filters
//! (antialiased, which is what torchvision does to PIL images), so results match
//! `torchvision.transforms` on PIL images up to rounding.

use std::io::Cursor;

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image, images::ImageRef};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::SampleRng;

/// Colour channels of decoded images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Three channels (grayscale replicated, alpha dropped: Pillow's `convert("RGB")`).
    Rgb,
    /// One channel (Pillow's `convert("L")`: ITU-R 601-2 luma).
    Gray,
}

impl Mode {
    /// Channels per pixel.
    pub fn channels(self) -> u64 {
        match self {
            Mode::Rgb => 3,
            Mode::Gray => 1,
        }
    }
}

/// Interpolation of a resize, as torchvision names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
}

impl Interpolation {
    /// Parses torchvision's name for it.
    pub(crate) fn named(word: &str) -> Result<Interpolation, String> {
        match word {
            "nearest" => Ok(Interpolation::Nearest),
            "bilinear" => Ok(Interpolation::Bilinear),
            "bicubic" => Ok(Interpolation::Bicubic),
            other => Err(format!("unknown interpolation '{other}'; use bilinear, bicubic or nearest")),
        }
    }

    fn algorithm(self, antialias: bool) -> ResizeAlg {
        let filter = match self {
            Interpolation::Nearest => return ResizeAlg::Nearest,
            Interpolation::Bilinear => FilterType::Bilinear,
            Interpolation::Bicubic => FilterType::CatmullRom,
        };
        if antialias { ResizeAlg::Convolution(filter) } else { ResizeAlg::Interpolation(filter) }
    }
}

/// How a resize picks its output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Size {
    /// The shorter side to this length, the aspect ratio kept (torchvision's `Resize(256)`).
    Shorter(u32),
    /// Exactly `(height, width)`.
    Exact(u32, u32),
}

/// One geometric operator on a decoded image of any size.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ImageOp {
    /// `resize(size, interpolation=bilinear, antialias=true)`.
    Resize { size: Size, interpolation: Interpolation, antialias: bool },
    /// `center_crop(height, width)`: the centre, zero-padded where the image is smaller.
    CenterCrop { height: u32, width: u32 },
    /// `random_resized_crop(size, scale=[0.08, 1], ratio=[3/4, 4/3], interpolation=bilinear)`.
    RandomResizedCrop { height: u32, width: u32, scale: (f64, f64), ratio: (f64, f64), interpolation: Interpolation },
}

impl ImageOp {
    /// The output size of this operator on any input, when it fixes one.
    pub(crate) fn fixed_size(&self) -> Option<(u32, u32)> {
        match self {
            ImageOp::Resize { size: Size::Exact(h, w), .. } => Some((*h, *w)),
            ImageOp::Resize { size: Size::Shorter(_), .. } => None,
            ImageOp::CenterCrop { height, width } | ImageOp::RandomResizedCrop { height, width, .. } => {
                Some((*height, *width))
            }
        }
    }
}

/// The head of a chain over an encoded-image field: decode, then geometric operators ending
/// in a fixed size.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ImageHead {
    /// Channels of the output.
    pub(crate) mode: Mode,
    /// Geometric operators, in order.
    pub(crate) ops: Vec<ImageOp>,
    /// Output `(height, width)`.
    pub(crate) size: (u32, u32),
    /// Most pixels an image may declare (`--max-image-pixels`).
    pub(crate) max_pixels: u64,
}

/// A decoded image: `height * width * channels` bytes, row-major, channels last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
    /// Channels per pixel (3 or 1).
    pub channels: u32,
    /// The pixels.
    pub data: Vec<u8>,
}

impl ImageHead {
    /// Bytes of one output sample.
    pub(crate) fn sample_bytes(&self) -> usize {
        self.size.0 as usize * self.size.1 as usize * self.mode.channels() as usize
    }

    /// Decodes `encoded` and runs the operators, appending the `[H, W, C]` result to `out`.
    ///
    /// # Errors
    /// Why the image cannot be decoded or is refused (its header, its size, its format).
    pub(crate) fn run(&self, encoded: &[u8], rng: &mut SampleRng, out: &mut Vec<u8>) -> Result<(), String> {
        let mut image = decode(encoded, self.mode, self.max_pixels)?;
        let mut resizer = Resizer::new();
        for op in &self.ops {
            image = apply(op, image, rng, &mut resizer)?;
        }
        debug_assert_eq!((image.height, image.width), self.size, "the head ends in a fixed size");
        out.extend_from_slice(&image.data);
        Ok(())
    }
}

/// The format and declared `(width, height)` of an encoded image, from its header alone.
///
/// # Errors
/// Why the header does not parse, or names a format the loader does not decode.
pub fn image_header(encoded: &[u8]) -> Result<(ImageFormat, u32, u32), String> {
    // The header only: no pixel buffer is allowed.
    let (format, decoder) = header_decoder(encoded, 1 << 20)?;
    let (width, height) = decoder.dimensions();
    Ok((format, width, height))
}

/// A decoder of `encoded` whose header has been read, allowed `max_alloc` bytes of buffers.
fn header_decoder(encoded: &[u8], max_alloc: u64) -> Result<(ImageFormat, impl ImageDecoder + '_), String> {
    let format = image::guess_format(encoded)
        .map_err(|_| "is not a JPEG, PNG or WebP image (its first bytes match none of them)".to_owned())?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) {
        return Err(format!("is a {format:?} image; the loader decodes JPEG, PNG and WebP"));
    }
    let mut reader = ImageReader::with_format(Cursor::new(encoded), format);
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_alloc);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| format!("has a {format:?} header that does not parse: {e}"))?;
    Ok((format, decoder))
}

/// Decodes `encoded` into `mode`, refusing images of more than `max_pixels` pixels before any
/// pixel buffer is allocated, and applying its EXIF orientation.
///
/// # Errors
/// Why the image cannot be decoded or is refused.
pub fn decode(encoded: &[u8], mode: Mode, max_pixels: u64) -> Result<Pixels, String> {
    // One decoder reads the header and then the pixels; its buffers are bounded by 8 bytes per
    // allowed pixel (16-bit RGBA), and the declared size is checked before any is allocated.
    let (format, mut decoder) = header_decoder(encoded, max_pixels.saturating_mul(8).max(1 << 20))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(format!(
            "declares {width}x{height} pixels ({pixels}), above this loader's --max-image-pixels {max_pixels}; raise \
             the flag if such images are expected (each gather thread may then hold one decoded)"
        ));
    }
    if pixels == 0 {
        return Err(format!("declares {width}x{height} pixels: an empty image"));
    }
    if format == ImageFormat::Jpeg {
        // The JPEG decoder fills in what a truncated file lacks instead of failing (Pillow
        // refuses such files): a file must reach its end-of-image marker.
        jpeg_complete(encoded)?;
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot be decoded as {format:?}: {e}"))?;
    image.apply_orientation(orientation);
    Ok(convert(image, mode))
}

/// Checks that a JPEG file's segments and scans run to its end-of-image marker (`FF D9`), so
/// that a file cut short is refused rather than decoded with made-up pixels. Walks the markers
/// from the start: a segment's length is skipped; a scan's entropy-coded data runs to the next
/// marker (`FF` followed by neither `00`, a stuffed byte, nor a restart marker).
///
/// # Errors
/// Where the file ends or breaks its structure.
pub fn jpeg_complete(encoded: &[u8]) -> Result<(), String> {
    let cut = |at: usize| {
        format!("is a JPEG file cut short or damaged at byte {at} of {} (no end-of-image marker)", encoded.len())
    };
    if !encoded.starts_with(&[0xFF, 0xD8]) {
        return Err(cut(0));
    }
    let mut at = 2;
    loop {
        // Fill bytes (FF FF ...) may precede a marker.
        while encoded.get(at) == Some(&0xFF) && encoded.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (encoded.get(at), encoded.get(at + 1)) else { return Err(cut(at)) };
        at += 2;
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(&high), Some(&low)) = (encoded.get(at), encoded.get(at + 1)) else { return Err(cut(at)) };
        let length = usize::from(u16::from_be_bytes([high, low]));
        if length < 2 || at + length > encoded.len() {
            return Err(cut(at));
        }
        at += length;
        if marker == 0xDA {
            // Entropy-coded data up to the next real marker.
            loop {
                let Some(offset) = encoded[at..].iter().position(|&b| b == 0xFF) else {
                    return Err(cut(encoded.len()));
                };
                at += offset;
                match encoded.get(at + 1) {
                    None => return Err(cut(encoded.len())),
                    Some(0x00 | 0xD0..=0xD7 | 0xFF) => at += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// `image` in `mode`, as Pillow's `convert` gives it.
fn convert(image: DynamicImage, mode: Mode) -> Pixels {
    let (width, height) = (image.width(), image.height());
    let gray_source = matches!(
        image.color(),
        image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8 | image::ColorType::La16
    );
    let data = match mode {
        Mode::Rgb => image.into_rgb8().into_raw(),
        Mode::Gray if gray_source => image.into_luma8().into_raw(),
        // Pillow's L = R * 299/1000 + G * 587/1000 + B * 114/1000, in its fixed-point form.
        // (The image crate's own luma uses other weights.)
        Mode::Gray => image
            .into_rgb8()
            .into_raw()
            .chunks_exact(3)
            .map(|p| {
                ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
            })
            .collect(),
    };
    Pixels { height, width, channels: mode.channels() as u32, data }
}

/// Python's `round` (half to even), which torchvision's size arithmetic uses.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - x.signum() } else { r }
}

/// Runs one operator.
fn apply(op: &ImageOp, image: Pixels, rng: &mut SampleRng, resizer: &mut Resizer) -> Result<Pixels, String> {
    match *op {
        ImageOp::Resize { size, interpolation, antialias } => {
            let (h, w) = (image.height, image.width);
            let (out_h, out_w) = match size {
                Size::Exact(out_h, out_w) => (out_h, out_w),
                // torchvision: the shorter side becomes `short`, the longer int(short * long / shorter).
                Size::Shorter(short) if w <= h => (((f64::from(short) * f64::from(h)) / f64::from(w)) as u32, short),
                Size::Shorter(short) => (short, ((f64::from(short) * f64::from(w)) / f64::from(h)) as u32),
            };
            resize(&image, (0, 0, h, w), (out_h.max(1), out_w.max(1)), interpolation.algorithm(antialias), resizer)
        }
        ImageOp::CenterCrop { height, width } => Ok(center_crop(&image, height, width)),
        ImageOp::RandomResizedCrop { height, width, scale, ratio, interpolation } => {
            let region = resized_crop_region(image.height, image.width, scale, ratio, rng);
            resize(&image, region, (height, width), interpolation.algorithm(true), resizer)
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: `(top, left, height, width)` of the region,
/// ten tries at a random area and aspect ratio, then the centre crop clamped to `ratio`.
pub(crate) fn resized_crop_region(
    height: u32,
    width: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut SampleRng,
) -> (u32, u32, u32, u32) {
    let area = f64::from(height) * f64::from(width);
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * (scale.0 + rng.unit() * (scale.1 - scale.0));
        let aspect = (log_lo + rng.unit() * (log_hi - log_lo)).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if w > 0.0 && w <= f64::from(width) && h > 0.0 && h <= f64::from(height) {
            let (h, w) = (h as u32, w as u32);
            let top = rng.below(u64::from(height - h) + 1) as u32;
            let left = rng.below(u64::from(width - w) + 1) as u32;
            return (top, left, h, w);
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (h, w) = if in_ratio < ratio.0.min(ratio.1) {
        ((round_half_even(f64::from(width) / ratio.0.min(ratio.1)) as u32).clamp(1, height), width)
    } else if in_ratio > ratio.0.max(ratio.1) {
        (height, (round_half_even(f64::from(height) * ratio.0.max(ratio.1)) as u32).clamp(1, width))
    } else {
        (height, width)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// The region `(top, left, height, width)` of `image` resized to `(out_h, out_w)`.
fn resize(
    image: &Pixels,
    region: (u32, u32, u32, u32),
    (out_h, out_w): (u32, u32),
    algorithm: ResizeAlg,
    resizer: &mut Resizer,
) -> Result<Pixels, String> {
    let pixel_type = if image.channels == 3 { PixelType::U8x3 } else { PixelType::U8 };
    let source = ImageRef::new(image.width, image.height, &image.data, pixel_type).map_err(|e| e.to_string())?;
    let mut target = Image::new(out_w, out_h, pixel_type);
    let (top, left, h, w) = region;
    let options = ResizeOptions::new()
        .resize_alg(algorithm)
        .crop(f64::from(left), f64::from(top), f64::from(w), f64::from(h))
        .use_alpha(false);
    resizer.resize(&source, &mut target, &options).map_err(|e| format!("cannot be resized: {e}"))?;
    Ok(Pixels { height: out_h, width: out_w, channels: image.channels, data: target.into_vec() })
}

/// torchvision's `center_crop`: the offset of the crop is `round((size - crop) / 2)` (half to
/// even); where the image is smaller it is zero-padded, `(crop - size) // 2` before.
fn center_crop(image: &Pixels, height: u32, width: u32) -> Pixels {
    let offset = |size: u32, crop: u32| -> i64 {
        if size >= crop { round_half_even(f64::from(size - crop) / 2.0) as i64 } else { -i64::from((crop - size) / 2) }
    };
    let (top, left) = (offset(image.height, height), offset(image.width, width));
    let c = image.channels as usize;
    let mut data = vec![0u8; height as usize * width as usize * c];
    // Columns of the output that fall inside the image.
    let x0 = (-left).max(0) as usize;
    let x1 = (i64::from(image.width) - left).clamp(0, i64::from(width)) as usize;
    for y in 0..height as usize {
        let source_y = y as i64 + top;
        if x0 >= x1 || !(0..i64::from(image.height)).contains(&source_y) {
            continue;
        }
        let row = source_y as usize * image.width as usize * c;
        let from = row + (x0 as i64 + left) as usize * c;
        let to = y * width as usize * c + x0 * c;
        data[to..to + (x1 - x0) * c].copy_from_slice(&image.data[from..from + (x1 - x0) * c]);
    }
    Pixels { height, width, channels: image.channels, data }
}

#[cfg(test)]
mod tests {
    use image::{ImageEncoder, codecs::png::PngEncoder};

    use super::*;

    fn png(width: u32, height: u32, channels: u8) -> (Vec<u8>, Vec<u8>) {
        let pixels: Vec<u8> =
            (0..width * height * u32::from(channels)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut encoded = Vec::new();
        let color = if channels == 3 { image::ExtendedColorType::Rgb8 } else { image::ExtendedColorType::L8 };
        PngEncoder::new(&mut encoded).write_image(&pixels, width, height, color).expect("encode");
        (encoded, pixels)
    }

    #[test]
    fn png_decodes_to_its_pixels_and_gray_replicates_to_rgb() {
        let (encoded, pixels) = png(5, 3, 3);
        let decoded = decode(&encoded, Mode::Rgb, 1000).expect("decodes");
        assert_eq!((decoded.height, decoded.width, decoded.channels), (3, 5, 3));
        assert_eq!(decoded.data, pixels);
        let (gray, luma) = png(4, 2, 1);
        let rgb = decode(&gray, Mode::Rgb, 1000).expect("decodes");
        assert_eq!(rgb.data, luma.iter().flat_map(|&l| [l, l, l]).collect::<Vec<_>>());
        let as_gray = decode(&encoded, Mode::Gray, 1000).expect("decodes");
        let p = &pixels[..3];
        let expected =
            ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8;
        assert_eq!(as_gray.data[0], expected, "Pillow's luma weights");
    }

    #[test]
    fn a_declared_bomb_is_refused_from_its_header() {
        // A PNG header declaring 60000x60000 pixels, with no pixel data at all.
        let mut encoded = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        let ihdr = [&60000u32.to_be_bytes()[..], &60000u32.to_be_bytes()[..], &[8, 2, 0, 0, 0]].concat();
        let crc = crc32(&[&b"IHDR"[..], &ihdr].concat());
        encoded.extend_from_slice(&ihdr);
        encoded.extend_from_slice(&crc.to_be_bytes());
        // An empty IDAT chunk: the decoder reads up to the first one.
        encoded.extend_from_slice(&[0, 0, 0, 0]);
        encoded.extend_from_slice(b"IDAT");
        encoded.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
        let (_, width, height) = image_header(&encoded).expect("the header parses");
        assert_eq!((width, height), (60000, 60000));
        let error = decode(&encoded, Mode::Rgb, 40_000_000).expect_err("refused");
        assert!(error.contains("60000x60000") && error.contains("--max-image-pixels"), "{error}");
        for bad in [&b"not an image"[..], &encoded[..12], b"GIF89a\x01\0\x01\0"] {
            assert!(decode(bad, Mode::Rgb, 1000).is_err());
        }
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn a_jpeg_cut_short_is_refused_and_a_whole_one_passes() {
        let pixels: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 31 % 256) as u8).collect();
        let mut encoded = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, 90)
            .write_image(&pixels, 64, 48, image::ExtendedColorType::Rgb8)
            .expect("encode");
        jpeg_complete(&encoded).expect("whole");
        assert!(decode(&encoded, Mode::Rgb, 1 << 20).is_ok());
        // Trailing bytes after the end marker are fine, as in Pillow.
        jpeg_complete(&[&encoded[..], b"trailer"].concat()).expect("trailing bytes");
        for cut in [encoded.len() - 2, encoded.len() * 2 / 3] {
            let error = decode(&encoded[..cut], Mode::Rgb, 1 << 20).expect_err("cut short");
            assert!(error.contains("cut short"), "{cut}: {error}");
        }
        // Cut inside the header: the header does not parse.
        for cut in [300, 3] {
            assert!(decode(&encoded[..cut], Mode::Rgb, 1 << 20).is_err(), "{cut}");
        }
    }

    #[test]
    fn center_crop_rounds_half_to_even_and_pads_small_images() {
        let image = Pixels { height: 3, width: 5, channels: 1, data: (0..15).collect() };
        // (5 - 2) / 2 = 1.5 rounds to 2; (3 - 2) / 2 = 0.5 rounds to 0.
        assert_eq!(center_crop(&image, 2, 2).data, [2, 3, 7, 8]);
        // Wider than the image: one column of zeros before ((7 - 5) // 2), one after.
        let padded = center_crop(&image, 1, 7);
        assert_eq!(padded.data, [0, 5, 6, 7, 8, 9, 0]);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }

    #[test]
    fn resized_crop_regions_lie_inside_the_image_and_follow_scale_and_ratio() {
        let mut rng = SampleRng::new(3);
        for _ in 0..2000 {
            let (top, left, h, w) = resized_crop_region(375, 500, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(h >= 1 && w >= 1 && top + h <= 375 && left + w <= 500, "{top} {left} {h} {w}");
        }
        // scale 1 and the image's own ratio: the whole image.
        assert_eq!(resized_crop_region(300, 400, (1.0, 1.0), (4.0 / 3.0, 4.0 / 3.0), &mut rng), (0, 0, 300, 400));
        // A ratio the image cannot have falls back to the centre crop clamped to it.
        assert_eq!(resized_crop_region(100, 1000, (1.0, 1.0), (1.0, 1.0), &mut rng), (0, 450, 100, 100));
    }

    #[test]
    fn resizing_keeps_a_flat_image_flat_and_follows_torchvision_sizes() {
        let image = Pixels { height: 30, width: 40, channels: 3, data: vec![77; 30 * 40 * 3] };
        let mut rng = SampleRng::new(1);
        let mut resizer = Resizer::new();
        let op = ImageOp::Resize { size: Size::Shorter(16), interpolation: Interpolation::Bilinear, antialias: true };
        let out = apply(&op, image.clone(), &mut rng, &mut resizer).expect("resizes");
        assert_eq!((out.height, out.width), (16, 21), "int(16 * 40 / 30) = 21");
        assert!(out.data.iter().all(|&v| v == 77));
        let head = ImageHead {
            mode: Mode::Rgb,
            ops: vec![op, ImageOp::CenterCrop { height: 16, width: 16 }],
            size: (16, 16),
            max_pixels: 10_000,
        };
        let (encoded, _) = png(40, 30, 3);
        let mut out = Vec::new();
        head.run(&encoded, &mut rng, &mut out).expect("runs");
        assert_eq!(out.len(), head.sample_bytes());
    }
}
