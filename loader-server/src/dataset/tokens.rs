//! Token streams for language models: a flat file of token ids as tokenizers write them (a raw
//! little-endian `.bin`, nanoGPT and Megatron style, of a dtype given with `--token-dtype`; or a
//! 1-D `.npy`) served as one field `tokens`, and `--windows NAME=L`, which serves a 1-D field as
//! windows of `L + 1` tokens with stride `L`: window `k` is tokens `k*L ..= k*L + L`, the inputs
//! of a next-token model and, shifted by one, its targets. Every token but the last few
//! (fewer than `L`) is an input of exactly one window, so an epoch over the windows under any
//! shuffle reads each once; the windows are rows of the mapped file that overlap by one token.

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use conveyor_proto::DType;

use super::{Dataset, Field, NEXT_FIELD_ID, Shard, ShardData, Source};
use crate::{error::LoadError, storage::mmap::MappedFile};

/// The field a token file is served as.
pub const TOKENS_FIELD: &str = "tokens";

/// Whether `path` is a raw token file (`.bin`).
pub fn is_token_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "bin")
}

/// Opens the raw token file `path` (`.bin`: little-endian `dtype` values, no header) as the
/// dataset `name` with one field, `tokens`, one token a sample.
///
/// # Errors
/// [`LoadError::Tokens`] when the dtype is missing or not an integer type, or the file's size is
/// not a whole number of tokens; [`LoadError::Io`] when it cannot be mapped.
pub fn open_bin(name: &str, path: &Path, dtype: Option<DType>) -> Result<Dataset, LoadError> {
    let bad = |problem: String| LoadError::Tokens { dataset: name.to_owned(), problem };
    let dtype = dtype.ok_or_else(|| {
        bad(format!(
            "{} is a raw token file: give its element type with --token-dtype {name}=uint16 (vocabularies under \
             65,536 tokens, as nanoGPT writes them) or {name}=uint32",
            path.display()
        ))
    })?;
    if !matches!(dtype, DType::Uint8 | DType::Uint16 | DType::Uint32 | DType::Int32 | DType::Int64 | DType::Uint64) {
        return Err(bad(format!("--token-dtype {} is not an integer type of token ids", dtype.name())));
    }
    let map = MappedFile::open(path).map_err(|error| LoadError::Io { path: path.to_owned(), error })?;
    let element = dtype.size_bytes();
    if map.len() % element != 0 {
        return Err(bad(format!(
            "{} holds {} bytes, not a whole number of {} tokens ({element} bytes each); is --token-dtype right?",
            path.display(),
            map.len(),
            dtype.name()
        )));
    }
    let num_samples = (map.len() / element) as u64;
    let shard = Shard { data: ShardData::Mapped(Arc::new(map)), data_offset: 0, num_samples, big_endian: false };
    let field = Field {
        name: TOKENS_FIELD.to_owned(),
        dtype,
        sample_shape: Vec::new(),
        bytes_per_sample: element,
        chunk_len: 1,
        dims: Vec::new(),
        num_samples,
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source: Source::Npy { shards: vec![shard], shard_starts: vec![0] },
    };
    Ok(Dataset {
        name: name.to_owned(),
        dir: path.to_owned(),
        num_samples,
        fields: vec![field],
        coordinates: Vec::new(),
        metadata_source: None,
        storage: None,
    })
}

/// One field served as overlapping windows of its mapped rows.
#[derive(Debug)]
pub(super) struct Windows {
    /// The token file (one shard).
    shard: Shard,
    /// Bytes from one window's start to the next's (`L` tokens).
    stride_bytes: usize,
}

impl Windows {
    /// Where window `index` starts in the map, and the map.
    pub(super) fn place(&self, index: u64) -> (&Arc<MappedFile>, usize, bool) {
        let ShardData::Mapped(map) = &self.shard.data else { unreachable!("windows are made over mapped files") };
        (map, self.shard.data_offset + index as usize * self.stride_bytes, self.shard.big_endian)
    }
}

/// `dataset` served as windows of `length + 1` tokens with stride `length` of its one 1-D field.
///
/// # Errors
/// [`LoadError::Tokens`] for a dataset of more than one field, a field that is not 1-D, sharded
/// or remote, or too short for one window.
pub fn into_windows(mut dataset: Dataset, length: u64) -> Result<Dataset, LoadError> {
    let bad = |problem: String| LoadError::Tokens { dataset: dataset.name.clone(), problem };
    if dataset.fields.len() != 1 {
        let names: Vec<&str> = dataset.fields.iter().map(|f| f.name.as_str()).collect();
        return Err(bad(format!(
            "--windows needs one field of token ids and the dataset has {} ({}); choose it with --fields {}=FIELD",
            names.len(),
            names.join(", "),
            dataset.name
        )));
    }
    let field = dataset.fields.remove(0);
    if !field.sample_shape.is_empty() {
        return Err(bad(format!(
            "--windows needs a 1-D field of token ids; '{}' has samples of shape {:?}",
            field.name, field.sample_shape
        )));
    }
    let Source::Npy { mut shards, .. } = field.source else {
        return Err(bad(format!("--windows reads a local .npy or .bin file; '{}' is stored otherwise", field.name)));
    };
    if shards.len() != 1 || !matches!(shards[0].data, ShardData::Mapped(_)) {
        return Err(bad(format!(
            "--windows reads one local file; '{}' is {} shards or remote (concatenate them into one file)",
            field.name,
            shards.len()
        )));
    }
    let tokens = field.num_samples;
    if length == 0 || tokens < length + 1 {
        return Err(bad(format!(
            "--windows {}={length} needs at least {} tokens and '{}' holds {tokens}",
            dataset.name,
            length.saturating_add(1),
            field.name
        )));
    }
    let num_windows = (tokens - 1) / length;
    let element = field.bytes_per_sample;
    let windows = Windows { shard: shards.remove(0), stride_bytes: length as usize * element };
    dataset.num_samples = num_windows;
    dataset.fields.push(Field {
        sample_shape: vec![length + 1],
        bytes_per_sample: (length as usize + 1) * element,
        num_samples: num_windows,
        source: Source::Windows(Box::new(windows)),
        ..field
    });
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::chunk_cache::ChunkCache;

    #[test]
    fn windows_overlap_by_one_token_and_cover_every_input_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train.bin");
        let tokens: Vec<u16> = (0..23).collect();
        std::fs::write(&path, tokens.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>()).expect("write");
        let dataset = open_bin("t", &path, Some(DType::Uint16)).expect("opens");
        assert_eq!(dataset.num_samples, 23);
        let windows = into_windows(dataset, 5).expect("windows");
        assert_eq!(windows.num_samples, 4, "(23 - 1) / 5");
        let (rows, _) = windows.gather(&[3, 0], &ChunkCache::new(0, 1)).expect("gathers");
        let got: Vec<u16> = rows[0].data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got, [15, 16, 17, 18, 19, 20, 0, 1, 2, 3, 4, 5]);
        let short = open_bin("t", &path, Some(DType::Uint16)).expect("opens");
        assert!(into_windows(short, 23).expect_err("too short").to_string().contains("needs at least 24 tokens"));
    }
}
