//! Loader settings: every flag is also a `LOADER_*` environment variable, and every bound on
//! memory or concurrency is one of them.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, time::Duration};

use crate::{error::LoadError, zarr::MissingChunks};

/// `loader-server` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "loader-server", version, about = "Serve .npy and Zarr datasets as ready-made batches over gRPC")]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed as
    /// `listening on ADDR` on stdout).
    #[arg(long, env = "LOADER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// A dataset to serve, as NAME=PATH: a directory of .npy fields (FIELD.npy or FIELD-00000.npy
    /// shards), or a Zarr array or group (repeat the flag for more; in the environment variable,
    /// separate several with commas).
    #[arg(long = "dataset", env = "LOADER_DATASET", value_delimiter = ',', required = true)]
    pub datasets: Vec<String>,

    /// A dataset derived by a Python function, as NAME=SOURCE:module:function: clients request
    /// NAME; the loader gathers SOURCE's rows and runs `function(batch, indices, rng)` from
    /// `module` in its worker processes (see --transform-workers). Repeat for more.
    #[arg(long = "transform", env = "LOADER_TRANSFORM", value_delimiter = ',')]
    pub transforms: Vec<String>,

    /// A dataset derived by built-in operators, as NAME=SOURCE:PIPELINE, where PIPELINE gives
    /// fields their operators: 'image: random_crop(56, 56) | flip(axis=-1) | cast(float32,
    /// scale=1/255) | normalize(mean=[...], std=[...]); eeg: random_window(200)', or @FILE to
    /// read it from a file. Repeat for more.
    #[arg(long = "pipeline", env = "LOADER_PIPELINE")]
    pub pipelines: Vec<String>,

    /// Worker processes of each --transform (each runs one batch at a time).
    #[arg(long, env = "LOADER_TRANSFORM_WORKERS", default_value = "2")]
    pub transform_workers: NonZeroUsize,

    /// Address space of each transform worker in bytes (its Python, numpy, the user's module and
    /// its --transform-shm-bytes region included), enforced by the kernel (RLIMIT_AS). A batch
    /// that allocates past it is retried once on a fresh worker. 0: no cap.
    #[arg(long, env = "LOADER_TRANSFORM_WORKER_MEMORY", default_value_t = 4 << 30)]
    pub transform_worker_memory: u64,

    /// Shared memory of each transform worker in bytes, holding one batch in and out
    /// (anonymous memory shared between the loader and the worker).
    #[arg(long, env = "LOADER_TRANSFORM_SHM_BYTES", default_value_t = 256 << 20)]
    pub transform_shm_bytes: u64,

    /// A transform worker that takes longer on one batch is killed and replaced, and the batch
    /// retried once.
    #[arg(long, env = "LOADER_TRANSFORM_TIMEOUT", default_value = "60s", value_parser = conveyor_proto::parse_duration)]
    pub transform_timeout: Duration,

    /// Batches after which a transform worker is replaced by a fresh one, so that memory the
    /// user's code leaks stays bounded. 0: never.
    #[arg(long, env = "LOADER_TRANSFORM_MAX_BATCHES", default_value_t = 1000)]
    pub transform_max_batches: u64,

    /// Batches waiting for a transform worker, per --transform (each holds its gathered rows).
    #[arg(long, env = "LOADER_TRANSFORM_QUEUE", default_value = "4")]
    pub transform_queue: NonZeroUsize,

    /// Python interpreter of the transform workers (it needs numpy).
    #[arg(long, env = "LOADER_PYTHON", default_value = "python3")]
    pub python: PathBuf,

    /// Directories searched for --transform modules, before PYTHONPATH (repeat, or separate
    /// with ':' in the environment variable).
    #[arg(long = "transform-pythonpath", env = "LOADER_TRANSFORM_PYTHONPATH", value_delimiter = ':')]
    pub transform_pythonpath: Vec<PathBuf>,

    /// Largest batch, in bytes of tensor data, one request may ask for. Bounds the size of one
    /// response message (the gRPC message limit is set from it).
    #[arg(long, env = "LOADER_MAX_BATCH_BYTES", default_value_t = 64 << 20)]
    pub max_batch_bytes: u64,

    /// Largest number of samples in one batch request.
    #[arg(long, env = "LOADER_MAX_BATCH_SAMPLES", default_value_t = 65536)]
    pub max_batch_samples: u64,

    /// Bytes of batch data being assembled or queued for sending, over all streams. Requests
    /// past it wait (backpressure); the loader's anonymous memory is about twice this.
    #[arg(long, env = "LOADER_MAX_INFLIGHT_BYTES", default_value_t = 256 << 20)]
    pub max_inflight_bytes: u64,

    /// Batches being gathered at once, over all streams (threads copying rows out of the maps).
    #[arg(long, env = "LOADER_ASSEMBLE_THREADS", default_value = "4")]
    pub assemble_threads: NonZeroUsize,

    /// Batches one stream may have being gathered at once.
    #[arg(long, env = "LOADER_STREAM_PARALLELISM", default_value = "4")]
    pub stream_parallelism: NonZeroUsize,

    /// Bytes of decoded Zarr chunks kept for reuse, shared by all streams and datasets.
    #[arg(long, env = "LOADER_CHUNK_CACHE_BYTES", default_value_t = 1 << 30)]
    pub chunk_cache_bytes: u64,

    /// Zarr chunks being decoded at once.
    #[arg(long, env = "LOADER_DECODE_THREADS", default_value = "2")]
    pub decode_threads: NonZeroUsize,

    /// What an absent Zarr chunk means: an error for the batches that need it, or the fill value.
    #[arg(long, env = "LOADER_ZARR_MISSING_CHUNKS", value_enum, default_value_t = MissingChunks::Error)]
    pub zarr_missing_chunks: MissingChunks,

    /// Concurrent batch streams; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOADER_MAX_STREAMS", default_value = "64")]
    pub max_streams: NonZeroUsize,

    /// HTTP/2 per-stream flow-control window in bytes (large windows keep a fast link full).
    #[arg(long, env = "LOADER_HTTP2_STREAM_WINDOW", default_value_t = 16 << 20)]
    pub http2_stream_window: u32,

    /// HTTP/2 per-connection flow-control window in bytes.
    #[arg(long, env = "LOADER_HTTP2_CONNECTION_WINDOW", default_value_t = 64 << 20)]
    pub http2_connection_window: u32,

    /// Largest HTTP/2 frame the loader accepts, in bytes (16 KiB to 16 MiB - 1).
    #[arg(long, env = "LOADER_HTTP2_MAX_FRAME", default_value_t = 1 << 20)]
    pub http2_max_frame: u32,

    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "LOADER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// A stream whose client takes no response for this long, while the loader has one ready,
    /// is ended with DEADLINE_EXCEEDED and its share of --max-inflight-bytes released (a client
    /// that stops reading cannot hold the budget other clients need).
    #[arg(long, env = "LOADER_WRITE_TIMEOUT", default_value = "60s", value_parser = conveyor_proto::parse_duration)]
    pub write_timeout: Duration,

    /// A batch stream that sends no request for this long is ended with DEADLINE_EXCEEDED
    /// (clients reconnect when they need batches again), so idle streams cannot hold every
    /// --max-streams slot.
    #[arg(long, env = "LOADER_STREAM_IDLE_TIMEOUT", default_value = "10m", value_parser = conveyor_proto::parse_duration)]
    pub stream_idle_timeout: Duration,

    /// A connection that has not made its first Loader call this long after it was accepted
    /// (TCP, TLS and HTTP/2 handshakes included) is closed.
    #[arg(long, env = "LOADER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = conveyor_proto::parse_duration)]
    pub handshake_timeout: Duration,

    /// A connection with no Loader call in progress for this long is closed.
    #[arg(long, env = "LOADER_IDLE_TIMEOUT", default_value = "5m", value_parser = conveyor_proto::parse_duration)]
    pub idle_timeout: Duration,

    /// Open connections; more are accepted and closed at once, with a warning (each costs a
    /// file descriptor and HTTP/2 buffers).
    #[arg(long, env = "LOADER_MAX_CONNECTIONS", default_value = "256")]
    pub max_connections: NonZeroUsize,

    /// Concurrent HTTP/2 streams (calls) on one connection.
    #[arg(long, env = "LOADER_MAX_STREAMS_PER_CONNECTION", default_value = "16")]
    pub max_streams_per_connection: NonZeroUsize,

    /// Interval of HTTP/2 pings on a connection; a peer that does not answer within
    /// --keepalive-timeout is treated as gone and its streams end.
    #[arg(long, env = "LOADER_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = conveyor_proto::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered.
    #[arg(long, env = "LOADER_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = conveyor_proto::parse_duration)]
    pub keepalive_timeout: Duration,

    /// PEM certificate chain to serve TLS with (with --tls-key); clients then connect to
    /// https://HOST:PORT.
    #[arg(long, env = "LOADER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "LOADER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS).
    #[arg(long, env = "LOADER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// File of accepted bearer tokens, one per line (blank lines and lines starting with # are
    /// ignored); reread on SIGHUP. Loader calls without one of them get UNAUTHENTICATED; the
    /// health service stays open.
    #[arg(long, env = "LOADER_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// On SIGTERM, how long in-flight batches may take to finish before the loader exits.
    #[arg(long, env = "LOADER_DRAIN_TIMEOUT", default_value = "10s", value_parser = conveyor_proto::parse_duration)]
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

    /// Splits the `--dataset` values into names and directories.
    ///
    /// # Errors
    /// [`LoadError::BadSpec`] or [`LoadError::DuplicateDataset`].
    pub fn dataset_specs(&self) -> Result<Vec<(String, PathBuf)>, LoadError> {
        let mut out: Vec<(String, PathBuf)> = Vec::new();
        for spec in &self.datasets {
            let (name, dir) = spec
                .split_once('=')
                .filter(|(n, d)| !n.is_empty() && !d.is_empty())
                .ok_or_else(|| LoadError::BadSpec { spec: spec.clone() })?;
            if out.iter().any(|(n, _)| n == name) {
                return Err(LoadError::DuplicateDataset { name: name.to_owned() });
            }
            out.push((name.to_owned(), PathBuf::from(dir)));
        }
        Ok(out)
    }

    /// Checks the bounds agree with each other.
    ///
    /// # Errors
    /// A message naming the flag to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch_bytes > self.max_inflight_bytes {
            return Err(format!(
                "--max-batch-bytes ({}) is larger than --max-inflight-bytes ({}); no batch that large could ever be sent, \
                 so raise --max-inflight-bytes or lower --max-batch-bytes",
                self.max_batch_bytes, self.max_inflight_bytes
            ));
        }
        if self.max_batch_bytes > u32::MAX as u64 {
            return Err("--max-batch-bytes must be below 4 GiB".into());
        }
        if !(16 << 10..1 << 24).contains(&self.http2_max_frame) {
            return Err(format!("--http2-max-frame {} is outside 16384..16777215", self.http2_max_frame));
        }
        Ok(())
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
    fn validate_names_the_flag() {
        let mut config = Config::for_datasets(["a=/x"]);
        assert!(config.validate().is_ok());
        config.max_inflight_bytes = 1;
        assert!(config.validate().expect_err("too small").contains("--max-inflight-bytes"));
    }
}
