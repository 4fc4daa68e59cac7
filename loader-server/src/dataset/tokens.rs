//! Token streams for language models: a flat file of token ids as tokenizers write them (a raw
//! little-endian `.bin`, nanoGPT and Megatron style, of a dtype given with `--token-dtype`; or a
//! 1-D `.npy`) served as one field `tokens`, and `--windows NAME=L`, which serves a 1-D field as
//! windows of `L + 1` tokens with stride `L`: window `k` is tokens `k*L ..= k*L + L`, the inputs
//! of a next-token model and, shifted by one, its targets. Every token but the last few
//! (fewer than `L`) is an input of exactly one window, so an epoch over the windows under any
//! shuffle reads each once; the windows are rows of the mapped file that overlap by one token.
//!
//! Documents (a ragged field of token ids) are packed with `--pack NAME=L,eos=ID`: the documents
//! joined in stored order, each followed by the EOS token, and that stream cut into windows as
//! above. Window `k` is computed from the documents' start positions alone (8 bytes a document,
//! in memory), so any replica serves any window and a resume reaches window `k` without replaying;
//! beside `tokens` each window carries `segment_ids` (the document's number within the window,
//! from 0) and `position_ids` (the token's position within its document, restarting at each
//! document; an EOS takes the position after its document's last token), what attention masks
//! and position embeddings need to keep packed documents apart.

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use conveyor_proto::{
    DType,
    wire::{OutgoingTensor, Piece},
};

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

/// What a field of a packed dataset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// The tokens (the documents' and the EOS tokens).
    Tokens,
    /// Each token's document number within its window, from 0 (`int32`).
    Segments,
    /// Each token's position within its document (`int32`).
    Positions,
}

/// Documents joined with EOS tokens and cut into windows (see the module docs).
#[derive(Debug)]
pub(super) struct Packer {
    /// The documents: a ragged field of token ids.
    documents: Field,
    /// Where each document starts in the joined stream, and the stream's length last
    /// (`documents + 1` entries).
    starts: Vec<u64>,
    /// Tokens per window step (`L`).
    length: u64,
    /// The EOS token's bytes in the documents' dtype.
    eos: Vec<u8>,
}

impl Packer {
    /// The document holding stream position `p` (`< stream length`).
    fn document_at(&self, p: u64) -> usize {
        self.starts.partition_point(|&start| start <= p) - 1
    }

    /// Stream positions of window `k`.
    fn span(&self, k: u64) -> std::ops::Range<u64> {
        k * self.length..k * self.length + self.length + 1
    }

    /// Appends `part` of windows `indices` to `tensor`; the tokens read the rows of the documents
    /// the windows hold. Returns the bytes read.
    ///
    /// # Errors
    /// The window whose documents could not be read, and why.
    pub(super) fn select_into(
        &self,
        part: Part,
        indices: &[u64],
        tensor: &mut OutgoingTensor,
    ) -> Result<u64, (u64, String)> {
        let mut out = Vec::with_capacity(indices.len() * (self.length as usize + 1) * 4);
        let mut read = 0;
        match part {
            Part::Segments | Part::Positions => {
                for &k in indices {
                    let span = self.span(k);
                    let first = self.document_at(span.start);
                    for p in span {
                        let document = self.document_at(p);
                        let value = match part {
                            Part::Segments => (document - first) as i32,
                            _ => (p - self.starts[document]) as i32,
                        };
                        out.extend_from_slice(&value.to_le_bytes());
                    }
                }
            }
            Part::Tokens => {
                // Per window, its runs of document tokens ((document, from, to) rows) and EOS
                // positions; only the rows a window holds are read, however long the document.
                let mut runs: Vec<(u64, u64, u64)> = Vec::new();
                let mut plan: Vec<Option<usize>> = Vec::new();
                for &k in indices {
                    let span = self.span(k);
                    let mut p = span.start;
                    while p < span.end {
                        let document = self.document_at(p);
                        let (start, eos_at) = (self.starts[document], self.starts[document + 1] - 1);
                        if p < eos_at {
                            let end = eos_at.min(span.end);
                            plan.push(Some(runs.len()));
                            runs.push((document as u64, p - start, end - start));
                            p = end;
                        } else {
                            plan.push(None);
                            p += 1;
                        }
                    }
                }
                let read_spans = self.documents.ragged_spans(&runs).unwrap_or_else(|| Err("not a ragged pair".into()));
                let (values, big_endian) = read_spans.map_err(|reason| {
                    (indices[0], format!("reading the documents of window {}: {reason}", indices[0]))
                })?;
                let element = self.eos.len();
                for step in plan {
                    match step {
                        Some(run) => {
                            let bytes = &values[run];
                            read += bytes.len() as u64;
                            if big_endian && element > 1 {
                                for value in bytes.chunks_exact(element) {
                                    out.extend(value.iter().rev());
                                }
                            } else {
                                out.extend_from_slice(bytes);
                            }
                        }
                        None => out.extend_from_slice(&self.eos),
                    }
                }
            }
        }
        let len = out.len();
        let piece = tensor.add_piece(Piece { bytes: Bytes::from(out), big_endian: false });
        tensor.push(piece, 0, len);
        Ok(read)
    }
}

/// `dataset` (one ragged field of token ids) packed into windows of `length + 1` tokens with
/// stride `length`, each document followed by `eos`: fields `tokens`, `segment_ids` and
/// `position_ids`.
///
/// # Errors
/// [`LoadError::Tokens`] for a dataset of more than one field, a field that is not ragged token
/// ids with known lengths, an EOS id its dtype cannot hold, or too few tokens for one window.
pub fn into_packed(mut dataset: Dataset, length: u64, eos: i64) -> Result<Dataset, LoadError> {
    let bad = |problem: String| LoadError::Tokens { dataset: dataset.name.clone(), problem };
    if dataset.fields.len() != 1 {
        let names: Vec<&str> = dataset.fields.iter().map(|f| f.name.as_str()).collect();
        return Err(bad(format!(
            "--pack needs one ragged field of documents' token ids and the dataset has {} ({}); choose it with \
             --fields {}=FIELD",
            names.len(),
            names.join(", "),
            dataset.name
        )));
    }
    let documents = dataset.fields.remove(0);
    let lengths = documents
        .ragged_lengths()
        .filter(|_| documents.sample_shape.is_empty() && documents.ragged_spans(&[]).is_some())
        .ok_or_else(|| {
            bad(format!(
                "--pack needs documents as a ragged field of token ids (TOKENS.npy + TOKENS.offsets.npy, locally or in \
             object storage); '{}' is not one",
                documents.name
            ))
        })?;
    let element = documents.dtype.size_bytes();
    let eos_bytes = match documents.dtype {
        DType::Uint8 => u8::try_from(eos).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Uint16 => u16::try_from(eos).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Uint32 => u32::try_from(eos).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Int32 => i32::try_from(eos).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Int64 => Some(eos.to_le_bytes().to_vec()),
        DType::Uint64 => u64::try_from(eos).ok().map(|v| v.to_le_bytes().to_vec()),
        _ => None,
    }
    .filter(|b| b.len() == element)
    .ok_or_else(|| bad(format!("eos={eos} is not a token id of the documents' dtype {}", documents.dtype.name())))?;
    let mut starts = Vec::with_capacity(lengths.len() + 1);
    let mut at = 0u64;
    for len in lengths {
        starts.push(at);
        at += len + 1;
    }
    starts.push(at);
    if length == 0 || at < length + 1 {
        return Err(bad(format!(
            "--pack {}={length} needs at least {} tokens and the documents and their EOS \
             tokens make {at}",
            dataset.name,
            length.saturating_add(1)
        )));
    }
    let num_windows = (at - 1) / length;
    let packer = Arc::new(Packer { documents, starts, length, eos: eos_bytes });
    let field = |name: &str, dtype: DType, part: Part| Field {
        name: name.to_owned(),
        dtype,
        sample_shape: vec![length + 1],
        bytes_per_sample: (length as usize + 1) * dtype.size_bytes(),
        chunk_len: 1,
        dims: Vec::new(),
        num_samples: num_windows,
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source: Source::Packed(packer.clone(), part),
    };
    dataset.fields = vec![
        field("position_ids", DType::Int32, Part::Positions),
        field("segment_ids", DType::Int32, Part::Segments),
        field(TOKENS_FIELD, packer.documents.dtype, Part::Tokens),
    ];
    dataset.num_samples = num_windows;
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
