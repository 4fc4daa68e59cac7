//! `.npy` fields: a field is `FIELD.npy` or shards `FIELD-00000.npy`, `FIELD-00001.npy`, ...
//! concatenated along axis 0 in name order, in a local directory (mapped), inside an `.npz`
//! archive (mapped in place) or under an object-store prefix (ranged reads). Headers are parsed
//! by [`conveyor_proto::npy`], where the writer lives too.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use conveyor_proto::npy::{self, NpyHeader};

use super::{Field, NEXT_FIELD_ID, Shard, ShardData, Source, group_fields, ragged, select_fields};
use crate::{
    error::LoadError,
    storage::{ObjectStorage, mmap::MappedFile, object::ObjectVersion},
};

/// Where one shard's `.npy` bytes lie: a whole mapped file, or a member of a mapped archive.
pub(super) struct ShardBytes {
    /// How messages name it.
    path: PathBuf,
    /// The map or the object.
    data: ShardData,
    /// Offset of the `.npy` magic in the map (0 in an object).
    start: usize,
    /// Bytes from `start` that belong to it.
    len: usize,
    /// A remote object's first bytes, its whole header included.
    header: Option<Bytes>,
}

impl ShardBytes {
    pub(super) fn mapped(path: PathBuf, map: Arc<MappedFile>, start: usize, len: usize) -> ShardBytes {
        ShardBytes { path, data: ShardData::Mapped(map), start, len, header: None }
    }

    /// At least the whole header.
    fn header_bytes(&self) -> &[u8] {
        match (&self.data, &self.header) {
            (ShardData::Mapped(map), _) => &map[self.start..self.start + self.len],
            (ShardData::Remote { .. }, header) => header.as_deref().unwrap_or_default(),
        }
    }
}

/// Opens the `.npy` objects of a remote prefix as fields (those in `select` when given). Each
/// header costs one ranged GET (two when it is longer than 4 KiB).
pub(super) fn open_remote_npy(
    name: &str,
    storage: &Arc<ObjectStorage>,
    objects: Vec<(String, u64, ObjectVersion)>,
    select: Option<&[String]>,
) -> Result<Vec<Field>, LoadError> {
    let location = PathBuf::from(storage.url());
    let stems = objects
        .into_iter()
        .filter_map(|(object, size, version)| Some((object.strip_suffix(".npy")?.to_owned(), (object, size, version))))
        .filter(|(stem, _)| !stem.is_empty() && !stem.contains('/'))
        .collect::<Vec<(String, _)>>();
    // Ragged pairs: FIELD.npy beside FIELD.offsets.npy.
    let (offsets, stems): (Vec<(String, ragged::ListedObject)>, Vec<(String, ragged::ListedObject)>) =
        stems.into_iter().partition(|(stem, _)| stem.ends_with(ragged::OFFSETS_SUFFIX));
    let mut offsets: Vec<(String, ragged::ListedObject)> = offsets
        .into_iter()
        .map(|(stem, listed)| (stem.trim_end_matches(ragged::OFFSETS_SUFFIX).to_owned(), listed))
        .collect();
    let groups = group_fields(stems, &location)?;
    for (field, (object, ..)) in &offsets {
        let values = groups.get(field).map_or(0, Vec::len);
        if values != 1 || !groups[field][0].0.ends_with(&format!("{field}.npy")) {
            return Err(LoadError::RaggedLayout { field: field.clone(), offsets: location.join(object), values });
        }
    }
    if groups.is_empty() {
        return Err(LoadError::Remote {
            dataset: name.to_owned(),
            url: storage.url().to_owned(),
            problem: "holds no .npy objects and no Zarr metadata; put FIELD.npy or FIELD-00000.npy objects \
                      (or a Zarr group) under it"
                .into(),
        });
    }
    let mut fields = Vec::with_capacity(groups.len());
    for (field_name, mut objects) in select_fields(name, &location, groups, select)? {
        if let Some(at) = offsets.iter().position(|(field, _)| *field == field_name) {
            let (_, offsets) = offsets.swap_remove(at);
            fields.push(ragged::open_remote(name, &field_name, storage, objects.remove(0), offsets)?);
            continue;
        }
        let mut shards = Vec::with_capacity(objects.len());
        for (object, size, version) in objects {
            let path = location.join(&object);
            let read = |end: u64| {
                storage
                    .read_ranges(&object, size, &version, std::slice::from_ref(&(0..end.min(size))), None)
                    .map(|mut parts| parts.remove(0))
                    .map_err(|problem| LoadError::Remote {
                        dataset: name.to_owned(),
                        url: storage.url().to_owned(),
                        problem,
                    })
            };
            let mut header = read(4096)?;
            if let Some(end) = npy::data_offset(&header).filter(|&end| end > header.len() && end as u64 <= size) {
                header = read(end as u64)?;
            }
            let data = ShardData::Remote { storage: storage.clone(), object: object.clone(), size, version };
            shards.push(ShardBytes { path, data, start: 0, len: size as usize, header: Some(header) });
        }
        fields.push(open_field(&field_name, shards)?);
    }
    Ok(fields)
}

/// Opens the single `.npy` file `path` as a dataset of one field named after the file (a 1-D
/// token file for `--windows`, or any array).
///
/// # Errors
/// As [`open_npy_dir`]; a `select` naming another field is refused.
pub(super) fn open_npy_file(name: &str, path: &Path, select: Option<&[String]>) -> Result<Vec<Field>, LoadError> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let groups = std::collections::BTreeMap::from([(stem.clone(), vec![path.to_owned()])]);
    let selected = select_fields(name, path, groups, select)?;
    let map = MappedFile::open(path).map_err(|error| LoadError::Io { path: path.to_owned(), error })?;
    let len = map.len();
    let field = open_field(&stem, vec![ShardBytes::mapped(path.to_owned(), Arc::new(map), 0, len)])?;
    Ok(if selected.is_empty() { Vec::new() } else { vec![field] })
}

/// Opens every `.npy` field in `dir` (those in `select` when given).
pub(super) fn open_npy_dir(name: &str, dir: &Path, select: Option<&[String]>) -> Result<Vec<Field>, LoadError> {
    let io_error = |error| LoadError::Io { path: dir.to_owned(), error };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_error)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_error)?;
    files.retain(|p| p.extension().is_some_and(|e| e == "npy") && p.is_file());
    let offsets = ragged::split_offsets(&mut files);
    let stems = files
        .into_iter()
        .map(|path| (path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), path))
        .collect();
    let groups = group_fields(stems, dir)?;
    // A ragged field is one values file beside its offsets: not shards, not offsets alone.
    for (field, offsets) in &offsets {
        let values = groups.get(field).map_or(0, Vec::len);
        if values != 1 || !dir.join(format!("{field}.npy")).is_file() {
            return Err(LoadError::RaggedLayout { field: field.clone(), offsets: offsets.clone(), values });
        }
    }
    if groups.is_empty() {
        return Err(LoadError::NoFields { dataset: name.to_owned(), dir: dir.to_owned() });
    }
    let mut fields = Vec::with_capacity(groups.len());
    for (field_name, paths) in select_fields(name, dir, groups, select)? {
        if let Some((_, offsets)) = offsets.iter().find(|(field, _)| *field == field_name) {
            fields.push(ragged::open(&field_name, &paths[0], offsets)?);
            continue;
        }
        let mut shards = Vec::with_capacity(paths.len());
        for path in paths {
            let map = MappedFile::open(&path).map_err(|error| LoadError::Io { path: path.clone(), error })?;
            let len = map.len();
            shards.push(ShardBytes::mapped(path, Arc::new(map), 0, len));
        }
        fields.push(open_field(&field_name, shards)?);
    }
    Ok(fields)
}

/// How a mismatch names a shard's layout.
fn describe(header: &NpyHeader) -> String {
    format!("dtype {} and per-sample shape {:?}", header.dtype.name(), &header.shape[1..])
}

/// One field from its shards, in order: every header parsed and checked against the first.
pub(super) fn open_field(name: &str, parts: Vec<ShardBytes>) -> Result<Field, LoadError> {
    let mut shards = Vec::with_capacity(parts.len());
    let mut shard_starts = Vec::with_capacity(parts.len());
    let mut first_header: Option<NpyHeader> = None;
    let mut total = 0u64;
    for part in parts {
        let header = npy::parse_header(part.header_bytes())
            .map_err(|problem| LoadError::Header { path: part.path.clone(), problem })?;
        let ShardBytes { path, data, start, len, .. } = part;
        let expected_bytes = header.num_elements() * header.dtype.size_bytes() as u64;
        let actual_bytes = (len - header.data_offset) as u64;
        if actual_bytes < expected_bytes {
            return Err(LoadError::Truncated { path, expected_bytes, actual_bytes });
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
            data_offset: start + header.data_offset,
            num_samples: header.shape[0],
            big_endian: header.big_endian,
            data,
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
        dims: Vec::new(),
        num_samples: total,
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source: Source::Npy { shards, shard_starts },
    })
}
