//! Ragged fields: samples of different lengths, stored as users write them with numpy. A field
//! `FIELD` is the values `FIELD.npy` (`[total rows, ...row shape]`, every sample's rows one
//! after another) and the row offsets `FIELD.offsets.npy` (`int64`, one per sample plus one,
//! starting at 0: sample `i` is rows `offsets[i]..offsets[i+1]`), both memory-mapped. Bytes and
//! text are `uint8` values with no row shape.
//!
//! The offsets are checked whole when the field opens (they start at 0, never decrease and end
//! at the values' row count), so a batch never reads outside the values; both files are checked
//! unchanged before each batch reads them, as every mapped shard is.
//!
//! Under an object-store prefix ([`open_remote`]) the offsets object is read whole at start-up
//! and kept in memory (8 bytes a sample); a batch reads its samples' values with ranged GETs,
//! adjacent ones merged, from the version listed.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use conveyor_proto::{
    DType,
    npy::{self, NpyHeader},
    wire::{OutgoingTensor, Piece},
};

use super::{Field, NEXT_FIELD_ID, Source};
use crate::{
    error::{LoadError, OffsetsProblem},
    storage::{ObjectStorage, mmap::MappedFile, object::ObjectVersion, shared_bytes},
};

/// Suffix of an offsets file's stem: `FIELD.offsets.npy`.
pub(super) const OFFSETS_SUFFIX: &str = ".offsets";

/// A ragged tensor's offsets as its samples are appended: batch + 1 little-endian int64, from 0.
pub(super) struct OffsetsWriter {
    bytes: Vec<u8>,
    rows: u64,
}

impl OffsetsWriter {
    /// Offsets for `num_samples` samples, the first (0) written.
    pub(super) fn new(num_samples: usize) -> OffsetsWriter {
        let mut bytes = Vec::with_capacity((num_samples + 1) * 8);
        bytes.extend_from_slice(&0i64.to_le_bytes());
        OffsetsWriter { bytes, rows: 0 }
    }

    /// The next sample has `rows` rows.
    pub(super) fn push(&mut self, rows: u64) {
        self.rows += rows;
        self.bytes.extend_from_slice(&(self.rows as i64).to_le_bytes());
    }

    /// Gives `tensor` the offsets and its row count.
    pub(super) fn finish(self, tensor: &mut OutgoingTensor) {
        tensor.offsets = Some(Bytes::from(self.bytes));
        if let Some(rows) = tensor.shape.first_mut() {
            *rows = self.rows;
        }
    }
}

/// Where a ragged field's values and offsets are.
#[derive(Debug)]
pub(super) struct RaggedSource {
    /// The values file, mapped.
    values: Arc<MappedFile>,
    /// Offset of the first value in it.
    values_offset: usize,
    /// Whether values are big-endian (swapped on the way out).
    values_big_endian: bool,
    /// Bytes of one row of values.
    row_bytes: usize,
    /// The offsets file, mapped.
    offsets: Arc<MappedFile>,
    /// Offset of the first offset in it.
    offsets_offset: usize,
    /// Whether the offsets are big-endian.
    offsets_big_endian: bool,
}

impl RaggedSource {
    /// Offset `i` (`i <= num_samples`), read from the map.
    fn offset(&self, i: u64) -> u64 {
        let at = self.offsets_offset + i as usize * 8;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&self.offsets[at..at + 8]);
        let value = if self.offsets_big_endian { i64::from_be_bytes(raw) } else { i64::from_le_bytes(raw) };
        // Checked non-negative when the field opened.
        value as u64
    }

    /// Rows of sample `index`.
    fn rows(&self, index: u64) -> std::ops::Range<u64> {
        self.offset(index)..self.offset(index + 1)
    }

    /// Every sample's length in rows (`num_samples` of them).
    pub(super) fn lengths(&self, num_samples: u64) -> Vec<u64> {
        (0..num_samples).map(|i| self.offset(i + 1) - self.offset(i)).collect()
    }

    /// The values of rows `from..to` of each `(sample, from, to)`, as slices of the map (checked
    /// unchanged first); whether they are big-endian.
    ///
    /// # Errors
    /// When either file changed since it was opened.
    pub(super) fn spans(&self, spans: &[(u64, u64, u64)]) -> Result<(Vec<Bytes>, bool), String> {
        self.values.check()?;
        self.offsets.check()?;
        let values = shared_bytes(self.values.clone());
        let at = |sample: u64, row: u64| self.values_offset + (self.offset(sample) + row) as usize * self.row_bytes;
        Ok((
            spans.iter().map(|&(sample, from, to)| values.slice(at(sample, from)..at(sample, to))).collect(),
            self.values_big_endian,
        ))
    }

    /// Appends the samples `indices` to `tensor`: the values as runs into the values map, the
    /// offsets (batch + 1, from 0) as the tensor's own; sets the tensor's row count.
    ///
    /// # Errors
    /// When either file changed since it was opened (the first index, and why).
    pub(super) fn select_into(&self, indices: &[u64], tensor: &mut OutgoingTensor) -> Result<u64, (u64, String)> {
        let first = indices.first().copied().unwrap_or(0);
        self.values.check().map_err(|reason| (first, reason))?;
        self.offsets.check().map_err(|reason| (first, reason))?;
        let piece =
            tensor.add_piece(Piece { bytes: shared_bytes(self.values.clone()), big_endian: self.values_big_endian });
        let mut offsets = OffsetsWriter::new(indices.len());
        for &index in indices {
            let rows = self.rows(index);
            let len = rows.end - rows.start;
            let start = self.values_offset + rows.start as usize * self.row_bytes;
            tensor.push(piece, start, len as usize * self.row_bytes);
            offsets.push(len);
        }
        offsets.finish(tensor);
        Ok(0)
    }

    /// Bytes a batch of `indices` sends: its values and its offsets.
    pub(super) fn batch_bytes(&self, indices: &[u64]) -> u64 {
        let rows: u64 = indices.iter().map(|&index| self.rows(index)).map(|r| r.end - r.start).sum();
        rows * self.row_bytes as u64 + (indices.len() as u64 + 1) * 8
    }
}

/// A ragged field under an object-store prefix: the values object read by ranges, the offsets
/// held in memory.
#[derive(Debug)]
pub(super) struct RemoteRagged {
    storage: Arc<ObjectStorage>,
    /// The values object's name, size and listed version.
    object: String,
    size: u64,
    version: ObjectVersion,
    /// Where its first value is.
    values_offset: u64,
    /// Whether values are big-endian (swapped on the way out).
    values_big_endian: bool,
    /// Bytes of one row of values.
    row_bytes: u64,
    /// Row offsets, one per sample plus one (checked at start-up).
    offsets: Vec<u64>,
}

impl RemoteRagged {
    /// Appends the samples `indices` to `tensor`: their values fetched (spans sorted, the near
    /// merged, every GET of the batch in flight at once within `--io-concurrency`), the offsets
    /// its own. Returns the bytes fetched.
    ///
    /// # Errors
    /// The first sample of the batch and why its values could not be read.
    pub(super) fn select_into(&self, indices: &[u64], tensor: &mut OutgoingTensor) -> Result<u64, (u64, String)> {
        let first = indices.first().copied().unwrap_or(0);
        let rows = |index: u64| (self.offsets[index as usize], self.offsets[index as usize + 1]);
        let spans: Vec<(u64, u64)> = indices
            .iter()
            .map(|&index| {
                let (start, end) = rows(index);
                (self.values_offset + start * self.row_bytes, (end - start) * self.row_bytes)
            })
            .collect();
        let values = self
            .storage
            .read_spans(&self.object, self.size, &self.version, &spans, self.row_bytes)
            .map_err(|reason| (first, reason))?;
        let mut offsets = OffsetsWriter::new(indices.len());
        let mut fetched = 0;
        for (&index, bytes) in indices.iter().zip(values) {
            let (start, end) = rows(index);
            fetched += bytes.len() as u64;
            let len = bytes.len();
            let piece = tensor.add_piece(Piece { bytes, big_endian: self.values_big_endian });
            tensor.push(piece, 0, len);
            offsets.push(end - start);
        }
        offsets.finish(tensor);
        Ok(fetched)
    }

    /// The values of rows `from..to` of each `(sample, from, to)`, read by merged ranges; whether
    /// they are big-endian.
    ///
    /// # Errors
    /// A message naming the object when the read fails.
    pub(super) fn spans(&self, spans: &[(u64, u64, u64)]) -> Result<(Vec<Bytes>, bool), String> {
        let byte_spans: Vec<(u64, u64)> = spans
            .iter()
            .map(|&(sample, from, to)| {
                (
                    self.values_offset + (self.offsets[sample as usize] + from) * self.row_bytes,
                    (to - from) * self.row_bytes,
                )
            })
            .collect();
        let read = self.storage.read_spans(&self.object, self.size, &self.version, &byte_spans, self.row_bytes)?;
        Ok((read, self.values_big_endian))
    }

    /// Every sample's length in rows.
    pub(super) fn lengths(&self) -> Vec<u64> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Bytes a batch of `indices` sends: its values and its offsets.
    pub(super) fn batch_bytes(&self, indices: &[u64]) -> u64 {
        let rows: u64 = indices.iter().map(|&i| self.offsets[i as usize + 1] - self.offsets[i as usize]).sum();
        rows * self.row_bytes + (indices.len() as u64 + 1) * 8
    }
}

/// One object of a remote ragged pair: its name, size and listed version.
pub(super) type ListedObject = (String, u64, ObjectVersion);

/// Opens the ragged field `name` from the objects `values` and `offsets` under `storage`'s
/// prefix: both headers read, the offsets read whole and checked as a local pair's are.
///
/// # Errors
/// As [`open`], naming the objects.
pub(super) fn open_remote(
    dataset: &str,
    name: &str,
    storage: &Arc<ObjectStorage>,
    values: ListedObject,
    offsets: ListedObject,
) -> Result<Field, LoadError> {
    let remote =
        |problem: String| LoadError::Remote { dataset: dataset.to_owned(), url: storage.url().to_owned(), problem };
    let read = |(object, size, version): &ListedObject, range: std::ops::Range<u64>| {
        storage
            .read_ranges(object, *size, version, std::slice::from_ref(&(range.start..range.end.min(*size))), None)
            .map(|mut parts| parts.remove(0))
            .map_err(remote)
    };
    let header = |listed: &ListedObject| -> Result<NpyHeader, LoadError> {
        let path = Path::new(storage.url()).join(&listed.0);
        let mut head = read(listed, 0..4096)?;
        if let Some(end) = npy::data_offset(&head).filter(|&end| end > head.len() && end as u64 <= listed.1) {
            head = read(listed, 0..end as u64)?;
        }
        let header = npy::parse_header(&head).map_err(|problem| LoadError::Header { path: path.clone(), problem })?;
        let expected_bytes = header.num_elements() * header.dtype.size_bytes() as u64;
        let actual_bytes = listed.1.saturating_sub(header.data_offset as u64);
        if actual_bytes < expected_bytes {
            return Err(LoadError::Truncated { path, expected_bytes, actual_bytes });
        }
        Ok(header)
    };
    let (values_header, offsets_header) = (header(&values)?, header(&offsets)?);
    let offsets_path = Path::new(storage.url()).join(&offsets.0);
    let bad = |problem| LoadError::BadOffsets { path: offsets_path.clone(), problem };
    check_offsets_header(&offsets_header).map_err(bad)?;
    let num_offsets = offsets_header.shape[0];
    let start = offsets_header.data_offset as u64;
    let raw = read(&offsets, start..start + num_offsets * 8)?;
    let rows = values_header.shape[0];
    check_offset_bytes(&raw, offsets_header.big_endian, rows, &Path::new(storage.url()).join(&values.0))
        .map_err(bad)?;
    let decode = |c: &[u8]| {
        let raw: [u8; 8] = c.try_into().unwrap_or_default();
        if offsets_header.big_endian { i64::from_be_bytes(raw) } else { i64::from_le_bytes(raw) }
    };
    let row_bytes = values_header.shape[1..].iter().product::<u64>() * values_header.dtype.size_bytes() as u64;
    let (object, size, version) = values;
    let source = RemoteRagged {
        storage: storage.clone(),
        object,
        size,
        version,
        values_offset: values_header.data_offset as u64,
        values_big_endian: values_header.big_endian,
        row_bytes,
        // Checked non-negative and increasing above.
        offsets: raw.chunks_exact(8).map(|c| decode(c) as u64).collect(),
    };
    Ok(ragged_field(name, &values_header, num_offsets - 1, Source::RemoteRagged(Box::new(source))))
}

/// The ragged field `name` of `num_samples` samples whose values have `values`' dtype and row
/// shape.
fn ragged_field(name: &str, values: &NpyHeader, num_samples: u64, source: Source) -> Field {
    Field {
        name: name.to_owned(),
        dtype: values.dtype,
        sample_shape: values.shape[1..].to_vec(),
        bytes_per_sample: 0,
        chunk_len: 1,
        dims: Vec::new(),
        num_samples,
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source,
    }
}

/// An offsets file's header: int64, one-dimensional, at least one offset.
fn check_offsets_header(header: &NpyHeader) -> Result<(), OffsetsProblem> {
    if header.dtype != DType::Int64 {
        return Err(OffsetsProblem::NotInt64 { dtype: header.dtype.name() });
    }
    if header.shape.len() != 1 {
        return Err(OffsetsProblem::NotOneDimensional { shape: header.shape.clone() });
    }
    if header.shape[0] == 0 {
        return Err(OffsetsProblem::Empty);
    }
    Ok(())
}

/// Opens the ragged field `name` from its values file and its offsets file.
///
/// # Errors
/// [`LoadError::Header`] or [`LoadError::Truncated`] for either file, and
/// [`LoadError::BadOffsets`] when the offsets do not describe the values.
pub(super) fn open(name: &str, values_path: &Path, offsets_path: &Path) -> Result<Field, LoadError> {
    let (values, values_header) = open_npy(values_path)?;
    let (offsets, offsets_header) = open_npy(offsets_path)?;
    let bad = |problem| LoadError::BadOffsets { path: offsets_path.to_owned(), problem };
    check_offsets_header(&offsets_header).map_err(bad)?;
    let num_offsets = offsets_header.shape[0];
    let rows = values_header.shape[0];
    let source = RaggedSource {
        values: Arc::new(values),
        values_offset: values_header.data_offset,
        values_big_endian: values_header.big_endian,
        row_bytes: values_header.shape[1..].iter().product::<u64>() as usize * values_header.dtype.size_bytes(),
        offsets: Arc::new(offsets),
        offsets_offset: offsets_header.data_offset,
        offsets_big_endian: offsets_header.big_endian,
    };
    check_offsets(&source, num_offsets, rows, values_path).map_err(bad)?;
    Ok(ragged_field(name, &values_header, num_offsets - 1, Source::Ragged(Box::new(source))))
}

/// Maps `path` and parses its header, checking it holds the bytes the header promises.
fn open_npy(path: &Path) -> Result<(MappedFile, NpyHeader), LoadError> {
    let map = MappedFile::open(path).map_err(|error| LoadError::Io { path: path.to_owned(), error })?;
    let header = npy::parse_header(&map).map_err(|problem| LoadError::Header { path: path.to_owned(), problem })?;
    let expected_bytes = header.num_elements() * header.dtype.size_bytes() as u64;
    let actual_bytes = (map.len() - header.data_offset) as u64;
    if actual_bytes < expected_bytes {
        return Err(LoadError::Truncated { path: path.to_owned(), expected_bytes, actual_bytes });
    }
    Ok((map, header))
}

/// Offsets start at 0, never decrease, and end at the values' row count. Reads each once.
fn check_offsets(source: &RaggedSource, num_offsets: u64, rows: u64, values: &Path) -> Result<(), OffsetsProblem> {
    let start = source.offsets_offset;
    let bytes = &source.offsets[start..start + num_offsets as usize * 8];
    check_offset_bytes(bytes, source.offsets_big_endian, rows, values)
}

/// [`check_offsets`] on the offsets' bytes (`int64`, big- or little-endian; a partial last
/// entry is ignored): the check the fuzz target `ragged_offsets` drives.
///
/// # Errors
/// The first rule an offset breaks.
pub fn check_offset_bytes(bytes: &[u8], big_endian: bool, rows: u64, values: &Path) -> Result<(), OffsetsProblem> {
    let mut offsets = bytes.chunks_exact(8).map(|c| {
        let raw: [u8; 8] = c.try_into().unwrap_or_default();
        if big_endian { i64::from_be_bytes(raw) } else { i64::from_le_bytes(raw) }
    });
    let first = offsets.next().ok_or(OffsetsProblem::Empty)?;
    if first != 0 {
        return Err(OffsetsProblem::NotFromZero { first });
    }
    let mut previous = first;
    for (index, next) in offsets.enumerate() {
        if next < previous {
            return Err(OffsetsProblem::Decreasing { index: index as u64, at: previous, next });
        }
        previous = next;
    }
    if u64::try_from(previous).ok() != Some(rows) {
        return Err(OffsetsProblem::WrongEnd { last: previous, rows, values: values.to_owned() });
    }
    Ok(())
}

/// Takes the offsets files (`FIELD.offsets.npy`) out of `files` (paths of `.npy` files in one
/// directory) and returns them by field name, so the values files open as fields whose offsets
/// are known.
pub(super) fn split_offsets(files: &mut Vec<PathBuf>) -> Vec<(String, PathBuf)> {
    let stem = |path: &Path| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut ragged = Vec::new();
    files.retain(|path| match stem(path).strip_suffix(OFFSETS_SUFFIX) {
        Some(field) => {
            ragged.push((field.to_owned(), path.clone()));
            false
        }
        None => true,
    });
    ragged.sort();
    ragged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(offsets: &[i64], big_endian: bool) -> Vec<u8> {
        offsets.iter().flat_map(|o| if big_endian { o.to_be_bytes() } else { o.to_le_bytes() }).collect()
    }

    #[test]
    fn offsets_must_start_at_zero_never_decrease_and_end_at_the_rows() {
        let values = Path::new("v.npy");
        let check = |offsets: &[i64], rows| check_offset_bytes(&bytes(offsets, false), false, rows, values);
        assert!(check(&[0, 2, 2, 5], 5).is_ok());
        assert!(check(&[0], 0).is_ok(), "no samples, no rows");
        assert!(check_offset_bytes(&bytes(&[0, 1, 4], true), true, 4, values).is_ok(), "big-endian");
        assert!(matches!(check(&[], 0), Err(OffsetsProblem::Empty)));
        assert!(matches!(check(&[1, 5], 5), Err(OffsetsProblem::NotFromZero { first: 1 })));
        assert!(matches!(check(&[0, 3, 2, 5], 5), Err(OffsetsProblem::Decreasing { index: 1, at: 3, next: 2 })));
        assert!(matches!(check(&[0, 2, 4], 5), Err(OffsetsProblem::WrongEnd { last: 4, rows: 5, .. })));
        assert!(matches!(check(&[0, -1], 0), Err(OffsetsProblem::Decreasing { .. })), "negative offsets");
    }
}
