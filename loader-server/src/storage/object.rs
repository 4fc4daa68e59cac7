//! Object stores: S3-compatible services (AWS, MinIO, Ceph, R2, GCS's S3 interface) and HTTP
//! servers, through the `object_store` crate. A dataset prefix is listed once at start-up; rows
//! and chunks are then fetched with ranged GETs, adjacent rows coalesced into one request, at
//! most `--io-concurrency` requests in flight per dataset, transient failures retried with
//! bounded backoff (`--io-retries`, `--io-timeout`).
//!
//! The object store's futures run on a small runtime of their own, so the blocking gather
//! threads (and zarrs, which reads synchronously) can wait on them without tying up the
//! runtime that serves gRPC.

use std::{
    future::Future,
    ops::Range,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig, aws::AmazonS3Builder, http::HttpBuilder,
    limit::LimitStore, path::Path as ObjectPath, prefix::PrefixStore,
};
use zarrs::storage::{
    ListableStorageTraits, MaybeBytesIterator, ReadableListableStorage, ReadableStorageTraits, StorageError, StoreKey,
    StoreKeys, StoreKeysPrefixes, StorePrefix,
    byte_range::ByteRangeIterator,
    storage_adapter::async_to_sync::{AsyncToSyncBlockOn, AsyncToSyncStorageAdapter},
};
use zarrs_object_store::AsyncObjectStore;

use crate::{
    error::LoadError,
    storage::disk_cache::{DiskCache, Read},
};

/// Whether a `--dataset` PATH is an object-store URL.
pub fn is_url(spec: &str) -> bool {
    ["s3://", "http://", "https://"].iter().any(|scheme| spec.starts_with(scheme))
}

/// How to reach object stores: the `--s3-*` and `--io-*` flags.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// S3 endpoint URL (MinIO, Ceph ...); AWS's when `None` (or `AWS_ENDPOINT_URL`).
    pub s3_endpoint: Option<String>,
    /// S3 region (or `AWS_REGION`).
    pub s3_region: Option<String>,
    /// Send unsigned requests (public buckets); no credentials are read.
    pub s3_anonymous: bool,
    /// Address buckets as `https://BUCKET.endpoint/` instead of `https://endpoint/BUCKET/`.
    pub s3_virtual_hosted: bool,
    /// Requests in flight per loader, over all remote datasets.
    pub io_concurrency: usize,
    /// Retries of a request that failed transiently (5xx, timeout, reset connection).
    pub io_retries: usize,
    /// Time limit of one request attempt.
    pub io_timeout: Duration,
    /// Where fetched bytes are kept for later reads (`--disk-cache`).
    pub disk_cache: Option<Arc<DiskCache>>,
    /// With a disk cache, remote `.npy` objects are fetched and cached in aligned blocks of this
    /// many bytes, so that any later batch finds its rows whatever the shuffle.
    pub cache_block_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            s3_endpoint: None,
            s3_region: None,
            s3_anonymous: false,
            s3_virtual_hosted: false,
            io_concurrency: 16,
            io_retries: 3,
            io_timeout: Duration::from_secs(30),
            disk_cache: None,
            cache_block_bytes: 64 << 10,
        }
    }
}

/// The runtime the object stores' requests run on (two threads: requests are I/O-bound).
fn io_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("conveyor-io")
            .enable_all()
            .build()
            .expect("the I/O runtime starts (threads and a reactor)")
    })
}

/// Waits for `future` on the calling thread while the I/O runtime drives its sockets and
/// timers. Usable from blocking threads and at start-up (not from the I/O runtime itself).
fn block_on<F: Future>(future: F) -> F::Output {
    let _context = io_runtime().enter();
    futures::executor::block_on(future)
}

/// [`block_on`] for zarrs' async-to-sync adapter.
#[derive(Debug, Clone, Copy)]
struct IoBlockOn;

impl AsyncToSyncBlockOn for IoBlockOn {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        block_on(future)
    }
}

/// One remote dataset location: a store and a prefix in it, with request counters.
pub struct ObjectStorage {
    /// `s3://bucket/prefix` or the HTTP URL, as messages name it (never with credentials).
    url: String,
    /// The store, limited to `--io-concurrency` requests in flight for this dataset (a limit per
    /// dataset keeps one slow store from starving the others).
    store: Arc<dyn ObjectStore>,
    /// The dataset's prefix inside the store.
    prefix: ObjectPath,
    /// GET requests made for rows and headers (Zarr's are counted by zarrs' adapter below).
    requests: AtomicU64,
    /// Bytes those requests returned.
    bytes: AtomicU64,
    /// The disk cache, when one is set.
    disk_cache: Option<Arc<DiskCache>>,
    /// Its block size for `.npy` objects.
    cache_block_bytes: u64,
    /// Bytes read from the disk cache instead of the store.
    cache_hit_bytes: Arc<AtomicU64>,
    /// Zarr reads through zarrs, counted.
    zarr: OnceLock<
        Arc<
            zarrs::storage::storage_adapter::performance_metrics::PerformanceMetricsStorageAdapter<
                dyn zarrs::storage::ReadableListableStorageTraits,
            >,
        >,
    >,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Removes `user:password@` from a URL so that messages never show it.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            if path.is_empty() { format!("{scheme}://{host}") } else { format!("{scheme}://{host}/{path}") }
        }
        None => url.to_owned(),
    }
}

impl ObjectStorage {
    /// Builds the store for `url` (nothing is requested yet).
    ///
    /// # Errors
    /// [`LoadError::Remote`] for a URL or option the store cannot be built with.
    pub fn open(dataset: &str, url: &str, options: &StoreOptions) -> Result<ObjectStorage, LoadError> {
        // The HTTP client's TLS uses the process's rustls provider: ring, as tonic's TLS does.
        // Installing fails only when one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shown = redact(url);
        let fail = |problem: String| LoadError::Remote { dataset: dataset.to_owned(), url: shown.clone(), problem };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: options.io_retries,
            retry_timeout: options.io_timeout.saturating_mul(options.io_retries as u32 + 1),
        };
        let client = |allow_http: bool| {
            ClientOptions::new()
                .with_timeout(options.io_timeout)
                .with_connect_timeout(options.io_timeout.min(Duration::from_secs(10)))
                .with_allow_http(allow_http)
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(fail("names no bucket; write s3://BUCKET/PREFIX".into()));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(endpoint) = &options.s3_endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = &options.s3_region {
                builder = builder.with_region(region);
            }
            let endpoint = options
                .s3_endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                .or_else(|| std::env::var("AWS_ENDPOINT").ok())
                .unwrap_or_default();
            let store = builder
                .with_skip_signature(options.s3_anonymous)
                .with_virtual_hosted_style_request(options.s3_virtual_hosted)
                .with_client_options(client(endpoint.starts_with("http://")))
                .with_retry(retry)
                .build()
                .map_err(|e| fail(format!("cannot set up the S3 client: {e}")))?;
            (Arc::new(LimitStore::new(store, options.io_concurrency)), prefix.trim_matches('/').to_owned())
        } else {
            // The store is the server's root and the URL's path the prefix: WebDAV listings name
            // objects by their full path on the server.
            let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let store = HttpBuilder::new()
                .with_url(format!("{scheme}://{authority}/"))
                .with_client_options(client(scheme == "http"))
                .with_retry(retry)
                .build()
                .map_err(|e| fail(format!("cannot set up the HTTP client: {e}")))?;
            (Arc::new(LimitStore::new(store, options.io_concurrency)), path.trim_matches('/').to_owned())
        };
        Ok(ObjectStorage {
            url: shown.trim_end_matches('/').to_owned(),
            store,
            prefix: ObjectPath::from(prefix),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            disk_cache: options.disk_cache.clone(),
            cache_block_bytes: options.cache_block_bytes.max(1),
            cache_hit_bytes: Arc::new(AtomicU64::new(0)),
            zarr: OnceLock::new(),
        })
    }

    /// The location as messages name it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this is a plain HTTP(S) server (which cannot list a prefix).
    pub fn is_http(&self) -> bool {
        !self.url.starts_with("s3://")
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.as_ref().is_empty() { ObjectPath::from(name) } else { self.prefix.clone().join(name) }
    }

    /// Says what a failed request for `what` means, for people: missing bucket or object,
    /// access denied, endpoint unreachable, or the store's own words.
    pub fn explain(&self, what: &str, error: &object_store::Error) -> String {
        let text = error.to_string();
        let has = |needle: &str| text.contains(needle);
        match error {
            object_store::Error::NotFound { .. } => format!("{what} does not exist"),
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                format!("access to {what} was denied ({text}); {CREDENTIALS}")
            }
            _ if has("NoSuchBucket") => format!("the bucket does not exist ({text})"),
            _ if has("InvalidAccessKeyId") || has("SignatureDoesNotMatch") || has("AccessDenied") || has("403") => {
                format!("access to {what} was denied ({text}); {CREDENTIALS}")
            }
            _ if has("error sending request") || has("connect") || has("dns") => format!(
                "the endpoint is unreachable ({text}); check --s3-endpoint or AWS_ENDPOINT_URL (for HTTP, the URL) \
                 and that the server is up"
            ),
            _ => text,
        }
    }

    /// The objects directly under the prefix: (name relative to it, size in bytes).
    ///
    /// # Errors
    /// A message naming the location and the cause.
    pub fn list(&self) -> Result<Vec<(String, u64)>, String> {
        let listing =
            block_on(self.store.list_with_delimiter(Some(&self.prefix))).map_err(|e| self.explain("the prefix", &e))?;
        let base = self.prefix.as_ref().len();
        Ok(listing
            .objects
            .into_iter()
            .map(|meta| {
                let name = meta.location.as_ref()[base..].trim_start_matches('/').to_owned();
                (name, meta.size)
            })
            .collect())
    }

    /// Whether the object `name` exists.
    ///
    /// # Errors
    /// A message for a failure other than "not found".
    pub fn exists(&self, name: &str) -> Result<bool, String> {
        match block_on(self.store.head(&self.path(name))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(self.explain(&format!("object {name}"), &error)),
        }
    }

    /// Reads `ranges` of object `name` (of `size` bytes) concurrently (within
    /// `--io-concurrency`), in order; through the disk cache when one is set.
    ///
    /// # Errors
    /// A message naming the object and the cause, after the store's retries.
    pub fn read_ranges(&self, name: &str, size: u64, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, String> {
        match &self.disk_cache {
            Some(cache) => self.read_cached(cache, name, size, ranges),
            None => self.fetch(name, ranges),
        }
    }

    /// GETs `ranges` of `name` from the store.
    fn fetch(&self, name: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, String> {
        let path = self.path(name);
        let reads = ranges.iter().map(|range| self.store.get_range(&path, range.clone()));
        let parts = block_on(futures::future::try_join_all(reads))
            .map_err(|e| self.explain(&format!("object {}/{name}", self.url), &e))?;
        self.requests.fetch_add(ranges.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(parts.iter().map(|p| p.len() as u64).sum(), Ordering::Relaxed);
        Ok(parts)
    }

    /// [`read_ranges`](Self::read_ranges) through `cache`: the aligned blocks the ranges touch
    /// come from the cache, or are fetched (all at once) and put there.
    fn read_cached(
        &self,
        cache: &DiskCache,
        name: &str,
        size: u64,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, String> {
        // The object's size is in the key: a replaced object of another size is not confused
        // with the cached one (the README asks that objects be replaced under new names).
        let block_bytes = self.cache_block_bytes;
        let key = |block: u64| format!("{}/{name}#{size}@{block}x{block_bytes}", self.url);
        // Each range's parts, block by block: (block, offset in the block, length).
        let parts_of = |range: &Range<u64>| {
            let mut parts = Vec::new();
            let mut at = range.start;
            while at < range.end.min(size) {
                let block = at / block_bytes;
                let offset = at - block * block_bytes;
                let len = (range.end.min(size).min((block + 1) * block_bytes) - at) as usize;
                parts.push((block, offset, len));
                at += len as u64;
            }
            parts
        };
        // Whole blocks at hand: read (and checked) from the cache the first time this run, or
        // fetched. Parts of blocks verified earlier are read straight from their files.
        let mut whole: std::collections::BTreeMap<u64, Bytes> = std::collections::BTreeMap::new();
        let mut read_parts: std::collections::HashMap<(u64, u64), Bytes> = std::collections::HashMap::new();
        let mut missing: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
        for range in ranges {
            for (block, offset, len) in parts_of(range) {
                if whole.contains_key(&block) || missing.contains(&block) {
                    continue;
                }
                match cache.get_range(&key(block), offset, len) {
                    Some(Read::Whole(bytes)) => {
                        whole.insert(block, bytes);
                    }
                    Some(Read::Part(bytes)) => {
                        read_parts.insert((block, offset), bytes);
                    }
                    None => {
                        missing.insert(block);
                    }
                }
            }
        }
        let hit: u64 = whole.values().chain(read_parts.values()).map(|b| b.len() as u64).sum();
        self.cache_hit_bytes.fetch_add(hit, Ordering::Relaxed);
        let wanted: Vec<Range<u64>> =
            missing.iter().map(|&block| block * block_bytes..((block + 1) * block_bytes).min(size)).collect();
        for (block, bytes) in missing.iter().zip(self.fetch(name, &wanted)?) {
            cache.put(&key(*block), &bytes);
            whole.insert(*block, bytes);
        }
        Ok(ranges
            .iter()
            .map(|range| {
                let mut out = Vec::with_capacity((range.end - range.start) as usize);
                for (block, offset, len) in parts_of(range) {
                    let part = match (whole.get(&block), read_parts.get(&(block, offset))) {
                        (Some(data), _) => data.get(offset as usize..offset as usize + len),
                        (None, Some(part)) => Some(&part[..]),
                        (None, None) => None,
                    };
                    match part {
                        Some(part) => out.extend_from_slice(part),
                        // A block shorter than the object's listing says: the caller finds the
                        // range short and names the object.
                        None => break,
                    }
                }
                Bytes::from(out)
            })
            .collect())
    }

    /// The prefix as zarrs storage (synchronous, over the I/O runtime), counted, and through
    /// the disk cache when one is set.
    pub fn zarr_storage(&self) -> ReadableListableStorage {
        let counted = self
            .zarr
            .get_or_init(|| {
                let prefixed = PrefixStore::new(self.store.clone(), self.prefix.clone());
                let adapter: ReadableListableStorage =
                    Arc::new(AsyncToSyncStorageAdapter::new(Arc::new(AsyncObjectStore::new(prefixed)), IoBlockOn));
                Arc::new(zarrs::storage::storage_adapter::performance_metrics::PerformanceMetricsStorageAdapter::new(
                    adapter,
                ))
            })
            .clone();
        match &self.disk_cache {
            Some(cache) => Arc::new(CachedZarrStorage {
                inner: counted,
                cache: cache.clone(),
                url: self.url.clone(),
                hit_bytes: self.cache_hit_bytes.clone(),
            }),
            None => counted,
        }
    }

    /// Bytes served from the disk cache instead of the store.
    pub fn cache_hit_bytes(&self) -> u64 {
        self.cache_hit_bytes.load(Ordering::Relaxed)
    }

    /// Requests made and bytes fetched so far (rows, headers and Zarr chunks).
    pub fn counters(&self) -> (u64, u64) {
        let (zarr_reads, zarr_bytes) = self.zarr.get().map_or((0, 0), |z| (z.reads() as u64, z.bytes_read() as u64));
        (self.requests.load(Ordering::Relaxed) + zarr_reads, self.bytes.load(Ordering::Relaxed) + zarr_bytes)
    }
}

/// zarrs storage that keeps what it reads (chunks, shard indexes, metadata, sizes) in the disk
/// cache, keyed by URL, key and byte range; listings go to the store.
struct CachedZarrStorage {
    inner: ReadableListableStorage,
    cache: Arc<DiskCache>,
    url: String,
    hit_bytes: Arc<AtomicU64>,
}

impl CachedZarrStorage {
    fn cached(
        &self,
        key: &StoreKey,
        what: &str,
        fetch: impl FnOnce() -> Result<Option<Bytes>, StorageError>,
    ) -> Result<Option<Bytes>, StorageError> {
        let cache_key = format!("{}/{}#{what}", self.url, key.as_str());
        if let Some(bytes) = self.cache.get(&cache_key) {
            self.hit_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            return Ok(Some(bytes));
        }
        let bytes = fetch()?;
        if let Some(bytes) = &bytes {
            self.cache.put(&cache_key, bytes);
        }
        Ok(bytes)
    }
}

impl ReadableStorageTraits for CachedZarrStorage {
    fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StorageError> {
        // Whole values through the store's own `get` (a ranged GET of "0.." is not one).
        self.cached(key, "all", || self.inner.get(key))
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let mut parts = Vec::new();
        for range in byte_ranges {
            let whole = matches!(range, zarrs::storage::byte_range::ByteRange::FromStart(0, None));
            let read = if whole {
                self.get(key)?
            } else {
                self.cached(key, &format!("{range:?}"), || self.inner.get_partial(key, range))?
            };
            match read {
                Some(bytes) => parts.push(Ok(bytes)),
                None => return Ok(None),
            }
        }
        Ok(Some(Box::new(parts.into_iter())))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        let size = self.cached(key, "size", || {
            Ok(self.inner.size_key(key)?.map(|size| Bytes::copy_from_slice(&size.to_le_bytes())))
        })?;
        Ok(size.and_then(|bytes| Some(u64::from_le_bytes(bytes.as_ref().try_into().ok()?))))
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

impl ListableStorageTraits for CachedZarrStorage {
    fn list(&self) -> Result<StoreKeys, StorageError> {
        self.inner.list()
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> Result<StoreKeys, StorageError> {
        self.inner.list_prefix(prefix)
    }

    fn list_dir(&self, prefix: &StorePrefix) -> Result<StoreKeysPrefixes, StorageError> {
        self.inner.list_dir(prefix)
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> Result<u64, StorageError> {
        self.inner.size_prefix(prefix)
    }
}

const CREDENTIALS: &str = "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or --s3-anonymous for a \
                           public bucket)";

/// Groups row byte ranges into single requests where the bytes between them are at most
/// `max_gap` (a request costs more than a few KiB of unwanted bytes; `max_gap` 0 merges only
/// rows that touch), keeping each request under `max_bytes`. `rows` are (offset, len) sorted by
/// offset; returns the merged ranges and, per row, the index of its range and its offset in it.
pub fn coalesce(rows: &[(u64, u64)], max_gap: u64, max_bytes: u64) -> (Vec<Range<u64>>, Vec<(usize, usize)>) {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut placed = Vec::with_capacity(rows.len());
    for &(offset, len) in rows {
        match ranges.last_mut() {
            Some(last) if offset >= last.start && offset + len <= last.end => {}
            Some(last)
                if offset >= last.end && offset - last.end <= max_gap && offset + len - last.start <= max_bytes =>
            {
                last.end = offset + len;
            }
            _ => ranges.push(offset..offset + len),
        }
        let index = ranges.len() - 1;
        placed.push((index, (offset - ranges[index].start) as usize));
    }
    (ranges, placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_rows_share_a_request_and_repeated_rows_are_fetched_once() {
        let rows = [(0, 10), (10, 10), (20, 10), (50, 10), (50, 10), (60, 10)];
        let (ranges, placed) = coalesce(&rows, 0, 25);
        assert_eq!(ranges, [0..20, 20..30, 50..70]);
        assert_eq!(placed, [(0, 0), (0, 10), (1, 0), (2, 0), (2, 0), (2, 10)]);
        // Small gaps are read through rather than paid for with another request.
        let (ranges, placed) = coalesce(&[(0, 8), (16, 8), (100, 8)], 8, 1 << 20);
        assert_eq!(ranges, [0..24, 100..108]);
        assert_eq!(placed, [(0, 0), (0, 16), (1, 0)]);
    }

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(redact("https://user:secret@host:8080/data/x"), "https://host:8080/data/x");
        assert_eq!(redact("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(redact("http://host"), "http://host");
    }
}
