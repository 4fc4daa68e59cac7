//! Datasets of memory-mapped `.npy` fields: opening and validating a directory, and gathering
//! the rows of a batch into one contiguous little-endian buffer per field.
//!
//! A dataset directory holds fields. A field is `FIELD.npy` or shards `FIELD-00000.npy`,
//! `FIELD-00001.npy`, ... concatenated along axis 0 in name order. Axis 0 indexes samples.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use conveyor_proto::{
    DType,
    v1::{DatasetInfo, FieldInfo},
};

use crate::{
    cache::ChunkCache,
    error::{LoadError, ReadError},
    mmap::MappedFile,
    npy::{self, NpyHeader},
    zarr::{self, MissingChunks, ZarrSource},
};

/// One `.npy` file of a field.
#[derive(Debug)]
struct Shard {
    /// The mapped file (header included).
    map: MappedFile,
    /// Offset of the first element.
    data_offset: usize,
    /// Rows in this shard.
    num_samples: u64,
    /// Whether elements must be byte-swapped on the way out.
    big_endian: bool,
}

/// Where a field's rows live.
#[derive(Debug)]
enum Source {
    /// Memory-mapped `.npy` shards in axis-0 order; `shard_starts[i]` is the global index of
    /// shard `i`'s first row.
    Npy { shards: Vec<Shard>, shard_starts: Vec<u64> },
    /// A Zarr array read in chunk-aligned blocks through the shared cache.
    Zarr(Box<ZarrSource>),
}

/// Gives every field a distinct id for cache keys.
static NEXT_FIELD_ID: AtomicU64 = AtomicU64::new(0);

/// One named array of a dataset.
#[derive(Debug)]
pub struct Field {
    /// Field name (`.npy` file name without extension and shard suffix, or Zarr array name).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of one sample.
    pub sample_shape: Vec<u64>,
    /// Bytes of one sample.
    pub bytes_per_sample: usize,
    /// Rows decoded together (Zarr chunk length along axis 0; 1 for `.npy`).
    pub chunk_len: u64,
    /// Total rows.
    num_samples: u64,
    /// Cache key prefix.
    id: u64,
    source: Source,
}

impl Field {
    /// Copies the rows `indices` (all `< num_samples`) into `out`, converted to little-endian.
    /// Returns the bytes decoded from storage for this call (0 for `.npy`, cache misses for Zarr).
    fn gather_into(&self, indices: &[u64], out: &mut Vec<u8>, cache: &ChunkCache) -> Result<u64, (u64, String)> {
        let row = self.bytes_per_sample;
        out.reserve_exact(indices.len() * row);
        match &self.source {
            Source::Npy { shards, shard_starts } => {
                // Each shard a batch touches is checked once, before any of its rows is read: a
                // file truncated under its map would raise SIGBUS instead of failing the batch.
                let mut checked = vec![false; shards.len()];
                for &index in indices {
                    let shard_index =
                        if shards.len() == 1 { 0 } else { shard_starts.partition_point(|&start| start <= index) - 1 };
                    let shard = &shards[shard_index];
                    if !checked[shard_index] {
                        shard.map.check().map_err(|reason| (index, reason))?;
                        checked[shard_index] = true;
                    }
                    let local = (index - shard_starts[shard_index]) as usize;
                    let start = shard.data_offset + local * row;
                    let begin = out.len();
                    out.extend_from_slice(&shard.map[start..start + row]);
                    if shard.big_endian {
                        let width = self.dtype.size_bytes();
                        for element in out[begin..].chunks_exact_mut(width) {
                            element.reverse();
                        }
                    }
                }
                Ok(0)
            }
            Source::Zarr(zarr) => {
                let mut decoded = 0;
                let mut current: Option<(u64, Arc<Vec<u8>>)> = None;
                for &index in indices {
                    let block = index / zarr.block_len;
                    let data = match &current {
                        Some((b, data)) if *b == block => data.clone(),
                        _ => {
                            let (data, bytes) = cache
                                .get_or_decode((self.id, block), || zarr.decode_block(block))
                                .map_err(|reason| (block, reason))?;
                            decoded += bytes;
                            current = Some((block, data.clone()));
                            data
                        }
                    };
                    let start = (index - block * zarr.block_len) as usize * row;
                    out.extend_from_slice(&data[start..start + row]);
                }
                Ok(decoded)
            }
        }
    }

    /// Wire description of this field.
    pub fn info(&self) -> FieldInfo {
        FieldInfo {
            name: self.name.clone(),
            dtype: self.dtype as i32,
            sample_shape: self.sample_shape.clone(),
            bytes_per_sample: self.bytes_per_sample as u64,
            chunk_len: self.chunk_len,
        }
    }
}

/// A named set of fields with one sample count.
#[derive(Debug)]
pub struct Dataset {
    /// Name clients use.
    pub name: String,
    /// Directory it was opened from.
    pub dir: PathBuf,
    /// Samples per field.
    pub num_samples: u64,
    /// Fields in name order.
    pub fields: Vec<Field>,
}

impl Dataset {
    /// Opens the dataset at `path`: a Zarr array or group when it holds Zarr metadata, else a
    /// directory of `.npy` fields. Checks headers, lengths and shard agreement.
    ///
    /// # Errors
    /// A [`LoadError`] naming the file and the problem.
    pub fn open(name: &str, path: &Path, missing: MissingChunks) -> Result<Dataset, LoadError> {
        let fields = if zarr::is_zarr(path) {
            let default_name = path.file_stem().map_or_else(|| name.to_owned(), |s| s.to_string_lossy().into_owned());
            zarr::open(path, &default_name, missing)?.into_iter().map(zarr_field).collect()
        } else {
            open_npy_dir(name, path)?
        };
        let first = &fields[0];
        for field in &fields[1..] {
            if field.num_samples != first.num_samples {
                return Err(LoadError::UnequalLengths {
                    dataset: name.to_owned(),
                    first_field: first.name.clone(),
                    first_len: first.num_samples,
                    field: field.name.clone(),
                    len: field.num_samples,
                });
            }
        }
        Ok(Dataset { name: name.to_owned(), dir: path.to_owned(), num_samples: first.num_samples, fields })
    }

    /// Bytes of one sample across all fields.
    pub fn bytes_per_sample(&self) -> usize {
        self.fields.iter().map(|f| f.bytes_per_sample).sum()
    }

    /// Gathers `indices` (already checked `< num_samples`) into one buffer per field, and
    /// returns the bytes decoded from storage. Touches mapped pages and decodes chunks, so call
    /// it off the async runtime.
    ///
    /// # Errors
    /// [`ReadError`] naming the dataset, field and chunk that could not be read.
    pub fn gather(&self, indices: &[u64], cache: &ChunkCache) -> Result<(Vec<Vec<u8>>, u64), ReadError> {
        let mut decoded = 0;
        let mut buffers = Vec::with_capacity(self.fields.len());
        for field in &self.fields {
            let mut out = Vec::new();
            decoded += field.gather_into(indices, &mut out, cache).map_err(|(block, reason)| ReadError {
                dataset: self.name.clone(),
                field: field.name.clone(),
                first_row: block * field.chunk_len,
                last_row: ((block + 1) * field.chunk_len).min(field.num_samples),
                reason,
            })?;
            buffers.push(out);
        }
        Ok((buffers, decoded))
    }

    /// Wire description, given the server's per-batch sample limit.
    pub fn info(&self, max_batch_samples: u64) -> DatasetInfo {
        DatasetInfo {
            name: self.name.clone(),
            num_samples: self.num_samples,
            fields: self.fields.iter().map(Field::info).collect(),
            max_batch_samples,
            derivation: String::new(),
        }
    }
}

fn zarr_field(opened: zarr::OpenedArray) -> Field {
    let sample_shape = opened.shape[1..].to_vec();
    let bytes_per_sample = sample_shape.iter().product::<u64>() as usize * opened.dtype.size_bytes();
    Field {
        name: opened.name,
        dtype: opened.dtype,
        sample_shape,
        bytes_per_sample,
        chunk_len: opened.source.block_len,
        num_samples: opened.shape[0],
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source: Source::Zarr(Box::new(opened.source)),
    }
}

/// Opens every `.npy` field in `dir`.
fn open_npy_dir(name: &str, dir: &Path) -> Result<Vec<Field>, LoadError> {
    let io_error = |error| LoadError::Io { path: dir.to_owned(), error };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_error)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_error)?;
    files.retain(|p| p.extension().is_some_and(|e| e == "npy") && p.is_file());
    files.sort();

    // field name -> (is a single FIELD.npy, its files in name order)
    let mut groups: BTreeMap<String, (bool, Vec<PathBuf>)> = BTreeMap::new();
    for path in files {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let (field, sharded) = match stem.rsplit_once('-') {
            Some((field, number))
                if !field.is_empty() && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (field.to_owned(), true)
            }
            _ => (stem, false),
        };
        let entry = groups.entry(field.clone()).or_insert((!sharded, Vec::new()));
        if entry.0 == sharded {
            return Err(LoadError::AmbiguousField { field, dir: dir.to_owned() });
        }
        entry.1.push(path);
    }
    if groups.is_empty() {
        return Err(LoadError::NoFields { dataset: name.to_owned(), dir: dir.to_owned() });
    }

    let mut fields = Vec::with_capacity(groups.len());
    for (field_name, (_, paths)) in groups {
        fields.push(open_field(&field_name, &paths)?);
    }
    Ok(fields)
}

fn describe(header: &NpyHeader) -> String {
    format!("dtype {} and per-sample shape {:?}", header.dtype.name(), &header.shape[1..])
}

fn open_field(name: &str, paths: &[PathBuf]) -> Result<Field, LoadError> {
    let mut shards = Vec::with_capacity(paths.len());
    let mut shard_starts = Vec::with_capacity(paths.len());
    let mut first_header: Option<NpyHeader> = None;
    let mut total = 0u64;
    for path in paths {
        let map = MappedFile::open(path).map_err(|error| LoadError::Io { path: path.clone(), error })?;
        let header = npy::parse_header(&map).map_err(|problem| LoadError::Header { path: path.clone(), problem })?;
        let expected_bytes = header.num_elements() * header.dtype.size_bytes() as u64;
        let actual_bytes = (map.len() - header.data_offset) as u64;
        if actual_bytes < expected_bytes {
            return Err(LoadError::Truncated { path: path.clone(), expected_bytes, actual_bytes });
        }
        if let Some(first) =
            first_header.as_ref().filter(|f| f.dtype != header.dtype || f.shape[1..] != header.shape[1..])
        {
            return Err(LoadError::ShardMismatch {
                field: name.to_owned(),
                path: path.clone(),
                expected: describe(first),
                found: describe(&header),
            });
        }
        shard_starts.push(total);
        total = total.checked_add(header.shape[0]).ok_or_else(|| LoadError::TooManySamples {
            field: name.to_owned(),
            dir: path.parent().map(Path::to_owned).unwrap_or_default(),
        })?;
        shards.push(Shard {
            data_offset: header.data_offset,
            num_samples: header.shape[0],
            big_endian: header.big_endian,
            map,
        });
        first_header.get_or_insert(header);
    }
    let header = first_header.expect("a field has at least one file");
    let sample_shape = header.shape[1..].to_vec();
    let bytes_per_sample = sample_shape.iter().product::<u64>() as usize * header.dtype.size_bytes();
    // Empty shards never hold an index; drop them so the shard search stays simple.
    let (shards, shard_starts): (Vec<_>, Vec<_>) =
        shards.into_iter().zip(shard_starts).filter(|(s, _)| s.num_samples > 0).unzip();
    Ok(Field {
        name: name.to_owned(),
        dtype: header.dtype,
        sample_shape,
        bytes_per_sample,
        chunk_len: 1,
        num_samples: total,
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source: Source::Npy { shards, shard_starts },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_npy(dir: &Path, file: &str, dtype: DType, shape: &[u64], data: &[u8]) {
        let mut bytes = conveyor_proto::npy_header(dtype, shape);
        bytes.extend_from_slice(data);
        std::fs::write(dir.join(file), bytes).expect("write fixture");
    }

    #[test]
    fn shards_concatenate_in_name_order_and_gather_picks_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows: Vec<u16> = (0..10).collect();
        let le = |r: &[u16]| r.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        write_npy(dir.path(), "x-00000.npy", DType::Uint16, &[3], &le(&rows[0..3]));
        write_npy(dir.path(), "x-00001.npy", DType::Uint16, &[0], &[]);
        write_npy(dir.path(), "x-00002.npy", DType::Uint16, &[7], &le(&rows[3..10]));
        write_npy(dir.path(), "y.npy", DType::Uint8, &[10, 2], &(0..20).collect::<Vec<u8>>());
        let ds = Dataset::open("d", dir.path(), MissingChunks::Error).expect("opens");
        assert_eq!(ds.num_samples, 10);
        assert_eq!(ds.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["x", "y"]);
        let (out, decoded) = ds.gather(&[9, 0, 3, 2], &ChunkCache::new(0, 1)).expect("gather");
        assert_eq!(decoded, 0);
        assert_eq!(out[0], le(&[9, 0, 3, 2]));
        assert_eq!(out[1], vec![18, 19, 0, 1, 6, 7, 4, 5]);
    }

    #[test]
    fn shards_whose_sample_counts_overflow_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Zero-byte samples: each header is possible on its own, their sum is not.
        write_npy(dir.path(), "x-00000.npy", DType::Uint8, &[1 << 63, 0], &[]);
        write_npy(dir.path(), "x-00001.npy", DType::Uint8, &[1 << 63, 0], &[]);
        let error = Dataset::open("d", dir.path(), MissingChunks::Error).expect_err("overflow");
        assert!(matches!(error, LoadError::TooManySamples { .. }), "{error}");
        assert!(error.to_string().contains("field 'x'"), "{error}");
    }

    #[test]
    fn single_file_and_shards_of_one_field_conflict() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_npy(dir.path(), "x.npy", DType::Uint8, &[1], &[0]);
        write_npy(dir.path(), "x-00000.npy", DType::Uint8, &[1], &[0]);
        let err = Dataset::open("d", dir.path(), MissingChunks::Error).expect_err("ambiguous");
        assert!(matches!(err, LoadError::AmbiguousField { ref field, .. } if field == "x"), "{err}");
    }
}
