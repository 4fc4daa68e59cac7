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
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
    aws::AmazonS3Builder, http::HttpBuilder, limit::LimitStore, path::Path as ObjectPath, prefix::PrefixStore,
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
    storage::disk_cache::{DiskCache, ReadPages},
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
    /// The runtime requests run on.
    pub io: IoRuntime,
}

impl StoreOptions {
    /// The flags' defaults, with requests on `io`.
    pub fn new(io: IoRuntime) -> Self {
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
            io,
        }
    }
}

/// The runtime object-store requests run on (two threads: requests are I/O-bound), started by
/// whoever opens the datasets ([`crate::open`]) and handed to every store through
/// [`StoreOptions`]. Clones share it; the last one lets its threads go without waiting, so it
/// may be dropped anywhere, inside an async runtime too.
#[derive(Clone)]
pub struct IoRuntime(Arc<OwnedRuntime>);

/// The runtime itself, shut down in the background when dropped.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for IoRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoRuntime")
    }
}

impl IoRuntime {
    /// Starts the runtime's two threads.
    ///
    /// # Errors
    /// When the threads or the reactor cannot be created.
    pub fn start() -> std::io::Result<IoRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("conveyor-io")
            .enable_all()
            .build()?;
        Ok(IoRuntime(Arc::new(OwnedRuntime(Some(runtime)))))
    }

    /// Waits for `future` on the calling thread while the runtime drives its sockets and
    /// timers. Usable from blocking threads and at start-up (not from the I/O runtime itself).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let _context = self.0.0.as_ref().map(tokio::runtime::Runtime::enter);
        // Unconstrained: a caller that is itself inside a tokio task (start-up runs in the
        // binary's async main) would otherwise spend that task's cooperative budget, and once it
        // is spent every tokio future polled here answers "yield" forever: this loop would spin
        // without progress (seen after a few hundred requests at start-up).
        futures::executor::block_on(tokio::task::unconstrained(future))
    }
}

/// [`IoRuntime::block_on`] for zarrs' async-to-sync adapter.
impl AsyncToSyncBlockOn for IoRuntime {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        IoRuntime::block_on(self, future)
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
    /// Requests in flight at most (`--io-concurrency`; the store's limit).
    io_concurrency: usize,
    /// The runtime its requests run on.
    io: IoRuntime,
    /// The disk cache, when one is set.
    disk_cache: Option<Arc<DiskCache>>,
    /// Its block size for `.npy` objects.
    cache_block_bytes: u64,
    /// Bytes read from the disk cache instead of the store.
    cache_hit_bytes: Arc<AtomicU64>,
    /// Disk-cache blocks being fetched now, by cache key (see [`Claim`]).
    fetching: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Signalled when a [`Claim`] is released.
    fetched: std::sync::Condvar,
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
        Ok(ObjectStorage::from_store(shown.trim_end_matches('/'), store, &prefix, options))
    }

    /// A location over an already built store (limited by the caller), at `prefix` in it.
    fn from_store(url: &str, store: Arc<dyn ObjectStore>, prefix: &str, options: &StoreOptions) -> ObjectStorage {
        ObjectStorage {
            url: url.to_owned(),
            store,
            prefix: ObjectPath::from(prefix),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            io_concurrency: options.io_concurrency.max(1),
            io: options.io.clone(),
            disk_cache: options.disk_cache.clone(),
            cache_block_bytes: options.cache_block_bytes.max(1),
            cache_hit_bytes: Arc::new(AtomicU64::new(0)),
            fetching: std::sync::Mutex::default(),
            fetched: std::sync::Condvar::new(),
            zarr: OnceLock::new(),
        }
    }

    /// The location as messages name it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Requests in flight at most for this dataset (`--io-concurrency`).
    pub fn io_concurrency(&self) -> usize {
        self.io_concurrency
    }

    /// How a batch's rows of `row_bytes` each are grouped into ranges ([`coalesce`]): (the
    /// largest gap read through, the largest range). Without a disk cache each range is a
    /// request, so near rows share one ([`MAX_GAP_BYTES`], [`MAX_REQUEST_BYTES`]); with one the
    /// store is read in whole cache blocks whatever the ranges, and a warm row is a slice of its
    /// block, so each row is its own range (rows glued together would be copied).
    pub fn row_requests(&self, row_bytes: u64) -> (u64, u64) {
        if self.disk_cache.is_some() { (0, row_bytes) } else { (MAX_GAP_BYTES, MAX_REQUEST_BYTES.max(row_bytes)) }
    }

    /// Whether this is a plain HTTP(S) server (which cannot list a prefix).
    pub fn is_http(&self) -> bool {
        !self.url.starts_with("s3://")
    }

    fn path(&self, name: &str) -> ObjectPath {
        // A name below the prefix (`cat/1.png`) joins part by part: one part would escape its '/'.
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(name)
        } else {
            name.split('/').fold(self.prefix.clone(), |path, part| path.join(part))
        }
    }

    /// Says what a failed request for `what` means, for people: missing bucket or object,
    /// access denied, endpoint unreachable, or the store's own words.
    pub fn explain(&self, what: &str, error: &object_store::Error) -> String {
        let text = error.to_string();
        let has = |needle: &str| text.contains(needle);
        match error {
            // With no credentials set, the store asks the instance metadata service (an EC2
            // role) last; where there is none, its failure is all the store reports.
            _ if has("/latest/api/token") || has("/latest/meta-data/iam/security-credentials") => format!(
                "{NO_CREDENTIALS} to read {what}: none are set and the instance metadata service gave none ({text}); \
                 set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), or \
                 AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, or pass --s3-anonymous for a public bucket"
            ),
            object_store::Error::NotFound { .. } => format!("{what} does not exist"),
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                format!("access to {what} was denied ({text}); {CREDENTIALS}")
            }
            _ if has("NoSuchBucket") => format!("the bucket does not exist ({text})"),
            // "403" alone would also match inside a duration ("in 52.864403ms").
            _ if has("InvalidAccessKeyId")
                || has("SignatureDoesNotMatch")
                || has("AccessDenied")
                || has("403 Forbidden")
                || has("status 403") =>
            {
                format!("access to {what} was denied ({text}); {CREDENTIALS}")
            }
            _ if has("error sending request") || has("connect") || has("dns") => format!(
                "the endpoint is unreachable ({text}); check --s3-endpoint or AWS_ENDPOINT_URL (for HTTP, the URL) \
                 and that the server is up"
            ),
            _ => text,
        }
    }

    /// The objects directly under the prefix: (name relative to it, size in bytes, the version
    /// every later read of it must find).
    ///
    /// # Errors
    /// A message naming the location and the cause.
    pub fn list(&self) -> Result<Vec<(String, u64, ObjectVersion)>, String> {
        let listing = self
            .io
            .block_on(self.store.list_with_delimiter(Some(&self.prefix)))
            .map_err(|e| self.explain("the prefix", &e))?;
        Ok(self.listed(listing.objects))
    }

    /// (name relative to the prefix, size, version) of each listed object.
    fn listed(&self, metas: Vec<ObjectMeta>) -> Vec<(String, u64, ObjectVersion)> {
        let base = self.prefix.as_ref().len();
        metas
            .into_iter()
            .map(|meta| {
                let name = meta.location.as_ref()[base..].trim_start_matches('/').to_owned();
                let version = ObjectVersion::of(&meta);
                (name, meta.size, version)
            })
            .collect()
    }

    /// Every object below the prefix, at any depth, as [`list`](Self::list) gives them (names
    /// relative to the prefix, `CLASS/sub/file.jpg`), in no particular order.
    ///
    /// # Errors
    /// A message naming the location and the cause.
    pub fn list_all(&self) -> Result<Vec<(String, u64, ObjectVersion)>, String> {
        use futures::TryStreamExt;
        let metas: Vec<ObjectMeta> = if self.is_http() {
            // WebDAV servers refuse `Depth: infinity` listings (nginx does): one level at a time.
            let mut metas = Vec::new();
            let mut prefixes = vec![self.prefix.clone()];
            while let Some(prefix) = prefixes.pop() {
                let level = self
                    .io
                    .block_on(self.store.list_with_delimiter(Some(&prefix)))
                    .map_err(|e| self.explain(&format!("the prefix {prefix}"), &e))?;
                metas.extend(level.objects);
                prefixes.extend(level.common_prefixes);
            }
            metas
        } else {
            self.io
                .block_on(self.store.list(Some(&self.prefix)).try_collect())
                .map_err(|e| self.explain("the prefix", &e))?
        };
        Ok(self.listed(metas))
    }

    /// Reads the byte spans `spans` ((offset, length), in any order) of object `name`, each
    /// returned as its own slice, in order: spans are sorted, near ones merged into one request
    /// as [`row_requests`](Self::row_requests) allows (for spans of about `typical_bytes`), and
    /// every request is in flight at once within `--io-concurrency`. Empty spans cost nothing.
    ///
    /// # Errors
    /// A message naming the object and the cause; a span the object does not hold names it.
    pub fn read_spans(
        &self,
        name: &str,
        size: u64,
        version: &ObjectVersion,
        spans: &[(u64, u64)],
        typical_bytes: u64,
    ) -> Result<Vec<Bytes>, String> {
        let mut order: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].1 > 0).collect();
        order.sort_unstable_by_key(|&i| spans[i]);
        let sorted: Vec<(u64, u64)> = order.iter().map(|&i| spans[i]).collect();
        let (max_gap, max_bytes) = self.row_requests(typical_bytes.max(1));
        let (ranges, placed) = coalesce(&sorted, max_gap, max_bytes);
        let parts = if ranges.is_empty() { Vec::new() } else { self.read_ranges(name, size, version, &ranges, None)? };
        let mut out = vec![Bytes::new(); spans.len()];
        for (&i, (range, offset)) in order.iter().zip(placed) {
            let len = spans[i].1 as usize;
            if parts[range].len() < offset + len {
                return Err(format!(
                    "{}/{name} returned {} bytes for bytes {}..{}; it is shorter than its listing or header says",
                    self.url,
                    parts[range].len(),
                    ranges[range].start,
                    ranges[range].end
                ));
            }
            out[i] = parts[range].slice(offset..offset + len);
        }
        Ok(out)
    }

    /// Reads each of `objects` (name, size, version) whole, `--io-concurrency` at a time, through
    /// the disk cache when one is set: each object's bytes, or a message naming it.
    pub fn read_objects(&self, objects: &[(&str, u64, &ObjectVersion)]) -> Vec<Result<Bytes, String>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let read: Vec<std::sync::Mutex<Option<Result<Bytes, String>>>> =
            objects.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let read_one = |&(name, size, version): &(&str, u64, &ObjectVersion)| match size {
            0 => Ok(Bytes::new()),
            _ => self.read_ranges(name, size, version, std::slice::from_ref(&(0..size)), None).map(|mut p| p.remove(0)),
        };
        std::thread::scope(|scope| {
            for _ in 0..self.io_concurrency().min(objects.len()) {
                let reader = || {
                    loop {
                        let at = next.fetch_add(1, Ordering::Relaxed);
                        let Some(object) = objects.get(at) else { break };
                        *read[at].lock().unwrap_or_else(|p| p.into_inner()) = Some(read_one(object));
                    }
                };
                // Without a thread (the process is at its limit), what is left is read below.
                if std::thread::Builder::new().name("conveyor-fetch".into()).spawn_scoped(scope, reader).is_err() {
                    break;
                }
            }
        });
        objects
            .iter()
            .zip(read)
            .map(|(object, slot)| match slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(result) => result,
                None => read_one(object),
            })
            .collect()
    }

    /// Whether the object `name` exists.
    ///
    /// # Errors
    /// A message for a failure other than "not found".
    pub fn exists(&self, name: &str) -> Result<bool, String> {
        match self.io.block_on(self.store.head(&self.path(name))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(self.explain(&format!("object {name}"), &error)),
        }
    }

    /// Reads `ranges` of object `name` (of `size` bytes) concurrently (within
    /// `--io-concurrency`), in order; through the disk cache when one is set, whose blocks then
    /// hold whole rows of `rows` (rows of that many bytes from that offset) when it is given.
    ///
    /// # Errors
    /// A message naming the object and the cause, after the store's retries.
    pub fn read_ranges(
        &self,
        name: &str,
        size: u64,
        version: &ObjectVersion,
        ranges: &[Range<u64>],
        rows: Option<Rows>,
    ) -> Result<Vec<Bytes>, String> {
        match &self.disk_cache {
            Some(cache) => {
                let grid = Grid::new(self.cache_block_bytes, size, rows);
                self.read_cached(cache, name, size, version, ranges, grid)
            }
            None => self.fetch(name, version, ranges),
        }
    }

    /// GETs `ranges` of `name` from the store, each only from `version` of the object (`If-Match`
    /// with its ETag, and the version of each response checked): an object replaced since it was
    /// listed fails the read, naming it, and its bytes are never mixed with the listed ones.
    fn fetch(&self, name: &str, version: &ObjectVersion, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, String> {
        let path = self.path(name);
        let what = format!("object {}/{name}", self.url);
        let changed = |now: &str| {
            format!(
                "{what} changed since the loader listed it (it was {}, it is {now} now); a loader serves the \
                 version of each object it found at start-up and never mixes two: restart the loader to serve the \
                 new data, and write new data under new names while a loader serves the old",
                version.describe()
            )
        };
        let reads = ranges.iter().map(|range| {
            let options = GetOptions {
                range: Some(GetRange::Bounded(range.clone())),
                if_match: version.e_tag.clone(),
                ..GetOptions::default()
            };
            let (path, changed, what) = (&path, &changed, &what);
            async move {
                let result = self.store.get_opts(path, options).await.map_err(|error| match error {
                    object_store::Error::Precondition { .. } => changed("another version (If-Match failed)"),
                    other => self.explain(what, &other),
                })?;
                if !version.matches(&result.meta) {
                    return Err(changed(&ObjectVersion::of(&result.meta).describe()));
                }
                result.bytes().await.map_err(|error| self.explain(what, &error))
            }
        });
        let parts = self.io.block_on(futures::future::try_join_all(reads))?;
        self.requests.fetch_add(ranges.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(parts.iter().map(|p| p.len() as u64).sum(), Ordering::Relaxed);
        Ok(parts)
    }

    /// [`read_ranges`](Self::read_ranges) through `cache`: the blocks of `grid` the ranges touch
    /// come from the cache, or are fetched and put there. Missing blocks are fetched
    /// `--io-concurrency` at a time (a cold batch over big blocks holds at most that many
    /// blocks at once) and once over all threads: a block another batch is fetching is waited
    /// for and then read from the cache, so batches running together do not fetch it twice.
    fn read_cached(
        &self,
        cache: &DiskCache,
        name: &str,
        size: u64,
        version: &ObjectVersion,
        ranges: &[Range<u64>],
        grid: Grid,
    ) -> Result<Vec<Bytes>, String> {
        // The object's size and version are in the key: blocks of a replaced object are never
        // served for the listed one, nor the other way round.
        let tag = version.describe();
        let key = |block: u64| format!("{}/{name}#{size}#{tag}@{block}:{}+{}", self.url, grid.origin, grid.span);
        let bytes_of = |block: u64| grid.bytes(block);
        // What each block gives: (range, offset in the block, length, offset in the range's output).
        let mut wants: std::collections::BTreeMap<u64, Vec<Want>> = std::collections::BTreeMap::new();
        let mut out: Vec<Output> = Vec::with_capacity(ranges.len());
        // Where each range's output stops being filled (a block shorter than the listing says).
        let mut short = Vec::with_capacity(ranges.len());
        for (range_index, range) in ranges.iter().enumerate() {
            let end = range.end.min(size);
            let mut at = range.start;
            while at < end {
                let block = grid.block(at);
                let bytes = grid.bytes(block);
                let len = (end.min(bytes.end) - at) as usize;
                let out_at = (at - range.start) as usize;
                wants.entry(block).or_default().push(Want { range_index, offset: at - bytes.start, len, out_at });
                at += len as u64;
            }
            let len = end.saturating_sub(range.start) as usize;
            let across_blocks = len > 0 && grid.block(range.start) != grid.block(end - 1);
            out.push(if across_blocks { Output::Assembled(vec![0; len]) } else { Output::Empty });
            short.push(len);
        }
        let mut hit = 0u64;
        let mut missing = Vec::new();
        for (&block, block_wants) in &wants {
            match self.read_from_cache(cache, &key(block), block_wants, &mut out, &mut short) {
                Some(bytes) => hit += bytes,
                None => missing.push(block),
            }
        }
        for wave in missing.chunks(self.io_concurrency) {
            // Blocks no other thread is fetching are fetched here; the others are read from the
            // cache once their fetch is done (or fetched here if it failed or was not kept).
            let claim = self.claim(wave.iter().map(|&block| key(block)).collect());
            let (claimed, others): (Vec<u64>, Vec<u64>) = wave.iter().partition(|&&block| claim.holds(&key(block)));
            // A block fetched by another thread since it was found missing is in the cache now.
            let mut mine = Vec::with_capacity(claimed.len());
            for block in claimed {
                match self.read_from_cache(cache, &key(block), &wants[&block], &mut out, &mut short) {
                    Some(bytes) => hit += bytes,
                    None => mine.push(block),
                }
            }
            let wanted: Vec<Range<u64>> = mine.iter().map(|&block| bytes_of(block)).collect();
            for (block, bytes) in mine.iter().zip(self.fetch(name, version, &wanted)?) {
                cache.put(&key(*block), &bytes);
                fill(&bytes, &wants[block], &mut out, &mut short);
            }
            drop(claim);
            for block in others {
                self.wait_unclaimed(&key(block));
                match self.read_from_cache(cache, &key(block), &wants[&block], &mut out, &mut short) {
                    Some(bytes) => hit += bytes,
                    None => {
                        let bytes = self.fetch(name, version, &[bytes_of(block)])?.remove(0);
                        cache.put(&key(block), &bytes);
                        fill(&bytes, &wants[&block], &mut out, &mut short);
                    }
                }
            }
        }
        self.cache_hit_bytes.fetch_add(hit, Ordering::Relaxed);
        Ok(out
            .into_iter()
            .zip(short)
            // The caller finds a short range and names the object.
            .map(|(output, filled)| match output {
                Output::Empty => Bytes::new(),
                Output::Slice(bytes) => bytes.slice(..filled.min(bytes.len())),
                Output::Assembled(mut bytes) => {
                    bytes.truncate(filled);
                    Bytes::from(bytes)
                }
            })
            .collect())
    }

    /// Fills `wants` from the cache entry `key`, each read and checked page by page (see
    /// [`DiskCache::entry`]). Returns the bytes served, or `None` when the entry is not there or
    /// failed a check (it is then deleted; wants already filled are filled again by the fetch).
    fn read_from_cache(
        &self,
        cache: &DiskCache,
        key: &str,
        wants: &[Want],
        out: &mut [Output],
        short: &mut [usize],
    ) -> Option<u64> {
        let entry = cache.entry(key)?;
        let mut pages = ReadPages::default();
        let mut served = 0;
        for want in wants {
            let (start, end) = (want.offset as usize, want.offset as usize + want.len);
            if end > entry.len() {
                short[want.range_index] = short[want.range_index].min(want.out_at);
                continue;
            }
            place(out, want, entry.read(start..end, &mut pages)?);
            served += want.len as u64;
        }
        Some(served)
    }

    /// Claims the cache keys in `keys` that no other thread is fetching (see [`Claim`]).
    fn claim(&self, keys: Vec<String>) -> Claim<'_> {
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        let held = keys.into_iter().filter(|key| fetching.insert(key.clone())).collect();
        Claim { storage: self, held }
    }

    /// Waits until no thread is fetching `key`. Bounded: a fetch ends within the store's
    /// retries and time limits.
    fn wait_unclaimed(&self, key: &str) {
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        while fetching.contains(key) {
            fetching = self.fetched.wait(fetching).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The prefix as zarrs storage (synchronous, over the I/O runtime), counted, and through
    /// the disk cache when one is set.
    pub fn zarr_storage(&self) -> ReadableListableStorage {
        let counted = self
            .zarr
            .get_or_init(|| {
                let objects = PrefixStore::new(self.store.clone(), self.prefix.clone());
                let prefixed = Arc::new(AsyncObjectStore::new(objects.clone()));
                let adapter: ReadableListableStorage = Arc::new(WholeValueReads {
                    inner: Arc::new(AsyncToSyncStorageAdapter::new(prefixed, self.io.clone())),
                    objects,
                    url: self.url.clone(),
                    io: self.io.clone(),
                    versions: std::sync::Mutex::default(),
                });
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

    /// Entries of the disk cache (one per loader, shared by its datasets) refused so far:
    /// `(refused, evicted)`, or `None` without a disk cache.
    pub fn disk_cache_counters(&self) -> Option<(u64, u64)> {
        self.disk_cache
            .as_ref()
            .map(|cache| (cache.num_refused.load(Ordering::Relaxed), cache.num_evicted.load(Ordering::Relaxed)))
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

/// Rows of an object: `bytes` each from `offset` (a `.npy` file's data after its header).
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    /// Where the first row starts.
    pub offset: u64,
    /// Bytes of a row.
    pub bytes: u64,
}

/// How an object is cut into disk-cache blocks: the bytes before `origin` (a header) are block
/// 0; from `origin` on, blocks of `span` bytes. With rows known, `span` is whole rows (as many
/// as `--disk-cache-block-bytes` holds, at least one), so each row lies in one block and a warm
/// read hands it on as a slice of that block's map instead of gluing it from two.
#[derive(Debug, Clone, Copy)]
struct Grid {
    origin: u64,
    span: u64,
    /// The object's size.
    size: u64,
}

impl Grid {
    fn new(block_bytes: u64, size: u64, rows: Option<Rows>) -> Grid {
        match rows {
            Some(rows) if rows.bytes > 0 => {
                Grid { origin: rows.offset, span: (block_bytes / rows.bytes).max(1) * rows.bytes, size }
            }
            _ => Grid { origin: 0, span: block_bytes, size },
        }
    }

    /// The block holding byte `at`.
    fn block(&self, at: u64) -> u64 {
        if at < self.origin { 0 } else { 1 + (at - self.origin) / self.span }
    }

    /// The bytes of block `block`.
    fn bytes(&self, block: u64) -> Range<u64> {
        if block == 0 {
            return 0..self.origin.min(self.size);
        }
        let start = self.origin + (block - 1) * self.span;
        start..(start + self.span).min(self.size)
    }
}

/// A part of a cached `.npy` block that a range needs.
#[derive(Debug, Clone, Copy)]
struct Want {
    /// Which range of the read.
    range_index: usize,
    /// Where the part starts in the block.
    offset: u64,
    /// Its length.
    len: usize,
    /// Where it goes in the range's output.
    out_at: usize,
}

/// Where a range's bytes go: a slice of the one block it lies in, or, for a range across
/// blocks, a buffer its parts are copied into.
#[derive(Debug)]
enum Output {
    /// Not filled (yet).
    Empty,
    /// The range's bytes, from one block.
    Slice(Bytes),
    /// The range's bytes, assembled from several blocks.
    Assembled(Vec<u8>),
}

/// Whether a read failure's message (an `object_store` error as this module or zarrs words it)
/// is the store's and transient: an answer of 5xx or 429, a timeout, a reset, refused or failed
/// connection. Such a read may succeed a moment later (clients retry it); anything else (a
/// missing object, a refusal, an object that changed, bytes that do not decode) is permanent.
pub fn is_transient(message: &str) -> bool {
    if message.contains(NO_CREDENTIALS) {
        return false;
    }
    let text = message.to_ascii_lowercase();
    let status = text
        .match_indices("status code: ")
        .filter_map(|(at, found)| text[at + found.len()..].get(..3)?.parse::<u16>().ok())
        .last();
    if let Some(status) = status {
        return status >= 500 || status == 429;
    }
    [
        "error sending request",
        "timed out",
        "timeout",
        "connection reset",
        "connection refused",
        "connection closed",
        "broken pipe",
        "endpoint is unreachable",
        "error decoding response body",
        "request or response body error",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// The version of an object a loader serves: its ETag when the store gives one, and its
/// modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    /// The ETag (S3, most HTTP servers).
    pub e_tag: Option<String>,
    /// The modification time (RFC 3339), compared where there is no ETag.
    pub modified: String,
}

impl ObjectVersion {
    /// The version `meta` describes.
    pub fn of(meta: &ObjectMeta) -> ObjectVersion {
        ObjectVersion { e_tag: meta.e_tag.clone(), modified: meta.last_modified.to_rfc3339() }
    }

    /// Whether a response's `meta` is this version: the same ETag when both have one, else the
    /// same modification time.
    fn matches(&self, meta: &ObjectMeta) -> bool {
        match (&self.e_tag, &meta.e_tag) {
            (Some(listed), Some(now)) => listed == now,
            _ => self.modified == meta.last_modified.to_rfc3339(),
        }
    }

    /// For messages and cache keys.
    pub fn describe(&self) -> String {
        match &self.e_tag {
            Some(e_tag) => format!("ETag {e_tag}"),
            None => format!("modified {}", self.modified),
        }
    }
}

/// Puts each of `wants` from `block` (a whole fetched block) where it goes, copied (the block
/// is let go once its rows are out). A want the block does not hold marks its range short from
/// there.
fn fill(block: &Bytes, wants: &[Want], out: &mut [Output], short: &mut [usize]) {
    for want in wants {
        let (start, end) = (want.offset as usize, want.offset as usize + want.len);
        if end > block.len() {
            short[want.range_index] = short[want.range_index].min(want.out_at);
            continue;
        }
        place(out, want, &block[start..end]);
    }
}

/// Puts `bytes` (one want's) where the want goes: into its range's assembled buffer, or as the
/// range's own copy.
fn place(out: &mut [Output], want: &Want, bytes: &[u8]) {
    match &mut out[want.range_index] {
        Output::Assembled(buf) => buf[want.out_at..want.out_at + want.len].copy_from_slice(bytes),
        slot => *slot = Output::Slice(Bytes::copy_from_slice(bytes)),
    }
}

/// Cache keys this thread is fetching; other threads wanting them wait
/// ([`ObjectStorage::wait_unclaimed`]). Dropping it (also on an error) releases them.
struct Claim<'a> {
    storage: &'a ObjectStorage,
    held: std::collections::HashSet<String>,
}

impl Claim<'_> {
    fn holds(&self, key: &str) -> bool {
        self.held.contains(key)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut fetching = self.storage.fetching.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.held {
            fetching.remove(key);
        }
        drop(fetching);
        self.storage.fetched.notify_all();
    }
}

/// zarrs' synchronous view of an object store. A whole value (an unsharded chunk, a metadata
/// document) is read with one GET: through zarrs' async-to-sync adapter alone it is the byte
/// range "from 0 to the end", which `zarrs_object_store` answers with a HEAD for the size and
/// then a ranged GET, two requests where one does (half the rate of a request-bound store).
///
/// Each object is pinned to the version of its first read in this run: every later read (a
/// chunk read again after the chunk cache let it go, the ranges of a shard after its index)
/// must find the same ETag (or, without one, modification time), else it fails naming the
/// object, so one run never serves two versions of a chunk.
struct WholeValueReads {
    /// zarrs' adapter, for listings and sizes.
    inner: ReadableListableStorage,
    /// The objects, read here.
    objects: PrefixStore<Arc<dyn ObjectStore>>,
    /// The location as messages name it.
    url: String,
    /// The runtime the reads run on.
    io: IoRuntime,
    /// Per object read so far (a hash of its key): a hash of the version it was first read at.
    /// 16 bytes (plus the map's own) per chunk, shard or metadata object of the array, which its
    /// metadata bounds.
    versions: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
}

fn hash_of(text: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(text)
}

impl WholeValueReads {
    /// Pins `key` to the version `meta` describes at its first read, or checks it against the
    /// pinned one; `meta` is `None` when the object is absent, which is a change once it was read.
    fn check_version(&self, key: &StoreKey, meta: Option<&ObjectMeta>) -> Result<(), StorageError> {
        use std::collections::hash_map::Entry;
        let now = meta.map(|meta| hash_of(&ObjectVersion::of(meta).describe()));
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        match (versions.entry(hash_of(key.as_str())), now) {
            (Entry::Vacant(first), Some(now)) => {
                first.insert(now);
                Ok(())
            }
            // Absent and never read in this run: a chunk that was never written.
            (Entry::Vacant(_), None) => Ok(()),
            (Entry::Occupied(pinned), Some(now)) if *pinned.get() == now => Ok(()),
            (Entry::Occupied(_), _) => {
                let now = meta.map_or_else(|| "gone".to_owned(), |meta| ObjectVersion::of(meta).describe());
                Err(StorageError::Other(format!(
                    "object {}/{} changed since the loader first read it (it is {now} now); a loader serves one \
                     version of each object per run and never mixes two: restart the loader to serve the new data, \
                     and write new data under a new prefix while a loader serves the old",
                    self.url,
                    key.as_str()
                )))
            }
        }
    }

    /// One GET of `key` (a `range` of it, or all of it), its version checked; `None` when the
    /// object does not exist (and never did in this run).
    async fn read(&self, key: &StoreKey, range: Option<GetRange>) -> Result<Option<Bytes>, StorageError> {
        let other = |error: object_store::Error| StorageError::Other(error.to_string());
        let options = GetOptions { range, ..GetOptions::default() };
        let result = match self.objects.get_opts(&ObjectPath::from(key.as_str()), options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return self.check_version(key, None).map(|()| None),
            Err(error) => return Err(other(error)),
        };
        self.check_version(key, Some(&result.meta))?;
        let expected = result.range.end - result.range.start;
        let bytes = result.bytes().await.map_err(other)?;
        if bytes.len() as u64 != expected {
            return Err(StorageError::Other(format!(
                "object {}/{}: a read of {expected} bytes returned {}",
                self.url,
                key.as_str(),
                bytes.len()
            )));
        }
        Ok(Some(bytes))
    }
}

impl ReadableStorageTraits for WholeValueReads {
    fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StorageError> {
        self.io.block_on(self.read(key, None))
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        use zarrs::storage::byte_range::ByteRange;
        let ranges: Vec<GetRange> = byte_ranges
            .map(|range| match range {
                ByteRange::FromStart(start, None) => GetRange::Offset(start),
                ByteRange::FromStart(start, Some(len)) => GetRange::Bounded(start..start + len),
                ByteRange::Suffix(len) => GetRange::Suffix(len),
            })
            .collect();
        if let [GetRange::Offset(0)] = ranges[..] {
            return Ok(self.get(key)?.map(|bytes| Box::new(std::iter::once(Ok(bytes))) as _));
        }
        // Bounded ranges near each other (a shard's inner chunks) share a request, as
        // object_store's own `get_ranges` would merge them; suffixes and open ends go alone.
        let mut rows: Vec<(u64, u64, usize)> = Vec::new();
        let mut requests: Vec<GetRange> = Vec::new();
        let mut placed: Vec<(usize, usize, usize)> = vec![(0, 0, 0); ranges.len()];
        for (i, range) in ranges.into_iter().enumerate() {
            match range {
                GetRange::Bounded(r) => rows.push((r.start, r.end - r.start, i)),
                other => {
                    placed[i] = (requests.len(), 0, usize::MAX);
                    requests.push(other);
                }
            }
        }
        rows.sort_unstable();
        let offsets: Vec<(u64, u64)> = rows.iter().map(|&(offset, len, _)| (offset, len)).collect();
        let (merged, at) = coalesce(&offsets, MAX_GAP_BYTES, MAX_REQUEST_BYTES);
        let first_merged = requests.len();
        for (&(_, len, i), (index, offset)) in rows.iter().zip(at) {
            placed[i] = (first_merged + index, offset, len as usize);
        }
        requests.extend(merged.into_iter().map(GetRange::Bounded));
        let reads = requests.into_iter().map(|range| self.read(key, Some(range)));
        let Some(parts) =
            self.io.block_on(futures::future::try_join_all(reads))?.into_iter().collect::<Option<Vec<Bytes>>>()
        else {
            return Ok(None);
        };
        let out = placed.into_iter().map(move |(request, offset, len)| match len {
            usize::MAX => Ok(parts[request].clone()),
            len => Ok(parts[request].slice(offset..offset + len)),
        });
        Ok(Some(Box::new(out.collect::<Vec<_>>().into_iter())))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        self.inner.size_key(key)
    }

    fn supports_get_partial(&self) -> bool {
        true
    }
}

impl ListableStorageTraits for WholeValueReads {
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

/// Largest ranged GET of coalesced rows: big enough to amortise a request, small enough that
/// one slow request does not hold a whole batch.
const MAX_REQUEST_BYTES: u64 = 8 << 20;

/// Rows at most this far apart share a request: reading 16 KiB of unwanted bytes costs less
/// than another round trip (a small field, such as labels, then takes one request a batch).
const MAX_GAP_BYTES: u64 = 16 << 10;

/// How a failure to find any credentials begins: never transient, whatever the metadata
/// service's failure said.
const NO_CREDENTIALS: &str = "no credentials found";

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

    fn test_options() -> StoreOptions {
        StoreOptions::new(IoRuntime::start().expect("the I/O runtime starts"))
    }

    /// The in-memory store needs no runtime.
    fn block_on<F: Future>(future: F) -> F::Output {
        futures::executor::block_on(future)
    }

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
    fn batches_reading_the_same_cold_blocks_together_fetch_each_once_and_get_every_byte() {
        let object: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let memory = object_store::memory::InMemory::new();
        block_on(memory.put(&ObjectPath::from("data/rows.npy"), object.clone().into())).expect("put");
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            disk_cache: Some(Arc::new(DiskCache::open(dir.path(), 64 << 20, 16).expect("cache"))),
            cache_block_bytes: 64 << 10,
            io_concurrency: 4,
            ..test_options()
        };
        let storage = ObjectStorage::from_store("mem://data", Arc::new(memory), "data", &options);
        let version = listed(&storage, "rows.npy");
        // Rows of 1000 bytes, every 37th row: ranges inside blocks and across block edges.
        let ranges: Vec<Range<u64>> = (0..1u64 << 20).step_by(37_000).map(|at| at..(at + 1000).min(1 << 20)).collect();
        let reads: Vec<Vec<Bytes>> = std::thread::scope(|scope| {
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| storage.read_ranges("rows.npy", 1 << 20, &version, &ranges, None).expect("reads"))
                })
                .collect();
            readers.into_iter().map(|reader| reader.join().expect("reader")).collect()
        });
        for parts in &reads {
            for (range, part) in ranges.iter().zip(parts) {
                assert_eq!(&part[..], &object[range.start as usize..range.end as usize], "range {range:?}");
            }
        }
        let touched: std::collections::BTreeSet<u64> =
            ranges.iter().flat_map(|r| r.start / (64 << 10)..=(r.end - 1) / (64 << 10)).collect();
        assert_eq!(storage.counters().0, touched.len() as u64, "each block fetched once over the four readers");
        // Warm: nothing more is fetched.
        storage.read_ranges("rows.npy", 1 << 20, &version, &ranges, None).expect("reads");
        assert_eq!(storage.counters().0, touched.len() as u64);
    }

    #[test]
    fn cache_blocks_of_rows_hold_whole_rows_and_leave_the_header_out() {
        // A 128-byte header and 50 rows of 1000 bytes, cached in blocks of up to 4096 bytes:
        // blocks of four whole rows (the last of two), the header in none of them.
        let object: Vec<u8> = (0..128 + 50_000u32).map(|i| (i % 253) as u8).collect();
        let memory = object_store::memory::InMemory::new();
        block_on(memory.put(&ObjectPath::from("data/rows.npy"), object.clone().into())).expect("put");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, 16).expect("cache"));
        let options = StoreOptions {
            disk_cache: Some(cache.clone()),
            cache_block_bytes: 4096,
            io_concurrency: 4,
            ..test_options()
        };
        let storage = ObjectStorage::from_store("mem://data", Arc::new(memory), "data", &options);
        let version = listed(&storage, "rows.npy");
        let rows = Some(Rows { offset: 128, bytes: 1000 });
        let ranges: Vec<Range<u64>> = (0..50u64).rev().map(|row| 128 + row * 1000..128 + (row + 1) * 1000).collect();
        for pass in ["cold", "warm"] {
            let parts = storage.read_ranges("rows.npy", object.len() as u64, &version, &ranges, rows).expect("reads");
            for (range, part) in ranges.iter().zip(&parts) {
                assert_eq!(&part[..], &object[range.start as usize..range.end as usize], "{pass} {range:?}");
            }
            assert_eq!(storage.counters().0, 13, "{pass}: thirteen blocks fetched once");
        }
        assert_eq!(cache.total_bytes(), 50_000);
        // A range across blocks (adjacent rows read as one) is glued from both.
        let parts = storage
            .read_ranges("rows.npy", object.len() as u64, &version, std::slice::from_ref(&(3128..5128)), rows)
            .expect("reads");
        assert_eq!(&parts[0][..], &object[3128..5128]);
        assert_eq!(storage.counters().0, 13);
    }

    /// The version of `name` as the prefix's listing gives it.
    fn listed(storage: &ObjectStorage, name: &str) -> ObjectVersion {
        let listing = storage.list().expect("lists");
        listing.into_iter().find(|(object, ..)| object == name).map(|(_, _, version)| version).expect("listed")
    }

    #[test]
    fn zarr_objects_are_pinned_to_the_version_of_their_first_read_and_ranges_get_their_own_bytes() {
        use zarrs::storage::byte_range::ByteRange;
        let memory = Arc::new(object_store::memory::InMemory::new());
        let (chunk, shard) = (ObjectPath::from("data/x/c/0/0"), ObjectPath::from("data/x/c/1/0"));
        block_on(memory.put(&chunk, vec![1u8; 64].into())).expect("put");
        block_on(memory.put(&shard, (0..=255u8).collect::<Vec<u8>>().into())).expect("put");
        let storage = ObjectStorage::from_store("mem://data", memory.clone(), "data", &test_options());
        let zarr = storage.zarr_storage();
        let key = |k: &str| StoreKey::new(k).expect("key");
        assert_eq!(zarr.get(&key("x/c/0/0")).expect("read").expect("exists"), vec![1u8; 64]);
        assert_eq!(zarr.get(&key("x/c/9/9")).expect("read"), None, "a chunk never written is absent");

        // A shard's index (its last bytes) and two inner chunks (read with one merged GET): each
        // range gets its own bytes.
        let ranges = [ByteRange::Suffix(16), ByteRange::FromStart(10, Some(5)), ByteRange::FromStart(20, Some(3))];
        let parts: Vec<Bytes> = zarr
            .get_partial_many(&key("x/c/1/0"), Box::new(ranges.into_iter()))
            .expect("read")
            .expect("exists")
            .collect::<Result<_, _>>()
            .expect("parts");
        assert_eq!(parts, [(240..=255u8).collect::<Vec<u8>>(), (10..15).collect(), (20..23).collect()]);

        // Rewritten under the running loader: the next read of either object fails, naming it;
        // the new bytes are never returned.
        block_on(memory.put(&chunk, vec![2u8; 64].into())).expect("put");
        block_on(memory.put(&shard, vec![0u8; 256].into())).expect("put");
        let error = zarr.get(&key("x/c/0/0")).expect_err("a changed chunk was served").to_string();
        assert!(error.contains("object mem://data/x/c/0/0 changed since the loader first read it"), "{error}");
        assert!(error.contains("restart the loader"), "{error}");
        let ranges = [ByteRange::FromStart(10, Some(5))];
        let error = zarr.get_partial_many(&key("x/c/1/0"), Box::new(ranges.into_iter())).err().expect("changed");
        assert!(error.to_string().contains("x/c/1/0 changed since the loader first read it"), "{error}");
        // Deleted: also a change, not a chunk that was never there.
        block_on(memory.delete(&chunk)).expect("delete");
        let error = zarr.get(&key("x/c/0/0")).expect_err("a deleted chunk read as absent").to_string();
        assert!(error.contains("it is gone now"), "{error}");
    }

    #[test]
    fn an_object_replaced_after_it_was_listed_fails_its_reads_naming_it_with_or_without_a_cache() {
        for cached in [false, true] {
            let memory = Arc::new(object_store::memory::InMemory::new());
            let path = ObjectPath::from("data/rows.npy");
            block_on(memory.put(&path, vec![1u8; 4096].into())).expect("put");
            let dir = tempfile::tempdir().expect("tempdir");
            let options = StoreOptions {
                disk_cache: cached.then(|| Arc::new(DiskCache::open(dir.path(), 1 << 20, 16).expect("cache"))),
                cache_block_bytes: 1024,
                ..test_options()
            };
            let storage = ObjectStorage::from_store("mem://data", memory.clone(), "data", &options);
            let version = listed(&storage, "rows.npy");
            let first = storage.read_ranges("rows.npy", 4096, &version, &[0..100], None).expect("reads");
            assert_eq!(&first[0][..], &[1u8; 100][..]);
            // Replaced by an object of the same size: reads of bytes not yet read (and, without
            // a cache, of any bytes) fail, naming the object; none returns the new bytes.
            block_on(memory.put(&path, vec![2u8; 4096].into())).expect("put");
            let error = storage.read_ranges("rows.npy", 4096, &version, &[3000..3100], None).expect_err("changed");
            assert!(error.contains("mem://data/rows.npy changed since the loader listed it"), "{error}");
            assert!(error.contains("restart the loader"), "{error}");
            if cached {
                // What was cached is the listed version, and is still served.
                let again = storage.read_ranges("rows.npy", 4096, &version, &[0..100], None).expect("cached");
                assert_eq!(&again[0][..], &[1u8; 100][..]);
            }
        }
    }

    #[test]
    fn an_unreachable_endpoint_is_told_apart_from_a_refusal_whatever_the_request_took() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let storage = ObjectStorage::from_store("mem://data", memory, "data", &test_options());
        let generic = |source: &str| object_store::Error::Generic { store: "S3", source: source.to_owned().into() };
        let unreachable = generic(
            "Error performing list request: Error performing GET http://127.0.0.1:9/data in 52.864403ms, after 1 \
             retries - HTTP error: error sending request",
        );
        let told = storage.explain("the prefix", &unreachable);
        assert!(told.starts_with("the endpoint is unreachable"), "{told}");
        let refused = generic("Error performing list request: Server returned non-2xx status code: 403 Forbidden: ");
        let told = storage.explain("the prefix", &refused);
        assert!(told.starts_with("access to the prefix was denied"), "{told}");
    }

    #[test]
    fn storage_failures_are_told_transient_or_permanent_by_their_cause() {
        for transient in [
            "Generic S3 error: Error performing GET http://x/y in 1.2s, after 3 retries: Server returned non-2xx \
             status code: 503 Service Unavailable: ",
            "Generic HTTP error: ... Server returned non-2xx status code: 429 Too Many Requests",
            "the endpoint is unreachable (Generic S3 error: error sending request for url); check --s3-endpoint",
            "HTTP error: operation timed out",
            "Generic S3 error: ... Connection reset by peer (os error 104)",
        ] {
            assert!(is_transient(transient), "{transient}");
        }
        for permanent in [
            "object s3://data/x.npy does not exist",
            "access to the prefix was denied (403 Forbidden); set AWS_ACCESS_KEY_ID",
            "Generic S3 error: ... Server returned non-2xx status code: 404 Not Found",
            "object mem://data/rows.npy changed since the loader listed it (it was ETag 1, it is another version \
             (If-Match failed) now)",
            "chunk c/0/0: its zstd frames declare 3221225472 decoded bytes",
            "no credentials found to read the prefix: none are set and the instance metadata service gave none \
             (Generic S3 error: error sending request for url (http://169.254.169.254/latest/api/token): connection \
             refused)",
        ] {
            assert!(!is_transient(permanent), "{permanent}");
        }
    }

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(redact("https://user:secret@host:8080/data/x"), "https://host:8080/data/x");
        assert_eq!(redact("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(redact("http://host"), "http://host");
    }
}
