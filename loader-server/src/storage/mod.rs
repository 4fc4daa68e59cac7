//! Where a dataset's bytes live, one module per backend that owns opening and reading them:
//! [`mmap`] maps local files; [`object`] reads S3-compatible object stores and HTTP servers with
//! ranged requests, keeping what it fetched in the [`disk_cache`] when one is set. The dataset and Zarr code see a [`Location`] and the backend's readers, not
//! where the bytes come from.

pub mod disk_cache;
pub mod mmap;
pub mod object;

use std::{ops::Deref, path::PathBuf, sync::Arc};

use bytes::Bytes;

pub use object::{ObjectStorage, StoreOptions, is_transient};

use crate::error::LoadError;

/// A shared buffer (a mapped file, a decoded chunk the cache holds) as `Bytes` that keep it alive:
/// what a batch's rows point into until they are encoded.
pub fn shared_bytes<T: Deref<Target = [u8]> + Send + Sync + 'static>(owner: Arc<T>) -> Bytes {
    /// Derefs to the owner's bytes.
    struct Shared<T>(Arc<T>);
    impl<T: Deref<Target = [u8]>> AsRef<[u8]> for Shared<T> {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    Bytes::from_owner(Shared(owner))
}

/// A `--dataset` location: a local path, or an object-store URL.
#[derive(Debug, Clone)]
pub enum Location {
    /// A directory, `.npz` archive or Zarr node on a local file system.
    Local(PathBuf),
    /// A prefix in an object store (`s3://bucket/prefix`, `http(s)://host/path`).
    Remote(Arc<ObjectStorage>),
}

impl Location {
    /// Parses a `--dataset` PATH: `s3://`, `http://` and `https://` URLs open an object store
    /// (nothing is requested yet), anything else is a local path.
    ///
    /// # Errors
    /// [`LoadError::Remote`] for a URL the object store cannot be built for.
    pub fn parse(dataset: &str, spec: &str, options: &StoreOptions) -> Result<Location, LoadError> {
        if object::is_url(spec) {
            return Ok(Location::Remote(Arc::new(ObjectStorage::open(dataset, spec, options)?)));
        }
        Ok(Location::Local(PathBuf::from(spec)))
    }

    /// How messages name it (a URL never carries credentials).
    pub fn display(&self) -> PathBuf {
        match self {
            Location::Local(path) => path.clone(),
            Location::Remote(storage) => PathBuf::from(storage.url()),
        }
    }
}
