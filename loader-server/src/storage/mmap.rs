//! Read-only memory maps of dataset files: the one place this crate uses `unsafe`.
//!
//! A map is only as stable as its file: a file truncated under it raises SIGBUS on the next read
//! of a page past the new end, which would kill every stream of the loader. So each map keeps its
//! file open with the size and modification time it had when mapped, and [`MappedFile::check`]
//! compares them before rows are copied: a file that shrank or was modified in place fails the
//! batches that need it, naming the file, and the loader lives on.

use std::{
    fs::File,
    io,
    ops::Deref,
    path::{Path, PathBuf},
    time::SystemTime,
};

use memmap2::{Advice, Mmap};

/// A whole file mapped read-only (or nothing, for an empty file).
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    /// The open file, for the checks.
    file: File,
    /// Size and modification time when mapped.
    len: u64,
    modified: Option<SystemTime>,
    /// The file's pages, shared with the page cache (file-backed, not anonymous memory).
    map: Option<Mmap>,
}

impl MappedFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps `path` read-only and tells the kernel reads will be random (shuffled batches touch
    /// rows all over the file, so read-ahead would only waste page cache).
    ///
    /// # Errors
    /// The I/O error of opening or mapping the file. A file that cannot be mapped (a file
    /// system without mmap, `ulimit -v`) is refused: reading it whole into memory instead would
    /// break the loader's memory bound.
    pub fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        let metadata = file.metadata()?;
        let len = metadata.len();
        let modified = metadata.modified().ok();
        if len == 0 {
            return Ok(MappedFile { path: path.to_owned(), file, len, modified, map: None });
        }
        // SAFETY: the file is opened read-only and mapped read-only. Another process may still
        // truncate or rewrite it: `check` detects both before rows are copied (see the module
        // docs), and the docs ask that served files be replaced by rename, never edited.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "cannot memory-map it ({error}); the loader serves .npy files only through memory maps, never by \
                     reading them whole into memory: raise the address-space limit (ulimit -v) or use a file system \
                     that supports mmap"
                ),
            )
        })?;
        // Hints are best effort: a kernel that ignores them still serves correct data.
        let _ = map.advise(Advice::Random);
        Ok(MappedFile { path: path.to_owned(), file, len, modified, map: Some(map) })
    }

    /// The file's modification time when it was mapped.
    pub fn modified(&self) -> Option<SystemTime> {
        self.modified
    }

    /// Checks the file still has the size and modification time it had when mapped.
    ///
    /// # Errors
    /// A message naming the file and what changed.
    pub fn check(&self) -> Result<(), String> {
        let metadata =
            self.file.metadata().map_err(|error| format!("{}: cannot stat: {error}", self.path.display()))?;
        if metadata.len() < self.len {
            return Err(format!(
                "{} shrank from {} to {} bytes while being served; restore it, or replace dataset files by \
                 renaming a complete new file over the old one and restart the loader",
                self.path.display(),
                self.len,
                metadata.len()
            ));
        }
        if metadata.len() != self.len || metadata.modified().ok() != self.modified {
            return Err(format!(
                "{} was modified in place while being served, so its rows may be torn; replace dataset files by \
                 renaming a complete new file over the old one, and restart the loader",
                self.path.display()
            ));
        }
        Ok(())
    }
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn check_sees_truncation_and_in_place_edits_but_not_renames_over_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.npy");
        std::fs::write(&path, vec![7u8; 4096]).expect("write");
        let map = MappedFile::open(&path).expect("map");
        assert_eq!(map.len(), 4096);
        map.check().expect("unchanged");

        // A new file renamed over the old one: the map keeps the old inode, which is unchanged.
        let new = dir.path().join("x.new");
        std::fs::write(&new, vec![1u8; 10]).expect("write");
        std::fs::rename(&new, &path).expect("rename");
        map.check().expect("the mapped file itself did not change");
        assert_eq!(map[0], 7);

        let edited = MappedFile::open(&path).expect("map");
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        // Modification times have at least millisecond resolution here; make the edit visible.
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.write_all(&[2]).expect("edit");
        file.set_modified(later).expect("mtime");
        let error = edited.check().expect_err("in-place edit");
        assert!(error.contains("modified in place") && error.contains("x.npy"), "{error}");

        let shrunk = MappedFile::open(&path).expect("map");
        file.set_len(4).expect("truncate");
        let error = shrunk.check().expect_err("truncation");
        assert!(error.contains("shrank from 10 to 4 bytes"), "{error}");
    }
}
