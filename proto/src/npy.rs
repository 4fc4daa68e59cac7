//! The `.npy` header: format versions 1, 2 and 3, the dtypes Conveyor serves in either byte
//! order, and every way a header can be wrong, each with a message that says what to do.
//!
//! Layout (numpy's `format.py`): magic `\x93NUMPY`, major and minor version bytes, a header
//! length (u16 LE in v1, u32 LE in v2/v3), then a Python dict literal
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (10, 3), }` padded with spaces and a
//! newline so the data starts on a 64-byte boundary. v3 only differs in allowing UTF-8.
//!
//! Both directions live here: the parser the loader reads shards with, and the writer the
//! trainer's dumps, the demo data and the test fixtures are made with.

use crate::DType;

/// The `.npy` magic string.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: DType,
    /// Whether elements are stored big-endian (and must be swapped before sending).
    pub big_endian: bool,
    /// Array shape; axis 0 indexes samples.
    pub shape: Vec<u64>,
    /// Byte offset of the first element in the file.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Number of elements in the whole array.
    pub fn num_elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Why a `.npy` header was rejected. The file name is added by the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The file is shorter than its header claims.
    #[error("file is too short for a .npy header ({len} bytes); it is truncated or not a .npy file")]
    TooShort {
        /// File length in bytes.
        len: usize,
    },
    /// No `\x93NUMPY` magic.
    #[error("not a .npy file (missing the \\x93NUMPY magic); write it with numpy.save")]
    BadMagic,
    /// A version other than 1, 2 or 3.
    #[error("unsupported .npy format version {major}.{minor}; versions 1, 2 and 3 are read")]
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The header dict could not be parsed.
    #[error("malformed .npy header: {reason}; rewrite the file with numpy.save")]
    Malformed {
        /// What was wrong.
        reason: String,
    },
    /// A dtype Conveyor does not serve.
    #[error(
        "unsupported dtype '{descr}'; use bool, int8/16/32/64, uint8/16/32/64 or float16/32/64 \
         (for example arr.astype('<f4'))"
    )]
    UnsupportedDtype {
        /// The descr string as written.
        descr: String,
    },
    /// Fortran (column-major) order.
    #[error("array is in Fortran order; save it in C order with numpy.save(path, numpy.ascontiguousarray(arr))")]
    FortranOrder,
    /// A 0-d array has no samples axis.
    #[error("array is 0-dimensional; axis 0 must index samples, so save at least a 1-D array")]
    ZeroDimensional,
    /// A shape whose byte size does not fit in 64 bits: no file can hold it.
    #[error(
        "shape {shape:?} of {dtype} elements is larger than any file can be (its byte size overflows 64 bits); the header is corrupt"
    )]
    TooLarge {
        /// The shape as written.
        shape: Vec<u64>,
        /// The element type name.
        dtype: &'static str,
    },
}

/// The offset of the first element, from the first 12 bytes of a file (what a ranged read of
/// a remote file needs to fetch whole); `None` when they are not an `.npy` preamble.
pub fn data_offset(prefix: &[u8]) -> Option<usize> {
    if prefix.len() < 10 || &prefix[..6] != MAGIC {
        return None;
    }
    match prefix[6] {
        1 => Some(10 + u16::from_le_bytes([prefix[8], prefix[9]]) as usize),
        2 | 3 if prefix.len() >= 12 => {
            Some(12 + u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize)
        }
        _ => None,
    }
}

/// Parses the header at the start of `bytes` (the whole file, or at least its header).
///
/// # Errors
/// Returns a [`HeaderError`] for a wrong magic, version, dict, dtype or memory order.
pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader, HeaderError> {
    if bytes.len() < 10 {
        return Err(HeaderError::TooShort { len: bytes.len() });
    }
    if &bytes[..6] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, dict_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(HeaderError::TooShort { len: bytes.len() });
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        _ => return Err(HeaderError::UnsupportedVersion { major, minor }),
    };
    let data_offset = dict_start + header_len;
    if bytes.len() < data_offset {
        return Err(HeaderError::TooShort { len: bytes.len() });
    }
    let dict =
        std::str::from_utf8(&bytes[dict_start..data_offset]).map_err(|_| malformed("header is not valid UTF-8"))?;
    if major == 1 && !dict.is_ascii() {
        return Err(malformed("a version 1 header must be ASCII"));
    }
    parse_dict(dict, data_offset)
}

fn malformed(reason: impl Into<String>) -> HeaderError {
    HeaderError::Malformed { reason: reason.into() }
}

fn parse_dict(dict: &str, data_offset: usize) -> Result<NpyHeader, HeaderError> {
    let body = dict.trim_end_matches(['\n', ' ', '\0']).trim();
    let body = body
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| malformed("header is not a {...} dict"))?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (key, after_key) =
            parse_quoted(rest).ok_or_else(|| malformed(format!("expected a quoted key at '{rest}'")))?;
        let after_colon = after_key
            .trim_start()
            .strip_prefix(':')
            .ok_or_else(|| malformed(format!("expected ':' after key '{key}'")))?
            .trim_start();
        let after_value = match key {
            "descr" => {
                let (value, after) = parse_quoted(after_colon)
                    .ok_or_else(|| malformed("'descr' is not a quoted string (structured dtypes are not supported)"))?;
                descr = Some(value.to_owned());
                after
            }
            "fortran_order" => {
                if let Some(after) = after_colon.strip_prefix("True") {
                    fortran = Some(true);
                    after
                } else if let Some(after) = after_colon.strip_prefix("False") {
                    fortran = Some(false);
                    after
                } else {
                    return Err(malformed("'fortran_order' is neither True nor False"));
                }
            }
            "shape" => {
                let inner_start = after_colon.strip_prefix('(').ok_or_else(|| malformed("'shape' is not a tuple"))?;
                let close = inner_start.find(')').ok_or_else(|| malformed("'shape' tuple is not closed"))?;
                let mut dims = Vec::new();
                for part in inner_start[..close].split(',') {
                    let part = part.trim().trim_end_matches('L');
                    if part.is_empty() {
                        continue;
                    }
                    dims.push(
                        part.parse::<u64>()
                            .map_err(|_| malformed(format!("shape entry '{part}' is not a non-negative integer")))?,
                    );
                }
                shape = Some(dims);
                &inner_start[close + 1..]
            }
            other => return Err(malformed(format!("unexpected key '{other}'"))),
        };
        rest = after_value.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    let descr = descr.ok_or_else(|| malformed("missing key 'descr'"))?;
    let fortran = fortran.ok_or_else(|| malformed("missing key 'fortran_order'"))?;
    let shape = shape.ok_or_else(|| malformed("missing key 'shape'"))?;
    let (dtype, big_endian) = parse_descr(&descr)?;
    if fortran && shape.len() > 1 {
        return Err(HeaderError::FortranOrder);
    }
    if shape.is_empty() {
        return Err(HeaderError::ZeroDimensional);
    }
    // Every size derived from the shape (elements, bytes, bytes per sample) is then exact.
    if shape.iter().try_fold(dtype.size_bytes() as u64, |bytes, &dim| bytes.checked_mul(dim)).is_none() {
        return Err(HeaderError::TooLarge { shape, dtype: dtype.name() });
    }
    Ok(NpyHeader { dtype, big_endian, shape, data_offset })
}

/// Parses a `'...'` or `"..."` literal at the start of `s`; returns it and what follows.
fn parse_quoted(s: &str) -> Option<(&str, &str)> {
    let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let end = s[1..].find(quote)? + 1;
    Some((&s[1..end], &s[end + 1..]))
}

/// Maps a numpy descr (`'<f4'`, `'>i8'`, `'|b1'`, `'|u1'`) to a dtype and byte order.
fn parse_descr(descr: &str) -> Result<(DType, bool), HeaderError> {
    let unsupported = || HeaderError::UnsupportedDtype { descr: descr.to_owned() };
    let (order, code) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
        _ => ('=', descr),
    };
    let dtype = DType::from_numpy_code(code).ok_or_else(unsupported)?;
    // '=' is "native", which for files numpy wrote means the writer's order; numpy always writes
    // an explicit '<' or '>' for multi-byte types, so treat '=' as little-endian.
    let big_endian = order == '>' && dtype.size_bytes() > 1;
    Ok((dtype, big_endian))
}

/// The `.npy` header (format version 1, or 2 when the header needs it) for a C-order
/// little-endian array of `shape`; the data follows it directly. Used to write dumps, demo data
/// and test fixtures in the exact layout Conveyor delivers.
pub fn npy_header(dtype: DType, shape: &[u64]) -> Vec<u8> {
    npy_header_padded(dtype, shape, 0)
}

/// [`npy_header`] padded with spaces to at least `min_len` bytes (a length another header of the
/// same array took, say for a larger row count), so that a header can be rewritten in place as
/// rows are appended.
pub fn npy_header_padded(dtype: DType, shape: &[u64], min_len: usize) -> Vec<u8> {
    let order = if dtype.size_bytes() == 1 { '|' } else { '<' };
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut dict =
        format!("{{'descr': '{order}{}', 'fortran_order': False, 'shape': {shape_text}, }}", dtype.numpy_code());
    let v1 = dict.len() + 11 < u16::MAX as usize;
    let prefix_len = if v1 { 10 } else { 12 };
    let total = ((prefix_len + dict.len() + 1).div_ceil(64) * 64).max(min_len);
    dict.push_str(&" ".repeat(total - prefix_len - dict.len() - 1));
    dict.push('\n');
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"\x93NUMPY");
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ALL_DTYPES;
    use proptest::prelude::*;

    fn file(version: u8, dict: &str) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(version);
        out.push(0);
        if version == 1 {
            out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(dict.as_bytes());
        out
    }

    #[test]
    fn reads_versions_1_2_and_3() {
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (10, 3), }   \n";
        for version in [1u8, 2, 3] {
            let h = parse_header(&file(version, dict)).expect("valid header");
            assert_eq!(h.dtype, DType::Float32);
            assert!(!h.big_endian);
            assert_eq!(h.shape, vec![10, 3]);
            assert_eq!(h.data_offset, if version == 1 { 10 } else { 12 } + dict.len());
        }
    }

    #[test]
    fn big_endian_and_scalar_samples() {
        let h = parse_header(&file(1, "{'descr': '>i8', 'fortran_order': False, 'shape': (7,), }\n")).expect("valid");
        assert_eq!((h.dtype, h.big_endian, h.shape.clone()), (DType::Int64, true, vec![7]));
        let h = parse_header(&file(1, "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 0), }\n")).expect("valid");
        assert_eq!((h.dtype, h.big_endian, h.shape), (DType::Bool, false, vec![2, 0]));
    }

    #[test]
    fn one_byte_types_are_never_swapped() {
        let h = parse_header(&file(1, "{'descr': '>u1', 'fortran_order': False, 'shape': (3,), }\n")).expect("valid");
        assert!(!h.big_endian);
    }

    #[test]
    fn rejects_bad_inputs_with_named_causes() {
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }\n";
        assert_eq!(parse_header(b"\x93NUM"), Err(HeaderError::TooShort { len: 4 }));
        assert_eq!(parse_header(b"PK\x03\x04xxxxxxxxxxxx"), Err(HeaderError::BadMagic));
        assert_eq!(parse_header(&file(4, ok)), Err(HeaderError::UnsupportedVersion { major: 4, minor: 0 }));
        let mut truncated = file(1, ok);
        truncated.truncate(30);
        assert!(matches!(parse_header(&truncated), Err(HeaderError::TooShort { .. })));
        assert_eq!(
            parse_header(&file(1, "{'descr': '<c8', 'fortran_order': False, 'shape': (4,), }\n")),
            Err(HeaderError::UnsupportedDtype { descr: "<c8".into() })
        );
        assert_eq!(
            parse_header(&file(1, "{'descr': '<U3', 'fortran_order': False, 'shape': (4,), }\n")),
            Err(HeaderError::UnsupportedDtype { descr: "<U3".into() })
        );
        assert_eq!(
            parse_header(&file(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 2), }\n")),
            Err(HeaderError::FortranOrder)
        );
        assert_eq!(
            parse_header(&file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }\n")),
            Err(HeaderError::ZeroDimensional)
        );
        let structured = "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (4,), }\n";
        assert!(matches!(parse_header(&file(1, structured)), Err(HeaderError::Malformed { .. })));
        assert!(matches!(
            parse_header(&file(1, "{'descr': '<f4', 'shape': (4,), }\n")),
            Err(HeaderError::Malformed { reason }) if reason.contains("fortran_order")
        ));
    }

    #[test]
    fn fortran_flag_is_harmless_for_one_dimensional_arrays() {
        let h = parse_header(&file(1, "{'descr': '<i4', 'fortran_order': True, 'shape': (5,), }\n")).expect("valid");
        assert_eq!(h.shape, vec![5]);
    }

    #[test]
    fn shapes_whose_byte_size_overflows_are_refused() {
        for shape in ["(9223372036854775808, 3)", "(100, 4611686018427387904)", "(4294967296, 4294967296)"] {
            let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
            let error = parse_header(&file(1, &dict)).expect_err(shape);
            assert!(matches!(error, HeaderError::TooLarge { .. }), "{shape}: {error}");
            assert!(error.to_string().contains("overflows 64 bits"), "{error}");
        }
        let fits = "{'descr': '|u1', 'fortran_order': False, 'shape': (4294967296, 4294967295), }\n";
        assert!(parse_header(&file(1, fits)).is_ok(), "just under 2^64 bytes is a valid header");
    }

    proptest! {
        #[test]
        fn encoded_headers_parse_back(dtype_index in 0usize..12, shape in prop::collection::vec(0u64..100_000, 1..5)) {
            let dtype = ALL_DTYPES[dtype_index];
            let bytes = npy_header(dtype, &shape);
            prop_assert_eq!(bytes.len() % 64, 0);
            let fits = shape.iter().try_fold(dtype.size_bytes() as u64, |b, &d| b.checked_mul(d)).is_some();
            if !fits {
                let too_large = matches!(parse_header(&bytes), Err(HeaderError::TooLarge { .. }));
                prop_assert!(too_large, "a shape over 2^64 bytes must be refused as too large");
                return Ok(());
            }
            let h = parse_header(&bytes).expect("own header parses");
            prop_assert_eq!(h.dtype, dtype);
            prop_assert_eq!(h.shape, shape);
            prop_assert_eq!(h.data_offset, bytes.len());
            prop_assert!(!h.big_endian);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = parse_header(&bytes);
            let _ = parse_header(&with_magic);
        }
    }

    #[test]
    fn padded_headers_keep_the_layout_and_state_their_length() {
        let natural = npy_header(DType::Int16, &[3, 12, 8, 8]);
        let padded = npy_header_padded(DType::Int16, &[3, 12, 8, 8], 256);
        assert_eq!((natural.len(), padded.len()), (128, 256));
        assert_eq!(u16::from_le_bytes([padded[8], padded[9]]) as usize + 10, padded.len());
        let dict_end = natural.iter().position(|&b| b == b'}').expect("a dict") + 1;
        assert_eq!((&padded[..8], &padded[10..dict_end]), (&natural[..8], &natural[10..dict_end]), "the same dict");
        assert!(padded[dict_end..255].iter().all(|&b| b == b' '), "then spaces");
        assert_eq!(*padded.last().expect("non-empty"), b'\n');
        assert_eq!(npy_header_padded(DType::Int16, &[3, 12, 8, 8], 10), natural, "never shorter than needed");
    }
}
