//! Counters of what the loader served, read by the metrics endpoint and the log line at the end
//! of each stream.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use crate::error::{ERROR_KINDS, RequestError, error_kind_index};

/// Monotonic counters, shared by all streams.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches answered with data.
    pub batches_served: AtomicU64,
    /// Tensor bytes answered.
    pub bytes_served: AtomicU64,
    /// Batch requests refused or failed, one counter per row of [`ERROR_KINDS`].
    pub errors: [AtomicU64; ERROR_KINDS.len()],
    /// Streams refused because `--max-streams` were open.
    pub streams_refused: AtomicU64,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed by `--handshake-timeout` or `--idle-timeout`.
    pub connections_timed_out: AtomicU64,
    /// Streams ended by `--write-timeout` or `--stream-idle-timeout`.
    pub streams_timed_out: AtomicU64,
    /// Request messages that could not be decoded (over the limit or malformed).
    pub requests_malformed: AtomicU64,
    /// Samples that could not be decoded and were served in place of another
    /// (`--on-bad-sample substitute`).
    pub bad_samples_substituted: AtomicU64,
    /// Samples that could not be decoded and failed their batch (`--on-bad-sample fail`).
    pub bad_samples_failed: AtomicU64,
    /// Batches written to a client's shared-memory region.
    pub shm_batches: AtomicU64,
    /// Batches sent inline on a shared-memory connection because the region was full.
    pub shm_full: AtomicU64,
    /// Unix-socket connections granted a shared-memory region.
    pub shm_regions: AtomicU64,
    /// Unix-socket connections that asked for a region and got none: --max-shm-bytes was in use.
    pub shm_regions_refused: AtomicU64,
    /// Shared memory of the regions granted and not yet released, in bytes.
    pub shm_bytes_in_use: Arc<AtomicU64>,
    /// Unix-socket connections closed at once: their peer's user id is not in --unix-allow-uid.
    pub unix_peers_refused: AtomicU64,
    /// Log lines of refused calls (a missing or wrong token).
    pub auth_log: crate::serve::throttle::LogThrottle,
    /// Log lines of connections refused (over --max-connections, or not in --unix-allow-uid).
    pub refusal_log: crate::serve::throttle::LogThrottle,
    /// Calls refused for a missing or wrong token.
    pub auth_refused: AtomicU64,
    /// The allocator's live and retained bytes and purges (`--allocator-retain-bytes`).
    pub allocator: crate::allocator::RetainStats,
    /// Per dataset: bytes delivered and bytes decoded from storage.
    pub datasets: BTreeMap<String, DatasetCounters>,
}

/// Bytes delivered and decoded for one dataset; decoded / delivered is the read amplification.
#[derive(Debug, Default)]
pub struct DatasetCounters {
    /// Tensor bytes sent.
    pub delivered_bytes: AtomicU64,
    /// Bytes decoded from storage (chunk cache misses).
    pub decoded_bytes: AtomicU64,
    /// Batches a transform ran on (derived datasets).
    pub transform_batches: AtomicU64,
    /// Nanoseconds spent transforming, summed (for Python: queue wait, copies and the function).
    pub transform_nanos: AtomicU64,
}

impl Stats {
    /// Counters for these datasets.
    pub fn new(datasets: impl IntoIterator<Item = String>) -> Stats {
        Stats { datasets: datasets.into_iter().map(|d| (d, DatasetCounters::default())).collect(), ..Stats::default() }
    }

    /// Counts one transformed batch that took `elapsed`.
    pub fn record_transform(&self, dataset: &str, elapsed: std::time::Duration) {
        if let Some(counters) = self.datasets.get(dataset) {
            counters.transform_batches.fetch_add(1, Relaxed);
            counters.transform_nanos.fetch_add(elapsed.as_nanos() as u64, Relaxed);
        }
    }

    /// Counts one served batch of `bytes` tensor bytes that needed `decoded` bytes decoded.
    pub fn record_batch(&self, dataset: &str, bytes: u64, decoded: u64) {
        self.batches_served.fetch_add(1, Relaxed);
        self.bytes_served.fetch_add(bytes, Relaxed);
        if let Some(counters) = self.datasets.get(dataset) {
            counters.delivered_bytes.fetch_add(bytes, Relaxed);
            counters.decoded_bytes.fetch_add(decoded, Relaxed);
        }
    }

    /// Logs decoded / delivered bytes per dataset that decoded anything.
    pub fn log_read_amplification(&self) {
        for (dataset, counters) in &self.datasets {
            let decoded = counters.decoded_bytes.load(Relaxed);
            let delivered = counters.delivered_bytes.load(Relaxed);
            if decoded > 0 && delivered > 0 {
                tracing::info!(
                    %dataset,
                    decoded_bytes = decoded,
                    delivered_bytes = delivered,
                    read_amplification = format!("{:.3}", decoded as f64 / delivered as f64),
                    "read amplification"
                );
            }
        }
    }

    /// Counts one rejected request by cause.
    pub fn record_error(&self, error: &RequestError) {
        self.errors[error_kind_index(error.kind())].fetch_add(1, Relaxed);
    }

    /// Counts one refused stream.
    pub fn record_refused_stream(&self) {
        self.streams_refused.fetch_add(1, Relaxed);
    }
}
