//! A local disk cache of bytes fetched from object stores (`--disk-cache DIR
//! --disk-cache-bytes N`), so that later epochs read the loader's disk instead of the store.
//!
//! One file per entry, named by the SHA-256 of its key, holding a header (magic, payload length,
//! payload CRC-32C, the key) and the payload. (CRC-32C runs in hardware: a warm epoch checks
//! every block it reads, and SHA-256 of each block cost more than reading it.) A read checks all of them: an entry that was
//! truncated, edited or belongs to another key is deleted and fetched again. Entries are written
//! beside their final name and renamed, so a crash leaves whole entries or none. The least
//! recently used entries go once the payloads pass the byte budget. The directory survives a
//! restart (entries are found again, oldest first by modification time) and belongs to one
//! loader at a time: it holds an exclusive lock on `DIR/.lock`, and a second loader is refused.

use std::{
    collections::HashMap,
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

/// Entries by file name: (payload bytes, last use).
#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, (u64, u64)>,
    /// Payload bytes of all entries.
    total_bytes: u64,
    /// Use counter for least-recently-used order.
    clock: u64,
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
    let hash = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.entry")
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
            index.clock += 1;
            index.total_bytes += payload;
            index.entries.insert(name, (payload, index.clock));
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
        let name = file_name(key);
        {
            let mut index = self.index.lock().expect("cache index lock");
            index.clock += 1;
            let clock = index.clock;
            let (_, last_use) = index.entries.get_mut(&name)?;
            *last_use = clock;
        }
        let path = self.dir.join(&name);
        match std::fs::read(&path).ok().and_then(|data| check(&data, key)) {
            Some(payload) => {
                // Recency survives a restart through the modification time.
                if let Ok(file) = File::options().write(true).open(&path) {
                    let _ = file.set_modified(std::time::SystemTime::now());
                }
                Some(payload)
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
        index.clock += 1;
        let clock = index.clock;
        if let Some((old, _)) = index.entries.insert(name, (payload.len() as u64, clock)) {
            index.total_bytes -= old;
        }
        index.total_bytes += payload.len() as u64;
        self.evict(&mut index);
    }

    /// Payload bytes held now.
    pub fn total_bytes(&self) -> u64 {
        self.index.lock().expect("cache index lock").total_bytes
    }

    fn remove(&self, name: &str) {
        let mut index = self.index.lock().expect("cache index lock");
        if let Some((size, _)) = index.entries.remove(name) {
            index.total_bytes -= size;
        }
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    fn evict(&self, index: &mut Index) {
        while index.total_bytes > self.budget_bytes {
            let Some(oldest) = index.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(n, _)| n.clone()) else {
                break;
            };
            let (size, _) = index.entries.remove(&oldest).expect("present");
            index.total_bytes -= size;
            let _ = std::fs::remove_file(self.dir.join(&oldest));
            self.num_evicted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The payload of an entry file when its magic, length, checksum and key are right.
fn check(data: &[u8], key: &str) -> Option<Bytes> {
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
    Some(Bytes::copy_from_slice(payload))
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
}
