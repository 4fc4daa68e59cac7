//! Read-only memory maps of dataset files: the one place this crate uses `unsafe`.

use std::{fs::File, io, ops::Deref, path::Path};

use memmap2::{Advice, Mmap};

/// A whole file mapped read-only, or read into memory when it cannot be mapped (empty files,
/// file systems without mmap support).
#[derive(Debug)]
pub enum MappedFile {
    /// The file's pages, shared with the page cache (file-backed, not anonymous memory).
    Mapped(Mmap),
    /// A file that could not be mapped, read once into memory.
    Read(Vec<u8>),
}

impl MappedFile {
    /// Maps `path` read-only and tells the kernel reads will be random (shuffled batches touch
    /// rows all over the file, so read-ahead would only waste page cache).
    ///
    /// # Safety contract kept by callers
    /// The map is only valid while no other process truncates or rewrites the file. Loader
    /// servers serve datasets that are written once and then only read; the README says so,
    /// and a truncation shows up as SIGBUS, never as wrong data passed silently.
    ///
    /// # Errors
    /// Returns the I/O error of opening or reading the file.
    pub fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(MappedFile::Read(Vec::new()));
        }
        // SAFETY: the file is opened read-only and mapped read-only; the contract above (datasets
        // are immutable while served) is what makes the returned slice stable.
        #[allow(unsafe_code)]
        let mapped = unsafe { Mmap::map(&file) };
        match mapped {
            Ok(map) => {
                // Hints are best effort: a kernel that ignores them still serves correct data.
                let _ = map.advise(Advice::Random);
                Ok(MappedFile::Mapped(map))
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "mmap failed, reading the file into memory instead");
                std::fs::read(path).map(MappedFile::Read)
            }
        }
    }
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            MappedFile::Mapped(map) => map,
            MappedFile::Read(bytes) => bytes,
        }
    }
}
