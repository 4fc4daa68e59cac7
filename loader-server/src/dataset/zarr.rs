//! Zarr fields (format 2 and 3, any codec zarrs decodes: zstd, blosc, gzip, crc32c, sharding...),
//! read in blocks of whole chunks along axis 0 through the shared [`ChunkCache`].
//!
//! A block is the rows of one axis-0 chunk (for a sharded array, one inner chunk) across the
//! full extent of the other axes; decoding it once serves every sample in it.
//!
//! One-dimensional arrays of variable-length values are ragged fields, one value a sample:
//! format 3 `string` (`vlen-utf8`) and `bytes` (`vlen-bytes`), and format 2 object arrays with
//! numcodecs' `VLenUTF8`, `VLenBytes` or `VLenArray` filter. Their decoded blocks hold the
//! values' offsets before the values ([`VlenBlock`]); a chunk may decode to at most
//! `--max-vlen-chunk-bytes`, checked before anything is decoded.

use std::{io::Read, path::Path, sync::Arc};

use conveyor_proto::DType;
use zarrs::{
    array::{Array, ArrayBytes, ArrayShardedExt, ArraySubset, data_type as zdt},
    filesystem::FilesystemStore,
    group::Group,
    metadata::{ArrayMetadata, v2::ArrayMetadataV2, v3::ArrayMetadataV3},
    storage::ReadableStorageTraits,
    storage::{ReadableListableStorage, ReadableListableStorageTraits, StoreKey, StorePrefix},
};

use bytes::Bytes;
use conveyor_proto::wire::{OutgoingTensor, Piece};

use super::{chunk_cache::ChunkCache, ragged::OffsetsWriter};
use crate::{
    error::{LoadError, ZarrProblem},
    storage::shared_bytes,
};

/// What to do when a chunk file is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingChunks {
    /// Fail the batches that need it, naming the chunk (a lost file is an error).
    Error,
    /// Zarr semantics: an absent chunk holds the fill value (zarr-python skips writing chunks
    /// that are entirely fill value unless `write_empty_chunks=True`).
    Fill,
}

/// How Zarr arrays open: the flags that concern them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZarrOptions {
    /// What an absent chunk means.
    pub missing: MissingChunks,
    /// The most bytes one chunk of a variable-length array may decode to (fixed-size chunks
    /// are bounded by their shape).
    pub max_vlen_chunk_bytes: u64,
}

/// `--max-vlen-chunk-bytes` unless set.
pub const DEFAULT_MAX_VLEN_CHUNK_BYTES: u64 = 256 << 20;

impl From<MissingChunks> for ZarrOptions {
    fn from(missing: MissingChunks) -> ZarrOptions {
        ZarrOptions { missing, max_vlen_chunk_bytes: DEFAULT_MAX_VLEN_CHUNK_BYTES }
    }
}

/// What a variable-length array holds: one value of any length per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vlen {
    /// Element type of the values: `uint8` for bytes and text, the dtype of a numcodecs
    /// `VLenArray` otherwise.
    pub dtype: DType,
    /// Text (`vlen-utf8`): bytes flagged as UTF-8 on the wire.
    pub utf8: bool,
}

/// One Zarr array serving as a field.
pub struct ZarrSource {
    array: Array<dyn ReadableListableStorageTraits>,
    /// Rows per block (axis-0 chunk length, or inner chunk length when sharded).
    pub block_len: u64,
    missing: MissingChunks,
    /// Bytes of one element.
    element_bytes: u64,
    /// Chunks [`ZarrSource::fetch_encoded`] reads at once: `--io-concurrency` on an object
    /// store, where each read is a request; 1 on a local file system (nothing to overlap).
    fetch_concurrency: usize,
    /// The compressors of its codec chain whose output is bounded by the chunk's size before
    /// zarrs decodes it (see [`ZarrSource::check_declared_size`]).
    compressors: Compressors,
    /// Set for an array of variable-length values (a ragged field).
    pub vlen: Option<Vlen>,
    /// The most bytes one of its chunks may decode to when it is variable-length.
    max_vlen_chunk_bytes: u64,
}

/// Compressors in an array's codec chain that a chunk is checked against before decoding (zstd
/// and gzip are recognised by their magic numbers whatever the metadata says).
#[derive(Debug, Clone, Copy, Default)]
struct Compressors {
    blosc: bool,
    zlib: bool,
    /// Compressors in the chain (zstd inside gzip is two): each layer is checked in turn.
    layers: usize,
}

/// Codec names (format 3, and format 2 ids) of bytes-to-bytes compressors.
const COMPRESSOR_NAMES: [&str; 7] = ["zstd", "gzip", "zlib", "blosc", "bz2", "lz4", "lzma"];

impl Compressors {
    /// Those named in `array`'s codec metadata (format 3 names, and format 2 compressor ids as
    /// zarrs maps them).
    fn of(array: &Array<dyn ReadableListableStorageTraits>) -> Compressors {
        let names: Vec<String> = array
            .codecs()
            .create_metadatas(&zarrs::array::CodecMetadataOptions::default())
            .iter()
            .map(|m| m.name().to_ascii_lowercase())
            .collect();
        Compressors {
            blosc: names.iter().any(|n| n.contains("blosc")),
            zlib: names.iter().any(|n| n.contains("zlib")),
            layers: names.iter().filter(|n| COMPRESSOR_NAMES.iter().any(|c| n.contains(c))).count(),
        }
    }
}

/// A block's one encoded chunk as [`ZarrSource::fetch_encoded`] read it: its bytes, `None`
/// when the chunk is absent, or a message naming the chunk.
pub type EncodedBlock = Result<Option<Vec<u8>>, String>;

impl std::fmt::Debug for ZarrSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZarrSource").field("shape", &self.array.shape()).field("block_len", &self.block_len).finish()
    }
}

/// Whether `path` holds Zarr metadata (an array or a group, format 2 or 3).
pub fn is_zarr(path: &Path) -> bool {
    ["zarr.json", ".zarray", ".zgroup"].iter().any(|f| path.join(f).is_file())
}

/// `array` or `group` as the root's metadata says (the `node_type` of `zarr.json` for format 3,
/// `.zarray`/`.zgroup` for format 2; `None` when it says neither), with the `zarr.json` document
/// when there is one. `zarr.json` is read first: on a store that cannot list (plain HTTP) each
/// probe is a request, and format 3 is what zarr-python writes by default.
fn root_metadata(
    storage: &ReadableListableStorage,
    path: &Path,
) -> Result<(Option<String>, Option<serde_json::Value>), LoadError> {
    if let Some(document) = read_json(storage, path, "zarr.json")? {
        let node_type = document.get("node_type").and_then(serde_json::Value::as_str).map(str::to_owned);
        return Ok((node_type, Some(document)));
    }
    if read_json(storage, path, ".zarray")?.is_some() {
        return Ok((Some("array".into()), None));
    }
    if read_json(storage, path, ".zgroup")?.is_some() {
        return Ok((Some("group".into()), None));
    }
    Ok((None, None))
}

/// A field's facts plus its source.
pub struct OpenedArray {
    /// Field name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Full array shape.
    pub shape: Vec<u64>,
    /// Dimension names as the metadata gives them (empty when it gives none).
    pub dims: Vec<String>,
    /// The source.
    pub source: ZarrSource,
}

/// An array of a group that is not served as a field (an xarray coordinate, or a data variable
/// not chosen or without the sample dimension first), described from its metadata alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinate {
    /// Array name.
    pub name: String,
    /// Whether xarray counts it as a coordinate or as a data variable.
    pub role: ArrayRole,
    /// Data type as the metadata writes it (`float64`, `<U4`, `fixed_length_utf32` ...).
    pub dtype: String,
    /// Full array shape.
    pub shape: Vec<u64>,
    /// Dimension names.
    pub dims: Vec<String>,
    /// The CF `units` attribute (`days since 2000-01-01` for a datetime xarray encoded as
    /// integers); empty when absent.
    pub units: String,
    /// The CF `calendar` attribute; empty when absent.
    pub calendar: String,
    /// Why it is not a field (logged at start-up).
    pub reason: String,
}

/// What an array that is not a field is to xarray.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayRole {
    /// A dimension coordinate (1-d, named after its dimension) or one named in a `coordinates`
    /// attribute.
    Coordinate,
    /// A data variable that is not served.
    Variable,
}

impl ArrayRole {
    /// The name the wire and the logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            ArrayRole::Coordinate => "coordinate",
            ArrayRole::Variable => "variable",
        }
    }
}

/// What a Zarr array or group serves.
pub struct OpenedGroup {
    /// The fields, in name order.
    pub arrays: Vec<OpenedArray>,
    /// The group's other arrays.
    pub coordinates: Vec<Coordinate>,
    /// Where the member list came from: `.zmetadata`, `zarr.json (consolidated)` or a listing.
    pub metadata_source: &'static str,
}

fn zarr_error(path: &Path, problem: ZarrProblem) -> LoadError {
    LoadError::Zarr { path: path.to_owned(), problem }
}

/// zarrs' error, kept whole for [`ZarrProblem`].
fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(error)
}

fn dtype_of(array: &Array<dyn ReadableListableStorageTraits>) -> Option<DType> {
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

/// The variable-length layout of `array`, if it has one: `string` and `bytes` data types
/// (format 2 object arrays read as `string`; their filter says bytes or text), or a numcodecs
/// `VLenArray` of `vlen_array` elements (see [`vlen_array_as_bytes`]).
///
/// # Errors
/// A `VLenArray` whose element type Conveyor does not serve, or stores big-endian.
fn vlen_of(
    array: &Array<dyn ReadableListableStorageTraits>,
    vlen_array: Option<&str>,
) -> Result<Option<Vlen>, ZarrProblem> {
    let t = array.data_type();
    if t.is::<zdt::BytesDataType>() {
        return Ok(Some(Vlen { dtype: DType::Uint8, utf8: false }));
    }
    if !t.is::<zdt::StringDataType>() {
        return Ok(None);
    }
    if let Some(declared) = vlen_array {
        let code = declared.trim_start_matches(['<', '|', '=']);
        return match DType::from_numpy_code(code) {
            Some(dtype) if !declared.starts_with('>') || dtype.size_bytes() == 1 => {
                Ok(Some(Vlen { dtype, utf8: false }))
            }
            _ => Err(ZarrProblem::UnsupportedDtype { data_type: format!("VLenArray of '{declared}'") }),
        };
    }
    let codecs = array.codecs().create_metadatas(&zarrs::array::CodecMetadataOptions::default());
    let names: Vec<String> = codecs.iter().map(|codec| codec.name().to_ascii_lowercase().replace('_', "-")).collect();
    if names.iter().any(|name| name.contains("vlen-bytes")) {
        return Ok(Some(Vlen { dtype: DType::Uint8, utf8: false }));
    }
    // An object array needs a codec that says how its objects are stored.
    if !names.iter().any(|name| name.contains("vlen")) {
        return Err(ZarrProblem::ObjectWithoutCodec { data_type: t.to_string() });
    }
    Ok(Some(Vlen { dtype: DType::Uint8, utf8: true }))
}

/// A format 2 `.zarray` document's numcodecs `VLenArray` filter, rewritten as `VLenBytes`, and
/// the element type it named. The two encode a chunk alike (an item count, then each item's
/// byte length and bytes); zarrs decodes `vlen-bytes` but not `vlen-array`, and the values are
/// then read as elements of that type.
fn vlen_array_as_bytes(document: &mut serde_json::Value) -> Option<String> {
    let filters = document.get_mut("filters")?.as_array_mut()?;
    let filter = filters.iter_mut().find(|f| f.get("id").and_then(serde_json::Value::as_str) == Some("vlen-array"))?;
    let dtype = filter.get("dtype").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
    *filter = serde_json::json!({ "id": "vlen-bytes" });
    Some(dtype)
}

/// Opens the format 2 array at `node` (`/` or `/NAME`) from its `.zarray` document, a
/// `VLenArray` filter read as [`vlen_array_as_bytes`] says; with the element type it named.
fn array_from_v2(
    store: &ReadableListableStorage,
    node: &str,
    mut document: serde_json::Value,
) -> Result<(Array<dyn ReadableListableStorageTraits>, Option<String>), Box<dyn std::error::Error + Send + Sync>> {
    let vlen_array = vlen_array_as_bytes(&mut document);
    // zarrs tags its format 2 metadata with a node type, as format 3 documents are.
    document["node_type"] = "array".into();
    let metadata = ArrayMetadata::V2(serde_json::from_value::<ArrayMetadataV2>(document).map_err(boxed)?);
    Ok((Array::new_with_metadata(store.clone(), node, metadata).map_err(boxed)?, vlen_array))
}

fn open_one(
    array_path: &Path,
    name: String,
    dims: Vec<String>,
    (array, vlen_array): (Array<dyn ReadableListableStorageTraits>, Option<String>),
    options: ZarrOptions,
    fetch_concurrency: usize,
) -> Result<OpenedArray, LoadError> {
    let vlen = vlen_of(&array, vlen_array.as_deref()).map_err(|problem| zarr_error(array_path, problem))?;
    let dtype = vlen.map(|v| v.dtype).or_else(|| dtype_of(&array)).ok_or_else(|| {
        zarr_error(array_path, ZarrProblem::UnsupportedDtype { data_type: array.data_type().to_string() })
    })?;
    let shape = array.shape().to_vec();
    if shape.is_empty() {
        return Err(zarr_error(array_path, ZarrProblem::ZeroDimensional));
    }
    if vlen.is_some() && shape.len() != 1 {
        return Err(zarr_error(array_path, ZarrProblem::VlenNotOneDimensional { shape }));
    }
    let zeros = vec![0u64; shape.len()];
    let outer = array.chunk_shape(&zeros).map_err(|e| zarr_error(array_path, ZarrProblem::Store(boxed(e))))?;
    let inner = array.effective_subchunk_shape().unwrap_or(outer);
    let block_len = inner[0].get();
    let compressors = Compressors::of(&array);
    Ok(OpenedArray {
        name,
        dtype,
        shape,
        dims,
        source: ZarrSource {
            array,
            block_len,
            missing: options.missing,
            element_bytes: dtype.size_bytes() as u64,
            fetch_concurrency: fetch_concurrency.max(1),
            compressors,
            vlen,
            max_vlen_chunk_bytes: options.max_vlen_chunk_bytes,
        },
    })
}

/// A child array of a group as its metadata document describes it, before anything is opened
/// (coordinates may have data types no field could have, such as strings).
#[derive(Debug, Clone)]
struct Member {
    name: String,
    /// `zarr.json` (format 3), or `.zarray` with the `.zattrs` under `attributes` (format 2).
    metadata: serde_json::Value,
}

impl Member {
    fn format(&self) -> u64 {
        self.metadata.get("zarr_format").and_then(serde_json::Value::as_u64).unwrap_or(3)
    }

    fn shape(&self) -> Vec<u64> {
        let shape = self.metadata.get("shape").and_then(serde_json::Value::as_array);
        shape.map(|dims| dims.iter().filter_map(serde_json::Value::as_u64).collect()).unwrap_or_default()
    }

    fn attribute(&self, key: &str) -> Option<&serde_json::Value> {
        self.metadata.get("attributes")?.get(key)
    }

    /// Dimension names: format 3 `dimension_names`, else xarray's `_ARRAY_DIMENSIONS` attribute.
    /// An unnamed dimension is `""`; `None` when the metadata names none.
    fn dims(&self) -> Option<Vec<String>> {
        let names = |value: &serde_json::Value| -> Option<Vec<String>> {
            let names: Vec<String> =
                value.as_array()?.iter().map(|n| n.as_str().unwrap_or_default().to_owned()).collect();
            names.iter().any(|n| !n.is_empty()).then_some(names)
        };
        self.metadata
            .get("dimension_names")
            .and_then(names)
            .or_else(|| self.attribute("_ARRAY_DIMENSIONS").and_then(names))
    }

    /// A text attribute (CF `units`, `calendar`); empty when absent or not text.
    fn text_attribute(&self, key: &str) -> String {
        self.attribute(key).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned()
    }

    /// Names in the CF `coordinates` attribute (how xarray marks non-dimension coordinates).
    fn coordinate_names(&self) -> Vec<String> {
        coordinate_names(self.metadata.get("attributes"))
    }

    fn dtype(&self) -> String {
        let dtype = self.metadata.get("data_type").or_else(|| self.metadata.get("dtype"));
        match dtype {
            Some(serde_json::Value::String(name)) => name.clone(),
            Some(other) => {
                other.get("name").and_then(serde_json::Value::as_str).map_or_else(|| other.to_string(), str::to_owned)
            }
            None => "unknown".to_owned(),
        }
    }

    /// The zarrs metadata of this member.
    /// Opens the member as an array, with a `VLenArray`'s element type (see [`array_from_v2`]).
    fn open_array(
        &self,
        store: &ReadableListableStorage,
    ) -> Result<(Array<dyn ReadableListableStorageTraits>, Option<String>), Box<dyn std::error::Error + Send + Sync>>
    {
        let node = format!("/{}", self.name);
        if self.format() == 2 {
            return array_from_v2(store, &node, self.metadata.clone());
        }
        let metadata = serde_json::from_value::<ArrayMetadataV3>(self.metadata.clone()).map_err(boxed)?;
        Ok((Array::new_with_metadata(store.clone(), &node, ArrayMetadata::V3(metadata)).map_err(boxed)?, None))
    }
}

fn coordinate_names(attributes: Option<&serde_json::Value>) -> Vec<String> {
    let text = attributes.and_then(|a| a.get("coordinates")).and_then(serde_json::Value::as_str).unwrap_or_default();
    text.split_whitespace().map(str::to_owned).collect()
}

/// The JSON document at `key` of `storage` (`None` when absent); `path` names the storage.
fn read_json(
    storage: &ReadableListableStorage,
    path: &Path,
    key: &str,
) -> Result<Option<serde_json::Value>, LoadError> {
    let shown = path.join(key);
    let store_key = StoreKey::new(key).map_err(|e| zarr_error(&shown, ZarrProblem::Store(boxed(e))))?;
    let bytes = storage.get(&store_key).map_err(|e| zarr_error(&shown, ZarrProblem::Unreadable(boxed(e))))?;
    let Some(bytes) = bytes else { return Ok(None) };
    let document: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| zarr_error(&shown, ZarrProblem::NotJson(e)))?;
    as_object(document, &shown).map(Some)
}

/// Metadata documents are JSON objects; anything else is refused before it is indexed.
fn as_object(document: serde_json::Value, shown: &Path) -> Result<serde_json::Value, LoadError> {
    if document.is_object() { Ok(document) } else { Err(zarr_error(shown, ZarrProblem::NotObject)) }
}

/// The group's own attributes and its direct child arrays, from consolidated metadata when the
/// group has it (format 2 `.zmetadata`, zarr-python 3's `consolidated_metadata` in `zarr.json`),
/// else from each child's metadata documents (which needs a store that lists: a file system or
/// S3, not plain HTTP).
///
/// `zarr_json` is the group's `zarr.json` as [`root_metadata`] read it (not read again).
fn list_members(
    storage: &ReadableListableStorage,
    path: &Path,
    zarr_json: Option<serde_json::Value>,
) -> Result<(serde_json::Value, Vec<Member>, &'static str), LoadError> {
    let direct = |key: &str| !key.is_empty() && !key.contains('/');
    if let Some(consolidated) = read_json(storage, path, ".zmetadata")? {
        let metadata = consolidated
            .get("metadata")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| zarr_error(&path.join(".zmetadata"), ZarrProblem::NoConsolidatedMetadata))?;
        let mut members = Vec::new();
        for (key, value) in metadata {
            if let Some(name) = key.strip_suffix("/.zarray").filter(|name| direct(name)) {
                let mut value = as_object(value.clone(), &path.join(".zmetadata").join(key))?;
                let attributes = metadata.get(&format!("{name}/.zattrs")).cloned().unwrap_or_default();
                value["attributes"] = attributes;
                members.push(Member { name: name.to_owned(), metadata: value });
            }
        }
        let attributes = metadata.get(".zattrs").cloned().unwrap_or_default();
        return Ok((attributes, members, ".zmetadata"));
    }
    let group = zarr_json;
    let group_attributes = match &group {
        Some(group) => group.get("attributes").cloned().unwrap_or_default(),
        None => read_json(storage, path, ".zattrs")?.unwrap_or_default(),
    };
    let consolidated = group.as_ref().and_then(|g| g.get("consolidated_metadata")?.get("metadata")?.as_object());
    if let Some(metadata) = consolidated {
        // A document that is not an object has no node type, so it is never a member.
        let members = metadata
            .iter()
            .filter(|(key, value)| {
                direct(key) && value.get("node_type").and_then(serde_json::Value::as_str) == Some("array")
            })
            .map(|(key, value)| Member { name: key.clone(), metadata: value.clone() })
            .collect();
        return Ok((group_attributes, members, "zarr.json (consolidated)"));
    }
    let listing =
        storage.list_dir(&StorePrefix::root()).map_err(|e| zarr_error(path, ZarrProblem::CannotList(boxed(e))))?;
    let mut members = Vec::new();
    for prefix in listing.prefixes() {
        let name = prefix.as_str().trim_end_matches('/').to_owned();
        if !direct(&name) {
            continue;
        }
        if let Some(mut zarray) = read_json(storage, path, &format!("{name}/.zarray"))? {
            zarray["attributes"] = read_json(storage, path, &format!("{name}/.zattrs"))?.unwrap_or_default();
            members.push(Member { name, metadata: zarray });
        } else if let Some(document) = read_json(storage, path, &format!("{name}/zarr.json"))?
            && document.get("node_type").and_then(serde_json::Value::as_str) == Some("array")
        {
            members.push(Member { name, metadata: document });
        }
    }
    Ok((group_attributes, members, "a listing of the group"))
}

/// What one array of a group is, given the sample dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Field,
    /// Not a field, and why.
    Coordinate(String),
}

/// Decides which arrays of a group are fields. Without dimension names every array is a field
/// (the length check then names any that disagree). With them (xarray), the sample dimension
/// is the first dimension of the data variables (the selected arrays, when `select` is given),
/// and arrays that do not start with it are coordinates.
///
/// `members` are (name, dimension names or `None`), `coordinates` the names xarray marks as
/// coordinates. Returns each member's role.
fn classify(
    members: &[(String, Option<Vec<String>>)],
    coordinates: &[String],
    select: Option<&[String]>,
) -> Result<Vec<Role>, ZarrProblem> {
    let selected = |name: &str| select.is_none_or(|s| s.iter().any(|f| f == name));
    if members.iter().all(|(_, dims)| dims.is_none()) {
        return Ok(members
            .iter()
            .map(|(name, _)| if selected(name) { Role::Field } else { Role::Coordinate("not in --fields".into()) })
            .collect());
    }
    let is_coordinate = |name: &str, dims: &Option<Vec<String>>| {
        coordinates.iter().any(|c| c == name) || dims.as_deref().is_some_and(|d| d.len() == 1 && d[0] == name)
    };
    // Data variables: the selection, else every array that is not a coordinate.
    let variables: Vec<&(String, Option<Vec<String>>)> = members
        .iter()
        .filter(|(name, dims)| if select.is_some() { selected(name) } else { !is_coordinate(name, dims) })
        .collect();
    let firsts: Vec<(&str, &str)> = variables
        .iter()
        .filter_map(|(name, dims)| Some((name.as_str(), dims.as_ref()?.first()?.as_str())))
        .filter(|(_, first)| !first.is_empty())
        .collect();
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for (_, first) in &firsts {
        match counts.iter_mut().find(|(d, _)| d == first) {
            Some((_, n)) => *n += 1,
            None => counts.push((first, 1)),
        }
    }
    counts.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    let describe =
        || firsts.iter().map(|(name, first)| format!("{name} ({first}, ...)")).collect::<Vec<_>>().join(", ");
    let sample_dim = match counts.as_slice() {
        [] => {
            return Err(ZarrProblem::NoSampleDimension);
        }
        [(only, _)] => *only,
        [(first, n), (_, m), ..] if n > m && select.is_none() => *first,
        _ => {
            let what = if select.is_some() { "the fields chosen with --fields" } else { "the data variables" };
            return Err(ZarrProblem::MixedSampleDimensions { what, starts: describe() });
        }
    };
    let mut roles = Vec::with_capacity(members.len());
    for (name, dims) in members {
        let role = match dims.as_deref() {
            _ if !selected(name) => Role::Coordinate("not in --fields".into()),
            None => Role::Field,
            Some([first, ..]) if first == sample_dim && (select.is_some() || !is_coordinate(name, dims)) => Role::Field,
            Some([first, ..]) if first == sample_dim => Role::Coordinate(format!(
                "a coordinate along the sample dimension '{sample_dim}' (serve it as a field by naming it in --fields)"
            )),
            Some(dims) if select.is_none() && is_coordinate(name, &Some(dims.to_vec())) => {
                Role::Coordinate(format!("a coordinate (dimensions: {})", dims.join(", ")))
            }
            Some(dims) if dims.iter().any(|d| d == sample_dim) => Role::Coordinate(format!(
                "its dimensions ({}) have the sample dimension '{sample_dim}' but not first; write it with \
                 '{sample_dim}' first (xarray: .transpose('{sample_dim}', ...))",
                dims.join(", ")
            )),
            Some(dims) => Role::Coordinate(format!(
                "its dimensions ({}) do not include the sample dimension '{sample_dim}'",
                dims.join(", ")
            )),
        };
        if let (Some(_), true, Role::Coordinate(reason)) = (select, selected(name), &role) {
            return Err(ZarrProblem::NotAField { name: name.clone(), reason: reason.clone() });
        }
        roles.push(role);
    }
    if !roles.contains(&Role::Field) {
        return Err(ZarrProblem::NoFieldAlong { sample_dim: sample_dim.to_owned() });
    }
    Ok(roles)
}

/// Opens a Zarr array (one field, named `default_name`) or group (one field per data variable,
/// see [`classify`]), keeping only the fields in `select` when it is given.
///
/// # Errors
/// [`LoadError::Zarr`] naming the path and the problem; [`LoadError::UnknownField`] for a name
/// in `select` that the group does not have.
pub fn open(
    dataset: &str,
    path: &Path,
    default_name: &str,
    options: impl Into<ZarrOptions>,
    select: Option<&[String]>,
) -> Result<OpenedGroup, LoadError> {
    let store: ReadableListableStorage =
        Arc::new(FilesystemStore::new(path).map_err(|e| zarr_error(path, ZarrProblem::Store(boxed(e))))?);
    open_storage(dataset, store, path, default_name, options, select, 1)
}

/// [`open`] for any zarrs storage (a local directory, an object-store prefix); `path` names it
/// in messages. The fields read up to `fetch_concurrency` chunks of a batch at once (see
/// [`ZarrSource::fetch_encoded`]).
///
/// # Errors
/// As [`open`].
pub fn open_storage(
    dataset: &str,
    store: ReadableListableStorage,
    path: &Path,
    default_name: &str,
    options: impl Into<ZarrOptions>,
    select: Option<&[String]>,
    fetch_concurrency: usize,
) -> Result<OpenedGroup, LoadError> {
    let options = options.into();
    // Decide array or group from the metadata first, so that a broken array is reported with
    // the array's problem rather than as "not a group".
    let (node_type, zarr_json) = root_metadata(&store, path)?;
    if node_type.as_deref() == Some("array") {
        check_selection(dataset, path, select, &[default_name.to_owned()], &[])?;
        let metadata_error = |error| zarr_error(path, ZarrProblem::Metadata { node: "array", error });
        // A format 2 array with a VLenArray filter is opened from its rewritten document.
        let v2_vlen_array = match zarr_json {
            Some(_) => None,
            None => read_json(&store, path, ".zarray")?.filter(|d| vlen_array_as_bytes(&mut d.clone()).is_some()),
        };
        let (array, vlen_array) = match v2_vlen_array {
            Some(document) => array_from_v2(&store, "/", document).map_err(metadata_error)?,
            None => (Array::open(store, "/").map_err(|e| metadata_error(boxed(e)))?, None),
        };
        let dims = array.dimension_names().as_ref().map(|d| d.iter().map(|n| n.clone().unwrap_or_default()).collect());
        return Ok(OpenedGroup {
            arrays: vec![open_one(
                path,
                default_name.to_owned(),
                dims.unwrap_or_default(),
                (array, vlen_array),
                options,
                fetch_concurrency,
            )?],
            coordinates: Vec::new(),
            metadata_source: "the array's metadata",
        });
    }
    Group::open(store.clone(), "/")
        .map_err(|e| zarr_error(path, ZarrProblem::Metadata { node: "group", error: boxed(e) }))?;
    let (group_attributes, mut members, metadata_source) = list_members(&store, path, zarr_json)?;
    members.sort_by(|a, b| a.name.cmp(&b.name));
    if members.is_empty() {
        return Err(zarr_error(path, ZarrProblem::EmptyGroup));
    }
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let mut coordinate_attr = coordinate_names(Some(&group_attributes));
    for member in &members {
        coordinate_attr.extend(member.coordinate_names());
    }
    let facts: Vec<(String, Option<Vec<String>>)> = members.iter().map(|m| (m.name.clone(), m.dims())).collect();
    let dimension_coordinates = facts.iter().filter(|(name, dims)| dims.as_deref() == Some(std::slice::from_ref(name)));
    let marked: Vec<String> =
        coordinate_attr.iter().cloned().chain(dimension_coordinates.map(|(n, _)| n.clone())).collect();
    check_selection(dataset, path, select, &names, &marked)?;
    let roles = classify(&facts, &coordinate_attr, select).map_err(|problem| zarr_error(path, problem))?;
    let mut opened = OpenedGroup { arrays: Vec::new(), coordinates: Vec::new(), metadata_source };
    for (member, role) in members.into_iter().zip(roles) {
        let member_path = path.join(&member.name);
        let dims = member.dims().unwrap_or_default();
        match role {
            Role::Field => {
                let array = member
                    .open_array(&store)
                    .map_err(|error| zarr_error(&member_path, ZarrProblem::Metadata { node: "array", error }))?;
                opened.arrays.push(open_one(&member_path, member.name, dims, array, options, fetch_concurrency)?);
            }
            Role::Coordinate(reason) => opened.coordinates.push(Coordinate {
                role: if marked.contains(&member.name) { ArrayRole::Coordinate } else { ArrayRole::Variable },
                dtype: member.dtype(),
                shape: member.shape(),
                units: member.text_attribute("units"),
                calendar: member.text_attribute("calendar"),
                name: member.name,
                dims,
                reason,
            }),
        }
    }
    Ok(opened)
}

/// Refuses a `--fields` name that is not an array of the group, naming those that are.
fn check_selection(
    dataset: &str,
    path: &Path,
    select: Option<&[String]>,
    names: &[String],
    coordinates: &[String],
) -> Result<(), LoadError> {
    let Some(unknown) = select.into_iter().flatten().find(|f| !names.contains(f)) else { return Ok(()) };
    let available = names
        .iter()
        .map(|n| if coordinates.contains(n) { format!("{n} (coordinate)") } else { n.clone() })
        .collect::<Vec<_>>()
        .join(", ");
    Err(LoadError::UnknownField {
        dataset: dataset.to_owned(),
        field: unknown.clone(),
        location: path.to_owned(),
        available,
    })
}

/// The zstd frame magic number, as it starts a zstd-compressed chunk.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The gzip member magic number and deflate method.
const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
/// A blosc chunk's header.
const BLOSC_HEADER_BYTES: usize = 16;

/// How much larger than the chunk's decoded size a compressed inner layer may be: compressing
/// incompressible bytes adds headers and block overheads (well under an eighth), never more.
fn layer_slack(holds: u64) -> u64 {
    holds / 8 + 64 * 1024
}

/// Bytes `reader` decodes, read into nothing, stopping at `limit` or at the first error (what
/// was decoded before it counts): memory stays at the copy buffer whatever the stream says.
fn decoded_len(reader: &mut dyn std::io::Read, limit: u64) -> u64 {
    let mut buffer = [0u8; 64 << 10];
    let mut total = 0u64;
    while total < limit {
        let want = buffer.len().min(usize::try_from(limit - total).unwrap_or(usize::MAX));
        match reader.read(&mut buffer[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    total
}

impl ZarrSource {
    /// Refuses a compressed chunk that would decode to more bytes than a chunk of its shape
    /// holds, before zarrs decodes it (its decoders allocate and fill whatever the stream says: a
    /// 98 KB zstd chunk can declare 3 GiB, a 3 MB gzip one inflates to 3 GiB). zstd: the frames'
    /// declared sizes when every byte is a frame, else every frame decoded into nothing, stopping
    /// one byte past the bound (bytes after the frames, such as a crc32c checksum, end it); gzip
    /// (every member) and zlib: decoded the same way; blosc: its header's decoded size. In a
    /// chain of compressors (zstd inside gzip) each outer layer is decoded into memory, bounded
    /// by the chunk's size plus [`layer_slack`], and the next layer is checked in what it gave.
    fn check_declared_size(&self, raw: &[u8], chunk_indices: &[u64]) -> Result<(), String> {
        let shape = self.array.chunk_shape(chunk_indices).map_err(|e| e.to_string())?;
        let elements = shape.iter().try_fold(1u64, |n, d| n.checked_mul(d.get()));
        let holds = match self.vlen {
            // Variable-length values: their count and length prefixes included.
            Some(_) => self.max_vlen_chunk_bytes,
            None => elements.and_then(|n| n.checked_mul(self.element_bytes)).unwrap_or(u64::MAX),
        };
        let shape: Vec<u64> = shape.iter().map(|d| d.get()).collect();
        let too_big = |what: String| match self.vlen {
            Some(_) => format!(
                "{what} but a chunk of variable-length values may decode to at most {holds} bytes \
                 (--max-vlen-chunk-bytes); raise the flag if the chunk is genuine, else rewrite it"
            ),
            None => format!(
                "{what} but a chunk of shape {shape:?} holds {holds}; the chunk is corrupt or hostile and was not decoded \
                 (rewrite it)"
            ),
        };
        let mut layer = std::borrow::Cow::Borrowed(raw);
        for outer in (1..self.compressors.layers).rev() {
            let bound = holds.saturating_add(layer_slack(holds));
            let Some((codec, mut decoder)) = self.decoder(&layer) else { return Ok(()) };
            let mut decoded = Vec::new();
            // A decoding error is zarrs' to report, with the chunk's name.
            let _ = decoder.by_ref().take(bound.saturating_add(1)).read_to_end(&mut decoded);
            if decoded.len() as u64 > bound {
                let inner = if outer == 1 { "compressed chunk" } else { "compressed layers" };
                return Err(too_big(format!(
                    "its {codec} stream decodes to more than {bound} bytes (the {inner} inside it at most)"
                )));
            }
            drop(decoder);
            layer = std::borrow::Cow::Owned(decoded);
        }
        let raw = &layer[..];
        // Every byte is a zstd frame that declares its size: no need to decode.
        if let Some(declared) =
            raw.starts_with(&ZSTD_MAGIC).then(|| zstd::bulk::Decompressor::upper_bound(raw)).flatten()
        {
            if declared as u64 > holds {
                return Err(too_big(format!("its zstd frames declare {declared} decoded bytes")));
            }
            return Ok(());
        }
        if let Some((codec, mut decoder)) = self.decoder(raw) {
            return match decoded_len(&mut decoder, holds.saturating_add(1)) {
                decoded if decoded > holds => {
                    Err(too_big(format!("its {codec} stream decodes to more than {holds} bytes")))
                }
                _ => Ok(()),
            };
        }
        if self.compressors.blosc && raw.len() >= BLOSC_HEADER_BYTES {
            // Version, version of its codec, flags, type size, then the decoded size (u32 LE).
            let declared = u64::from(u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]));
            if declared > holds {
                return Err(too_big(format!("its blosc header declares {declared} decoded bytes")));
            }
        }
        Ok(())
    }

    /// A streaming decoder for a chunk layer this check can decode (zstd and gzip by their
    /// magic numbers, zlib by its header where the chain names it), with the codec's name.
    fn decoder<'a>(&self, raw: &'a [u8]) -> Option<(&'static str, Box<dyn std::io::Read + 'a>)> {
        if raw.starts_with(&ZSTD_MAGIC) {
            return Some(("zstd", Box::new(zstd::stream::read::Decoder::new(raw).ok()?)));
        }
        if raw.starts_with(&GZIP_MAGIC) {
            return Some(("gzip", Box::new(flate2::read::MultiGzDecoder::new(raw))));
        }
        if self.compressors.zlib
            && raw.len() >= 2
            && raw[0] & 0x0f == 8
            && u16::from_be_bytes([raw[0], raw[1]]).is_multiple_of(31)
        {
            return Some(("zlib", Box::new(flate2::read::ZlibDecoder::new(raw))));
        }
        None
    }

    /// The subset of block `block` (rows `block * block_len ..` across every other axis) and the
    /// chunks it covers.
    fn block_chunks(&self, block: u64) -> Result<(ArraySubset, Vec<Vec<u64>>), String> {
        let shape = self.array.shape();
        let start = block * self.block_len;
        let end = (start + self.block_len).min(shape[0]);
        let ranges: Vec<std::ops::Range<u64>> =
            std::iter::once(start..end).chain(shape[1..].iter().map(|&d| 0..d)).collect();
        let subset = ArraySubset::new_with_ranges(&ranges);
        let chunks = self.array.chunks_in_array_subset(&subset).map_err(|e| e.to_string())?;
        let chunks = chunks.iter().flat_map(|c| c.indices().into_iter()).map(|i| i.to_vec()).collect();
        Ok((subset, chunks))
    }

    /// The indices of the one unsharded chunk that is block `block` whole (spanning every other
    /// axis), if it is one: such a block is decoded from that chunk's encoded bytes alone.
    fn single_chunk(&self, block: u64) -> Option<Vec<u64>> {
        if self.array.is_sharded() {
            return None;
        }
        let (_, mut chunks) = self.block_chunks(block).ok()?;
        (chunks.len() == 1 && self.chunk_spans_other_axes(&chunks[0])).then(|| chunks.remove(0))
    }

    /// Whether a batch's chunks are worth reading ahead together ([`fetch_encoded`](Self::fetch_encoded)):
    /// on an object store, where each read is a request.
    pub fn reads_ahead(&self) -> bool {
        self.fetch_concurrency > 1
    }

    /// Reads the encoded chunk of each of `blocks` that is one whole chunk (see
    /// [`decode_block`](Self::decode_block)), `fetch_concurrency` reads at a time. On an object
    /// store each read is a request of a few milliseconds: reading a batch's chunks one after
    /// another would leave the store and the connection idle between them. Blocks of other
    /// layouts, and any a thread could not be started for, are left out (decoding reads them).
    /// Memory: the encoded bytes of `blocks`, held until each is decoded.
    pub fn fetch_encoded(&self, blocks: &[u64]) -> Vec<(u64, EncodedBlock)> {
        if self.fetch_concurrency <= 1 || blocks.len() < 2 {
            return Vec::new();
        }
        let wanted: Vec<(u64, Vec<u64>)> =
            blocks.iter().filter_map(|&block| Some((block, self.single_chunk(block)?))).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let read = std::sync::Mutex::new(Vec::with_capacity(wanted.len()));
        std::thread::scope(|scope| {
            for _ in 0..self.fetch_concurrency.min(wanted.len()) {
                let reader = || {
                    while let Some((block, indices)) =
                        wanted.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        let bytes = self
                            .array
                            .retrieve_encoded_chunk(indices)
                            .map_err(|e| format!("cannot read chunk {}: {e}", self.array.chunk_key(indices)));
                        read.lock().unwrap_or_else(|p| p.into_inner()).push((*block, bytes));
                    }
                };
                // Without a thread (the process is at its limit), the block is read when decoded.
                if std::thread::Builder::new().name("conveyor-fetch".into()).spawn_scoped(scope, reader).is_err() {
                    break;
                }
            }
        });
        read.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes block `block` (rows `block * block_len ..`) into C-order native-endian bytes;
    /// `fetched` is what [`fetch_encoded`](Self::fetch_encoded) read for it, if it was.
    ///
    /// # Errors
    /// A description naming the chunk and what failed.
    pub fn decode_block(&self, block: u64, mut fetched: Option<EncodedBlock>) -> Result<Vec<u8>, String> {
        if self.vlen.is_some() {
            return self.decode_vlen_block(block, fetched);
        }
        let (subset, chunks) = self.block_chunks(block)?;
        let rows = (self.array.shape()[0] - block * self.block_len).min(self.block_len);
        let sharded = self.array.is_sharded();
        // Unsharded chunks are decoded from the raw bytes read for the size check below, instead
        // of being read again: a block that is one whole chunk (the chunk spans every other axis)
        // directly, a block of several (chunked along other axes too) by assembling them.
        let mut single: Option<Vec<u8>> = None;
        // Present chunks of a block of several, with their encoded bytes (absent ones are the fill
        // value).
        let mut raws: Vec<(Vec<u64>, Vec<u8>)> = Vec::new();
        if self.missing == MissingChunks::Error || !sharded {
            let num_chunks = chunks.len();
            for indices in &chunks {
                let key = self.array.chunk_key(indices);
                let present = if sharded {
                    self.array.storage().size_key(&key).map_err(|e| format!("cannot read chunk {key}: {e}"))?.is_some()
                } else {
                    // Unsharded chunks are read raw first, so that a compressed chunk declaring
                    // more bytes than its shape holds is refused before anything is decoded.
                    let raw = match fetched.take() {
                        Some(read) if num_chunks == 1 => read?,
                        _ => self
                            .array
                            .retrieve_encoded_chunk(indices)
                            .map_err(|e| format!("cannot read chunk {key}: {e}"))?,
                    };
                    match raw {
                        Some(raw) => {
                            self.check_declared_size(&raw, indices)
                                .map_err(|problem| format!("chunk {key}: {problem}"))?;
                            if num_chunks == 1 && self.chunk_spans_other_axes(indices) {
                                single = Some(raw);
                            } else {
                                raws.push((indices.clone(), raw));
                            }
                            true
                        }
                        None => false,
                    }
                };
                if !present && self.missing == MissingChunks::Error {
                    return Err(missing_chunk(&key));
                }
            }
        }
        if let Some(raw) = single {
            return self.decode_whole_chunk(raw, block, rows);
        }
        if !sharded {
            return self.assemble(&subset, raws);
        }
        let bytes: ArrayBytes = self.array.retrieve_array_subset(&subset).map_err(|e| e.to_string())?;
        Ok(bytes.into_fixed().map_err(|e| e.to_string())?.into_owned())
    }

    /// Decodes the unsharded chunks `raws` (indices and encoded bytes) and copies the part of
    /// each inside `subset` (a block) into the block's C-order bytes, the fill value elsewhere.
    fn assemble(&self, subset: &ArraySubset, raws: Vec<(Vec<u64>, Vec<u8>)>) -> Result<Vec<u8>, String> {
        use zarrs::array::{ArrayBytes, update_array_bytes};
        let data_type = self.array.data_type();
        let fill_value = self.array.fill_value();
        let mut bytes =
            ArrayBytes::new_fill_value(data_type, subset.num_elements(), fill_value).map_err(|e| e.to_string())?;
        for (indices, raw) in raws {
            let key = self.array.chunk_key(&indices);
            let chunk_shape = self.array.chunk_shape(&indices).map_err(|e| e.to_string())?;
            let chunk = self.array.chunk_subset(&indices).map_err(|e| e.to_string())?;
            let decoded = self.decode_chunk(raw, &indices, &chunk_shape)?;
            let overlap = chunk.overlap(subset).map_err(|e| e.to_string())?;
            let in_chunk = overlap.relative_to(chunk.start()).map_err(|e| e.to_string())?;
            let part = decoded
                .extract_array_subset(&in_chunk, chunk.shape(), data_type)
                .map_err(|e| format!("chunk {key}: {e}"))?;
            let in_block = overlap.relative_to(subset.start()).map_err(|e| e.to_string())?;
            bytes = update_array_bytes(bytes, subset.shape(), &in_block, &part, data_type.size())
                .map_err(|e| format!("chunk {key}: {e}"))?;
        }
        Ok(bytes.into_fixed().map_err(|e| e.to_string())?.into_owned())
    }

    /// Whether the chunk at `indices` has exactly the array's extent on every axis but the first
    /// (then its decoded rows are the block's rows, with nothing to cut out).
    fn chunk_spans_other_axes(&self, indices: &[u64]) -> bool {
        self.array
            .chunk_shape(indices)
            .is_ok_and(|chunk| chunk[1..].iter().map(|d| d.get()).eq(self.array.shape()[1..].iter().copied()))
    }

    /// Decodes the encoded chunk of block `block` (one chunk covers it) and keeps its first
    /// `rows` rows (the last chunk along axis 0 may reach past the array's end).
    fn decode_whole_chunk(&self, raw: Vec<u8>, block: u64, rows: u64) -> Result<Vec<u8>, String> {
        let mut indices = vec![0u64; self.array.dimensionality()];
        indices[0] = block;
        let chunk_shape = self.array.chunk_shape(&indices).map_err(|e| e.to_string())?;
        let decoded = self.decode_chunk(raw, &indices, &chunk_shape)?;
        let mut bytes = decoded.into_fixed().map_err(|e| e.to_string())?.into_owned();
        let row_bytes = chunk_shape[1..].iter().map(|d| d.get()).product::<u64>() * self.element_bytes;
        bytes.truncate((rows * row_bytes) as usize);
        Ok(bytes)
    }

    /// Decodes the encoded chunk `raw` at `indices` (of shape `chunk_shape`) through the
    /// array's codecs; errors name the chunk.
    fn decode_chunk(
        &self,
        raw: Vec<u8>,
        indices: &[u64],
        chunk_shape: &[std::num::NonZeroU64],
    ) -> Result<zarrs::array::ArrayBytes<'static>, String> {
        use zarrs::array::codec::api::{ArrayToBytesCodecTraits, CodecOptions};
        self.array
            .codecs()
            .decode(
                std::borrow::Cow::Owned(raw),
                chunk_shape,
                self.array.data_type(),
                self.array.fill_value(),
                &CodecOptions::default(),
            )
            .map_err(|e| format!("chunk {}: {e}", self.array.chunk_key(indices)))
    }

    /// Rows of block `block` (the last may be short).
    fn block_rows(&self, block: u64) -> u64 {
        (self.array.shape()[0] - block * self.block_len).min(self.block_len)
    }

    /// Decodes block `block` of a variable-length array into a [`VlenBlock`]'s bytes. The chunk
    /// is bounded by `--max-vlen-chunk-bytes` before it is decoded (an uncompressed one by its
    /// stored size); an absent one is the fill value or an error, as `--zarr-missing-chunks` says.
    fn decode_vlen_block(&self, block: u64, fetched: Option<EncodedBlock>) -> Result<Vec<u8>, String> {
        let rows = self.block_rows(block);
        let indices = vec![block];
        let key = self.array.chunk_key(&indices);
        let missing = || missing_chunk(&key);
        let decoded = if self.array.is_sharded() {
            if self.missing == MissingChunks::Error
                && self.array.storage().size_key(&key).map_err(|e| format!("cannot read chunk {key}: {e}"))?.is_none()
            {
                return Err(missing());
            }
            let (subset, _) = self.block_chunks(block)?;
            self.array.retrieve_array_subset(&subset).map_err(|e| format!("chunk {key}: {e}"))?
        } else {
            let raw = match fetched {
                Some(read) => read?,
                None => {
                    self.array.retrieve_encoded_chunk(&indices).map_err(|e| format!("cannot read chunk {key}: {e}"))?
                }
            };
            match raw {
                Some(raw) => {
                    self.check_declared_size(&raw, &indices).map_err(|problem| format!("chunk {key}: {problem}"))?;
                    let chunk_shape = self.array.chunk_shape(&indices).map_err(|e| e.to_string())?;
                    self.decode_chunk(raw, &indices, &chunk_shape)?
                }
                None if self.missing == MissingChunks::Error => return Err(missing()),
                None => ArrayBytes::new_fill_value(self.array.data_type(), rows, self.array.fill_value())
                    .map_err(|e| format!("chunk {key}: {e}"))?,
            }
        };
        let (values, offsets) = decoded.into_variable().map_err(|e| format!("chunk {key}: {e}"))?.into_parts();
        VlenBlock::pack(&values, &offsets, rows as usize, self.vlen.map_or(1, |v| v.dtype.size_bytes()))
            .map_err(|problem| format!("chunk {key}: {problem}"))
    }

    /// Appends the samples `indices` of a variable-length array to `tensor` as values plus
    /// offsets (in elements). Blocks are held while the message is built when they hold at most
    /// a few times the batch (see [`super::PIN_FACTOR`]); otherwise each sample is copied out
    /// while its block is at hand. Returns the bytes decoded.
    ///
    /// # Errors
    /// The block that failed and why.
    pub(super) fn select_vlen_into(
        &self,
        field_id: u64,
        indices: &[u64],
        tensor: &mut OutgoingTensor,
        cache: &ChunkCache,
    ) -> Result<u64, (u64, String)> {
        let element_bytes = self.element_bytes as usize;
        let block_of = |index: u64| index / self.block_len;
        let local = |index: u64| (index - block_of(index) * self.block_len) as usize;
        let mut blocks: Vec<u64> = indices.iter().map(|&index| block_of(index)).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut decoded = 0;
        let mut offsets = OffsetsWriter::new(indices.len());
        if blocks.len() as u64 * self.block_len <= super::PIN_FACTOR * indices.len() as u64 {
            let mut held = Vec::with_capacity(blocks.len());
            for &block in &blocks {
                let (data, bytes) = cache
                    .get_or_decode((field_id, block), || self.decode_block(block, None))
                    .map_err(|reason| (block, reason))?;
                decoded += bytes;
                let piece = tensor.add_piece(Piece { bytes: shared_bytes(data.clone()), big_endian: false });
                held.push((data, piece));
            }
            for &index in indices {
                let (data, piece) = &held[blocks.binary_search(&block_of(index)).expect("listed above")];
                let value = VlenBlock::new(data, self.block_rows(block_of(index)) as usize).value(local(index));
                tensor.push(*piece, value.start, value.len());
                offsets.push((value.len() / element_bytes) as u64);
            }
        } else {
            let mut copied = Vec::new();
            let mut current = None;
            for &index in indices {
                let block = block_of(index);
                let (data, bytes) = cache
                    .hold(&mut current, (field_id, block), || self.decode_block(block, None))
                    .map_err(|reason| (block, reason))?;
                decoded += bytes;
                let value = VlenBlock::new(&data, self.block_rows(block) as usize).value(local(index));
                copied.extend_from_slice(&data[value.clone()]);
                offsets.push((value.len() / element_bytes) as u64);
            }
            let len = copied.len();
            let piece = tensor.add_piece(Piece { bytes: Bytes::from(copied), big_endian: false });
            tensor.push(piece, 0, len);
        }
        offsets.finish(tensor);
        Ok(decoded)
    }

    /// Bytes a batch of `indices` of a variable-length array sends (values and offsets): the
    /// lengths come from the decoded blocks, read through `cache` (where the batch then finds
    /// them). A block that cannot be read counts nothing here; the batch fails on it after.
    pub(super) fn vlen_batch_bytes(&self, field_id: u64, indices: &[u64], cache: &ChunkCache) -> u64 {
        let block_of = |index: u64| index / self.block_len;
        let mut order: Vec<u64> = indices.to_vec();
        order.sort_unstable();
        let mut total = (indices.len() as u64 + 1) * 8;
        let mut current = None;
        for index in order {
            let block = block_of(index);
            let Ok((data, _)) = cache.hold(&mut current, (field_id, block), || self.decode_block(block, None)) else {
                continue;
            };
            let local = (index - block * self.block_len) as usize;
            total += VlenBlock::new(&data, self.block_rows(block) as usize).value(local).len() as u64;
        }
        total
    }
}

/// The message for chunk `key` absent under `--zarr-missing-chunks error`.
fn missing_chunk(key: &impl std::fmt::Display) -> String {
    format!("chunk {key} is missing (pass --zarr-missing-chunks fill if absent chunks mean the fill value)")
}

/// A decoded block of a variable-length array as the chunk cache holds it: `rows + 1` byte
/// offsets (`u64`, little-endian, from 0, never decreasing, the last the values' length), then
/// the values one after another.
struct VlenBlock<'a> {
    data: &'a [u8],
    rows: usize,
}

impl<'a> VlenBlock<'a> {
    /// The block `data` of `rows` rows, as [`VlenBlock::pack`] wrote it.
    fn new(data: &'a [u8], rows: usize) -> VlenBlock<'a> {
        VlenBlock { data, rows }
    }

    fn offset(&self, i: usize) -> usize {
        let at = i * 8;
        u64::from_le_bytes(self.data[at..at + 8].try_into().unwrap_or_default()) as usize
    }

    /// Where value `i` (`< rows`) is in the block's bytes.
    fn value(&self, i: usize) -> std::ops::Range<usize> {
        let start = (self.rows + 1) * 8;
        start + self.offset(i)..start + self.offset(i + 1)
    }

    /// Packs the first `rows` values of zarrs' decoded `values` and `offsets` (element count +
    /// 1 byte offsets) into a block's bytes.
    ///
    /// # Errors
    /// When the offsets do not describe `rows` values inside `values`, or a value is not a whole
    /// number of `element_bytes` elements.
    fn pack(values: &[u8], offsets: &[usize], rows: usize, element_bytes: usize) -> Result<Vec<u8>, String> {
        let Some(used) = offsets.get(..=rows) else {
            return Err(format!("it decoded to {} values, expected at least {rows}", offsets.len().saturating_sub(1)));
        };
        let (first, last) = (used[0], used[rows]);
        if used.windows(2).any(|w| w[1] < w[0]) || last > values.len() {
            return Err("its decoded offsets are out of order or past its values".into());
        }
        if let Some(i) = used.windows(2).position(|w| (w[1] - w[0]) % element_bytes != 0) {
            return Err(format!("value {i} is not a whole number of {element_bytes}-byte elements"));
        }
        let mut block = Vec::with_capacity((rows + 1) * 8 + (last - first));
        for offset in used {
            block.extend_from_slice(&((offset - first) as u64).to_le_bytes());
        }
        block.extend_from_slice(&values[first..last]);
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, dims: Option<&[&str]>) -> (String, Option<Vec<String>>) {
        (name.to_owned(), dims.map(|d| d.iter().map(|s| (*s).to_owned()).collect()))
    }

    fn fields(members: &[(String, Option<Vec<String>>)], roles: &[Role]) -> Vec<String> {
        members.iter().zip(roles).filter(|(_, r)| **r == Role::Field).map(|(m, _)| m.0.clone()).collect()
    }

    #[test]
    fn xarray_coordinates_are_not_fields_and_the_majority_first_dimension_is_the_sample_dimension() {
        let members = [
            member("channel", Some(&["channel"])),
            member("eeg", Some(&["window", "channel", "time"])),
            member("label", Some(&["window"])),
            member("age", Some(&["window"])),
            member("montage", Some(&["channel", "xyz"])),
            member("subject", Some(&["window"])),
            member("late", Some(&["channel", "window"])),
        ];
        let roles = classify(&members, &["subject".into()], None).expect("classifies");
        assert_eq!(fields(&members, &roles), ["eeg", "label", "age"]);
        let Role::Coordinate(reason) = &roles[6] else { panic!("late is not a field") };
        assert!(reason.contains("not first") && reason.contains(".transpose('window', ...)"), "{reason}");
        let Role::Coordinate(reason) = &roles[5] else { panic!("subject is a coordinate") };
        assert!(reason.contains("naming it in --fields"), "{reason}");

        let chosen = ["subject".to_owned(), "eeg".to_owned()];
        let roles = classify(&members, &["subject".into()], Some(&chosen)).expect("classifies");
        assert_eq!(fields(&members, &roles), ["eeg", "subject"]);
        let unfit = ["late".to_owned(), "eeg".to_owned(), "label".to_owned()];
        let error = classify(&members, &[], Some(&unfit)).expect_err("late starts with channel");
        assert!(error.to_string().contains("different dimensions"), "{error}");
    }

    /// A store whose chunk reads wait (5 s at most) until `release_at` of them are in flight,
    /// recording the most in flight: reads made one after another would each wait the 5 s and
    /// be seen one at a time.
    struct GatedStore {
        inner: Arc<zarrs::storage::store::MemoryStore>,
        release_at: usize,
        /// (in flight now, most in flight, chunk reads in all)
        in_flight: std::sync::Mutex<(usize, usize, usize)>,
        changed: std::sync::Condvar,
    }

    impl ReadableStorageTraits for GatedStore {
        fn get(&self, key: &StoreKey) -> Result<Option<bytes::Bytes>, zarrs::storage::StorageError> {
            if !key.as_str().contains("/c/") && !key.as_str().starts_with("c/") {
                return self.inner.get(key);
            }
            let mut state = self.in_flight.lock().expect("lock");
            state.2 += 1;
            state.0 += 1;
            state.1 = state.1.max(state.0);
            self.changed.notify_all();
            let (mut state, _) = self
                .changed
                .wait_timeout_while(state, std::time::Duration::from_secs(5), |s| s.1 < self.release_at)
                .expect("lock");
            state.0 -= 1;
            drop(state);
            self.inner.get(key)
        }

        fn get_partial_many<'a>(
            &'a self,
            key: &StoreKey,
            byte_ranges: zarrs::storage::byte_range::ByteRangeIterator<'a>,
        ) -> Result<zarrs::storage::MaybeBytesIterator<'a>, zarrs::storage::StorageError> {
            self.inner.get_partial_many(key, byte_ranges)
        }

        fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, zarrs::storage::StorageError> {
            self.inner.size_key(key)
        }

        fn supports_get_partial(&self) -> bool {
            true
        }
    }

    impl zarrs::storage::ListableStorageTraits for GatedStore {
        fn list(&self) -> Result<zarrs::storage::StoreKeys, zarrs::storage::StorageError> {
            self.inner.list()
        }

        fn list_prefix(&self, prefix: &StorePrefix) -> Result<zarrs::storage::StoreKeys, zarrs::storage::StorageError> {
            self.inner.list_prefix(prefix)
        }

        fn list_dir(
            &self,
            prefix: &StorePrefix,
        ) -> Result<zarrs::storage::StoreKeysPrefixes, zarrs::storage::StorageError> {
            self.inner.list_dir(prefix)
        }

        fn size_prefix(&self, prefix: &StorePrefix) -> Result<u64, zarrs::storage::StorageError> {
            self.inner.size_prefix(prefix)
        }
    }

    /// A [16, 3] uint8 array in chunks of 4 rows holding 0..48, behind a [`GatedStore`].
    fn gated_array(release_at: usize, fetch_concurrency: usize) -> (Arc<GatedStore>, ZarrSource) {
        let memory = Arc::new(zarrs::storage::store::MemoryStore::new());
        let array = zarrs::array::ArrayBuilder::new(vec![16, 3], vec![4, 3], zdt::uint8(), 0u8)
            .build(memory.clone(), "/")
            .expect("array");
        array.store_metadata().expect("metadata");
        array
            .store_array_subset(&ArraySubset::new_with_ranges(&[0..16, 0..3]), (0..48u8).collect::<Vec<_>>())
            .expect("data");
        let gated = Arc::new(GatedStore {
            inner: memory,
            release_at,
            in_flight: std::sync::Mutex::new((0, 0, 0)),
            changed: std::sync::Condvar::new(),
        });
        let storage: ReadableListableStorage = gated.clone();
        let opened = open_storage("d", storage, Path::new("mem"), "x", MissingChunks::Error, None, fetch_concurrency)
            .expect("opens");
        (gated, opened.arrays.into_iter().next().expect("one field").source)
    }

    #[test]
    fn the_chunks_of_a_batch_are_read_together_within_the_fetch_concurrency() {
        let (gated, source) = gated_array(4, 16);
        let mut fetched = source.fetch_encoded(&[0, 1, 2, 3]);
        assert_eq!(gated.in_flight.lock().expect("lock").1, 4, "all four chunk reads in flight at once");
        fetched.sort_by_key(|(block, _)| *block);
        assert_eq!(fetched.iter().map(|(block, _)| *block).collect::<Vec<_>>(), [0, 1, 2, 3]);
        for (block, read) in fetched {
            let rows = source.decode_block(block, Some(read)).expect("decodes");
            let first = (block * 12) as u8;
            assert_eq!(rows, (first..first + 12).collect::<Vec<_>>(), "block {block}");
        }
        assert_eq!(gated.in_flight.lock().expect("lock").2, 4, "each chunk read once, by the fetch");

        let (gated, source) = gated_array(2, 2);
        assert_eq!(source.fetch_encoded(&[0, 1, 2, 3]).len(), 4);
        assert_eq!(gated.in_flight.lock().expect("lock").1, 2, "never more than --io-concurrency reads");

        // A local store (concurrency 1) reads nothing ahead; a missing chunk read ahead is
        // reported by the decode like one it reads itself.
        let (_, source) = gated_array(1, 1);
        assert!(source.fetch_encoded(&[0, 1]).is_empty());
        let error = source.decode_block(2, Some(Ok(None))).expect_err("absent");
        assert!(error.contains("chunk c/2/0 is missing"), "{error}");
    }

    #[test]
    fn vlen_blocks_keep_their_rows_values_and_refuse_offsets_that_lie() {
        // Three values "ab", "", "cde" and a fourth past the array's end (a short last chunk).
        let values = b"xxabcdefg";
        let block = VlenBlock::pack(values, &[2, 4, 4, 7, 9], 3, 1).expect("packs");
        let view = VlenBlock::new(&block, 3);
        let value = |i| &block[view.value(i)];
        assert_eq!((value(0), value(1), value(2)), (&b"ab"[..], &b""[..], &b"cde"[..]));
        assert_eq!(block.len(), 4 * 8 + 5, "only the rows' values are kept");
        assert!(VlenBlock::pack(values, &[0, 4], 3, 1).expect_err("too few").contains("expected at least 3"));
        assert!(VlenBlock::pack(values, &[0, 4, 2, 5], 3, 1).expect_err("order").contains("out of order"));
        assert!(VlenBlock::pack(values, &[0, 4, 5, 12], 3, 1).expect_err("past").contains("past its values"));
        let error = VlenBlock::pack(values, &[0, 4, 5, 8], 3, 4).expect_err("elements");
        assert!(error.contains("value 1 is not a whole number of 4-byte elements"), "{error}");
    }

    #[test]
    fn metadata_documents_that_are_not_objects_are_refused_by_name() {
        // Found by the zarr_metadata fuzz target: a child `.zarray` holding the JSON number 2.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".zgroup"), br#"{"zarr_format": 2}"#).expect("write");
        std::fs::create_dir(dir.path().join("child")).expect("mkdir");
        std::fs::write(dir.path().join("child/.zarray"), b"\n2").expect("write");
        let Err(error) = open("d", dir.path(), "x", MissingChunks::Error, None) else { panic!("refused") };
        let message = error.to_string();
        assert!(message.contains("child/.zarray: is not a JSON object"), "{message}");
        std::fs::write(dir.path().join("child/.zarray"), b"{}").expect("write");
        std::fs::write(dir.path().join("child/.zattrs"), b"[1]").expect("write");
        let Err(error) = open("d", dir.path(), "x", MissingChunks::Error, None) else { panic!("refused") };
        assert!(error.to_string().contains("child/.zattrs: is not a JSON object"), "{error}");
    }

    #[test]
    fn groups_without_dimension_names_serve_every_array_or_the_chosen_ones() {
        let members = [member("a", None), member("b", None)];
        assert_eq!(classify(&members, &[], None).expect("ok"), [Role::Field, Role::Field]);
        let roles = classify(&members, &[], Some(&["b".to_owned()])).expect("ok");
        assert_eq!(fields(&members, &roles), ["b"]);
    }

    #[test]
    fn ties_and_groups_of_only_coordinates_ask_the_user_to_choose() {
        let tie = [member("x", Some(&["sample", "f"])), member("y", Some(&["f", "sample"]))];
        let error = classify(&tie, &[], None).expect_err("tie");
        let error = error.to_string();
        assert!(error.contains("x (sample, ...), y (f, ...)") && error.contains("--fields"), "{error}");
        let only_coordinates = [member("time", Some(&["time"]))];
        let error = classify(&only_coordinates, &[], None).expect_err("nothing to serve");
        assert!(error.to_string().contains("no data variable"), "{error}");
    }
}
