//! Datasets: opening and validating a directory of `.npy` fields, an `.npz` archive or a Zarr
//! array or group, and gathering the rows of a batch into one contiguous little-endian buffer
//! per field.
//!
//! A dataset directory holds fields. A field is `FIELD.npy` or shards `FIELD-00000.npy`,
//! `FIELD-00001.npy`, ... concatenated along axis 0 in name order. Axis 0 indexes samples. The
//! members of an `.npz` archive follow the same naming rule and are mapped in place.
//!
//! One module per format: [`npy`] (fields of `.npy` shards), [`ragged`] (samples of different
//! lengths: values and offsets), `image_folder` (torchvision's `ImageFolder` layout), `webdataset` (tar shards), [`npz`]
//! (archives), [`zarr`] (arrays and groups); [`chunk_cache`] keeps decoded Zarr blocks in memory (not to be confused with the
//! object-store disk cache in [`crate::storage::disk_cache`]). This wing reads bytes through
//! [`crate::storage`] and never imports [`crate::serve`].

pub mod chunk_cache;
mod image_folder;
pub mod npy;
pub mod npz;
pub mod ragged;
pub mod tokens;
mod webdataset;
pub mod zarr;

use bytes::Bytes;
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
    v1::{CoordinateInfo, DatasetInfo, FieldInfo},
    wire::{OutgoingTensor, Piece},
};

use self::{
    chunk_cache::ChunkCache,
    zarr::{Coordinate, ZarrOptions, ZarrSource},
};
use crate::{
    error::{LoadError, ReadError},
    storage::{
        Location, ObjectStorage,
        mmap::MappedFile,
        object::{ObjectVersion, Rows, coalesce},
        shared_bytes,
    },
};

/// Where a shard's bytes are read from.
#[derive(Debug)]
enum ShardData {
    /// A mapped file (header included); one map serves every member of an archive.
    Mapped(Arc<MappedFile>),
    /// An object in a store, read with ranged GETs.
    Remote {
        /// The store and prefix.
        storage: Arc<ObjectStorage>,
        /// The object's name under the prefix.
        object: String,
        /// Its size in bytes (from the listing).
        size: u64,
        /// The version every read must find (from the listing).
        version: ObjectVersion,
    },
}

/// One `.npy` file (or `.npz` member, or remote object) of a field.
#[derive(Debug)]
struct Shard {
    /// Where its bytes are.
    data: ShardData,
    /// Offset of the first element in the map or object.
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
    /// A ragged field: mapped values and row offsets.
    Ragged(Box<ragged::RaggedSource>),
    /// A ragged field in an object store: values read by ranges, offsets in memory.
    RemoteRagged(Box<ragged::RemoteRagged>),
    /// A ragged field of whole files (an image folder's images), read per batch.
    Files(Box<image_folder::Files>),
    /// Rows held in memory (an image folder's labels, a WebDataset's class indices).
    Memory(Bytes),
    /// A ragged field of WebDataset members: runs into the mapped tar shards.
    Tar(Box<webdataset::Members>),
    /// Overlapping windows of a mapped token file (`--windows`).
    Windows(Box<tokens::Windows>),
    /// One part of documents packed into windows (`--pack`).
    Packed(Arc<tokens::Packer>, tokens::Part),
}

/// One field of a gathered batch as a transform takes it: the rows one after another, and for
/// a ragged field where each sample's bytes start (batch + 1 byte offsets, from 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldRows {
    /// The bytes of every sample, in batch order.
    pub data: Vec<u8>,
    /// A ragged field's byte offsets into `data`; `None` for a fixed-shape field.
    pub offsets: Option<Vec<u64>>,
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
    /// Dimension names, the sample dimension first (Zarr metadata; empty when unnamed).
    pub dims: Vec<String>,
    /// Total rows.
    num_samples: u64,
    /// Cache key prefix.
    id: u64,
    source: Source,
}

impl Field {
    /// Appends the rows `indices` (all `< num_samples`) to `tensor` as runs into the buffers that
    /// hold them: the shards' maps, decoded chunks, ranges fetched from a store. Nothing is copied
    /// here; the rows are copied once, when the caller builds the batch's message (or writes it
    /// to shared memory, or materialises it for a transform) on the same thread, which then lets
    /// the buffers go. Zarr blocks holding more than [`PIN_FACTOR`] times the rows (a full
    /// shuffle over big chunks) are not all held at once: rows are copied out as each is decoded.
    /// Returns the bytes read from storage (0 for local `.npy`, the bytes fetched for remote
    /// `.npy`, cache misses for Zarr).
    fn select_into(
        &self,
        indices: &[u64],
        tensor: &mut OutgoingTensor,
        cache: &ChunkCache,
    ) -> Result<u64, (u64, String)> {
        let row = self.bytes_per_sample;
        match &self.source {
            Source::Ragged(ragged) => ragged.select_into(indices, tensor),
            Source::RemoteRagged(ragged) => ragged.select_into(indices, tensor),
            Source::Files(files) => files.select_into(indices, tensor),
            // A shard is a chunk: a changed shard fails its rows.
            Source::Tar(members) => {
                members.select_into(indices, tensor).map_err(|(index, reason)| (index / self.chunk_len, reason))
            }
            Source::Packed(packer, part) => packer.select_into(*part, indices, tensor),
            Source::Windows(windows) => {
                let mut piece = None;
                for &index in indices {
                    let (map, start, big_endian) = windows.place(index);
                    let piece = match piece {
                        Some(piece) => piece,
                        None => {
                            // Checked once per batch: a file truncated under its map would raise SIGBUS.
                            map.check().map_err(|reason| (index, reason))?;
                            *piece.insert(tensor.add_piece(Piece { bytes: shared_bytes(map.clone()), big_endian }))
                        }
                    };
                    tensor.push(piece, start, row);
                }
                Ok(0)
            }
            Source::Memory(rows) => {
                let piece = tensor.add_piece(Piece { bytes: rows.clone(), big_endian: false });
                for &index in indices {
                    tensor.push(piece, index as usize * row, row);
                }
                Ok(0)
            }
            Source::Npy { shards, shard_starts } => {
                let shard_of = |index: u64| {
                    if shards.len() == 1 { 0 } else { shard_starts.partition_point(|&start| start <= index) - 1 }
                };
                if matches!(shards[0].data, ShardData::Remote { .. }) {
                    return self.select_remote(indices, tensor, shards, shard_starts, &shard_of);
                }
                // Each shard a batch touches is checked once, before any of its rows is read: a
                // file truncated under its map would raise SIGBUS instead of failing the batch.
                let mut pieces: Vec<Option<u32>> = vec![None; shards.len()];
                for &index in indices {
                    let shard_index = shard_of(index);
                    let shard = &shards[shard_index];
                    let ShardData::Mapped(map) = &shard.data else { unreachable!("a field's shards are all mapped") };
                    let piece = match pieces[shard_index] {
                        Some(piece) => piece,
                        None => {
                            map.check().map_err(|reason| (index, reason))?;
                            let piece = tensor
                                .add_piece(Piece { bytes: shared_bytes(map.clone()), big_endian: shard.big_endian });
                            pieces[shard_index] = Some(piece);
                            piece
                        }
                    };
                    let local = (index - shard_starts[shard_index]) as usize;
                    tensor.push(piece, shard.data_offset + local * row, row);
                }
                Ok(0)
            }
            Source::Zarr(zarr) if zarr.vlen.is_some() => zarr.select_vlen_into(self.id, indices, tensor, cache),
            Source::Zarr(zarr) => {
                let block_of = |index: u64| index / zarr.block_len;
                let mut decoded = 0;
                let start_of = |index: u64| (index - block_of(index) * zarr.block_len) as usize * row;
                let mut blocks: Vec<u64> = indices.iter().map(|&index| block_of(index)).collect();
                blocks.sort_unstable();
                blocks.dedup();
                if blocks.len() as u64 * zarr.block_len <= PIN_FACTOR * indices.len() as u64 {
                    // The blocks hold at most a few times what the batch does (block or
                    // sequential batches): hold each once and point the rows into them. From an
                    // object store, the chunks of those no one holds or decodes are reserved
                    // and read together first (requests), then decoded in ascending order.
                    let mut reservation =
                        zarr.reads_ahead().then(|| cache.reserve(blocks.iter().map(|&block| (self.id, block))));
                    let mut fetched: std::collections::HashMap<u64, zarr::EncodedBlock> = match &reservation {
                        Some(reserved) => {
                            let mine: Vec<u64> = reserved.keys().iter().map(|&(_, block)| block).collect();
                            zarr.fetch_encoded(&mine).into_iter().collect()
                        }
                        None => Default::default(),
                    };
                    let mut pieces = Vec::with_capacity(blocks.len());
                    for &block in &blocks {
                        let prefetched = fetched.remove(&block);
                        let (data, bytes) = cache
                            .get_or_decode_reserved((self.id, block), reservation.as_mut(), || {
                                zarr.decode_block(block, prefetched)
                            })
                            .map_err(|reason| (block, reason))?;
                        decoded += bytes;
                        pieces.push(tensor.add_piece(Piece { bytes: shared_bytes(data), big_endian: false }));
                    }
                    for &index in indices {
                        let piece = pieces[blocks.binary_search(&block_of(index)).expect("listed above")];
                        tensor.push(piece, start_of(index), row);
                    }
                } else {
                    // Rows scattered over many blocks (full shuffle over big chunks): copy each row
                    // out while its block is at hand rather than hold hundreds of blocks at once.
                    let mut copied = Vec::with_capacity(indices.len() * row);
                    let mut current = None;
                    for &index in indices {
                        let block = block_of(index);
                        let (data, bytes) = cache
                            .hold(&mut current, (self.id, block), || zarr.decode_block(block, None))
                            .map_err(|reason| (block, reason))?;
                        decoded += bytes;
                        copied.extend_from_slice(&data[start_of(index)..start_of(index) + row]);
                    }
                    let piece = tensor.add_piece(Piece { bytes: Bytes::from(copied), big_endian: false });
                    tensor.push(piece, 0, indices.len() * row);
                }
                Ok(decoded)
            }
        }
    }

    /// Selects rows of remote shards: the rows' byte ranges sorted, adjacent ones merged into one
    /// GET, every GET of the batch in flight at once (within `--io-concurrency`), then the rows
    /// appended in the order asked as runs into the fetched ranges. Returns the bytes fetched
    /// (what read amplification is counted against).
    fn select_remote(
        &self,
        indices: &[u64],
        tensor: &mut OutgoingTensor,
        shards: &[Shard],
        shard_starts: &[u64],
        shard_of: &dyn Fn(u64) -> usize,
    ) -> Result<u64, (u64, String)> {
        let row = self.bytes_per_sample;
        // (shard, byte offset, position in the batch), in storage order.
        let mut wanted: Vec<(usize, u64, usize)> = indices
            .iter()
            .enumerate()
            .map(|(position, &index)| {
                let shard = shard_of(index);
                let local = index - shard_starts[shard];
                (shard, shards[shard].data_offset as u64 + local * row as u64, position)
            })
            .collect();
        wanted.sort_unstable();
        // Where each row of the batch is: (piece, offset in it).
        let mut placed_rows = vec![(0u32, 0usize); indices.len()];
        let mut fetched = 0;
        let mut first = 0;
        while first < wanted.len() {
            let shard_index = wanted[first].0;
            let last = first + wanted[first..].iter().take_while(|w| w.0 == shard_index).count();
            let group = &wanted[first..last];
            let ShardData::Remote { storage, object, size, version } = &shards[shard_index].data else {
                unreachable!("a field's shards are all remote")
            };
            let rows: Vec<(u64, u64)> = group.iter().map(|&(_, offset, _)| (offset, row as u64)).collect();
            let (max_gap, max_bytes) = storage.row_requests(row as u64);
            let (ranges, placed) = coalesce(&rows, max_gap, max_bytes);
            let index_of = |w: &(usize, u64, usize)| indices[w.2];
            let layout = Rows { offset: shards[shard_index].data_offset as u64, bytes: row as u64 };
            let parts = storage
                .read_ranges(object, *size, version, &ranges, Some(layout))
                .map_err(|reason| (index_of(&group[0]), reason))?;
            fetched += parts.iter().map(|p| p.len() as u64).sum::<u64>();
            let big_endian = shards[shard_index].big_endian;
            let pieces: Vec<u32> =
                parts.iter().map(|part| tensor.add_piece(Piece { bytes: part.clone(), big_endian })).collect();
            for (w, (range, offset)) in group.iter().zip(placed) {
                if parts[range].len() < offset + row {
                    return Err((
                        index_of(w),
                        format!(
                            "{}/{object} returned {} bytes for bytes {}..{}; the object is shorter than its header \
                             says (rewrite it)",
                            storage.url(),
                            parts[range].len(),
                            ranges[range].start,
                            ranges[range].end
                        ),
                    ));
                }
                placed_rows[w.2] = (pieces[range], offset);
            }
            first = last;
        }
        for (piece, offset) in placed_rows {
            tensor.push(piece, offset, row);
        }
        Ok(fetched)
    }

    /// Whether samples differ in length (values plus offsets on the wire).
    pub fn is_ragged(&self) -> bool {
        match &self.source {
            Source::Ragged(_) | Source::RemoteRagged(_) | Source::Files(_) | Source::Tar(_) => true,
            Source::Zarr(zarr) => zarr.vlen.is_some(),
            Source::Npy { .. } | Source::Memory(_) | Source::Windows(_) | Source::Packed(..) => false,
        }
    }

    /// Each sample's length in rows, for a ragged field whose lengths are known without reading
    /// its values (a ragged `.npy` pair, locally or remote); `None` otherwise.
    pub fn ragged_lengths(&self) -> Option<Vec<u64>> {
        match &self.source {
            Source::Ragged(ragged) => Some(ragged.lengths(self.num_samples)),
            Source::RemoteRagged(ragged) => Some(ragged.lengths()),
            _ => None,
        }
    }

    /// For a ragged `.npy` pair (local or remote): the values of rows `from..to` of each
    /// `(sample, from, to)` and whether they are big-endian; `None` for other fields.
    pub fn ragged_spans(&self, spans: &[(u64, u64, u64)]) -> Option<Result<(Vec<Bytes>, bool), String>> {
        match &self.source {
            Source::Ragged(ragged) => Some(ragged.spans(spans)),
            Source::RemoteRagged(ragged) => Some(ragged.spans(spans)),
            _ => None,
        }
    }

    /// Bytes a batch of `indices` sends for this field. Reads a ragged field's offsets (and
    /// decodes a variable-length Zarr array's blocks through `cache`): call it off the async
    /// runtime.
    pub fn batch_bytes(&self, indices: &[u64], cache: &ChunkCache) -> u64 {
        match &self.source {
            Source::Zarr(zarr) if zarr.vlen.is_some() => zarr.vlen_batch_bytes(self.id, indices, cache),
            Source::Ragged(ragged) => ragged.batch_bytes(indices),
            Source::RemoteRagged(ragged) => ragged.batch_bytes(indices),
            Source::Files(files) => files.batch_bytes(indices),
            Source::Tar(members) => members.batch_bytes(indices),
            _ => indices.len() as u64 * self.bytes_per_sample as u64,
        }
    }

    /// Where sample `index` of this field is stored, for messages: its file or shard member.
    pub fn describe_sample(&self, index: u64) -> String {
        match &self.source {
            Source::Files(files) => files.describe(index),
            Source::Tar(members) => members.describe(index),
            _ => format!("row {index} of field '{}'", self.name),
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
            dimension_names: self.dims.clone(),
            ragged: self.is_ragged(),
            utf8: match &self.source {
                Source::Tar(members) => members.utf8,
                Source::Zarr(zarr) => zarr.vlen.is_some_and(|v| v.utf8),
                _ => false,
            },
        }
    }
}

/// How many times a batch's own bytes the Zarr blocks its rows point into may hold while its
/// message is built (a batch of 256 from a block-shuffle window of 8 blocks of 64 spans 2x).
const PIN_FACTOR: u64 = 4;

/// A named set of fields with one sample count.
#[derive(Debug)]
pub struct Dataset {
    /// Name clients use.
    pub name: String,
    /// Directory, archive or Zarr node it was opened from.
    pub dir: PathBuf,
    /// Samples per field.
    pub num_samples: u64,
    /// Fields in name order.
    pub fields: Vec<Field>,
    /// Arrays of a Zarr group that are not fields (xarray coordinates), with the reason.
    pub coordinates: Vec<Coordinate>,
    /// Where a Zarr group's member list came from (consolidated metadata or a listing).
    pub metadata_source: Option<&'static str>,
    /// The object store it is read from, for its request counters (`None` when local).
    pub storage: Option<Arc<ObjectStorage>>,
}

impl Dataset {
    /// Opens the dataset at `path`: a Zarr array or group when it holds Zarr metadata, an
    /// `.npz` archive, else a directory of `.npy` fields; with `select`, only those fields.
    /// Checks headers, lengths and shard agreement.
    ///
    /// # Errors
    /// A [`LoadError`] naming the file and the problem.
    pub fn open(
        name: &str,
        location: &Location,
        zarr_options: impl Into<ZarrOptions>,
        select: Option<&[String]>,
    ) -> Result<Dataset, LoadError> {
        let zarr_options: ZarrOptions = zarr_options.into();
        let mut coordinates = Vec::new();
        let mut metadata_source = None;
        let path = location.display();
        let default_name = path.file_stem().map_or_else(|| name.to_owned(), |s| s.to_string_lossy().into_owned());
        let mut from_zarr = |group: zarr::OpenedGroup| -> Result<Vec<Field>, LoadError> {
            coordinates = group.coordinates;
            metadata_source = Some(group.metadata_source);
            group.arrays.into_iter().map(|array| zarr_field(&path, array)).collect()
        };
        let shards = match location {
            Location::Local(path) => webdataset::shards(path)?,
            Location::Remote(_) => Vec::new(),
        };
        let fields: Vec<Field> = match location {
            Location::Local(path) if zarr::is_zarr(path) => {
                from_zarr(zarr::open(name, path, &default_name, zarr_options, select)?)?
            }
            Location::Local(path) if npz::is_npz(path) => npz::open_npz(name, path, select)?,
            Location::Local(path) if is_hdf5(path) => {
                return Err(LoadError::Hdf5File { dataset: name.to_owned(), path: path.clone() });
            }
            Location::Local(_) if !shards.is_empty() => webdataset::open(name, &shards, select)?,
            Location::Local(path) if image_folder::is_image_folder(path) => image_folder::open(name, path, select)?,
            Location::Local(path) if path.is_file() && path.extension().is_some_and(|e| e == "npy") => {
                npy::open_npy_file(name, path, select)?
            }
            Location::Local(path) => npy::open_npy_dir(name, path, select)?,
            Location::Remote(storage) => {
                let remote = |problem: String| LoadError::Remote {
                    dataset: name.to_owned(),
                    url: storage.url().to_owned(),
                    problem,
                };
                // A listing checks endpoint, bucket and credentials with clear messages; plain
                // HTTP cannot list, so there the Zarr metadata is asked for directly.
                let listing = if storage.is_http() { None } else { Some(storage.list().map_err(remote)?) };
                let zarr_root = match &listing {
                    Some(objects) => objects
                        .iter()
                        .any(|(object, ..)| ["zarr.json", ".zarray", ".zgroup"].contains(&object.as_str())),
                    // Each probe is a request: stop at the first document found.
                    None => {
                        let mut found = false;
                        for key in ["zarr.json", ".zgroup", ".zarray"] {
                            if storage.exists(key).map_err(remote)? {
                                found = true;
                                break;
                            }
                        }
                        found
                    }
                };
                if zarr_root {
                    let store = storage.zarr_storage();
                    let concurrency = storage.io_concurrency();
                    from_zarr(zarr::open_storage(
                        name,
                        store,
                        &path,
                        &default_name,
                        zarr_options,
                        select,
                        concurrency,
                    )?)?
                } else {
                    let objects = match listing {
                        Some(objects) => objects,
                        None => storage.list().map_err(remote)?,
                    };
                    let has = |ext: &str| objects.iter().any(|(object, ..)| object.ends_with(ext));
                    if has(".tar") && !has(".npy") {
                        let tars = objects.into_iter().filter(|(object, ..)| object.ends_with(".tar")).collect();
                        webdataset::open_remote(name, storage, tars, select)?
                    } else {
                        // No .npy at the top: an image folder is classes below it.
                        let all = if has(".npy") { None } else { Some(storage.list_all().map_err(remote)?) };
                        match all {
                            Some(all) if image_folder::is_image_listing(&all) => {
                                image_folder::open_remote(name, storage, all, select)?
                            }
                            _ => npy::open_remote_npy(name, storage, objects, select)?,
                        }
                    }
                }
            }
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
        Ok(Dataset {
            name: name.to_owned(),
            dir: path,
            num_samples: first.num_samples,
            fields,
            coordinates,
            metadata_source,
            storage: match location {
                Location::Remote(storage) => Some(storage.clone()),
                Location::Local(_) => None,
            },
        })
    }

    /// Bytes of one sample across all fields (ragged fields count 0: see
    /// [`Dataset::batch_bytes`]).
    pub fn bytes_per_sample(&self) -> usize {
        self.fields.iter().map(|f| f.bytes_per_sample).sum()
    }

    /// The first ragged field, if any.
    pub fn ragged_field(&self) -> Option<&Field> {
        self.fields.iter().find(|f| f.is_ragged())
    }

    /// Bytes a batch of `indices` sends, ragged fields counted by their samples' lengths (which
    /// reads their offsets: call it off the async runtime).
    pub fn batch_bytes(&self, indices: &[u64], cache: &ChunkCache) -> u64 {
        self.fields.iter().map(|f| f.batch_bytes(indices, cache)).sum()
    }

    /// Selects `indices` (already checked `< num_samples`) as one [`OutgoingTensor`] per field,
    /// whose rows are copied when it is encoded, and returns the bytes decoded from storage.
    /// Touches mapped pages, fetches ranges and decodes chunks, so call it off the async runtime.
    ///
    /// # Errors
    /// [`ReadError`] naming the dataset, field and chunk that could not be read.
    pub fn select(&self, indices: &[u64], cache: &ChunkCache) -> Result<(Vec<OutgoingTensor>, u64), ReadError> {
        let mut decoded = 0;
        let mut tensors = Vec::with_capacity(self.fields.len());
        for field in &self.fields {
            let shape = std::iter::once(indices.len() as u64).chain(field.sample_shape.iter().copied()).collect();
            let mut tensor = OutgoingTensor::new(field.name.clone(), field.dtype, shape);
            decoded += field.select_into(indices, &mut tensor, cache).map_err(|(block, reason)| ReadError {
                transient: crate::storage::is_transient(&reason),
                dataset: self.name.clone(),
                field: field.name.clone(),
                first_row: block * field.chunk_len,
                last_row: ((block + 1) * field.chunk_len).min(field.num_samples),
                reason,
            })?;
            tensors.push(tensor);
        }
        Ok((tensors, decoded))
    }

    /// Gathers `indices` into one contiguous little-endian buffer per field (what transforms
    /// take), and returns the bytes decoded from storage. Blocks like [`Dataset::select`].
    ///
    /// # Errors
    /// As [`Dataset::select`].
    pub fn gather(&self, indices: &[u64], cache: &ChunkCache) -> Result<(Vec<FieldRows>, u64), ReadError> {
        let (tensors, decoded) = self.select(indices, cache)?;
        let rows = self
            .fields
            .iter()
            .zip(&tensors)
            .map(|(field, tensor)| {
                // Offsets count rows of the values; transforms take them in bytes.
                let row_bytes = field.sample_shape.iter().product::<u64>() * field.dtype.size_bytes() as u64;
                let offsets = tensor.offsets.as_ref().map(|raw| {
                    raw.chunks_exact(8)
                        .map(|o| i64::from_le_bytes(o.try_into().unwrap_or_default()) as u64 * row_bytes)
                        .collect()
                });
                FieldRows { data: tensor.to_vec(), offsets }
            })
            .collect();
        Ok((rows, decoded))
    }

    /// Wire description, given the server's per-batch sample limit.
    pub fn info(&self, max_batch_samples: u64) -> DatasetInfo {
        DatasetInfo {
            name: self.name.clone(),
            num_samples: self.num_samples,
            fields: self.fields.iter().map(Field::info).collect(),
            max_batch_samples,
            derivation: String::new(),
            coordinates: self.coordinates.iter().map(coordinate_info).collect(),
        }
    }
}

fn coordinate_info(coordinate: &Coordinate) -> CoordinateInfo {
    CoordinateInfo {
        name: coordinate.name.clone(),
        dtype: coordinate.dtype.clone(),
        shape: coordinate.shape.clone(),
        dimension_names: coordinate.dims.clone(),
        role: coordinate.role.as_str().to_owned(),
        units: coordinate.units.clone(),
        calendar: coordinate.calendar.clone(),
        reason: coordinate.reason.clone(),
    }
}

/// The largest sample a field may have: a batch of one must still fit a gRPC message (whose
/// limit is at most 4 GiB), and sizes computed from it cannot overflow.
const MAX_SAMPLE_BYTES: u64 = 1 << 32;

fn zarr_field(path: &Path, opened: zarr::OpenedArray) -> Result<Field, LoadError> {
    let sample_shape = opened.shape[1..].to_vec();
    let ragged = opened.source.vlen.is_some();
    let bytes_per_sample = sample_shape
        .iter()
        .try_fold(opened.dtype.size_bytes() as u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_SAMPLE_BYTES)
        .ok_or_else(|| LoadError::Zarr {
            path: path.join(&opened.name),
            problem: crate::error::ZarrProblem::SampleTooLarge {
                array: opened.name.clone(),
                sample_shape: sample_shape.clone(),
                dtype: opened.dtype.name(),
                max_bytes: MAX_SAMPLE_BYTES,
            },
        })? as usize;
    Ok(Field {
        // A variable-length array's samples are ragged: their size is their values'.
        bytes_per_sample: if ragged { 0 } else { bytes_per_sample },
        name: opened.name,
        dtype: opened.dtype,
        sample_shape,
        chunk_len: opened.source.block_len,
        dims: opened.dims,
        num_samples: opened.shape[0],
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source: Source::Zarr(Box::new(opened.source)),
    })
}

/// Groups file (or member) names into fields by the naming rule of the module docs: `STEM` is a
/// single-file field, `FIELD-NNNNN` a shard of `FIELD`. Items are taken in name order.
fn group_fields<T>(mut items: Vec<(String, T)>, location: &Path) -> Result<BTreeMap<String, Vec<T>>, LoadError> {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    // field name -> (is a single FIELD.npy, its items in name order)
    let mut groups: BTreeMap<String, (bool, Vec<T>)> = BTreeMap::new();
    for (stem, item) in items {
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
            return Err(LoadError::AmbiguousField { field, dir: location.to_owned() });
        }
        entry.1.push(item);
    }
    Ok(groups.into_iter().map(|(field, (_, items))| (field, items)).collect())
}

/// Keeps the fields named in `select` (all when `None`), refusing names that are not fields.
fn select_fields<T>(
    dataset: &str,
    location: &Path,
    mut groups: BTreeMap<String, T>,
    select: Option<&[String]>,
) -> Result<BTreeMap<String, T>, LoadError> {
    let Some(select) = select else { return Ok(groups) };
    if let Some(unknown) = select.iter().find(|f| !groups.contains_key(*f)) {
        return Err(LoadError::UnknownField {
            dataset: dataset.to_owned(),
            field: unknown.clone(),
            location: location.to_owned(),
            available: groups.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    groups.retain(|field, _| select.contains(field));
    Ok(groups)
}

/// The signature every HDF5 file (netCDF-4 included) starts with.
const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// Whether `path` is a file that starts with the HDF5 signature.
fn is_hdf5(path: &Path) -> bool {
    let mut head = [0u8; 8];
    path.is_file()
        && std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
        && &head == HDF5_SIGNATURE
}

#[cfg(test)]
mod tests {
    use super::{zarr::MissingChunks, *};

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
        let ds =
            Dataset::open("d", &Location::Local(dir.path().to_owned()), MissingChunks::Error, None).expect("opens");
        assert_eq!(ds.num_samples, 10);
        assert_eq!(ds.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["x", "y"]);
        let (out, decoded) = ds.gather(&[9, 0, 3, 2], &ChunkCache::new(0, 1)).expect("gather");
        assert_eq!(decoded, 0);
        assert_eq!(out[0].data, le(&[9, 0, 3, 2]));
        assert_eq!(out[1].data, vec![18, 19, 0, 1, 6, 7, 4, 5]);
    }

    #[test]
    fn shards_whose_sample_counts_overflow_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Zero-byte samples: each header is possible on its own, their sum is not.
        write_npy(dir.path(), "x-00000.npy", DType::Uint8, &[1 << 63, 0], &[]);
        write_npy(dir.path(), "x-00001.npy", DType::Uint8, &[1 << 63, 0], &[]);
        let error = Dataset::open("d", &Location::Local(dir.path().to_owned()), MissingChunks::Error, None)
            .expect_err("overflow");
        assert!(matches!(error, LoadError::TooManySamples { .. }), "{error}");
        assert!(error.to_string().contains("field 'x'"), "{error}");
    }

    #[test]
    fn single_file_and_shards_of_one_field_conflict() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_npy(dir.path(), "x.npy", DType::Uint8, &[1], &[0]);
        write_npy(dir.path(), "x-00000.npy", DType::Uint8, &[1], &[0]);
        let err = Dataset::open("d", &Location::Local(dir.path().to_owned()), MissingChunks::Error, None)
            .expect_err("ambiguous");
        assert!(matches!(err, LoadError::AmbiguousField { ref field, .. } if field == "x"), "{err}");
    }
}
