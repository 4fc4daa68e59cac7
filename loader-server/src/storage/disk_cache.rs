//! A local disk cache of bytes fetched from object stores (`--disk-cache DIR
//! --disk-cache-bytes N`), so that later epochs read the loader's disk instead of the store.
//!
//! One file per entry, named by the SHA-256 of its key, holding a header (magic, payload length,
//! payload CRC-32C, the key) and the payload. (CRC-32C runs in hardware: a warm epoch checks
//! every block it reads, and SHA-256 of each block cost more than reading it.) A read checks all of them: an entry that was
//! truncated, edited or belongs to another key is deleted and fetched again. Entries are written
//! beside their final name and renamed, so a crash leaves whole entries or none. The least
//! recently used entries go once the payloads pass the byte budget (an ordered index: eviction
//! does not scan the entries). The directory survives a restart (entries are found again, oldest
//! first by modification time, which a loader sets on an entry's first use in its run rather than
//! on every read) and belongs to one loader at a time: it holds an exclusive lock on
//! `DIR/.lock`, and a second loader is refused.
//!
//! Reads copy nothing: the first read of an entry in a run returns its payload as a slice of
//! the bytes read for the check; later reads return a slice of the entry's memory map (file
//! pages in the page cache, not loader memory), so a warm epoch's rows go from the page cache
//! into the batch message with one copy, as from a local `.npy`. Up to `--disk-cache-open-files`
//! maps stay open between reads; a read checks that the file keeps the size and modification time
//! it was mapped with ([`MappedFile::check`], at most every [`MAP_CHECK_INTERVAL`]): another
//! process truncating an entry fails a read, which fetches the bytes again, rather than raising
//! SIGBUS on a later one. The loader itself never changes an entry file in place: it writes new
//! ones and renames them.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;

use super::mmap::MappedFile;
use crate::error::LoadError;

const MAGIC: &[u8; 4] = b"CVC2";
/// Magic, payload length, payload CRC-32C, key length.
const FIXED_HEADER: usize = 4 + 8 + 4 + 4;

/// A kept map's file is checked (one `fstat`) on its read at most this often: once per read
/// cost a tenth of a warm epoch's time with 64 KiB blocks (a batch reads hundreds of entries).
const MAP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

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
    /// Its whole payload passed the checks since this loader started (or this loader wrote it):
    /// later reads use its map, checked against the file's size and modification time.
    verified: bool,
    /// The file's modification time when it was written or checked this run: a file mapped
    /// later must still have it (an edit in place since fails).
    stamp: Option<SystemTime>,
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
    /// Maps of checked entries, by id (at most `--disk-cache-open-files`); an entry that is
    /// replaced or removed loses its map too (batches still holding slices of it keep it alive).
    maps: HashMap<Id, KeptMap>,
}

/// A map kept open between reads.
#[derive(Debug)]
struct KeptMap {
    map: Arc<MappedFile>,
    /// When its file was last checked against the map ([`MappedFile::check`]).
    checked: Instant,
}

impl Index {
    /// Counts a use of `id`; returns the entry, with whether its modification time was already
    /// set this run (it is from now on), or `None` when there is no such entry.
    fn use_entry(&mut self, id: Id) -> Option<(bool, &Entry)> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(&id)?;
        self.by_last_use.remove(&entry.last_use);
        entry.last_use = clock;
        self.by_last_use.insert(clock, id);
        Some((std::mem::replace(&mut entry.touched, true), entry))
    }

    /// Adds or replaces `id`, as used now.
    fn insert(&mut self, id: Id, bytes: u64, fresh: bool, stamp: Option<SystemTime>) {
        self.remove(id);
        self.clock += 1;
        self.by_last_use.insert(self.clock, id);
        self.entries.insert(id, Entry { bytes, last_use: self.clock, touched: fresh, verified: fresh, stamp });
        self.total_bytes += bytes;
    }

    fn remove(&mut self, id: Id) -> Option<Entry> {
        self.maps.remove(&id);
        let entry = self.entries.remove(&id)?;
        self.by_last_use.remove(&entry.last_use);
        self.total_bytes -= entry.bytes;
        Some(entry)
    }

    /// Removes the least recently used entry and returns its id.
    fn pop_oldest(&mut self) -> Option<Id> {
        let (_, id) = self.by_last_use.pop_first()?;
        self.maps.remove(&id);
        let entry = self.entries.remove(&id)?;
        self.total_bytes -= entry.bytes;
        Some(id)
    }

    /// Keeps `map` open for `id` while it is an entry, closing another when `limit` are open
    /// (which one matters little: mapping it again costs an open and an mmap).
    fn keep_map(&mut self, id: Id, map: KeptMap, limit: usize) {
        if !self.entries.contains_key(&id) || limit == 0 {
            return;
        }
        if self.maps.len() >= limit
            && let Some(other) = self.maps.keys().next().cloned()
        {
            self.maps.remove(&other);
        }
        self.maps.insert(id, map);
    }
}

/// The cache of one loader.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    budget_bytes: u64,
    /// Entry maps kept open between reads at most (`--disk-cache-open-files`).
    open_files: usize,
    /// How often the file of a kept map is checked against it ([`MAP_CHECK_INTERVAL`]).
    check_interval: Duration,
    /// Held open for the loader's lifetime: its exclusive lock keeps other loaders out.
    _lock: File,
    index: Mutex<Index>,
    /// Entries that failed their check and were fetched again.
    pub num_corrupt: AtomicU64,
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

impl DiskCache {
    /// Opens (or creates) the cache in `dir`, finding the entries a previous loader left.
    ///
    /// # Errors
    /// [`LoadError::DiskCache`] when the directory cannot be used or another loader holds it.
    pub fn open(dir: &Path, budget_bytes: u64, open_files: usize) -> Result<DiskCache, LoadError> {
        let fail = |problem: String| LoadError::DiskCache { dir: dir.to_owned(), problem };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it: {e}")))?;
        let lock = File::create(dir.join(".lock")).map_err(|e| fail(format!("cannot create its lock file: {e}")))?;
        if let Err(error) = lock.try_lock() {
            return Err(fail(match error {
                std::fs::TryLockError::WouldBlock => "is in use by another loader (it holds the lock on .lock); give \
                                                      each loader its own --disk-cache directory"
                    .into(),
                std::fs::TryLockError::Error(e) => format!("cannot lock it: {e}"),
            }));
        }
        reserve_descriptors(open_files).map_err(fail)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| fail(format!("cannot list it: {e}")))? {
            let entry = entry.map_err(|e| fail(format!("cannot list it: {e}")))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp") {
                // A write interrupted by a crash.
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(id) = Id::parse(&name)
                && let Ok(metadata) = entry.metadata()
            {
                let modified = metadata.modified().unwrap_or(std::time::UNIX_EPOCH);
                let payload = metadata.len().saturating_sub(FIXED_HEADER as u64);
                found.push((modified, id, payload));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, id, payload) in found {
            index.insert(id, payload, false, None);
        }
        let cache = DiskCache {
            dir: dir.to_owned(),
            budget_bytes,
            open_files,
            check_interval: MAP_CHECK_INTERVAL,
            _lock: lock,
            index: Mutex::new(index),
            num_corrupt: AtomicU64::new(0),
            num_evicted: AtomicU64::new(0),
        };
        cache.evict(&mut cache.index.lock().expect("cache index lock"));
        Ok(cache)
    }

    /// The cached bytes of `key`, checked; `None` when absent or when the entry failed its
    /// check (it is then deleted, so the caller fetches and puts it again). The first read of an
    /// entry in this run reads and checks it whole; later ones return a slice of its map.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.read(key).map(|payload| payload.bytes)
    }

    /// [`get`](Self::get), saying whether the bytes are a slice of the entry's map (which a
    /// caller may hold on to at no memory cost) or were read into memory (the first read of the
    /// entry in this run: a caller keeps only what it needs of them).
    pub fn read(&self, key: &str) -> Option<Payload> {
        let id = Id::of(key);
        let now = Instant::now();
        let (verified, payload, stamp, kept) = {
            let mut index = self.index.lock().expect("cache index lock");
            let (touched, entry) = index.use_entry(id)?;
            let (verified, payload, stamp) = (entry.verified, entry.bytes, entry.stamp);
            if !touched {
                // Recency survives a restart through the modification time. Set under the lock,
                // once per entry and run, so that every thread reading the entry whole sees the
                // time it keeps from then on (its stamp).
                if let Ok(file) = File::options().write(true).open(self.dir.join(id.file_name())) {
                    let _ = file.set_modified(SystemTime::now());
                }
            }
            // (the map, whether its file is due for a check)
            let kept = index.maps.get_mut(&id).map(|kept| {
                let due = now.duration_since(kept.checked) >= self.check_interval;
                if due {
                    kept.checked = now;
                }
                (kept.map.clone(), due)
            });
            (verified, payload, stamp, kept)
        };
        if !verified {
            return self.read_whole(key, id).map(|bytes| Payload { bytes, mapped: false });
        }
        let start = FIXED_HEADER + key.len();
        let kept = match kept {
            Some(kept) => Some(kept),
            // Just mapped: its size is compared below, and its modification time with the one it
            // had when it was checked or written.
            None => MappedFile::open(&self.dir.join(id.file_name()))
                .ok()
                .filter(|map| stamp.is_none_or(|stamp| map.modified() == Some(stamp)))
                .map(Arc::new)
                .map(|map| {
                    let keep = KeptMap { map: map.clone(), checked: now };
                    self.index.lock().expect("cache index lock").keep_map(id, keep, self.open_files);
                    (map, false)
                }),
        };
        match kept {
            // The file as it was checked: its size, and unchanged since it was mapped.
            Some((map, due)) if map.len() as u64 == start as u64 + payload && (!due || map.check().is_ok()) => {
                Some(Payload { bytes: super::shared_bytes(map).slice(start..), mapped: true })
            }
            _ => {
                self.refuse(id);
                None
            }
        }
    }

    /// Deletes entry `id` after it failed a check, counting it, so that it is fetched again.
    fn refuse(&self, id: Id) {
        self.num_corrupt.fetch_add(1, Ordering::Relaxed);
        self.remove(id);
    }

    /// Reads and checks the whole entry file of `key` (whose id is `id`).
    fn read_whole(&self, key: &str, id: Id) -> Option<Bytes> {
        let path = self.dir.join(id.file_name());
        let Some(payload) = std::fs::read(&path).ok().and_then(|data| check(data, key)) else {
            self.refuse(id);
            return None;
        };
        let stamp = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let mut index = self.index.lock().expect("cache index lock");
        if let Some(entry) = index.entries.get_mut(&id) {
            // Found at start-up, its size was counted from the file's (key included).
            let counted = std::mem::replace(&mut entry.bytes, payload.len() as u64);
            entry.verified = true;
            entry.stamp = stamp;
            index.total_bytes = index.total_bytes - counted + payload.len() as u64;
        }
        Some(payload)
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
            let mut header = Vec::with_capacity(FIXED_HEADER + key.len());
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            header.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
            header.extend_from_slice(&(key.len() as u32).to_le_bytes());
            header.extend_from_slice(key.as_bytes());
            file.write_all(&header)?;
            file.write_all(payload)?;
            std::fs::rename(&tmp, self.dir.join(&name))
        })();
        if let Err(error) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(dir = %self.dir.display(), %error, "cannot write a disk cache entry; going on without it");
            return;
        }
        let stamp = std::fs::metadata(self.dir.join(&name)).and_then(|m| m.modified()).ok();
        let mut index = self.index.lock().expect("cache index lock");
        index.insert(id, payload.len() as u64, true, stamp);
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

/// File descriptors beside the cache's maps: connections, dataset files, the runtime's own.
const OTHER_DESCRIPTORS: u64 = 256;

/// Makes room for `open_files` kept maps under the open-file limit, raising the soft limit when
/// the hard one allows.
fn reserve_descriptors(open_files: usize) -> Result<(), String> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let need = open_files as u64 + OTHER_DESCRIPTORS;
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= need) {
        return Ok(());
    }
    if limit.maximum.is_some_and(|maximum| maximum < need) {
        return Err(format!(
            "--disk-cache-open-files {open_files} needs {need} file descriptors but the hard open-file limit is {} \
             (ulimit -Hn); lower --disk-cache-open-files or raise the limit",
            limit.maximum.unwrap_or(0)
        ));
    }
    setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(need), maximum: limit.maximum })
        .map_err(|e| format!("cannot raise the open-file limit to {need} for --disk-cache-open-files: {e}"))
}

/// What [`DiskCache::read`] returns.
#[derive(Debug)]
pub struct Payload {
    /// The entry's payload.
    pub bytes: Bytes,
    /// Whether `bytes` is a slice of the entry's memory map (page cache) rather than loader memory.
    pub mapped: bool,
}

/// The payload of an entry file (a slice of `data`, not a copy) when its magic, length, checksum
/// and key are right.
fn check(data: Vec<u8>, key: &str) -> Option<Bytes> {
    let header = data.get(..FIXED_HEADER)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let payload_len = u64::from_le_bytes(header[4..12].try_into().ok()?) as usize;
    let checksum = u32::from_le_bytes(header[12..16].try_into().ok()?);
    let key_len = u32::from_le_bytes(header[16..20].try_into().ok()?) as usize;
    let stored_key = data.get(FIXED_HEADER..FIXED_HEADER + key_len)?;
    let payload = data.get(FIXED_HEADER + key_len..)?;
    if stored_key != key.as_bytes() || payload.len() != payload_len || crc32c::crc32c(payload) != checksum {
        return None;
    }
    let start = FIXED_HEADER + key_len;
    Some(Bytes::from(data).slice(start..))
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
        // A truncated entry is refused and deleted, so it is fetched again.
        let path = dir.path().join(Id::of("a").file_name());
        let length = std::fs::metadata(&path).expect("entry").len();
        File::options().write(true).open(&path).expect("open").set_len(length - 1).expect("truncate");
        assert_eq!(cache.get("a"), None);
        assert!(!path.exists());
        assert_eq!(cache.num_corrupt.load(Ordering::Relaxed), 1);
        // An entry whose bytes changed fails its checksum.
        let path = dir.path().join(Id::of("c").file_name());
        let mut data = std::fs::read(&path).expect("entry");
        *data.last_mut().expect("payload") ^= 1;
        std::fs::write(&path, data).expect("write");
        assert_eq!(cache.get("c"), None);
    }

    #[test]
    fn checked_entries_are_read_from_their_maps_and_a_file_changed_under_one_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let payload: Vec<u8> = (0..200u8).collect();
        {
            let cache = DiskCache::open(dir.path(), 1000, 4).expect("opens");
            cache.put("k", &payload);
            // Written by this loader: already checked, so it is mapped at once.
            assert_eq!(cache.get("k").as_deref(), Some(&payload[..]));
            assert_eq!(cache.index.lock().expect("index").maps.len(), 1);
        }
        let mut cache = DiskCache::open(dir.path(), 1000, 4).expect("reopens");
        // Every read of a kept map checks its file (not only every MAP_CHECK_INTERVAL).
        cache.check_interval = Duration::ZERO;
        // The first read of the run reads and checks the whole entry; the second maps it.
        assert_eq!(cache.get("k").as_deref(), Some(&payload[..]));
        assert!(cache.index.lock().expect("index").maps.is_empty());
        let held = cache.get("k").expect("mapped");
        assert_eq!(&held[..], &payload[..]);
        // A file that shrank since it was mapped is refused and deleted; the slice a batch still
        // holds is never read past the file's end by the cache.
        let path = dir.path().join(Id::of("k").file_name());
        let length = std::fs::metadata(&path).expect("entry").len();
        File::options().write(true).open(&path).expect("open").set_len(length - 1).expect("truncate");
        assert_eq!(cache.get("k"), None);
        assert!(!path.exists());
        assert_eq!(cache.num_corrupt.load(Ordering::Relaxed), 1);
        assert_eq!(cache.total_bytes(), 0);
        drop(held);
        // An entry edited in place after it was mapped is refused too.
        cache.put("e", &payload);
        assert!(cache.get("e").is_some());
        let path = dir.path().join(Id::of("e").file_name());
        let file = File::options().write(true).open(&path).expect("open");
        file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).expect("mtime");
        assert_eq!(cache.get("e"), None);
        assert_eq!(cache.num_corrupt.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn open_maps_stay_within_their_bound_and_leave_with_their_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DiskCache::open(dir.path(), 1 << 20, 8).expect("opens");
        let keys: Vec<String> = (0..20).map(|i| format!("key{i}")).collect();
        for (i, key) in keys.iter().enumerate() {
            cache.put(key, &[i as u8; 8]);
            assert_eq!(cache.get(key).as_deref(), Some(&[i as u8; 8][..]));
        }
        assert_eq!(cache.index.lock().expect("index").maps.len(), 8);
        // A replaced entry is read from its new file, not from the map held open.
        let last = &keys[keys.len() - 1];
        assert!(cache.index.lock().expect("index").maps.contains_key(&Id::of(last)));
        cache.put(last, &[255; 8]);
        assert_eq!(cache.get(last).as_deref(), Some(&[255u8; 8][..]));
        // Evicted entries close their maps.
        let small_dir = tempfile::tempdir().expect("tempdir");
        let small = DiskCache::open(small_dir.path(), 16, 8).expect("opens");
        for key in &keys[..3] {
            small.put(key, &[1; 8]);
            assert!(small.get(key).is_some());
        }
        let index = small.index.lock().expect("index");
        assert_eq!(index.entries.len(), 2);
        assert!(index.maps.keys().all(|name| index.entries.contains_key(name)));
        // With no maps kept, every read maps the entry afresh.
        let unkept_dir = tempfile::tempdir().expect("tempdir");
        let unkept = DiskCache::open(unkept_dir.path(), 100, 0).expect("opens");
        unkept.put("k", &[7; 8]);
        assert_eq!(unkept.get("k").as_deref(), Some(&[7u8; 8][..]));
        assert_eq!(unkept.get("k").as_deref(), Some(&[7u8; 8][..]));
        assert!(unkept.index.lock().expect("index").maps.is_empty());
    }
}
