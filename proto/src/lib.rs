//! Conveyor's wire protocol (`conveyor.v1`): the message types and the gRPC client and server
//! stubs generated from `proto/conveyor.proto`, plus the facts about element types that both
//! sides must agree on (sizes, numpy type strings).

/// Generated code for package `conveyor.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("conveyor.v1");
}

/// The loader's side of `conveyor.v1.Loader`: the same service as [`v1::loader_server`], except
/// that `StreamBatches` answers with [`wire::OutgoingBatch`] through [`wire::GatherCodec`] (the
/// loader answers that method itself with each batch's prebuilt message; the generated server
/// serves the others).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1_gather {
    include!(concat!(env!("OUT_DIR"), "/server/conveyor.v1.rs"));
}

#[allow(unsafe_code)]
pub mod npy;
#[allow(unsafe_code)]
pub mod shm;
pub mod wire;

pub use npy::{npy_header, npy_header_padded};
pub use v1::Dtype as DType;

/// Every concrete element type, in wire order.
pub const ALL_DTYPES: [DType; 12] = [
    DType::Bool,
    DType::Int8,
    DType::Int16,
    DType::Int32,
    DType::Int64,
    DType::Uint8,
    DType::Uint16,
    DType::Uint32,
    DType::Uint64,
    DType::Float16,
    DType::Float32,
    DType::Float64,
];

impl DType {
    /// Bytes per element; 0 for `Unspecified`.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::Unspecified => 0,
            DType::Bool | DType::Int8 | DType::Uint8 => 1,
            DType::Int16 | DType::Uint16 | DType::Float16 => 2,
            DType::Int32 | DType::Uint32 | DType::Float32 => 4,
            DType::Int64 | DType::Uint64 | DType::Float64 => 8,
        }
    }

    /// numpy's type code without the byte-order mark (`"i2"`, `"f4"`, `"b1"`).
    pub fn numpy_code(self) -> &'static str {
        match self {
            DType::Unspecified => "V0",
            DType::Bool => "b1",
            DType::Int8 => "i1",
            DType::Int16 => "i2",
            DType::Int32 => "i4",
            DType::Int64 => "i8",
            DType::Uint8 => "u1",
            DType::Uint16 => "u2",
            DType::Uint32 => "u4",
            DType::Uint64 => "u8",
            DType::Float16 => "f2",
            DType::Float32 => "f4",
            DType::Float64 => "f8",
        }
    }

    /// The dtype numpy calls by this code (`"i2"`), if Conveyor serves it.
    pub fn from_numpy_code(code: &str) -> Option<DType> {
        ALL_DTYPES.into_iter().find(|d| d.numpy_code() == code)
    }

    /// Lowercase human name (`"int16"`, `"float32"`), as numpy prints it.
    pub fn name(self) -> &'static str {
        match self {
            DType::Unspecified => "unspecified",
            DType::Bool => "bool",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::Uint8 => "uint8",
            DType::Uint16 => "uint16",
            DType::Uint32 => "uint32",
            DType::Uint64 => "uint64",
            DType::Float16 => "float16",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
        }
    }
}

/// Default largest gRPC message either side accepts: a batch plus its indices and framing.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Bytes the encoded indices and headers of a batch may add on top of its tensor bytes.
pub fn message_overhead_bytes(num_samples: usize, num_fields: usize) -> usize {
    // 10 bytes per varint index in the request echo, plus field names/shapes and framing.
    num_samples * 10 + num_fields * 256 + 4096
}

/// SplitMix64's increment, the golden ratio in 64 bits.
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function: a bijective mix of 64 bits (Steele, Lea, Flood 2014). Every
/// seed-derived choice on both sides is built from it: the trainer's sample order and the
/// loaders' per-sample augmentation.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One SplitMix64 step from `z`: the increment, then [`mix64`].
pub fn splitmix64(z: u64) -> u64 {
    mix64(z.wrapping_add(GOLDEN_GAMMA))
}

/// Parses a duration flag the same way in both binaries: `500ms`, `10s`, `2m`, or a plain
/// number of seconds (`3`, `0.5`).
///
/// # Errors
/// A message naming the value and the accepted forms.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let bad = || format!("'{text}' is not a duration; write for example 500ms, 10s, 2m or a number of seconds");
    let (number, unit) = text.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(bad()),
    };
    std::time::Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Parses a byte-size flag the same way in both binaries (and as `conveyor-convert` does): a
/// plain number of bytes (`1048576`), or a whole number with a unit in powers of 1024, in any
/// case and with or without `iB`/`B`: `64k`, `64KiB`, `512MiB`, `1GiB`, `2T`.
///
/// # Errors
/// A message naming the value and the accepted forms, or saying it does not fit `T`.
pub fn parse_bytes<T: TryFrom<u64>>(text: &str) -> Result<T, String> {
    let trimmed = text.trim();
    let bad = || format!("'{trimmed}' is not a byte size; write for example 1048576, 64KiB, 512MiB or 1GiB");
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("ib").or_else(|| unit.strip_suffix('b')).unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    let bytes = number.checked_mul(1 << shift).ok_or_else(|| format!("'{trimmed}' is more bytes than 2^64"))?;
    T::try_from(bytes).map_err(|_| format!("'{trimmed}' is too large here (at most {} bytes)", max_of::<T>()))
}

/// The largest value of the unsigned integer `T` (for the message of a value that does not fit).
fn max_of<T>() -> u64 {
    match std::mem::size_of::<T>() {
        bytes @ 1..8 => (1u64 << (8 * bytes)) - 1,
        _ => u64::MAX,
    }
}

/// Longest field name, in bytes: it becomes a file name (`trainer-client --dump`), whose limit is
/// 255 bytes on common file systems, with room for `.npy` and a shard suffix.
pub const MAX_FIELD_NAME_BYTES: usize = 200;

/// Checks a field name against the rule both sides apply: names become dictionary keys in the
/// trainer and file names in `--dump` directories, so a name is not empty, at most
/// [`MAX_FIELD_NAME_BYTES`] long, holds no path separator or control character, is not `.` or
/// `..`, and does not start with `__` (kept for Conveyor's own names, such as the Python
/// package's `__index__` and the dump's `__indices__.npy`).
///
/// # Errors
/// A [`FieldNameError`] naming the field and what is wrong with it.
pub fn check_field_name(name: &str) -> Result<(), FieldNameError> {
    let problem = if name.is_empty() {
        FieldNameProblem::Empty
    } else if name.len() > MAX_FIELD_NAME_BYTES {
        FieldNameProblem::TooLong
    } else if name.contains(['/', '\\']) {
        FieldNameProblem::PathSeparator
    } else if name.chars().any(char::is_control) {
        FieldNameProblem::ControlCharacter
    } else if name == "." || name == ".." {
        FieldNameProblem::Directory
    } else if name.starts_with("__") {
        FieldNameProblem::Reserved
    } else {
        return Ok(());
    };
    Err(FieldNameError { name: name.to_owned(), problem })
}

/// A field name neither side serves (see [`check_field_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field name {name:?} cannot be served: {problem}; rename the array, file or output key")]
pub struct FieldNameError {
    /// The name as found.
    pub name: String,
    /// What is wrong with it.
    pub problem: FieldNameProblem,
}

/// What is wrong with a field name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldNameProblem {
    /// The empty string.
    #[error("it is empty")]
    Empty,
    /// Longer than [`MAX_FIELD_NAME_BYTES`].
    #[error("it is longer than 200 bytes")]
    TooLong,
    /// `/` or `\`.
    #[error("it holds a path separator")]
    PathSeparator,
    /// A control character.
    #[error("it holds a control character")]
    ControlCharacter,
    /// `.` or `..`.
    #[error("it names a directory")]
    Directory,
    /// Starts with `__`.
    #[error("names starting with __ are kept for Conveyor's own (__index__, the dump's __indices__)")]
    Reserved,
}

#[cfg(test)]
mod tests {
    #[test]
    fn field_names_that_could_escape_a_directory_or_shadow_conveyors_own_are_refused() {
        for name in ["board", "t2m", "label.v2", "x-y", "données", "..x", ".hidden"] {
            assert_eq!(super::check_field_name(name), Ok(()), "{name}");
        }
        let long = "a".repeat(201);
        for name in ["", "../../x", "/abs", "a\\b", "a\nb", "nul\0", ".", "..", "__index__", "__indices__", &long] {
            let error = super::check_field_name(name).expect_err(name).to_string();
            assert!(error.contains(&format!("{name:?}")) && error.contains("rename"), "{error}");
        }
    }

    use super::*;

    #[test]
    fn byte_sizes_parse_as_numbers_or_with_binary_units() {
        assert_eq!(parse_bytes::<u64>("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes::<u64>("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes::<u64>("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes::<u64>("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes::<u64>("512 mb"), Ok(512 << 20));
        assert_eq!(parse_bytes::<u64>("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes::<u64>("2T"), Ok(2 << 40));
        assert_eq!(parse_bytes::<u64>("0"), Ok(0));
        assert_eq!(parse_bytes::<u32>("16MiB"), Ok(16 << 20));
        for bad in ["", "MiB", "1.5GiB", "-1", "12 parsecs", "1e9"] {
            let error = parse_bytes::<u64>(bad).expect_err(bad);
            assert!(error.contains("is not a byte size") && error.contains("512MiB"), "{error}");
        }
        let error = parse_bytes::<u32>("4GiB").expect_err("past u32");
        assert!(error.contains("at most 4294967295 bytes"), "{error}");
        assert!(parse_bytes::<u64>("16777216TiB").expect_err("past u64").contains("2^64"));
    }

    #[test]
    fn durations_parse_with_units_or_as_seconds() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").expect_err("unknown unit").contains("500ms"));
    }

    #[test]
    fn numpy_codes_round_trip_and_sizes_match_codes() {
        for dtype in ALL_DTYPES {
            let code = dtype.numpy_code();
            assert_eq!(DType::from_numpy_code(code), Some(dtype));
            let size: usize = code[1..].parse().expect("numeric size in code");
            assert_eq!(dtype.size_bytes(), size, "{code}");
        }
        assert_eq!(DType::from_numpy_code("c8"), None);
    }
}

/// Standard error for both binaries' logs, dropping what cannot be written: a log reader that
/// went away (a closed pipe, a stopped collector) must not fail the call being logged, which
/// the standard writer did by panicking inside it.
#[derive(Debug)]
pub struct LogWriter(std::io::Stderr);

impl LogWriter {
    /// The writer over the process's standard error.
    pub fn stderr() -> LogWriter {
        LogWriter(std::io::stderr())
    }
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(self.0.write(buf).unwrap_or(buf.len()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}
