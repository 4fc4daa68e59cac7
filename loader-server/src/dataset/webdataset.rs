//! WebDataset shards: tar files whose members are grouped into samples by key, as the
//! `webdataset` library writes and reads them. A member `DIR/KEY.EXT` (the extension is
//! everything after the first dot of the file name) belongs to sample `DIR/KEY`; consecutive
//! members with one key are one sample; each extension is a field. `cls` members (a class index
//! as text) are parsed into an `int64` field; every other extension is a ragged `uint8` field of
//! the members' bytes as stored (images are not decoded), marked UTF-8 for text extensions
//! (`txt`, `json` ...).
//!
//! The shards (`DIR/*.tar` in name order, or one `.tar` file) are indexed once at start-up from
//! their headers alone (seeking past the data) and memory-mapped; a batch's members are runs into
//! the maps, copied once into its message, with each shard checked unchanged first. Shards
//! under an object-store prefix (`PREFIX/*.tar`) are indexed the same way through ranged reads
//! of [`INDEX_WINDOW_BYTES`] at each header (a member's data is skipped, not read), pinned at
//! their listed version; a batch reads its members by ranges, near ones merged.

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use conveyor_proto::{
    DType,
    wire::{OutgoingTensor, Piece},
};

use super::{
    Field, NEXT_FIELD_ID, Source,
    ragged::{ListedObject, OffsetsWriter},
};
use crate::{
    error::LoadError,
    storage::{ObjectStorage, mmap::MappedFile, shared_bytes},
};

/// Where a member's bytes are: (shard, offset, size).
type Place = (u32, u64, u64);

/// A sample as indexed: its shard, key and members by extension.
type Sample = (u32, String, BTreeMap<String, (u64, u64)>);

/// A dataset's shards: mapped files, or objects under a store's prefix.
#[derive(Debug)]
enum Shards {
    Mapped(Vec<Arc<MappedFile>>),
    Remote { storage: Arc<ObjectStorage>, objects: Vec<ListedObject> },
}

impl Shards {
    fn len(&self) -> usize {
        match self {
            Shards::Mapped(maps) => maps.len(),
            Shards::Remote { objects, .. } => objects.len(),
        }
    }

    /// The bytes at `places` ((shard, offset, size) each), each its own slice, in order; a
    /// shard's are read together.
    ///
    /// # Errors
    /// The shard that could not be read, and why.
    fn read_places(&self, places: &[Place]) -> Result<Vec<Bytes>, (u32, String)> {
        let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, place) in places.iter().enumerate() {
            by_shard.entry(place.0).or_default().push(i);
        }
        let mut out = vec![Bytes::new(); places.len()];
        for (shard, at) in by_shard {
            let spans: Vec<(u64, u64)> = at.iter().map(|&i| (places[i].1, places[i].2)).collect();
            for (i, bytes) in at.into_iter().zip(self.read(shard, &spans).map_err(|reason| (shard, reason))?) {
                out[i] = bytes;
            }
        }
        Ok(out)
    }

    /// How messages name shard `shard`.
    fn name(&self, shard: u32) -> PathBuf {
        match self {
            Shards::Mapped(maps) => maps[shard as usize].path().to_owned(),
            Shards::Remote { storage, objects } => Path::new(storage.url()).join(&objects[shard as usize].0),
        }
    }

    /// The byte spans `spans` ((offset, length), inside the shard) of shard `shard`, each its
    /// own slice: of the map (checked unchanged first), or read from the store.
    fn read(&self, shard: u32, spans: &[(u64, u64)]) -> Result<Vec<Bytes>, String> {
        match self {
            Shards::Mapped(maps) => {
                let map = &maps[shard as usize];
                map.check()?;
                let whole = shared_bytes(map.clone());
                Ok(spans.iter().map(|&(at, len)| whole.slice(at as usize..(at + len) as usize)).collect())
            }
            Shards::Remote { storage, objects } => {
                let (object, size, version) = &objects[shard as usize];
                storage.read_spans(object, *size, version, spans, INDEX_WINDOW_BYTES)
            }
        }
    }
}

/// What one ranged read of a remote shard's index fetches at a header: the header and, for
/// small members (`.cls`, `.txt`, `.json`), the next headers too.
pub(super) const INDEX_WINDOW_BYTES: u64 = 64 << 10;

/// A remote shard read as a file through ranged reads of [`INDEX_WINDOW_BYTES`] (or more, for
/// a longer read), for the tar reader that indexes it: seeking past a member's data costs
/// nothing.
struct RangedReader<'a> {
    storage: &'a ObjectStorage,
    listed: &'a ListedObject,
    position: u64,
    /// The bytes last fetched and where they start.
    window: (u64, Bytes),
}

impl Read for RangedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (object, size, version) = self.listed;
        if self.position >= *size || buf.is_empty() {
            return Ok(0);
        }
        let (start, window) = &self.window;
        if !(*start..*start + window.len() as u64).contains(&self.position) {
            let end = (self.position + INDEX_WINDOW_BYTES.max(buf.len() as u64)).min(*size);
            let range = self.position..end;
            let mut parts = self
                .storage
                .read_ranges(object, *size, version, std::slice::from_ref(&range), None)
                .map_err(std::io::Error::other)?;
            self.window = (self.position, parts.remove(0));
        }
        let (start, window) = &self.window;
        let available = &window[(self.position - start) as usize..];
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for RangedReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let position = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
            SeekFrom::End(delta) => self.listed.1.checked_add_signed(delta),
        };
        self.position = position.ok_or_else(|| std::io::Error::other("a seek before the start of the shard"))?;
        Ok(self.position)
    }
}

/// One field's members: where each sample's bytes lie in which shard.
#[derive(Debug)]
pub(super) struct Members {
    /// The shards.
    shards: Arc<Shards>,
    /// Per sample: (shard, offset of the member's data, its size).
    members: Vec<Place>,
    /// The members are text (`txt`, `json` ...), UTF-8 as WebDataset writes it.
    pub(super) utf8: bool,
    /// Every sample's key (shared by the dataset's fields), for messages.
    keys: Arc<Vec<Box<str>>>,
    /// Bytes of one row of values: 1 for bytes, the row of a `.npy` member's array otherwise.
    row_bytes: u64,
    /// The members' extension.
    extension: String,
}

/// Extensions whose members WebDataset writes as UTF-8 text.
const TEXT_EXTENSIONS: [&str; 5] = ["txt", "text", "json", "jsonl", "transcript"];

impl Members {
    /// Appends the members of `indices` to `tensor` as runs into the shards' maps, with offsets.
    ///
    /// # Errors
    /// When a shard changed since it was indexed (the first index, and why).
    pub(super) fn select_into(&self, indices: &[u64], tensor: &mut OutgoingTensor) -> Result<u64, (u64, String)> {
        let maps = match &*self.shards {
            Shards::Mapped(maps) => maps,
            Shards::Remote { .. } => return self.select_remote(indices, tensor),
        };
        let mut pieces: Vec<Option<u32>> = vec![None; maps.len()];
        let mut offsets = OffsetsWriter::new(indices.len());
        for &index in indices {
            let (shard, offset, size) = self.members[index as usize];
            let piece = match pieces[shard as usize] {
                Some(piece) => piece,
                None => {
                    let map = &maps[shard as usize];
                    map.check().map_err(|reason| (index, reason))?;
                    let piece = tensor.add_piece(Piece { bytes: shared_bytes(map.clone()), big_endian: false });
                    pieces[shard as usize] = Some(piece);
                    piece
                }
            };
            tensor.push(piece, offset as usize, size as usize);
            offsets.push(size / self.row_bytes);
        }
        offsets.finish(tensor);
        Ok(0)
    }

    /// [`Members::select_into`] for remote shards: each shard's members of the batch read by
    /// spans (near ones merged into one request). Returns the bytes fetched.
    fn select_remote(&self, indices: &[u64], tensor: &mut OutgoingTensor) -> Result<u64, (u64, String)> {
        // Per shard, the batch positions of its members.
        let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (position, &index) in indices.iter().enumerate() {
            by_shard.entry(self.members[index as usize].0).or_default().push(position);
        }
        let mut read = vec![Bytes::new(); indices.len()];
        for (shard, positions) in by_shard {
            let spans: Vec<(u64, u64)> = positions
                .iter()
                .map(|&p| {
                    let (_, offset, size) = self.members[indices[p] as usize];
                    (offset, size)
                })
                .collect();
            let parts = self.shards.read(shard, &spans).map_err(|reason| (indices[positions[0]], reason))?;
            for (position, bytes) in positions.into_iter().zip(parts) {
                read[position] = bytes;
            }
        }
        let mut offsets = OffsetsWriter::new(indices.len());
        let mut fetched = 0;
        for bytes in read {
            let len = bytes.len();
            fetched += len as u64;
            let piece = tensor.add_piece(Piece { bytes, big_endian: false });
            tensor.push(piece, 0, len);
            offsets.push(len as u64 / self.row_bytes);
        }
        offsets.finish(tensor);
        Ok(fetched)
    }

    /// Where sample `index` is, for messages: `member KEY.EXT of SHARD`.
    pub(super) fn describe(&self, index: u64) -> String {
        let (shard, offset, size) = self.members[index as usize];
        format!(
            "member {}.{} of {} (bytes {offset}..{})",
            self.keys[index as usize],
            self.extension,
            self.shards.name(shard).display(),
            offset + size
        )
    }

    /// Bytes a batch of `indices` sends: the members' sizes and the offsets.
    pub(super) fn batch_bytes(&self, indices: &[u64]) -> u64 {
        indices.iter().map(|&i| self.members[i as usize].2).sum::<u64>() + (indices.len() as u64 + 1) * 8
    }
}

/// The shards at `path`: the file itself when it is a `.tar`; the files a brace pattern names
/// (`train-{000000..000146}.tar`, `{a,b}.tar`), in the pattern's order; else the `.tar` files
/// directly in the directory, in name order (none when it holds `.npy` files).
///
/// # Errors
/// [`LoadError::WebDataset`] for a pattern that does not parse or names a file that is missing.
pub(super) fn shards(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let text = path.to_string_lossy();
    if text.contains('{') && !path.exists() {
        let expanded =
            expand_braces(&text).map_err(|problem| LoadError::WebDataset { shard: path.to_owned(), problem })?;
        let shards: Vec<PathBuf> = expanded.into_iter().map(PathBuf::from).collect();
        if let Some(missing) = shards.iter().find(|shard| !shard.is_file()) {
            return Err(LoadError::WebDataset {
                shard: missing.clone(),
                problem: format!(
                    "is named by the pattern {text} ({} shards) and is not a file; fix the pattern or the shards",
                    shards.len()
                ),
            });
        }
        return Ok(shards);
    }
    Ok(shards_at(path))
}

/// Most shards a brace pattern may name.
const MAX_PATTERN_SHARDS: usize = 1 << 20;

/// Expands WebDataset's (braceexpand's) patterns: `{000..146}` counts, keeping the width of a
/// zero-padded start; `{a,b,c}` lists; several braces multiply, left to right.
fn expand_braces(text: &str) -> Result<Vec<String>, String> {
    let Some(open) = text.find('{') else { return Ok(vec![text.to_owned()]) };
    let close =
        open + text[open..].find('}').ok_or_else(|| format!("the pattern {text} opens a brace it does not close"))?;
    let (prefix, inner, rest) = (&text[..open], &text[open + 1..close], &text[close + 1..]);
    let choices: Vec<String> = match inner.split_once("..") {
        Some((first, last)) if !inner.contains(',') => {
            let parse = |n: &str| {
                n.parse::<u64>().map_err(|_| format!("'{{{inner}}}' in {text} is not a range of whole numbers"))
            };
            let (start, end) = (parse(first)?, parse(last)?);
            if end < start || end - start >= MAX_PATTERN_SHARDS as u64 {
                return Err(format!("'{{{inner}}}' in {text} counts down or names over {MAX_PATTERN_SHARDS} shards"));
            }
            let width = if first.starts_with('0') { first.len() } else { 0 };
            (start..=end).map(|n| format!("{n:0width$}")).collect()
        }
        _ => inner.split(',').map(str::to_owned).collect(),
    };
    let tails = expand_braces(rest)?;
    if choices.len().saturating_mul(tails.len()) > MAX_PATTERN_SHARDS {
        return Err(format!("the pattern {text} names over {MAX_PATTERN_SHARDS} shards"));
    }
    Ok(choices.iter().flat_map(|c| tails.iter().map(move |t| format!("{prefix}{c}{t}"))).collect())
}

/// The `.tar` file at `path`, or those directly in the directory.
fn shards_at(path: &Path) -> Vec<PathBuf> {
    let is_tar = |p: &Path| p.is_file() && p.extension().is_some_and(|e| e == "tar");
    if is_tar(path) {
        return vec![path.to_owned()];
    }
    let Ok(entries) = std::fs::read_dir(path) else { return Vec::new() };
    let entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    if entries.iter().any(|p| p.extension().is_some_and(|e| e == "npy")) {
        return Vec::new();
    }
    let mut tars: Vec<PathBuf> = entries.into_iter().filter(|p| is_tar(p)).collect();
    tars.sort();
    tars
}

/// `DIR/KEY.EXT` split as WebDataset does: the extension is everything after the first dot of
/// the file name. `None` for a name without one.
fn key_and_extension(member: &str) -> Option<(&str, &str)> {
    let name_start = member.rfind('/').map_or(0, |i| i + 1);
    let dot = name_start + member[name_start..].find('.')?;
    let (key, extension) = (&member[..dot], &member[dot + 1..]);
    (!key.is_empty() && !extension.is_empty()).then_some((key, extension))
}

/// Opens the WebDataset `shards` as one field per member extension (those in `select`).
///
/// # Errors
/// [`LoadError::Io`] for a shard that cannot be read, [`LoadError::WebDataset`] naming the shard
/// and sample for a damaged tar, a sample without a member the others have, or a `cls` member
/// that is not an integer.
pub(super) fn open(name: &str, shards: &[PathBuf], select: Option<&[String]>) -> Result<Vec<Field>, LoadError> {
    let mut maps = Vec::with_capacity(shards.len());
    // Per sample: (shard, key, extension -> (offset, size)).
    let mut samples: Vec<Sample> = Vec::new();
    for (shard_no, shard) in shards.iter().enumerate() {
        let io = |error| LoadError::Io { path: shard.clone(), error };
        let file = std::fs::File::open(shard).map_err(io)?;
        let map = MappedFile::open(shard).map_err(io)?;
        index_shard(file, shard, shard_no as u32, map.len() as u64, &mut samples)?;
        maps.push(Arc::new(map));
    }
    fields(name, Shards::Mapped(maps), samples, select)
}

/// Opens the WebDataset shards `objects` (the `.tar` objects under `storage`'s prefix, in name
/// order) as [`open`] opens local ones: each indexed from its headers through ranged reads.
///
/// # Errors
/// As [`open`]; a read that fails names the object.
pub(super) fn open_remote(
    name: &str,
    storage: &Arc<ObjectStorage>,
    mut objects: Vec<ListedObject>,
    select: Option<&[String]>,
) -> Result<Vec<Field>, LoadError> {
    objects.sort_by(|a, b| a.0.cmp(&b.0));
    let mut samples: Vec<Sample> = Vec::new();
    for (shard_no, listed) in objects.iter().enumerate() {
        let reader = RangedReader { storage, listed, position: 0, window: (0, Bytes::new()) };
        let shown = Path::new(storage.url()).join(&listed.0);
        index_shard(reader, &shown, shard_no as u32, listed.1, &mut samples)?;
    }
    fields(name, Shards::Remote { storage: storage.clone(), objects }, samples, select)
}

/// Appends the samples of shard `shard_no` (of `size` bytes, read through `reader`; `shard`
/// names it) to `samples`, from its headers alone.
fn index_shard(
    reader: impl Read + Seek,
    shard: &Path,
    shard_no: u32,
    size: u64,
    samples: &mut Vec<Sample>,
) -> Result<(), LoadError> {
    let bad = |problem: String| LoadError::WebDataset { shard: shard.to_owned(), problem };
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries_with_seek().map_err(|e| bad(format!("not a readable tar file ({e})")))?;
    let first_sample = samples.len();
    for entry in entries {
        let entry = entry.map_err(|e| bad(format!("a damaged tar header ({e}); write the shard again")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry.path().map_err(|e| bad(format!("a member name that is not a path ({e})")))?;
        let member = member.to_string_lossy().into_owned();
        let Some((key, extension)) = key_and_extension(&member) else {
            tracing::warn!(shard = %shard.display(), %member, "skipping a member without an extension");
            continue;
        };
        let place = (entry.raw_file_position(), entry.size());
        let same_sample = samples.len() > first_sample && samples.last().is_some_and(|(_, last, _)| last == key);
        match samples.last_mut() {
            Some((_, _, members)) if same_sample => {
                if members.insert(extension.to_owned(), place).is_some() {
                    return Err(bad(format!("sample '{key}' has two '{extension}' members")));
                }
            }
            _ => samples.push((shard_no, key.to_owned(), BTreeMap::from([(extension.to_owned(), place)]))),
        }
    }
    // The data of every member lies inside the file (a header cannot point past it).
    for (_, key, members) in &samples[first_sample..] {
        if let Some((extension, _)) =
            members.iter().find(|(_, (offset, len))| offset.checked_add(*len).is_none_or(|end| end > size))
        {
            return Err(bad(format!("member '{key}.{extension}' runs past the end of the file; it is truncated")));
        }
    }
    Ok(())
}

/// The fields of indexed `samples` over `shards`: one per member extension (those in `select`).
fn fields(
    name: &str,
    shards: Shards,
    samples: Vec<Sample>,
    select: Option<&[String]>,
) -> Result<Vec<Field>, LoadError> {
    let shards = Arc::new(shards);
    let bad = |shard: u32, problem: String| LoadError::WebDataset { shard: shards.name(shard), problem };
    let Some((_, _, first)) = samples.first() else {
        return Err(LoadError::WebDataset {
            shard: if shards.len() > 0 { shards.name(0) } else { PathBuf::new() },
            problem: format!("dataset '{name}': the shards hold no samples; write them with webdataset.TarWriter"),
        });
    };
    let extensions: Vec<String> = match select {
        Some(chosen) => chosen.to_vec(),
        None => first.keys().cloned().collect(),
    };
    for (shard_no, key, members) in &samples {
        if let Some(missing) = extensions.iter().find(|e| !members.contains_key(*e)) {
            let has: Vec<&str> = members.keys().map(String::as_str).collect();
            return Err(bad(
                *shard_no,
                format!(
                    "sample '{key}' has no '{missing}' member (it has {}); every sample needs the members the others \
                     have, or choose the fields with --fields {name}=EXT,...",
                    has.join(", ")
                ),
            ));
        }
    }
    // A shard is a chunk for block shuffles when the shards hold the same number of samples
    // (the last may hold fewer), as ShardWriter(maxcount=..) writes them: a shuffled epoch then
    // reads each shard's members together.
    let mut per_shard = vec![0u64; shards.len()];
    for (shard, _, _) in &samples {
        per_shard[*shard as usize] += 1;
    }
    let chunk_len = match per_shard.split_last() {
        Some((last, rest)) if rest.iter().all(|&n| n == per_shard[0]) && *last <= per_shard[0] => per_shard[0].max(1),
        _ => 1,
    };
    let keys: Arc<Vec<Box<str>>> = Arc::new(samples.iter().map(|(_, key, _)| key.as_str().into()).collect());
    let num_samples = samples.len() as u64;
    let mut fields = Vec::with_capacity(extensions.len());
    for extension in extensions {
        let members: Vec<Place> =
            samples.iter().map(|(shard, _, m)| (*shard, m[&extension].0, m[&extension].1)).collect();
        let field = |dtype, bytes_per_sample, source| Field {
            name: extension.clone(),
            dtype,
            sample_shape: Vec::new(),
            bytes_per_sample,
            chunk_len,
            dims: Vec::new(),
            num_samples,
            id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
            source,
        };
        if extension == "cls" {
            let mut labels = Vec::with_capacity(samples.len() * 8);
            let texts = shards.read_places(&members).map_err(|(shard, problem)| bad(shard, problem))?;
            for ((text, (shard, _, _)), (_, key, _)) in texts.iter().zip(&members).zip(&samples) {
                let label = std::str::from_utf8(text)
                    .ok()
                    .and_then(|t| t.trim().parse::<i64>().ok())
                    .ok_or_else(|| bad(*shard, format!("member '{key}.cls' is not an integer class index")))?;
                labels.extend_from_slice(&label.to_le_bytes());
            }
            fields.push(field(DType::Int64, 8, Source::Memory(Bytes::from(labels))));
        } else {
            let last = extension.rsplit('.').next().unwrap_or_default();
            let utf8 = TEXT_EXTENSIONS.contains(&last);
            let (dtype, row_shape, row_bytes, members) = if last == "npy" {
                npy_members(&shards, members, &samples, &extension).map_err(|(shard, problem)| bad(shard, problem))?
            } else {
                (DType::Uint8, Vec::new(), 1, members)
            };
            let source = Source::Tar(Box::new(Members {
                shards: shards.clone(),
                members,
                utf8,
                keys: keys.clone(),
                row_bytes,
                extension: extension.clone(),
            }));
            let mut field = field(dtype, 0, source);
            field.sample_shape = row_shape;
            fields.push(field);
        }
    }
    Ok(fields)
}

/// The bytes of a `.npy` member read for its header (numpy pads headers to 64 or 128 bytes; a
/// longer one is read again whole).
const NPY_HEAD_BYTES: u64 = 4096;

/// A field's `.npy` members as one ragged array: each member's rows (its first axis; a 0-d array
/// is one row) become a sample, its header skipped. Returns the dtype, the row shape, the bytes
/// of a row and where each sample's values are.
///
/// # Errors
/// The shard and why, for a member that is not a little-endian C-order `.npy` array, whose data
/// does not match its header, or whose dtype or row shape differs from the first member's.
fn npy_members(
    shards: &Shards,
    members: Vec<Place>,
    samples: &[Sample],
    extension: &str,
) -> Result<(DType, Vec<u64>, u64, Vec<Place>), (u32, String)> {
    let mut first: Option<(DType, Vec<u64>)> = None;
    let mut values = Vec::with_capacity(members.len());
    // Each member's first bytes: its header, unless longer than they are (then read again).
    let heads: Vec<Place> =
        members.iter().map(|&(shard, offset, size)| (shard, offset, size.min(NPY_HEAD_BYTES))).collect();
    let heads = shards.read_places(&heads)?;
    for ((shard, offset, size), ((_, key, _), head)) in members.into_iter().zip(samples.iter().zip(heads)) {
        let fail = |problem: String| (shard, format!("member '{key}.{extension}' {problem}"));
        let head = match conveyor_proto::npy::data_offset(&head) {
            Some(end) if end > head.len() && end as u64 <= size => {
                shards.read_places(&[(shard, offset, end as u64)])?.remove(0)
            }
            _ => head,
        };
        let header = conveyor_proto::npy::parse_header(&head)
            .map_err(|e| fail(format!("is not a .npy array numpy.save writes ({e})")))?;
        if header.big_endian && header.dtype.size_bytes() > 1 {
            return Err(fail("is big-endian; save the arrays little-endian (numpy's default)".into()));
        }
        let (rows, row_shape) = match header.shape.split_first() {
            Some((&rows, row)) => (rows, row.to_vec()),
            None => (1, Vec::new()),
        };
        let row_bytes = row_shape.iter().product::<u64>() * header.dtype.size_bytes() as u64;
        if row_bytes == 0 {
            return Err(fail(format!("has rows of shape {row_shape:?}, which hold no values")));
        }
        let data =
            size.checked_sub(header.data_offset as u64).ok_or_else(|| fail("is cut inside its header".into()))?;
        if rows.checked_mul(row_bytes) != Some(data) {
            return Err(fail(format!(
                "holds {data} bytes of data where its header ({:?}, {}) needs {}; write it again",
                header.shape,
                header.dtype.name(),
                rows.saturating_mul(row_bytes)
            )));
        }
        match &first {
            None => first = Some((header.dtype, row_shape)),
            Some((dtype, shape)) if *dtype != header.dtype || *shape != row_shape => {
                return Err(fail(format!(
                    "has rows of {}{row_shape:?} where the first sample's have {}{shape:?}; a field's arrays may \
                     differ in their first axis only",
                    header.dtype.name(),
                    dtype.name()
                )));
            }
            Some(_) => {}
        }
        values.push((shard, offset + header.data_offset as u64, data));
    }
    let (dtype, row_shape) = first.unwrap_or((DType::Uint8, Vec::new()));
    let row_bytes = (row_shape.iter().product::<u64>() * dtype.size_bytes() as u64).max(1);
    Ok((dtype, row_shape, row_bytes, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_patterns_expand_as_webdataset_writes_them() {
        assert_eq!(
            expand_braces("d/t-{08..11}.tar").expect("valid"),
            ["d/t-08.tar", "d/t-09.tar", "d/t-10.tar", "d/t-11.tar"]
        );
        assert_eq!(expand_braces("{a,b}-{1..2}.tar").expect("valid"), ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]);
        assert_eq!(expand_braces("plain.tar").expect("valid"), ["plain.tar"]);
        for bad in ["t-{1..x}.tar", "t-{5..2}.tar", "t-{1..3.tar", "{0..999999999}.tar"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_end_at_the_first_dot_of_the_file_name() {
        assert_eq!(key_and_extension("000001.jpg"), Some(("000001", "jpg")));
        assert_eq!(key_and_extension("a/b.c/000001.seg.png"), Some(("a/b.c/000001", "seg.png")));
        assert_eq!(key_and_extension("README"), None);
        assert_eq!(key_and_extension(".hidden"), None);
    }
}
