//! Loader settings: every flag is also a `LOADER_*` environment variable, and every bound on
//! memory or concurrency is one of them.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, time::Duration};

use crate::{
    dataset::zarr::MissingChunks,
    error::{FieldsProblem, LoadError},
};

/// Flags that contradict each other or lie outside what the loader can do; each message names
/// the flag and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A batch could never fit the in-flight budget.
    #[error(
        "--max-batch-bytes ({max_batch_bytes}) is larger than --max-inflight-bytes ({max_inflight_bytes}); no batch \
         that large could ever be sent, so raise --max-inflight-bytes or lower --max-batch-bytes"
    )]
    BatchOverBudget {
        /// `--max-batch-bytes`.
        max_batch_bytes: u64,
        /// `--max-inflight-bytes`.
        max_inflight_bytes: u64,
    },
    /// A gRPC message cannot be 4 GiB or more.
    #[error("--max-batch-bytes {max_batch_bytes} must be below 4 GiB")]
    BatchOver4GiB {
        /// `--max-batch-bytes`.
        max_batch_bytes: u64,
    },
    /// A flag outside its range.
    #[error("{flag} {value} is outside {low}..={high}")]
    OutOfRange {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: u64,
        /// The smallest value allowed.
        low: u64,
        /// The largest value allowed.
        high: u64,
    },
    /// A Unix socket beside client authentication, with nobody named who may use it.
    #[error(
        "--listen-unix with {asked}: the Unix socket has no TLS and its shared-memory hello comes before any token, \
         so anyone who can open it would be served; name who may connect with --unix-allow-uid UID (the trainers' \
         user id, `id -u`), or drop --listen-unix"
    )]
    UnixSocketOpenToAll {
        /// The flag that asks for authentication.
        asked: &'static str,
    },
    /// A shared-memory region too small to hold its own header.
    #[error(
        "--shm-bytes {shm_bytes} is below the smallest region ({min} bytes); raise it or give 0 to turn shared memory off"
    )]
    ShmRegionTooSmall {
        /// `--shm-bytes`.
        shm_bytes: u64,
        /// The smallest region.
        min: u64,
    },
}

/// One `--dataset` with its `--fields` selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// The name clients use.
    pub name: String,
    /// Directory, `.npz` archive or Zarr node, or an object-store URL.
    pub path: PathBuf,
    /// The fields to serve; all when `None`.
    pub fields: Option<Vec<String>>,
    /// `--windows`: serve the one 1-D field as windows of this many tokens plus one.
    pub window: Option<u64>,
    /// `--token-dtype`: the element type of a raw `.bin` token file.
    pub token_dtype: Option<conveyor_proto::DType>,
    /// `--pack`: how its documents become sequences.
    pub pack: Option<crate::dataset::tokens::PackOptions>,
}

/// `L,eos=ID` (documents joined with EOS) or `L,bins,pad=ID[,eos=ID]` (whole documents in
/// padded sequences), as `--pack` takes them after `NAME=`.
fn parse_pack(text: &str) -> Result<crate::dataset::tokens::PackOptions, String> {
    use crate::dataset::tokens::{PackMode, PackOptions};
    let mut parts = text.split(',').map(str::trim);
    let length = parts.next().and_then(|l| l.parse::<u64>().ok()).filter(|&l| l > 0);
    let length = length.ok_or("needs a length of at least 1 token first: NAME=L,eos=ID or NAME=L,bins,pad=ID")?;
    let mut options = PackOptions { length, mode: PackMode::Concat, eos: None, pad: None };
    for part in parts {
        let id = |value: &str| value.parse::<i64>().map_err(|_| format!("'{part}': {value} is not a token id"));
        match part.split_once('=') {
            None if part == "bins" => options.mode = PackMode::Bins,
            None if part == "concat" => options.mode = PackMode::Concat,
            Some(("eos", value)) => options.eos = Some(id(value)?),
            Some(("pad", value)) => options.pad = Some(id(value)?),
            _ => return Err(format!("'{part}' is not eos=ID, pad=ID, bins or concat")),
        }
    }
    if options.mode == PackMode::Concat && options.eos.is_none() {
        return Err("joins documents with an EOS token: write NAME=L,eos=ID (or NAME=L,bins,pad=ID)".into());
    }
    if options.mode == PackMode::Bins && options.pad.is_none() {
        return Err("packs whole documents into padded sequences: add pad=ID".into());
    }
    Ok(options)
}

/// `loader-server` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "loader-server", version, about = "Serve .npy and Zarr datasets as ready-made batches over gRPC")]
pub struct Config {
    /// A dataset to serve, as NAME=PATH: a directory of .npy fields (FIELD.npy or FIELD-00000.npy
    /// shards), an .npz archive written by numpy.savez (its members are the fields), or a Zarr
    /// array or group (xarray's included: coordinates are described, not served); PATH may be
    /// s3://BUCKET/PREFIX or http(s)://HOST/PATH for .npy objects or Zarr in object storage
    /// (repeat the flag for more; in the environment variable, separate several with commas).
    #[arg(long = "dataset", env = "LOADER_DATASET", value_delimiter = ',', required = true)]
    #[arg(help_heading = "Datasets and storage")]
    pub datasets: Vec<String>,

    /// Address to listen on; port 0 picks a free port (the chosen address is printed as
    /// `listening on ADDR` on stdout).
    #[arg(long, env = "LOADER_LISTEN", default_value = "127.0.0.1:7070")]
    #[arg(help_heading = "Serving and limits")]
    pub listen: SocketAddr,

    /// Also listen on this Unix socket, for trainers on the same host (`--loader unix:PATH`):
    /// batches then travel through shared memory (see --shm-bytes). For a directory (one that
    /// several replicas share; trainers give it as `unix:DIR/`), the socket is
    /// DIR/loader-HOSTNAME.sock. A stale socket file left by a killed loader is replaced; one a
    /// running loader listens on is refused. Not served with TLS (the socket never leaves the
    /// host; its file permissions say who may connect).
    #[arg(long, env = "LOADER_LISTEN_UNIX")]
    #[arg(help_heading = "Same-host shared memory")]
    pub listen_unix: Option<std::path::PathBuf>,

    /// Shared memory per Unix-socket connection that asks for it: batches are written there
    /// once and the client's tensors map them. The loader's worst case is this times the
    /// connections open on the socket (pages count as Shmem once written, until the connection
    /// and the client's batches are gone). A batch that does not fit goes inline over the
    /// socket. 0 turns shared memory off (the socket still serves gRPC).
    #[arg(long, env = "LOADER_SHM_BYTES", default_value_t = 256 << 20, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Same-host shared memory")]
    pub shm_bytes: u64,

    /// Shared memory of all Unix-socket connections together: a connection whose region would
    /// pass it gets none (its batches go inline over the socket, counted in
    /// conveyor_loader_shm_regions_refused_total). Bounds the loader's shared memory whatever
    /// the number of connections.
    #[arg(long, env = "LOADER_MAX_SHM_BYTES", default_value_t = 1 << 30, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Same-host shared memory")]
    pub max_shm_bytes: u64,

    /// User ids allowed on the --listen-unix socket (comma-separated, repeatable), checked with
    /// the peer's credentials (SO_PEERCRED) before anything is read or mapped; others are
    /// closed at once. Required when the loader asks for credentials (--auth-token-file,
    /// --tls-client-ca) and listens on a Unix socket: neither reaches that socket's hello, and
    /// TLS does not run there.
    #[arg(long, env = "LOADER_UNIX_ALLOW_UID", value_delimiter = ',')]
    #[arg(help_heading = "Security")]
    pub unix_allow_uid: Vec<u32>,

    /// S3 endpoint for s3:// datasets (MinIO, Ceph, R2 ...; http:// is allowed for it). Without it,
    /// AWS_ENDPOINT_URL, else AWS. Credentials come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    /// and AWS_SESSION_TOKEN, and never appear in logs, errors or metrics.
    #[arg(long, env = "LOADER_S3_ENDPOINT")]
    #[arg(help_heading = "Datasets and storage")]
    pub s3_endpoint: Option<String>,

    /// S3 region (else AWS_REGION, else us-east-1).
    #[arg(long, env = "LOADER_S3_REGION")]
    #[arg(help_heading = "Datasets and storage")]
    pub s3_region: Option<String>,

    /// Read s3:// datasets without credentials (public buckets).
    #[arg(long, env = "LOADER_S3_ANONYMOUS")]
    #[arg(help_heading = "Datasets and storage")]
    pub s3_anonymous: bool,

    /// Address buckets as https://BUCKET.ENDPOINT/ (virtual-hosted style) instead of
    /// https://ENDPOINT/BUCKET/ (path style, the default, which MinIO-like servers need).
    #[arg(long, env = "LOADER_S3_VIRTUAL_HOSTED")]
    #[arg(help_heading = "Datasets and storage")]
    pub s3_virtual_hosted: bool,

    /// Object-store requests (ranged GETs) in flight per remote dataset.
    #[arg(long, env = "LOADER_IO_CONCURRENCY", default_value = "16")]
    #[arg(help_heading = "Datasets and storage")]
    pub io_concurrency: NonZeroUsize,

    /// Retries of an object-store request that failed transiently (5xx, timeout, reset
    /// connection), with exponential backoff from 50 ms to 2 s; then only the batches that need
    /// it fail.
    #[arg(long, env = "LOADER_IO_RETRIES", default_value_t = 3)]
    #[arg(help_heading = "Datasets and storage")]
    pub io_retries: usize,

    /// Time limit of one object-store request attempt.
    #[arg(long, env = "LOADER_IO_TIMEOUT", default_value = "30s", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Datasets and storage")]
    pub io_timeout: Duration,

    /// Keep bytes fetched from object stores in this directory, so that later epochs (and a
    /// restarted loader) read them from local disk. Off unless given. One loader per directory.
    #[arg(long, env = "LOADER_DISK_CACHE")]
    #[arg(help_heading = "Datasets and storage")]
    pub disk_cache: Option<PathBuf>,

    /// Bytes of fetched data the --disk-cache directory may hold (least recently used out).
    #[arg(long, env = "LOADER_DISK_CACHE_BYTES", default_value_t = 10 << 30, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Datasets and storage")]
    pub disk_cache_bytes: u64,

    /// With --disk-cache, entries kept open between reads at most: a warm read of a kept entry
    /// is one pread of the checked pages it needs, any other first opens the entry and checks its
    /// header. Each costs a file descriptor and its page table (4 bytes per 4 KiB of entry). The
    /// loader raises its soft open-file limit to this plus 256 when it can, and refuses to start
    /// when the hard limit is lower. 0 opens entries afresh on every read.
    #[arg(long, env = "LOADER_DISK_CACHE_OPEN_FILES", default_value_t = 1024)]
    #[arg(help_heading = "Datasets and storage")]
    pub disk_cache_open_files: usize,

    /// With --disk-cache, remote .npy objects are fetched and cached in blocks of whole rows, as
    /// many as this many bytes hold (at least one). Larger blocks make fewer requests and fewer
    /// entries: at 1 MiB a cold full-shuffle epoch over a dataset that fits the cache runs near
    /// the store's bulk rate, and a warm one near the local-disk loader (64 KiB: a request-bound
    /// store answers the first batches' hundreds of small GETs slowly, and a warm batch reads
    /// hundreds of entries). Smaller blocks fetch less around each row when the cache cannot
    /// hold the dataset (a shuffled batch touches up to one block per row, and what was evicted
    /// is fetched again). Each gather holds at most --io-concurrency fetched blocks at once; a
    /// block is fetched once however many batches want it together.
    #[arg(long, env = "LOADER_DISK_CACHE_BLOCK_BYTES", default_value_t = 1 << 20, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Datasets and storage")]
    pub disk_cache_block_bytes: u64,

    /// Serve only some fields of a --dataset, as NAME=FIELD,FIELD,...: for example --fields
    /// eeg=eeg,label serves arrays eeg and label of dataset eeg and nothing else (repeat the flag
    /// for more datasets; in the environment variable, separate datasets with ';'). A name the
    /// dataset does not have is refused, naming those it has.
    #[arg(long = "fields", env = "LOADER_FIELDS", value_delimiter = ';')]
    #[arg(help_heading = "Datasets and storage")]
    pub fields: Vec<String>,

    /// Serve a dataset of token ids as windows for next-token training, as NAME=L: its one 1-D
    /// field (a 1-D .npy, or a raw .bin token file) becomes field `tokens` of shape [L + 1],
    /// window k holding tokens k*L ..= k*L + L (inputs and shifted targets), every token an input
    /// of exactly one window per epoch. Repeat for more datasets.
    #[arg(long = "windows", env = "LOADER_WINDOWS", value_delimiter = ',')]
    #[arg(help_heading = "Datasets and storage")]
    pub windows: Vec<String>,

    /// Pack a dataset of documents (one ragged field of token ids) for next-token training, as
    /// NAME=L,eos=ID: the documents joined in stored order, each followed by token ID, cut into
    /// windows of L + 1 tokens with stride L; or NAME=L,bins,pad=ID[,eos=ID]: whole documents
    /// (longer ones cut at L) placed into sequences of L by first-fit decreasing within blocks
    /// of 1024 documents, the rest filled with token ID. Fields `tokens`, `segment_ids` and
    /// `position_ids` (restarting at each document). Repeat for more datasets.
    #[arg(long = "pack", env = "LOADER_PACK", value_delimiter = ';')]
    #[arg(help_heading = "Datasets and storage")]
    pub packs: Vec<String>,

    /// The element type of a raw .bin token file (no header), as NAME=DTYPE: uint16 for
    /// vocabularies under 65,536 tokens (as nanoGPT writes them), uint32 above. Repeat for more.
    #[arg(long = "token-dtype", env = "LOADER_TOKEN_DTYPE", value_delimiter = ',')]
    #[arg(help_heading = "Datasets and storage")]
    pub token_dtypes: Vec<String>,

    /// A dataset derived by a Python function, as NAME=SOURCE:module:function: clients request
    /// NAME; the loader gathers SOURCE's rows and runs `function(batch, indices, rng)` from
    /// `module` in its worker processes (see --transform-workers). Repeat for more.
    #[arg(long = "transform", env = "LOADER_TRANSFORM", value_delimiter = ',')]
    #[arg(help_heading = "Transforms")]
    pub transforms: Vec<String>,

    /// A dataset derived by built-in operators, as NAME=SOURCE:PIPELINE, where PIPELINE gives
    /// fields their operators: 'image: random_crop(56, 56) | flip(axis=-1) | cast(float32,
    /// scale=1/255) | normalize(mean=[...], std=[...]); eeg: random_window(200)', or @FILE to
    /// read it from a file. Repeat for more.
    #[arg(long = "pipeline", env = "LOADER_PIPELINE")]
    #[arg(help_heading = "Transforms")]
    pub pipelines: Vec<String>,

    /// Worker processes of each --transform (each runs one batch at a time).
    #[arg(long, env = "LOADER_TRANSFORM_WORKERS", default_value = "2")]
    #[arg(help_heading = "Transforms")]
    pub transform_workers: NonZeroUsize,

    /// Address space of each transform worker in bytes (its Python, numpy, the user's module and
    /// its --transform-shm-bytes region included), enforced by the kernel (RLIMIT_AS). A batch
    /// that allocates past it is retried once on a fresh worker. 0: no cap.
    #[arg(long, env = "LOADER_TRANSFORM_WORKER_MEMORY", default_value_t = 4 << 30, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Transforms")]
    pub transform_worker_memory: u64,

    /// Shared memory of each transform worker in bytes, holding one batch in and out
    /// (anonymous memory shared between the loader and the worker).
    #[arg(long, env = "LOADER_TRANSFORM_SHM_BYTES", default_value_t = 256 << 20, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Transforms")]
    pub transform_shm_bytes: u64,

    /// A transform worker that takes longer on one batch is killed and replaced, and the batch
    /// retried once.
    #[arg(long, env = "LOADER_TRANSFORM_TIMEOUT", default_value = "60s", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Transforms")]
    pub transform_timeout: Duration,

    /// Batches after which a transform worker is replaced by a fresh one, so that memory the
    /// user's code leaks stays bounded. 0: never.
    #[arg(long, env = "LOADER_TRANSFORM_MAX_BATCHES", default_value_t = 1000)]
    #[arg(help_heading = "Transforms")]
    pub transform_max_batches: u64,

    /// Batches waiting for a transform worker, per --transform (each holds its gathered rows).
    #[arg(long, env = "LOADER_TRANSFORM_QUEUE", default_value = "4")]
    #[arg(help_heading = "Transforms")]
    pub transform_queue: NonZeroUsize,

    /// Python interpreter of the transform workers (it needs numpy).
    #[arg(long, env = "LOADER_PYTHON", default_value = "python3")]
    #[arg(help_heading = "Transforms")]
    pub python: PathBuf,

    /// Directories searched for --transform modules, before PYTHONPATH (repeat, or separate
    /// with ':' in the environment variable).
    #[arg(long = "transform-pythonpath", env = "LOADER_TRANSFORM_PYTHONPATH", value_delimiter = ':')]
    #[arg(help_heading = "Transforms")]
    pub transform_pythonpath: Vec<PathBuf>,

    /// Largest batch, in bytes of tensor data, one request may ask for. Bounds the size of one
    /// response message (the gRPC message limit is set from it).
    #[arg(long, env = "LOADER_MAX_BATCH_BYTES", default_value_t = 64 << 20, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Serving and limits")]
    pub max_batch_bytes: u64,

    /// Freed buffers (batches, decoded blocks, encode buffers) the allocator may keep for reuse,
    /// in bytes. Reused pages spare the next batch its page faults; above this bound, checked
    /// every 100 ms, they go back to the kernel. Adds at most this (plus what is freed in 100 ms)
    /// to the loader's anonymous memory; 0 returns freed pages at every check.
    #[arg(long, env = "LOADER_ALLOCATOR_RETAIN_BYTES", default_value_t = 128 << 20, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Serving and limits")]
    pub allocator_retain_bytes: u64,

    /// Most pixels an image may declare to be decoded by a pipeline's decode_image (width x
    /// height, read from its header before anything is allocated for it); an image above it fails
    /// its batch (or is substituted, with --on-bad-sample substitute). Each gather thread holds at
    /// most one decoded image: about 8 bytes per pixel of it while it decodes.
    #[arg(long, env = "LOADER_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    #[arg(help_heading = "Transforms")]
    pub max_image_pixels: u64,

    /// What a batch does when one of its samples cannot be decoded (a corrupt or truncated image,
    /// one above --max-image-pixels): `fail` fails the batch, naming the sample, its file or
    /// shard member and why; `substitute` serves another sample in its place, chosen by the
    /// request's seed and epoch and the bad sample's index (so every replica and retry chooses
    /// the same one), and counts it in conveyor_loader_bad_samples_total.
    #[arg(long, env = "LOADER_ON_BAD_SAMPLE", value_enum, default_value = "fail")]
    #[arg(help_heading = "Transforms")]
    pub on_bad_sample: OnBadSample,

    /// Largest number of samples in one batch request.
    #[arg(long, env = "LOADER_MAX_BATCH_SAMPLES", default_value_t = 65536)]
    #[arg(help_heading = "Serving and limits")]
    pub max_batch_samples: u64,

    /// Bytes of batch data being assembled or queued for sending, over all streams. Requests
    /// past it wait (backpressure); the loader's anonymous memory is about twice this.
    #[arg(long, env = "LOADER_MAX_INFLIGHT_BYTES", default_value_t = 256 << 20, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Serving and limits")]
    pub max_inflight_bytes: u64,

    /// Batches being gathered at once, over all streams (threads copying rows out of the maps).
    #[arg(long, env = "LOADER_ASSEMBLE_THREADS", default_value = "4")]
    #[arg(help_heading = "Serving and limits")]
    pub assemble_threads: NonZeroUsize,

    /// Batches one stream may have being gathered at once.
    #[arg(long, env = "LOADER_STREAM_PARALLELISM", default_value = "4")]
    #[arg(help_heading = "Serving and limits")]
    pub stream_parallelism: NonZeroUsize,

    /// Bytes of decoded Zarr chunks kept for reuse, shared by all streams and datasets.
    #[arg(long, env = "LOADER_CHUNK_CACHE_BYTES", default_value_t = 1 << 30, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Serving and limits")]
    pub chunk_cache_bytes: u64,

    /// Zarr chunks being decoded at once.
    #[arg(long, env = "LOADER_DECODE_THREADS", default_value = "2")]
    #[arg(help_heading = "Serving and limits")]
    pub decode_threads: NonZeroUsize,

    /// What an absent Zarr chunk means: an error for the batches that need it, or the fill value.
    #[arg(long, env = "LOADER_ZARR_MISSING_CHUNKS", value_enum, default_value_t = MissingChunks::Error)]
    #[arg(help_heading = "Datasets and storage")]
    pub zarr_missing_chunks: MissingChunks,

    /// The most bytes one chunk of a variable-length Zarr array (strings, bytes, numcodecs
    /// VLen arrays) may decode to; a chunk that would decode to more is refused before it is
    /// decoded, failing the batches that need it. Fixed-size chunks are bounded by their shape.
    #[arg(long, env = "LOADER_MAX_VLEN_CHUNK_BYTES", default_value_t = crate::dataset::zarr::DEFAULT_MAX_VLEN_CHUNK_BYTES, value_parser = conveyor_proto::parse_bytes::<u64>)]
    #[arg(help_heading = "Datasets and storage")]
    pub max_vlen_chunk_bytes: u64,

    /// Concurrent batch streams, shared fairly between connections: when all are held, a new
    /// stream of a connection holding fewer takes the slot of another connection's longest-idle
    /// stream; one that can take none is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOADER_MAX_STREAMS", default_value = "64")]
    #[arg(help_heading = "Serving and limits")]
    pub max_streams: NonZeroUsize,

    /// HTTP/2 per-stream flow-control window in bytes (large windows keep a fast link full).
    #[arg(long, env = "LOADER_HTTP2_STREAM_WINDOW", default_value_t = 16 << 20, value_parser = conveyor_proto::parse_bytes::<u32>)]
    #[arg(help_heading = "Serving and limits")]
    pub http2_stream_window: u32,

    /// HTTP/2 per-connection flow-control window in bytes.
    #[arg(long, env = "LOADER_HTTP2_CONNECTION_WINDOW", default_value_t = 64 << 20, value_parser = conveyor_proto::parse_bytes::<u32>)]
    #[arg(help_heading = "Serving and limits")]
    pub http2_connection_window: u32,

    /// Largest HTTP/2 frame the loader accepts, in bytes (16 KiB to 16 MiB - 1).
    #[arg(long, env = "LOADER_HTTP2_MAX_FRAME", default_value_t = 1 << 20, value_parser = conveyor_proto::parse_bytes::<u32>)]
    #[arg(help_heading = "Serving and limits")]
    pub http2_max_frame: u32,

    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "LOADER_METRICS_LISTEN")]
    #[arg(help_heading = "Observability")]
    pub metrics_listen: Option<SocketAddr>,

    /// A stream whose client takes no response for this long, while the loader has one ready,
    /// is ended with DEADLINE_EXCEEDED and its share of --max-inflight-bytes released (a client
    /// that stops reading cannot hold the budget other clients need).
    #[arg(long, env = "LOADER_WRITE_TIMEOUT", default_value = "60s", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Serving and limits")]
    pub write_timeout: Duration,

    /// A batch stream that sends no request for this long is ended with DEADLINE_EXCEEDED
    /// (clients reconnect when they need batches again), so idle streams cannot hold every
    /// --max-streams slot.
    #[arg(long, env = "LOADER_STREAM_IDLE_TIMEOUT", default_value = "10m", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Serving and limits")]
    pub stream_idle_timeout: Duration,

    /// A connection that has not made its first Loader call this long after it was accepted
    /// (TCP, TLS and HTTP/2 handshakes included) is closed.
    #[arg(long, env = "LOADER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Serving and limits")]
    pub handshake_timeout: Duration,

    /// A connection with no Loader call in progress for this long is closed.
    #[arg(long, env = "LOADER_IDLE_TIMEOUT", default_value = "5m", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Serving and limits")]
    pub idle_timeout: Duration,

    /// Open connections; more are accepted and closed at once, with a warning (each costs a
    /// file descriptor and HTTP/2 buffers).
    #[arg(long, env = "LOADER_MAX_CONNECTIONS", default_value = "256")]
    #[arg(help_heading = "Serving and limits")]
    pub max_connections: NonZeroUsize,

    /// Concurrent HTTP/2 streams (calls) on one connection.
    #[arg(long, env = "LOADER_MAX_STREAMS_PER_CONNECTION", default_value = "16")]
    #[arg(help_heading = "Serving and limits")]
    pub max_streams_per_connection: NonZeroUsize,

    /// Interval of HTTP/2 pings on a connection; a peer that does not answer within
    /// --keepalive-timeout is treated as gone and its streams end.
    #[arg(long, env = "LOADER_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Serving and limits")]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered.
    #[arg(long, env = "LOADER_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Serving and limits")]
    pub keepalive_timeout: Duration,

    /// PEM certificate chain to serve TLS with (with --tls-key); clients then connect to
    /// https://HOST:PORT.
    #[arg(long, env = "LOADER_TLS_CERT", requires = "tls_key")]
    #[arg(help_heading = "Security")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "LOADER_TLS_KEY", requires = "tls_cert")]
    #[arg(help_heading = "Security")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS).
    #[arg(long, env = "LOADER_TLS_CLIENT_CA", requires = "tls_cert")]
    #[arg(help_heading = "Security")]
    pub tls_client_ca: Option<PathBuf>,

    /// File of accepted bearer tokens, one per line (blank lines and lines starting with # are
    /// ignored); reread on SIGHUP. Loader calls without one of them get UNAUTHENTICATED; the
    /// health service stays open.
    #[arg(long, env = "LOADER_AUTH_TOKEN_FILE")]
    #[arg(help_heading = "Security")]
    pub auth_token_file: Option<PathBuf>,

    /// On SIGTERM, how long in-flight batches may take to finish before the loader exits.
    #[arg(long, env = "LOADER_DRAIN_TIMEOUT", default_value = "10s", value_parser = conveyor_proto::parse_duration)]
    #[arg(help_heading = "Serving and limits")]
    pub drain_timeout: Duration,
}

impl Config {
    /// A configuration with the defaults and these `NAME=DIR` datasets, listening on port 0.
    pub fn for_datasets<I: IntoIterator<Item = S>, S: Into<String>>(datasets: I) -> Config {
        let mut args = vec!["loader-server".to_owned(), "--listen".to_owned(), "127.0.0.1:0".to_owned()];
        for spec in datasets {
            args.push("--dataset".into());
            args.push(spec.into());
        }
        <Config as clap::Parser>::parse_from(args)
    }

    /// Splits the `--dataset` values into names and paths, with their `--fields` selections.
    ///
    /// # Errors
    /// [`LoadError::BadSpec`], [`LoadError::DuplicateDataset`] or [`LoadError::BadFields`].
    pub fn dataset_specs(&self) -> Result<Vec<DatasetSpec>, LoadError> {
        let mut out: Vec<DatasetSpec> = Vec::new();
        for spec in &self.datasets {
            let (name, dir) = spec
                .split_once('=')
                .filter(|(n, d)| !n.is_empty() && !d.is_empty())
                .ok_or_else(|| LoadError::BadSpec { spec: spec.clone() })?;
            if out.iter().any(|s| s.name == name) {
                return Err(LoadError::DuplicateDataset { name: name.to_owned() });
            }
            out.push(DatasetSpec {
                name: name.to_owned(),
                path: PathBuf::from(dir),
                fields: None,
                window: None,
                token_dtype: None,
                pack: None,
            });
        }
        for (flag, values) in
            [("--windows", &self.windows), ("--token-dtype", &self.token_dtypes), ("--pack", &self.packs)]
        {
            for value in values {
                let bad = |problem: String| LoadError::BadTokenFlag { flag, value: value.clone(), problem };
                let (name, given) = value.split_once('=').ok_or_else(|| bad("is not NAME=VALUE".into()))?;
                let known = out.iter().map(|s| s.name.clone()).collect::<Vec<_>>().join(", ");
                let spec = out
                    .iter_mut()
                    .find(|s| s.name == name)
                    .ok_or_else(|| bad(format!("names no --dataset (the datasets are {known})")))?;
                if flag == "--pack" {
                    spec.pack = Some(parse_pack(given).map_err(bad)?);
                } else if flag == "--windows" {
                    let length = given.trim().parse::<u64>().ok().filter(|&l| l > 0);
                    spec.window = Some(length.ok_or_else(|| bad("needs a window length of at least 1 token".into()))?);
                } else {
                    let dtype = conveyor_proto::ALL_DTYPES.into_iter().find(|d| d.name() == given.trim());
                    spec.token_dtype = Some(dtype.ok_or_else(|| bad("names no dtype; write uint16 or uint32".into()))?);
                }
            }
        }
        for value in &self.fields {
            let bad = |problem: FieldsProblem| LoadError::BadFields { value: value.clone(), problem };
            let (name, list) = value.split_once('=').ok_or_else(|| bad(FieldsProblem::NotNamed))?;
            let names = || out.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
            let known = names();
            let spec = out
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| bad(FieldsProblem::UnknownDataset { name: name.to_owned(), known }))?;
            let fields: Vec<String> = list.split(',').map(str::trim).map(str::to_owned).collect();
            if fields.iter().any(String::is_empty) {
                return Err(bad(FieldsProblem::EmptyName));
            }
            if spec.fields.replace(fields).is_some() {
                return Err(bad(FieldsProblem::Repeated { name: name.to_owned() }));
            }
        }
        Ok(out)
    }

    /// Checks the bounds agree with each other.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the flag to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch_bytes > self.max_inflight_bytes {
            return Err(ConfigError::BatchOverBudget {
                max_batch_bytes: self.max_batch_bytes,
                max_inflight_bytes: self.max_inflight_bytes,
            });
        }
        if self.max_batch_bytes > u64::from(u32::MAX) {
            return Err(ConfigError::BatchOver4GiB { max_batch_bytes: self.max_batch_bytes });
        }
        let block = self.disk_cache_block_bytes;
        if !(4 << 10..=64 << 20).contains(&block) {
            return Err(ConfigError::OutOfRange {
                flag: "--disk-cache-block-bytes",
                value: block,
                low: 4 << 10,
                high: 64 << 20,
            });
        }
        if self.listen_unix.is_some()
            && self.unix_allow_uid.is_empty()
            && (self.auth_token_file.is_some() || self.tls_client_ca.is_some())
        {
            let asked = if self.tls_client_ca.is_some() { "--tls-client-ca" } else { "--auth-token-file" };
            return Err(ConfigError::UnixSocketOpenToAll { asked });
        }
        if self.shm_bytes != 0 && self.shm_bytes < conveyor_proto::shm::MIN_REGION_BYTES {
            return Err(ConfigError::ShmRegionTooSmall {
                shm_bytes: self.shm_bytes,
                min: conveyor_proto::shm::MIN_REGION_BYTES,
            });
        }
        let frame = u64::from(self.http2_max_frame);
        if !(16 << 10..1 << 24).contains(&frame) {
            return Err(ConfigError::OutOfRange {
                flag: "--http2-max-frame",
                value: frame,
                low: 16 << 10,
                high: (1 << 24) - 1,
            });
        }
        Ok(())
    }

    /// How remote datasets are reached (the `--s3-*` and `--io-*` flags), through `disk_cache`
    /// when `--disk-cache` gave one, with requests on `io` (both made by the caller:
    /// configuration does no I/O).
    pub fn store_options(
        &self,
        disk_cache: Option<std::sync::Arc<crate::storage::disk_cache::DiskCache>>,
        io: crate::storage::object::IoRuntime,
    ) -> crate::storage::StoreOptions {
        crate::storage::StoreOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_anonymous: self.s3_anonymous,
            s3_virtual_hosted: self.s3_virtual_hosted,
            io_concurrency: self.io_concurrency.get(),
            io_retries: self.io_retries,
            io_timeout: self.io_timeout,
            disk_cache,
            cache_block_bytes: self.disk_cache_block_bytes,
            io,
        }
    }

    /// Largest gRPC message this loader sends.
    pub fn max_message_bytes(&self) -> usize {
        self.max_batch_bytes as usize + conveyor_proto::message_overhead_bytes(self.max_batch_samples as usize, 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_specs_are_checked() {
        let config = Config::for_datasets(["a=/x", "b=/y"]);
        assert_eq!(config.dataset_specs().expect("valid").len(), 2);
        let bad = Config::for_datasets(["no-equals"]);
        assert!(matches!(bad.dataset_specs(), Err(LoadError::BadSpec { .. })));
        let dup = Config::for_datasets(["a=/x", "a=/y"]);
        assert!(matches!(dup.dataset_specs(), Err(LoadError::DuplicateDataset { .. })));
    }

    #[test]
    fn fields_select_per_dataset_and_name_what_is_wrong() {
        let mut config = Config::for_datasets(["eeg=/x", "chess=/y"]);
        config.fields = vec!["eeg=eeg, label".into()];
        let specs = config.dataset_specs().expect("valid");
        assert_eq!(specs[0].fields.as_deref(), Some(&["eeg".to_owned(), "label".to_owned()][..]));
        assert_eq!(specs[1].fields, None);
        for (value, expected) in [
            ("eeg", "is not NAME=FIELD"),
            ("eg=eeg", "names dataset 'eg', which no --dataset gives; the datasets are: eeg, chess"),
            ("eeg=a,,b", "empty field name"),
        ] {
            config.fields = vec![value.into()];
            let error = config.dataset_specs().expect_err(value).to_string();
            assert!(error.contains(expected) && error.contains(value), "{error}");
        }
        config.fields = vec!["eeg=a".into(), "eeg=b".into()];
        assert!(config.dataset_specs().expect_err("twice").to_string().contains("second time"));
        // In the environment, datasets are separated by ';' so field lists keep their commas.
        let parsed = <Config as clap::Parser>::try_parse_from([
            "loader-server",
            "--dataset",
            "eeg=/x",
            "--fields",
            "eeg=eeg,label;other=a",
        ])
        .expect("parses");
        assert_eq!(parsed.fields, ["eeg=eeg,label", "other=a"]);
    }

    #[test]
    fn validate_names_the_flag() {
        let mut config = Config::for_datasets(["a=/x"]);
        assert!(config.validate().is_ok());
        config.max_inflight_bytes = 1;
        assert!(config.validate().expect_err("too small").to_string().contains("--max-inflight-bytes"));
        config.max_inflight_bytes = 1 << 30;
        config.http2_max_frame = 1 << 24;
        let error = config.validate().expect_err("frame too large");
        assert_eq!(error.to_string(), "--http2-max-frame 16777216 is outside 16384..=16777215");
    }
}

/// `--on-bad-sample`: what a batch does with a sample that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBadSample {
    /// The batch fails, naming the sample.
    Fail,
    /// Another sample, chosen deterministically, takes its place.
    Substitute,
}
