//! Zarr fields (format 2 and 3, any codec zarrs decodes: zstd, blosc, gzip, crc32c, sharding...),
//! read in blocks of whole chunks along axis 0 through the shared [`ChunkCache`].
//!
//! A block is the rows of one axis-0 chunk (for a sharded array, one inner chunk) across the
//! full extent of the other axes; decoding it once serves every sample in it.

use std::{path::Path, sync::Arc};

use conveyor_proto::DType;
use zarrs::{
    array::{Array, ArrayBytes, ArrayShardedExt, ArraySubset, data_type as zdt},
    filesystem::FilesystemStore,
    group::Group,
    storage::ReadableStorageTraits,
};

use crate::error::LoadError;

/// What to do when a chunk file is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingChunks {
    /// Fail the batches that need it, naming the chunk (a lost file is an error).
    Error,
    /// Zarr semantics: an absent chunk holds the fill value (zarr-python skips writing chunks
    /// that are entirely fill value unless `write_empty_chunks=True`).
    Fill,
}

/// One Zarr array serving as a field.
#[derive(Debug)]
pub struct ZarrSource {
    array: Array<FilesystemStore>,
    /// Rows per block (axis-0 chunk length, or inner chunk length when sharded).
    pub block_len: u64,
    missing: MissingChunks,
    /// Bytes of one element.
    element_bytes: u64,
}

/// Whether `path` holds Zarr metadata (an array or a group, format 2 or 3).
pub fn is_zarr(path: &Path) -> bool {
    ["zarr.json", ".zarray", ".zgroup"].iter().any(|f| path.join(f).is_file())
}

/// `array` or `group` as the node's metadata says (`.zarray`/`.zgroup` for format 2, the
/// `node_type` of `zarr.json` for format 3); `None` when it says neither.
fn node_type(path: &Path) -> Option<String> {
    if path.join(".zarray").is_file() {
        return Some("array".into());
    }
    if path.join(".zgroup").is_file() {
        return Some("group".into());
    }
    let text = std::fs::read(path.join("zarr.json")).ok()?;
    let metadata: serde_json::Value = serde_json::from_slice(&text).ok()?;
    metadata.get("node_type")?.as_str().map(str::to_owned)
}

/// A field's facts plus its source.
pub struct OpenedArray {
    /// Field name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Full array shape.
    pub shape: Vec<u64>,
    /// The source.
    pub source: ZarrSource,
}

fn zarr_error(path: &Path, what: impl std::fmt::Display) -> LoadError {
    LoadError::Zarr { path: path.to_owned(), problem: what.to_string() }
}

fn dtype_of(array: &Array<FilesystemStore>) -> Option<DType> {
    let t = array.data_type();
    let table: [(bool, DType); 12] = [
        (t.is::<zdt::BoolDataType>(), DType::Bool),
        (t.is::<zdt::Int8DataType>(), DType::Int8),
        (t.is::<zdt::Int16DataType>(), DType::Int16),
        (t.is::<zdt::Int32DataType>(), DType::Int32),
        (t.is::<zdt::Int64DataType>(), DType::Int64),
        (t.is::<zdt::UInt8DataType>(), DType::Uint8),
        (t.is::<zdt::UInt16DataType>(), DType::Uint16),
        (t.is::<zdt::UInt32DataType>(), DType::Uint32),
        (t.is::<zdt::UInt64DataType>(), DType::Uint64),
        (t.is::<zdt::Float16DataType>(), DType::Float16),
        (t.is::<zdt::Float32DataType>(), DType::Float32),
        (t.is::<zdt::Float64DataType>(), DType::Float64),
    ];
    table.into_iter().find(|(is, _)| *is).map(|(_, d)| d)
}

fn open_one(
    array_path: &Path,
    name: String,
    array: Array<FilesystemStore>,
    missing: MissingChunks,
) -> Result<OpenedArray, LoadError> {
    let dtype = dtype_of(&array).ok_or_else(|| {
        zarr_error(
            array_path,
            format_args!(
                "unsupported data type {}; use bool, int8/16/32/64, uint8/16/32/64 or float16/32/64",
                array.data_type()
            ),
        )
    })?;
    let shape = array.shape().to_vec();
    if shape.is_empty() {
        return Err(zarr_error(array_path, "array is 0-dimensional; axis 0 must index samples"));
    }
    let zeros = vec![0u64; shape.len()];
    let outer = array.chunk_shape(&zeros).map_err(|e| zarr_error(array_path, e))?;
    let inner = array.effective_subchunk_shape().unwrap_or(outer);
    let block_len = inner[0].get();
    Ok(OpenedArray {
        name,
        dtype,
        shape,
        source: ZarrSource { array, block_len, missing, element_bytes: dtype.size_bytes() as u64 },
    })
}

/// Opens a Zarr array (one field, named `default_name`) or group (one field per child array).
///
/// # Errors
/// [`LoadError::Zarr`] naming the path and the problem.
pub fn open(path: &Path, default_name: &str, missing: MissingChunks) -> Result<Vec<OpenedArray>, LoadError> {
    let store = Arc::new(FilesystemStore::new(path).map_err(|e| zarr_error(path, e))?);
    // Decide array or group from the metadata first, so that a broken array is reported with
    // the array's problem rather than as "not a group".
    if node_type(path).as_deref() == Some("array") {
        let array =
            Array::open(store, "/").map_err(|e| zarr_error(path, format_args!("invalid array metadata: {e}")))?;
        return Ok(vec![open_one(path, default_name.to_owned(), array, missing)?]);
    }
    let group = Group::open(store, "/").map_err(|e| zarr_error(path, format_args!("invalid group metadata: {e}")))?;
    let mut arrays = group.child_arrays().map_err(|e| {
        // Name the child whose metadata is broken.
        let children = std::fs::read_dir(path).into_iter().flatten().flatten().map(|entry| entry.path());
        for child in children.filter(|child| node_type(child).as_deref() == Some("array")) {
            let name = child.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if let Err(error) = Array::open(group.storage(), &format!("/{name}")) {
                return zarr_error(&child, format_args!("invalid array metadata: {error}"));
            }
        }
        zarr_error(path, format_args!("invalid metadata of an array in the group: {e}"))
    })?;
    arrays.sort_by(|a, b| a.path().as_str().cmp(b.path().as_str()));
    if arrays.is_empty() {
        return Err(zarr_error(path, "the group holds no arrays; each array of a group is a field"));
    }
    arrays
        .into_iter()
        .map(|array| {
            let name = array.path().as_str().trim_start_matches('/').to_owned();
            open_one(&path.join(&name), name, array, missing)
        })
        .collect()
}

/// The zstd frame magic number, as it starts a zstd-compressed chunk.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl ZarrSource {
    /// Refuses a zstd chunk whose frames declare more decoded bytes than a chunk of its shape
    /// holds: the decoder would allocate and fill that much before any size check (a 98 KB
    /// chunk declaring 3 GiB would take 3 GiB of memory), whatever the cache budget says.
    fn check_declared_size(&self, raw: &[u8], chunk_indices: &[u64]) -> Result<(), String> {
        if !raw.starts_with(&ZSTD_MAGIC) {
            return Ok(());
        }
        let shape = self.array.chunk_shape(chunk_indices).map_err(|e| e.to_string())?;
        let elements = shape.iter().try_fold(1u64, |n, d| n.checked_mul(d.get()));
        let holds = elements.and_then(|n| n.checked_mul(self.element_bytes)).unwrap_or(u64::MAX);
        match zstd::bulk::Decompressor::upper_bound(raw) {
            Some(declared) if declared as u64 > holds => Err(format!(
                "its zstd frames declare {declared} decoded bytes but a chunk of shape {:?} holds {holds}; \
                 the chunk is corrupt or hostile and was not decoded (rewrite it)",
                shape.iter().map(|d| d.get()).collect::<Vec<_>>()
            )),
            Some(_) => Ok(()),
            // No bound from the frame headers (a frame without a declared size, or bytes after
            // the frames such as a crc32c checksum): decode the first frame into nothing,
            // stopping one byte past what the chunk may hold. Decoding errors are left to the
            // real decode, which reports them.
            None => {
                use std::io::Read;
                let Ok(decoder) = zstd::stream::read::Decoder::new(raw) else { return Ok(()) };
                let mut limited = decoder.single_frame().take(holds.saturating_add(1));
                let decoded = std::io::copy(&mut limited, &mut std::io::sink()).unwrap_or(0);
                if decoded > holds {
                    return Err(format!(
                        "it decodes to more than the {holds} bytes a chunk of its shape holds; the chunk is corrupt or \
                         hostile and was not decoded (rewrite it)"
                    ));
                }
                Ok(())
            }
        }
    }

    /// Decodes block `block` (rows `block * block_len ..`) into C-order native-endian bytes.
    ///
    /// # Errors
    /// A description naming the chunk and what failed.
    pub fn decode_block(&self, block: u64) -> Result<Vec<u8>, String> {
        let shape = self.array.shape();
        let start = block * self.block_len;
        let end = (start + self.block_len).min(shape[0]);
        let ranges: Vec<std::ops::Range<u64>> =
            std::iter::once(start..end).chain(shape[1..].iter().map(|&d| 0..d)).collect();
        let subset = ArraySubset::new_with_ranges(&ranges);
        let sharded = self.array.is_sharded();
        if self.missing == MissingChunks::Error || !sharded {
            let chunks = self.array.chunks_in_array_subset(&subset).map_err(|e| e.to_string())?;
            for indices in chunks.iter().flat_map(|c| c.indices().into_iter()) {
                let key = self.array.chunk_key(&indices);
                let present = if sharded {
                    self.array.storage().size_key(&key).map_err(|e| format!("cannot read chunk {key}: {e}"))?.is_some()
                } else {
                    // Unsharded chunks are read raw first, so that a compressed chunk declaring
                    // more bytes than its shape holds is refused before anything is decoded.
                    match self
                        .array
                        .retrieve_encoded_chunk(&indices)
                        .map_err(|e| format!("cannot read chunk {key}: {e}"))?
                    {
                        Some(raw) => {
                            self.check_declared_size(&raw, &indices)
                                .map_err(|problem| format!("chunk {key}: {problem}"))?;
                            true
                        }
                        None => false,
                    }
                };
                if !present && self.missing == MissingChunks::Error {
                    return Err(format!(
                        "chunk {key} is missing (pass --zarr-missing-chunks fill if absent chunks mean the fill value)"
                    ));
                }
            }
        }
        let bytes: ArrayBytes = self.array.retrieve_array_subset(&subset).map_err(|e| e.to_string())?;
        Ok(bytes.into_fixed().map_err(|e| e.to_string())?.into_owned())
    }
}
