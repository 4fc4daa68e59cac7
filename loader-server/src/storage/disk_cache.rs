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
//! `DIR/.lock`, and a second loader is refused. A read returns the payload as a slice of the
//! bytes read, without a second copy.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;

use crate::error::LoadError;

const MAGIC: &[u8; 4] = b"CVC2";
/// Magic, payload length, payload CRC-32C, key length.
const FIXED_HEADER: usize = 4 + 8 + 4 + 4;

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
    /// later reads of a part of it check only that the file still holds that part.
    verified: bool,
}

/// Entries by file name, and their names by last use (least recently used first).
#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, Entry>,
    by_last_use: BTreeMap<u64, String>,
    /// Payload bytes of all entries.
    total_bytes: u64,
    /// Use counter for least-recently-used order.
    clock: u64,
}

impl Index {
    /// Counts a use of `name`; returns (whether its modification time was already set this
    /// run, whether it was verified this run), or `None` when there is no such entry.
    fn use_entry(&mut self, name: &str) -> Option<(bool, bool)> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(name)?;
        self.by_last_use.remove(&entry.last_use);
        entry.last_use = clock;
        self.by_last_use.insert(clock, name.to_owned());
        Some((std::mem::replace(&mut entry.touched, true), entry.verified))
    }

    /// Adds or replaces `name`, as used now.
    fn insert(&mut self, name: String, bytes: u64, fresh: bool) {
        self.remove(&name);
        self.clock += 1;
        self.by_last_use.insert(self.clock, name.clone());
        self.entries.insert(name, Entry { bytes, last_use: self.clock, touched: fresh, verified: fresh });
        self.total_bytes += bytes;
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        let entry = self.entries.remove(name)?;
        self.by_last_use.remove(&entry.last_use);
        self.total_bytes -= entry.bytes;
        Some(entry)
    }

    /// Removes the least recently used entry and returns its name.
    fn pop_oldest(&mut self) -> Option<String> {
        let (_, name) = self.by_last_use.pop_first()?;
        let entry = self.entries.remove(&name)?;
        self.total_bytes -= entry.bytes;
        Some(name)
    }
}

/// The cache of one loader.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    budget_bytes: u64,
    /// Held open for the loader's lifetime: its exclusive lock keeps other loaders out.
    _lock: File,
    index: Mutex<Index>,
    /// Entries that failed their check and were fetched again.
    pub num_corrupt: AtomicU64,
    /// Entries removed to stay within the budget.
    pub num_evicted: AtomicU64,
}

fn file_name(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut name = String::with_capacity(2 * hash.as_ref().len() + 6);
    for &byte in hash.as_ref() {
        name.push(char::from(HEX[usize::from(byte >> 4)]));
        name.push(char::from(HEX[usize::from(byte & 15)]));
    }
    name.push_str(".entry");
    name
}

impl DiskCache {
    /// Opens (or creates) the cache in `dir`, finding the entries a previous loader left.
    ///
    /// # Errors
    /// [`LoadError::DiskCache`] when the directory cannot be used or another loader holds it.
    pub fn open(dir: &Path, budget_bytes: u64) -> Result<DiskCache, LoadError> {
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
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| fail(format!("cannot list it: {e}")))? {
            let entry = entry.map_err(|e| fail(format!("cannot list it: {e}")))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp") {
                // A write interrupted by a crash.
                let _ = std::fs::remove_file(entry.path());
            } else if name.ends_with(".entry")
                && let Ok(metadata) = entry.metadata()
            {
                let modified = metadata.modified().unwrap_or(std::time::UNIX_EPOCH);
                let payload = metadata.len().saturating_sub(FIXED_HEADER as u64);
                found.push((modified, name, payload));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, name, payload) in found {
            index.insert(name, payload, false);
        }
        let cache = DiskCache {
            dir: dir.to_owned(),
            budget_bytes,
            _lock: lock,
            index: Mutex::new(index),
            num_corrupt: AtomicU64::new(0),
            num_evicted: AtomicU64::new(0),
        };
        cache.evict(&mut cache.index.lock().expect("cache index lock"));
        Ok(cache)
    }

    /// The cached bytes of `key`, checked; `None` when absent or when the entry failed its
    /// check (it is then deleted, so the caller fetches and puts it again).
    pub fn get(&self, key: &str) -> Option<Bytes> {
        match self.read(key, None)? {
            Read::Whole(payload) => Some(payload),
            Read::Part(_) => unreachable!("no range asked"),
        }
    }

    /// `len` bytes at `offset` of `key`'s payload, or (the first time an entry is read in this
    /// run) the whole payload, checked, for the caller to take the range from. `None` as for
    /// [`DiskCache::get`], and when the entry no longer holds the range.
    pub fn get_range(&self, key: &str, offset: u64, len: usize) -> Option<Read> {
        self.read(key, Some((offset, len)))
    }

    fn read(&self, key: &str, range: Option<(u64, usize)>) -> Option<Read> {
        let name = file_name(key);
        let (touched, verified) = self.index.lock().expect("cache index lock").use_entry(&name)?;
        let path = self.dir.join(&name);
        let read = match range {
            // Verified earlier in this run: read just the range; a file that shrank since fails.
            Some((offset, len)) if verified => {
                read_at(&path, (FIXED_HEADER + key.len()) as u64 + offset, len).map(Read::Part)
            }
            _ => std::fs::read(&path).ok().and_then(|data| check(data, key)).map(Read::Whole),
        };
        match read {
            Some(read) => {
                if let (Read::Whole(_), Some(entry)) =
                    (&read, self.index.lock().expect("cache index lock").entries.get_mut(&name))
                {
                    entry.verified = true;
                }
                // Recency survives a restart through the modification time.
                if !touched && let Ok(file) = File::options().write(true).open(&path) {
                    let _ = file.set_modified(std::time::SystemTime::now());
                }
                Some(read)
            }
            None => {
                self.num_corrupt.fetch_add(1, Ordering::Relaxed);
                self.remove(&name);
                None
            }
        }
    }

    /// Stores `payload` under `key`, evicting the least recently used entries past the budget.
    /// Failures to write are logged and otherwise ignored: the cache only saves fetches.
    pub fn put(&self, key: &str, payload: &[u8]) {
        if payload.len() as u64 > self.budget_bytes {
            return;
        }
        let name = file_name(key);
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
        let mut index = self.index.lock().expect("cache index lock");
        index.insert(name, payload.len() as u64, true);
        self.evict(&mut index);
    }

    /// Payload bytes held now.
    pub fn total_bytes(&self) -> u64 {
        self.index.lock().expect("cache index lock").total_bytes
    }

    fn remove(&self, name: &str) {
        self.index.lock().expect("cache index lock").remove(name);
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    fn evict(&self, index: &mut Index) {
        while index.total_bytes > self.budget_bytes {
            let Some(oldest) = index.pop_oldest() else { break };
            let _ = std::fs::remove_file(self.dir.join(&oldest));
            self.num_evicted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What [`DiskCache::get_range`] read.
#[derive(Debug)]
pub enum Read {
    /// The whole payload, checked (the first read of the entry in this run).
    Whole(Bytes),
    /// Just the range asked for.
    Part(Bytes),
}

/// Exactly `len` bytes at `offset` of the file at `path`.
fn read_at(path: &Path, offset: u64, len: usize) -> Option<Bytes> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).ok()?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(Bytes::from(buf))
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
            let cache = DiskCache::open(dir.path(), 100).expect("opens");
            cache.put("a", &[1; 40]);
            cache.put("b", &[2; 40]);
            assert_eq!(cache.get("a").as_deref(), Some(&[1u8; 40][..]));
            let error = DiskCache::open(dir.path(), 100).expect_err("one loader per directory");
            assert!(error.to_string().contains("in use by another loader"), "{error}");
            // "b" is now the least recently used: a third entry pushes it out.
            cache.put("c", &[3; 40]);
            assert_eq!(cache.get("b"), None);
            assert_eq!(cache.total_bytes(), 80);
            assert_eq!(cache.num_evicted.load(Ordering::Relaxed), 1);
        }
        let cache = DiskCache::open(dir.path(), 100).expect("reopens after the first loader is gone");
        assert_eq!(cache.get("c").as_deref(), Some(&[3u8; 40][..]));
        // A truncated entry is refused and deleted, so it is fetched again.
        let path = dir.path().join(file_name("a"));
        let length = std::fs::metadata(&path).expect("entry").len();
        File::options().write(true).open(&path).expect("open").set_len(length - 1).expect("truncate");
        assert_eq!(cache.get("a"), None);
        assert!(!path.exists());
        assert_eq!(cache.num_corrupt.load(Ordering::Relaxed), 1);
        // An entry whose bytes changed fails its checksum.
        let path = dir.path().join(file_name("c"));
        let mut data = std::fs::read(&path).expect("entry");
        *data.last_mut().expect("payload") ^= 1;
        std::fs::write(&path, data).expect("write");
        assert_eq!(cache.get("c"), None);
    }

    #[test]
    fn ranges_of_entries_checked_this_run_are_read_alone_and_a_shrunk_file_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let payload: Vec<u8> = (0..200u8).collect();
        {
            let cache = DiskCache::open(dir.path(), 1000).expect("opens");
            cache.put("k", &payload);
            // Written by this loader: already checked, so a range is read by itself.
            let Some(Read::Part(part)) = cache.get_range("k", 10, 5) else { panic!("a part") };
            assert_eq!(&part[..], &payload[10..15]);
        }
        let cache = DiskCache::open(dir.path(), 1000).expect("reopens");
        // The first read of the run checks the whole entry.
        let Some(Read::Whole(whole)) = cache.get_range("k", 10, 5) else { panic!("the whole entry") };
        assert_eq!(&whole[..], &payload[..]);
        let Some(Read::Part(part)) = cache.get_range("k", 190, 10) else { panic!("a part") };
        assert_eq!(&part[..], &payload[190..]);
        // A file that shrank since no longer holds the range: refused and deleted.
        let path = dir.path().join(file_name("k"));
        let length = std::fs::metadata(&path).expect("entry").len();
        File::options().write(true).open(&path).expect("open").set_len(length - 1).expect("truncate");
        assert!(cache.get_range("k", 190, 10).is_none());
        assert!(!path.exists());
        assert_eq!(cache.num_corrupt.load(Ordering::Relaxed), 1);
        assert_eq!(cache.total_bytes(), 0);
    }
}
