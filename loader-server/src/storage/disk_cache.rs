//! A local disk cache of bytes fetched from object stores (`--disk-cache DIR
//! --disk-cache-bytes N`), so that later epochs read the loader's disk instead of the store.
//!
//! One file per entry, named by the SHA-256 of its key, holding a header (magic, payload length,
//! key, page size, a CRC-32C of the header itself), a table of one CRC-32C per 4 KiB page of the
//! payload, and the payload. Every read checks what it uses: the header when the entry is
//! opened, and each page it reads against the table (CRC-32C runs in hardware, at memory speed),
//! so an entry truncated, edited, damaged on disk (a flipped bit keeps size and modification time)
//! or belonging to another key fails the read that meets it: the entry is deleted, counted
//! (`conveyor_loader_disk_cache_refused_total`) and fetched again. Entries are read with `pread`
//! into loader memory, never memory-mapped, so a file that shrinks under the loader gives a short
//! read, not a SIGBUS. Entries are written beside their final name and renamed, so a crash leaves
//! whole entries or none. The least recently used entries go once the payloads pass the byte
//! budget (an ordered index: eviction does not scan the entries). The directory survives a
//! restart (entries are found again, oldest first by modification time, which a loader sets on an
//! entry's first use in its run rather than on every read) and belongs to one loader at a time: it
//! holds an exclusive lock on `DIR/.lock`, and a second loader is refused.
//!
//! Up to `--disk-cache-open-files` entries stay open between reads, with their checked header and
//! page table in memory: a warm row is then one `pread` of the pages that hold it, their CRCs, and
//! a copy of the row into the batch.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::Write,
    ops::Range,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use bytes::Bytes;

use crate::error::{DiskCacheProblem, LoadError};

const MAGIC: &[u8; 4] = b"CVC3";
/// Magic, payload length, key length, page size, header CRC-32C.
const FIXED_HEADER: usize = 4 + 8 + 4 + 4 + 4;
/// Payload bytes per checksum: a warm read checks (and reads) whole pages.
pub const PAGE_BYTES: usize = 4096;

/// One entry file.
#[derive(Debug)]
struct Entry {
    /// Payload bytes.
    bytes: u64,
    /// Use counter value of its last use.
    last_use: u64,
    /// Its modification time was set since this loader started: recency is written to the file
    /// system once per entry and run (what ordering after a restart needs), not on every read.
    touched: bool,
}

/// Entries by id, and their ids by last use (least recently used first).
#[derive(Debug, Default)]
struct Index {
    entries: HashMap<Id, Entry>,
    by_last_use: BTreeMap<u64, Id>,
    /// Payload bytes of all entries.
    total_bytes: u64,
    /// Use counter for least-recently-used order.
    clock: u64,
    /// Entries kept open, with their checked page tables, by id (at most
    /// `--disk-cache-open-files`); an entry that is replaced or removed is closed too (a read
    /// in progress keeps its handle until it ends).
    open: HashMap<Id, Arc<OpenEntry>>,
}

impl Index {
    /// Counts a use of `id`; returns whether its modification time was already set this run (it
    /// is from now on), or `None` when there is no such entry.
    fn use_entry(&mut self, id: Id) -> Option<bool> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(&id)?;
        self.by_last_use.remove(&entry.last_use);
        entry.last_use = clock;
        self.by_last_use.insert(clock, id);
        Some(std::mem::replace(&mut entry.touched, true))
    }

    /// Adds or replaces `id`, as used now.
    fn insert(&mut self, id: Id, bytes: u64, fresh: bool) {
        self.remove(id);
        self.clock += 1;
        self.by_last_use.insert(self.clock, id);
        self.entries.insert(id, Entry { bytes, last_use: self.clock, touched: fresh });
        self.total_bytes += bytes;
    }

    fn remove(&mut self, id: Id) -> Option<Entry> {
        self.open.remove(&id);
        let entry = self.entries.remove(&id)?;
        self.by_last_use.remove(&entry.last_use);
        self.total_bytes -= entry.bytes;
        Some(entry)
    }

    /// Removes the least recently used entry and returns its id.
    fn pop_oldest(&mut self) -> Option<Id> {
        let (_, id) = self.by_last_use.pop_first()?;
        self.open.remove(&id);
        let entry = self.entries.remove(&id)?;
        self.total_bytes -= entry.bytes;
        Some(id)
    }

    /// Keeps `open` for `id` while it is an entry, closing another when `limit` are open (which
    /// one matters little: opening it again costs an open and two reads).
    fn keep_open(&mut self, id: Id, open: Arc<OpenEntry>, limit: usize) {
        if !self.entries.contains_key(&id) || limit == 0 {
            return;
        }
        if self.open.len() >= limit
            && let Some(other) = self.open.keys().next().cloned()
        {
            self.open.remove(&other);
        }
        self.open.insert(id, open);
    }
}

/// An entry file opened and its header checked.
#[derive(Debug)]
pub struct OpenEntry {
    file: File,
    /// Where the payload starts in the file.
    data_offset: u64,
    /// Payload bytes.
    len: usize,
    /// CRC-32C of each page of the payload.
    page_crcs: Vec<u32>,
}

impl OpenEntry {
    /// Opens the entry file at `path` for `key`: its header must be whole, name `key`, match
    /// its CRC, and the file must hold exactly the payload it states.
    fn open(path: &Path, key: &str) -> Option<OpenEntry> {
        let file = File::open(path).ok()?;
        let mut fixed = [0u8; FIXED_HEADER];
        file.read_exact_at(&mut fixed, 0).ok()?;
        if &fixed[..4] != MAGIC {
            return None;
        }
        let len = usize::try_from(u64::from_le_bytes(fixed[4..12].try_into().ok()?)).ok()?;
        let key_len = u32::from_le_bytes(fixed[12..16].try_into().ok()?) as usize;
        let page_bytes = u32::from_le_bytes(fixed[16..20].try_into().ok()?) as usize;
        let header_crc = u32::from_le_bytes(fixed[20..24].try_into().ok()?);
        if key_len != key.len() || page_bytes != PAGE_BYTES {
            return None;
        }
        let num_pages = len.div_ceil(PAGE_BYTES);
        // The file must hold exactly what the header states before anything is allocated for it.
        let data_offset = (FIXED_HEADER + key_len).checked_add(num_pages.checked_mul(4)?)? as u64;
        if file.metadata().ok()?.len() != data_offset.checked_add(len as u64)? {
            return None;
        }
        let mut rest = vec![0u8; key_len + 4 * num_pages];
        file.read_exact_at(&mut rest, FIXED_HEADER as u64).ok()?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed[..20]), &rest);
        if crc != header_crc || &rest[..key_len] != key.as_bytes() {
            return None;
        }
        let page_crcs = rest[key_len..].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Some(OpenEntry { file, data_offset, len, page_crcs })
    }

    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `range` of the payload, read into `pages` (the whole pages that hold them, each
    /// checked against its CRC), as a slice of it; `None` when the file gives fewer bytes or a
    /// page fails its CRC. `pages` may hold pages from the previous read: they are reused when
    /// they cover `range`.
    pub fn read<'a>(self: &Arc<Self>, range: Range<usize>, pages: &'a mut ReadPages) -> Option<&'a [u8]> {
        if range.end > self.len || range.start > range.end {
            return None;
        }
        if range.is_empty() {
            return Some(&[]);
        }
        let (first, last) = (range.start / PAGE_BYTES, (range.end - 1) / PAGE_BYTES);
        let same_entry = pages.entry.as_ref().is_some_and(|entry| Arc::ptr_eq(entry, self));
        if !(same_entry && pages.first <= first && last < pages.first + pages.count) {
            pages.entry = Some(self.clone());
            let start = first * PAGE_BYTES;
            let end = ((last + 1) * PAGE_BYTES).min(self.len);
            pages.buf.resize(end - start, 0);
            self.file.read_exact_at(&mut pages.buf, self.data_offset + start as u64).ok()?;
            for (page, bytes) in pages.buf.chunks(PAGE_BYTES).enumerate() {
                if crc32c::crc32c(bytes) != *self.page_crcs.get(first + page)? {
                    pages.count = 0;
                    return None;
                }
            }
            (pages.first, pages.count) = (first, last + 1 - first);
        }
        let offset = pages.first * PAGE_BYTES;
        pages.buf.get(range.start - offset..range.end - offset)
    }
}

/// The pages a reader of entries read last (reused by its next read of the same entry when
/// they cover it).
#[derive(Debug, Default)]
pub struct ReadPages {
    buf: Vec<u8>,
    /// The entry they were read from, held so that no other entry can take its place.
    entry: Option<Arc<OpenEntry>>,
    first: usize,
    count: usize,
}

/// The cache of one loader.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    budget_bytes: u64,
    /// Entries kept open between reads at most (`--disk-cache-open-files`).
    open_files: usize,
    /// Held open for the loader's lifetime: its exclusive lock keeps other loaders out.
    _lock: File,
    index: Mutex<Index>,
    /// Entries that failed a check (truncated, damaged, another key's) and were deleted to be
    /// fetched again.
    pub num_refused: AtomicU64,
    /// Entries removed to stay within the budget.
    pub num_evicted: AtomicU64,
}

/// An entry's id: the SHA-256 of its key (compared and hashed in the index as 32 bytes; its
/// file is named by it in hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Id([u8; 32]);

impl Id {
    fn of(key: &str) -> Id {
        let hash = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        Id(hash.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// The id of the entry file named `name`, if it is one.
    fn parse(name: &str) -> Option<Id> {
        let hex = name.strip_suffix(".entry")?.as_bytes();
        let mut id = [0; 32];
        if hex.len() != 64 {
            return None;
        }
        for (byte, pair) in id.iter_mut().zip(hex.chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Id(id))
    }

    fn file_name(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut name = String::with_capacity(2 * self.0.len() + 6);
        for &byte in &self.0 {
            name.push(char::from(HEX[usize::from(byte >> 4)]));
            name.push(char::from(HEX[usize::from(byte & 15)]));
        }
        name.push_str(".entry");
        name
    }
}

/// An entry of the cache, open for reading; [`CachedEntry::refuse`] deletes it after a failed
/// read.
#[derive(Debug)]
pub struct CachedEntry<'a> {
    cache: &'a DiskCache,
    id: Id,
    open: Arc<OpenEntry>,
}

impl CachedEntry<'_> {
    /// See [`OpenEntry::len`].
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// See [`OpenEntry::read`]; a read that fails its checks deletes the entry (counted), so
    /// that the caller fetches it again. A range past the payload is `None` and no failure.
    pub fn read<'p>(&self, range: Range<usize>, pages: &'p mut ReadPages) -> Option<&'p [u8]> {
        if range.end > self.len() {
            return None;
        }
        let read = self.open.read(range, pages);
        if read.is_none() {
            self.cache.refuse_read(self.id, &self.open);
        }
        read
    }
}

impl DiskCache {
    /// Opens (or creates) the cache in `dir`, finding the entries a previous loader left.
    ///
    /// # Errors
    /// [`LoadError::DiskCache`] when the directory cannot be used or another loader holds it.
    pub fn open(dir: &Path, budget_bytes: u64, open_files: usize) -> Result<DiskCache, LoadError> {
        let fail = |problem: DiskCacheProblem| LoadError::DiskCache { dir: dir.to_owned(), problem };
        let io = |action: &'static str| move |error| fail(DiskCacheProblem::Io { action, error });
        std::fs::create_dir_all(dir).map_err(io("create it"))?;
        let lock = File::create(dir.join(".lock")).map_err(io("create its lock file"))?;
        if let Err(error) = lock.try_lock() {
            return Err(match error {
                std::fs::TryLockError::WouldBlock => fail(DiskCacheProblem::InUse),
                std::fs::TryLockError::Error(error) => io("lock it")(error),
            });
        }
        reserve_descriptors(open_files).map_err(fail)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io("list it"))? {
            let entry = entry.map_err(io("list it"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp") {
                // A write interrupted by a crash.
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(id) = Id::parse(&name)
                && let Ok(metadata) = entry.metadata()
            {
                let modified = metadata.modified().unwrap_or(std::time::UNIX_EPOCH);
                // The payload length its header states (checked when it is first read); a file
                // too short for a header counts as its size, and fails that read.
                let mut fixed = [0u8; FIXED_HEADER];
                let stated = File::open(entry.path())
                    .and_then(|file| file.read_exact_at(&mut fixed, 0))
                    .ok()
                    .filter(|()| &fixed[..4] == MAGIC)
                    .map(|()| u64::from_le_bytes(fixed[4..12].try_into().expect("8 bytes")));
                found.push((modified, id, stated.unwrap_or(metadata.len()).min(metadata.len())));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, id, bytes) in found {
            index.insert(id, bytes, false);
        }
        let cache = DiskCache {
            dir: dir.to_owned(),
            budget_bytes,
            open_files,
            _lock: lock,
            index: Mutex::new(index),
            num_refused: AtomicU64::new(0),
            num_evicted: AtomicU64::new(0),
        };
        cache.evict(&mut cache.index.lock().expect("cache index lock"));
        Ok(cache)
    }

    /// The entry of `key`, open and its header checked; `None` when absent or when its header
    /// fails the check (it is then deleted, so the caller fetches and puts it again).
    pub fn entry(&self, key: &str) -> Option<CachedEntry<'_>> {
        let id = Id::of(key);
        let kept = {
            let mut index = self.index.lock().expect("cache index lock");
            if !index.use_entry(id)? {
                // Recency survives a restart through the modification time, set once per entry
                // and run.
                if let Ok(file) = File::options().write(true).open(self.dir.join(id.file_name())) {
                    let _ = file.set_modified(SystemTime::now());
                }
            }
            index.open.get(&id).cloned()
        };
        let open = match kept {
            Some(open) => open,
            None => {
                let Some(open) = OpenEntry::open(&self.dir.join(id.file_name()), key).map(Arc::new) else {
                    self.refuse(id);
                    return None;
                };
                self.index.lock().expect("cache index lock").keep_open(id, open.clone(), self.open_files);
                open
            }
        };
        Some(CachedEntry { cache: self, id, open })
    }

    /// The whole payload of `key`, every page checked; `None` when absent or when the entry
    /// fails a check (it is then deleted, so the caller fetches and puts it again).
    pub fn get(&self, key: &str) -> Option<Bytes> {
        let entry = self.entry(key)?;
        let mut pages = ReadPages::default();
        entry.read(0..entry.len(), &mut pages)?;
        Some(Bytes::from(pages.buf))
    }

    /// [`DiskCache::refuse`] for a read of `open` that failed its checks, unless the file of
    /// entry `id` is no longer the one `open` holds (another batch reading it at the same time
    /// refused it first, and it may be fetched and stored again since): a bad entry is deleted
    /// and counted once however many batches read it together. Checked and deleted under the
    /// index lock, so two refusals cannot both see the old file.
    fn refuse_read(&self, id: Id, open: &OpenEntry) {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(id.file_name());
        let mut index = self.index.lock().expect("cache index lock");
        let same_file = match (open.file.metadata(), std::fs::metadata(&path)) {
            (Ok(held), Ok(now)) => held.ino() == now.ino() && held.dev() == now.dev(),
            _ => false,
        };
        if same_file {
            self.num_refused.fetch_add(1, Ordering::Relaxed);
            index.remove(id);
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Deletes entry `id` after it failed a check, counting it, so that it is fetched again.
    fn refuse(&self, id: Id) {
        self.num_refused.fetch_add(1, Ordering::Relaxed);
        self.remove(id);
    }

    /// Stores `payload` under `key`, evicting the least recently used entries past the budget.
    /// Failures to write are logged and otherwise ignored: the cache only saves fetches.
    pub fn put(&self, key: &str, payload: &[u8]) {
        if payload.len() as u64 > self.budget_bytes {
            return;
        }
        let id = Id::of(key);
        let name = id.file_name();
        let tmp = self.dir.join(format!("{name}.tmp{}", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            let num_pages = payload.len().div_ceil(PAGE_BYTES);
            let mut header = Vec::with_capacity(FIXED_HEADER + key.len() + 4 * num_pages);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            header.extend_from_slice(&(key.len() as u32).to_le_bytes());
            header.extend_from_slice(&(PAGE_BYTES as u32).to_le_bytes());
            header.extend_from_slice(&[0; 4]); // the header's CRC, below
            header.extend_from_slice(key.as_bytes());
            for page in payload.chunks(PAGE_BYTES) {
                header.extend_from_slice(&crc32c::crc32c(page).to_le_bytes());
            }
            let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..20]), &header[FIXED_HEADER..]);
            header[20..24].copy_from_slice(&crc.to_le_bytes());
            file.write_all(&header)?;
            file.write_all(payload)?;
            std::fs::rename(&tmp, self.dir.join(&name))
        })();
        if let Err(error) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(dir = %self.dir.display(), %error, "cannot write a disk cache entry; going on without it");
            return;
        }
        let mut index = self.index.lock().expect("cache index lock");
        index.insert(id, payload.len() as u64, true);
        self.evict(&mut index);
    }

    /// Payload bytes held now.
    pub fn total_bytes(&self) -> u64 {
        self.index.lock().expect("cache index lock").total_bytes
    }

    fn remove(&self, id: Id) {
        self.index.lock().expect("cache index lock").remove(id);
        let _ = std::fs::remove_file(self.dir.join(id.file_name()));
    }

    fn evict(&self, index: &mut Index) {
        while index.total_bytes > self.budget_bytes {
            let Some(oldest) = index.pop_oldest() else { break };
            let _ = std::fs::remove_file(self.dir.join(oldest.file_name()));
            self.num_evicted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// File descriptors beside the cache's open entries: connections, dataset files, the runtime's
/// own.
const OTHER_DESCRIPTORS: u64 = 256;

/// Makes room for `open_files` open entries under the open-file limit, raising the soft limit
/// when the hard one allows.
fn reserve_descriptors(open_files: usize) -> Result<(), DiskCacheProblem> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let need = open_files as u64 + OTHER_DESCRIPTORS;
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= need) {
        return Ok(());
    }
    if let Some(maximum) = limit.maximum.filter(|&maximum| maximum < need) {
        return Err(DiskCacheProblem::OpenFileLimit { open_files, need, maximum });
    }
    setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(need), maximum: limit.maximum })
        .map_err(|error| DiskCacheProblem::RaiseOpenFileLimit { need, error: error.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_restart_fail_their_check_when_damaged_and_stay_within_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let cache = DiskCache::open(dir.path(), 100, 4).expect("opens");
            cache.put("a", &[1; 40]);
            cache.put("b", &[2; 40]);
            assert_eq!(cache.get("a").as_deref(), Some(&[1u8; 40][..]));
            let error = DiskCache::open(dir.path(), 100, 4).expect_err("one loader per directory");
            assert!(error.to_string().contains("in use by another loader"), "{error}");
            // "b" is now the least recently used: a third entry pushes it out.
            cache.put("c", &[3; 40]);
            assert_eq!(cache.get("b"), None);
            assert_eq!(cache.total_bytes(), 80);
            assert_eq!(cache.num_evicted.load(Ordering::Relaxed), 1);
        }
        let cache = DiskCache::open(dir.path(), 100, 4).expect("reopens after the first loader is gone");
        assert_eq!(cache.get("c").as_deref(), Some(&[3u8; 40][..]));
        assert_eq!(cache.total_bytes(), 80, "payloads counted from their headers at start-up");
        // A truncated entry is refused and deleted, so it is fetched again.
        let path = dir.path().join(Id::of("a").file_name());
        let length = std::fs::metadata(&path).expect("entry").len();
        File::options().write(true).open(&path).expect("open").set_len(length - 1).expect("truncate");
        assert_eq!(cache.get("a"), None);
        assert!(!path.exists());
        assert_eq!(cache.num_refused.load(Ordering::Relaxed), 1);
        // An entry under another key's name is refused.
        std::fs::copy(dir.path().join(Id::of("c").file_name()), dir.path().join(Id::of("z").file_name())).unwrap();
        let cache = {
            drop(cache);
            DiskCache::open(dir.path(), 100, 4).expect("reopens")
        };
        assert_eq!(cache.get("z"), None);
        assert_eq!(cache.get("c").as_deref(), Some(&[3u8; 40][..]));
    }

    /// Flips one bit of the payload of `key`'s entry at payload offset `at`, keeping the file's
    /// size and modification time (as bit rot would).
    fn rot(dir: &Path, key: &str, at: usize) {
        let path = dir.join(Id::of(key).file_name());
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
        let file = File::options().read(true).write(true).open(&path).expect("open");
        let len = file.metadata().expect("metadata").len() as usize;
        let payload_len = u64::from_le_bytes(std::fs::read(&path).unwrap()[4..12].try_into().unwrap()) as usize;
        let offset = (len - payload_len + at) as u64;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset).expect("read");
        file.write_all_at(&[byte[0] ^ 4], offset).expect("write");
        file.set_modified(modified).expect("mtime");
    }

    #[test]
    fn every_read_checks_the_pages_it_uses_so_bit_rot_in_an_open_entry_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DiskCache::open(dir.path(), 1 << 20, 4).expect("opens");
        let payload: Vec<u8> = (0..3 * PAGE_BYTES + 100).map(|i| (i * 7 % 251) as u8).collect();
        cache.put("k", &payload);
        let entry = cache.entry("k").expect("entry");
        let mut pages = ReadPages::default();
        assert_eq!(entry.read(10..20, &mut pages), Some(&payload[10..20]));
        assert_eq!(
            entry.read(PAGE_BYTES - 3..PAGE_BYTES + 5, &mut pages),
            Some(&payload[PAGE_BYTES - 3..PAGE_BYTES + 5])
        );
        assert_eq!(entry.read(3 * PAGE_BYTES..payload.len(), &mut pages), Some(&payload[3 * PAGE_BYTES..]));
        assert_eq!(entry.read(0..payload.len() + 1, &mut pages), None, "past the payload");
        // A bit flipped in page 2 after the entry was opened (kept open, its header checked):
        // reads of other pages go on, a read of page 2 fails and deletes the entry.
        rot(dir.path(), "k", 2 * PAGE_BYTES + 9);
        drop(entry);
        let entry = cache.entry("k").expect("still there");
        assert_eq!(entry.read(0..8, &mut ReadPages::default()), Some(&payload[..8]));
        assert_eq!(entry.read(2 * PAGE_BYTES..2 * PAGE_BYTES + 16, &mut ReadPages::default()), None);
        assert_eq!(cache.num_refused.load(Ordering::Relaxed), 1);
        assert!(cache.entry("k").is_none() && cache.total_bytes() == 0, "deleted, to be fetched again");
        // The same through get, which checks every page.
        cache.put("g", &payload);
        rot(dir.path(), "g", payload.len() - 1);
        assert_eq!(cache.get("g"), None);
        assert_eq!(cache.num_refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_entry_truncated_while_open_gives_a_refused_read_not_a_fault() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DiskCache::open(dir.path(), 1 << 20, 4).expect("opens");
        let payload = vec![9u8; 4 * PAGE_BYTES];
        cache.put("t", &payload);
        let entry = cache.entry("t").expect("entry");
        let mut pages = ReadPages::default();
        assert_eq!(entry.read(0..PAGE_BYTES, &mut pages), Some(&payload[..PAGE_BYTES]));
        let path = dir.path().join(Id::of("t").file_name());
        let length = std::fs::metadata(&path).expect("entry").len();
        File::options().write(true).open(&path).expect("open").set_len(length / 2).expect("truncate");
        // A second batch holding the same entry fails its read too, but the entry is refused once.
        let other = cache.entry("t").expect("still listed");
        assert_eq!(entry.read(3 * PAGE_BYTES..4 * PAGE_BYTES, &mut pages), None);
        assert_eq!(cache.num_refused.load(Ordering::Relaxed), 1);
        assert!(cache.entry("t").is_none());
        // Fetched and stored again, the entry is not deleted by the late reader of the old file.
        cache.put("t", &payload);
        assert_eq!(other.read(3 * PAGE_BYTES..4 * PAGE_BYTES, &mut pages), None);
        assert_eq!(cache.num_refused.load(Ordering::Relaxed), 1, "counted once");
        let fresh = cache.entry("t").expect("the new entry stays");
        assert_eq!(fresh.read(0..PAGE_BYTES, &mut pages), Some(&payload[..PAGE_BYTES]));
    }

    #[test]
    fn open_entries_stay_within_their_bound_and_leave_with_their_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DiskCache::open(dir.path(), 1 << 20, 8).expect("opens");
        let keys: Vec<String> = (0..20).map(|i| format!("key{i}")).collect();
        for (i, key) in keys.iter().enumerate() {
            cache.put(key, &[i as u8; 8]);
            assert_eq!(cache.get(key).as_deref(), Some(&[i as u8; 8][..]));
        }
        assert_eq!(cache.index.lock().expect("index").open.len(), 8);
        // A replaced entry is read from its new file, not from the one held open.
        let last = &keys[keys.len() - 1];
        assert!(cache.index.lock().expect("index").open.contains_key(&Id::of(last)));
        cache.put(last, &[255; 8]);
        assert_eq!(cache.get(last).as_deref(), Some(&[255u8; 8][..]));
        // Evicted entries are closed.
        let small_dir = tempfile::tempdir().expect("tempdir");
        let small = DiskCache::open(small_dir.path(), 16, 8).expect("opens");
        for key in &keys[..3] {
            small.put(key, &[1; 8]);
            assert!(small.get(key).is_some());
        }
        let index = small.index.lock().expect("index");
        assert_eq!(index.entries.len(), 2);
        assert!(index.open.keys().all(|name| index.entries.contains_key(name)));
        // With none kept open, every read opens the entry afresh.
        let unkept_dir = tempfile::tempdir().expect("tempdir");
        let unkept = DiskCache::open(unkept_dir.path(), 100, 0).expect("opens");
        unkept.put("k", &[7; 8]);
        assert_eq!(unkept.get("k").as_deref(), Some(&[7u8; 8][..]));
        assert_eq!(unkept.get("k").as_deref(), Some(&[7u8; 8][..]));
        assert!(unkept.index.lock().expect("index").open.is_empty());
    }
}
