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
    /// The tokens (the documents', EOS and padding tokens).
    Tokens,
    /// Each token's document number within its sequence, from 0; -1 for padding (`int32`).
    Segments,
    /// Each token's position within its document; 0 for padding (`int32`).
    Positions,
}

/// How documents become sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackMode {
    /// Joined with EOS tokens and cut into windows of `L + 1` with stride `L`.
    Concat,
    /// Whole documents (each with its EOS when one is given) placed into sequences of `L` by
    /// first-fit decreasing within blocks of [`PACK_BLOCK_DOCUMENTS`] documents, the rest padded;
    /// a document longer than `L` is cut into pieces of `L` first.
    Bins,
}

/// Documents packed together: the bin packing is planned within blocks of this many documents
/// (in stored order), so the plan of a block never depends on another.
pub const PACK_BLOCK_DOCUMENTS: usize = 1024;

/// How to pack (from `--pack NAME=L,...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// `L`.
    pub length: u64,
    /// How.
    pub mode: PackMode,
    /// The token after each document (required for [`PackMode::Concat`]).
    pub eos: Option<i64>,
    /// The token that fills a bin's unused end (required for [`PackMode::Bins`]).
    pub pad: Option<i64>,
}

/// One stretch of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    /// Token rows `from..to` of a document.
    Run { document: u64, from: u64, to: u64 },
    /// A document's EOS token, at its position.
    Eos { document: u64, position: u64 },
    /// Padding tokens.
    Pad(u64),
}

/// Where each sequence's tokens come from.
#[derive(Debug)]
enum Layout {
    /// Where each document starts in the joined stream (with its EOS), and the stream's length
    /// last.
    Concat { starts: Vec<u64> },
    /// Each sequence's pieces (`bins[k]..bins[k + 1]` of `pieces`): (document, from, to) over
    /// the document with its EOS (position `len` is the EOS when there is one).
    Bins { pieces: Vec<(u64, u64, u64)>, bins: Vec<u64>, lengths: Vec<u64> },
}

/// Documents packed into sequences (see the module docs).
#[derive(Debug)]
pub(super) struct Packer {
    /// The documents: a ragged field of token ids.
    documents: Field,
    layout: Layout,
    /// Tokens per window step or bin (`L`).
    length: u64,
    /// The EOS and padding tokens' bytes in the documents' dtype (empty when not given).
    eos: Vec<u8>,
    pad: Vec<u8>,
}

impl Packer {
    /// The stretches of sequence `k`.
    fn items(&self, k: u64) -> Vec<Item> {
        let mut items = Vec::new();
        match &self.layout {
            Layout::Concat { starts } => {
                let document_at = |p: u64| starts.partition_point(|&start| start <= p) - 1;
                let span = k * self.length..k * self.length + self.length + 1;
                let mut p = span.start;
                while p < span.end {
                    let document = document_at(p);
                    let (start, eos_at) = (starts[document], starts[document + 1] - 1);
                    if p < eos_at {
                        let end = eos_at.min(span.end);
                        items.push(Item::Run { document: document as u64, from: p - start, to: end - start });
                        p = end;
                    } else {
                        items.push(Item::Eos { document: document as u64, position: p - start });
                        p += 1;
                    }
                }
            }
            Layout::Bins { pieces, bins, lengths } => {
                let mut used = 0;
                for &(document, from, to) in &pieces[bins[k as usize] as usize..bins[k as usize + 1] as usize] {
                    let len = lengths[document as usize];
                    if from < len.min(to) {
                        items.push(Item::Run { document, from, to: to.min(len) });
                    }
                    if to > len {
                        items.push(Item::Eos { document, position: len });
                    }
                    used += to - from;
                }
                if used < self.length {
                    items.push(Item::Pad(self.length - used));
                }
            }
        }
        items
    }

    /// Appends `part` of sequences `indices` to `tensor`; the tokens read the rows of the
    /// documents the sequences hold. Returns the bytes read.
    ///
    /// # Errors
    /// The sequence whose documents could not be read, and why.
    pub(super) fn select_into(
        &self,
        part: Part,
        indices: &[u64],
        tensor: &mut OutgoingTensor,
    ) -> Result<u64, (u64, String)> {
        let per_sequence = match self.layout {
            Layout::Concat { .. } => self.length as usize + 1,
            Layout::Bins { .. } => self.length as usize,
        };
        let mut out = Vec::with_capacity(indices.len() * per_sequence * 4);
        let mut read = 0;
        let sequences: Vec<Vec<Item>> = indices.iter().map(|&k| self.items(k)).collect();
        match part {
            Part::Segments | Part::Positions => {
                for items in &sequences {
                    let mut segment = -1i32;
                    let mut current = None;
                    for &item in items {
                        let (document, positions) = match item {
                            Item::Run { document, from, to } => (Some(document), from..to),
                            Item::Eos { document, position } => (Some(document), position..position + 1),
                            Item::Pad(count) => (None, 0..count),
                        };
                        if document.is_some() && document != current {
                            segment += 1;
                            current = document;
                        }
                        for position in positions {
                            let value = match (part, document) {
                                (Part::Segments, Some(_)) => segment,
                                (Part::Segments, None) => -1,
                                (_, Some(_)) => position as i32,
                                (_, None) => 0,
                            };
                            out.extend_from_slice(&value.to_le_bytes());
                        }
                    }
                }
            }
            Part::Tokens => {
                // Only the rows a sequence holds are read, however long the document.
                let runs: Vec<(u64, u64, u64)> = sequences
                    .iter()
                    .flatten()
                    .filter_map(|item| match *item {
                        Item::Run { document, from, to } => Some((document, from, to)),
                        _ => None,
                    })
                    .collect();
                let read_spans = self.documents.ragged_spans(&runs).unwrap_or_else(|| Err("not a ragged pair".into()));
                let (values, big_endian) = read_spans.map_err(|reason| {
                    (indices[0], format!("reading the documents of sequence {}: {reason}", indices[0]))
                })?;
                let element = self.documents.dtype.size_bytes();
                let mut values = values.into_iter();
                for &item in sequences.iter().flatten() {
                    match item {
                        Item::Run { .. } => {
                            let bytes = values.next().unwrap_or_default();
                            read += bytes.len() as u64;
                            if big_endian && element > 1 {
                                for value in bytes.chunks_exact(element) {
                                    out.extend(value.iter().rev());
                                }
                            } else {
                                out.extend_from_slice(&bytes);
                            }
                        }
                        Item::Eos { .. } => out.extend_from_slice(&self.eos),
                        Item::Pad(count) => {
                            for _ in 0..count {
                                out.extend_from_slice(&self.pad);
                            }
                        }
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

/// First-fit decreasing of `lengths` (documents `first..`, each with its EOS when `eos`) into
/// bins of `length`, a document longer than that cut into pieces of `length` first: appends the
/// pieces, bin by bin, and each bin's first piece to `bins`.
fn pack_block(
    first: u64,
    lengths: &[u64],
    eos: bool,
    length: u64,
    pieces: &mut Vec<(u64, u64, u64)>,
    bins: &mut Vec<u64>,
) {
    let mut items: Vec<(u64, u64, u64)> = Vec::new();
    for (i, &len) in lengths.iter().enumerate() {
        let total = len + u64::from(eos);
        let mut from = 0;
        while from < total {
            let to = (from + length).min(total);
            items.push((first + i as u64, from, to));
            from = to;
        }
    }
    // Longest first; ties in stored order (a stable sort), so the plan is the same everywhere.
    items.sort_by_key(|&(_, from, to)| std::cmp::Reverse(to - from));
    let mut open: Vec<(u64, Vec<(u64, u64, u64)>)> = Vec::new();
    for item in items {
        let size = item.2 - item.1;
        match open.iter_mut().find(|(used, _)| used + size <= length) {
            Some((used, bin)) => {
                *used += size;
                bin.push(item);
            }
            None => open.push((size, vec![item])),
        }
    }
    for (_, mut bin) in open {
        // Within a sequence, documents in stored order.
        bin.sort_unstable();
        bins.push(pieces.len() as u64);
        pieces.extend(bin);
    }
}

/// A token id as bytes of `dtype`, if it holds it.
fn token_bytes(dtype: DType, id: i64) -> Option<Vec<u8>> {
    match dtype {
        DType::Uint8 => u8::try_from(id).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Uint16 => u16::try_from(id).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Uint32 => u32::try_from(id).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Int32 => i32::try_from(id).ok().map(|v| v.to_le_bytes().to_vec()),
        DType::Int64 => Some(id.to_le_bytes().to_vec()),
        DType::Uint64 => u64::try_from(id).ok().map(|v| v.to_le_bytes().to_vec()),
        _ => None,
    }
}

/// `dataset` (one ragged field of token ids) packed as `options` says: fields `tokens`,
/// `segment_ids` and `position_ids`, of `L + 1` tokens (concat) or `L` (bins).
///
/// # Errors
/// [`LoadError::Tokens`] for a dataset of more than one field, a field that is not ragged token
/// ids with known lengths, an EOS or padding id its dtype cannot hold (or missing where the mode
/// needs it), or too few tokens for one window.
pub fn into_packed(mut dataset: Dataset, options: PackOptions) -> Result<Dataset, LoadError> {
    let bad = |problem: String| LoadError::Tokens { dataset: dataset.name.clone(), problem };
    let PackOptions { length, mode, eos, pad } = options;
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
    let dtype = documents.dtype;
    let id = |what: &str, id: Option<i64>| -> Result<Vec<u8>, LoadError> {
        match id {
            None => Ok(Vec::new()),
            Some(id) => token_bytes(dtype, id)
                .ok_or_else(|| bad(format!("{what}={id} is not a token id of the documents' dtype {}", dtype.name()))),
        }
    };
    let (eos_bytes, pad_bytes) = (id("eos", eos)?, id("pad", pad)?);
    if length == 0 {
        return Err(bad("--pack needs a length of at least 1 token".into()));
    }
    let (layout, num_sequences, sequence) = match mode {
        PackMode::Concat => {
            if eos.is_none() {
                return Err(bad(format!(
                    "--pack {}={length} joins documents with an EOS token: add eos=ID",
                    dataset.name
                )));
            }
            let mut starts = Vec::with_capacity(lengths.len() + 1);
            let mut at = 0u64;
            for len in &lengths {
                starts.push(at);
                at += len + 1;
            }
            starts.push(at);
            if at < length + 1 {
                return Err(bad(format!(
                    "--pack {}={length} needs at least {} tokens and the documents and their EOS tokens make {at}",
                    dataset.name,
                    length.saturating_add(1)
                )));
            }
            (Layout::Concat { starts }, (at - 1) / length, length + 1)
        }
        PackMode::Bins => {
            if pad.is_none() {
                return Err(bad(format!(
                    "--pack {}={length},bins fills each sequence's end: add pad=ID",
                    dataset.name
                )));
            }
            let (mut pieces, mut bins) = (Vec::new(), Vec::new());
            for (block, chunk) in lengths.chunks(PACK_BLOCK_DOCUMENTS).enumerate() {
                let first = (block * PACK_BLOCK_DOCUMENTS) as u64;
                pack_block(first, chunk, eos.is_some(), length, &mut pieces, &mut bins);
            }
            let num_bins = bins.len() as u64;
            bins.push(pieces.len() as u64);
            let tokens: u64 = lengths.iter().map(|len| len + u64::from(eos.is_some())).sum();
            let padding = num_bins * length - tokens;
            tracing::info!(
                dataset = %dataset.name,
                documents = lengths.len(),
                sequences = num_bins,
                padding_share = padding as f64 / (num_bins * length).max(1) as f64,
                "documents packed into sequences"
            );
            (Layout::Bins { pieces, bins, lengths }, num_bins, length)
        }
    };
    if num_sequences == 0 {
        return Err(bad("--pack found no tokens to pack".into()));
    }
    let packer = Arc::new(Packer { documents, layout, length, eos: eos_bytes, pad: pad_bytes });
    let field = |name: &str, dtype: DType, part: Part| Field {
        name: name.to_owned(),
        dtype,
        sample_shape: vec![sequence],
        bytes_per_sample: sequence as usize * dtype.size_bytes(),
        chunk_len: 1,
        dims: Vec::new(),
        num_samples: num_sequences,
        id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
        source: Source::Packed(packer.clone(), part),
    };
    dataset.fields = vec![
        field("position_ids", DType::Int32, Part::Positions),
        field("segment_ids", DType::Int32, Part::Segments),
        field(TOKENS_FIELD, dtype, Part::Tokens),
    ];
    dataset.num_samples = num_sequences;
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
