//! Run measurements: the process's memory and what `--stats-json` writes.

use std::collections::BTreeMap;

use serde::Serialize;

use trainer_client::{DispatchStats, EpochBoundary, ReplicaStats};

/// Reads a `kB` field of `/proc/self/status` in bytes (0 where /proc is missing).
fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Peak resident set size of this process so far.
pub(crate) fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident set size of this process now.
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
pub(crate) fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// What `--stats-json` writes.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunReport {
    /// Samples delivered.
    pub samples: u64,
    /// Batches delivered.
    pub batches: u64,
    /// Tensor bytes delivered.
    pub bytes: u64,
    /// Wall-clock seconds of streaming.
    pub seconds: f64,
    /// Delivered samples per second.
    pub samples_per_s: f64,
    /// Delivered tensor bytes per second.
    pub bytes_per_s: f64,
    /// Peak resident memory of the client process.
    pub peak_rss_bytes: u64,
    /// Batches re-sent after a replica failed.
    pub retried_batches: u64,
    /// Seconds the caller waited for data.
    pub wait_seconds: f64,
    /// Bytes the loaders decoded from storage for the delivered batches.
    pub decoded_bytes: u64,
    /// Decoded / delivered bytes (0 for memory-mapped `.npy`, ~1 when each chunk is decoded
    /// once, more when chunks are decoded again for other batches).
    pub read_amplification: f64,
    /// How each epoch boundary was crossed: the gap between the last batch of one epoch and
    /// the first of the next, and how much of it was spent waiting for data.
    pub epoch_boundaries: Vec<EpochBoundary>,
    /// Per-replica counts.
    pub replicas: BTreeMap<String, ReplicaStats>,
}

impl RunReport {
    /// Builds the report from totals and the dispatcher's counters.
    pub(crate) fn new(samples: u64, batches: u64, bytes: u64, seconds: f64, dispatch: DispatchStats) -> RunReport {
        let seconds = seconds.max(1e-9);
        RunReport {
            samples,
            batches,
            bytes,
            seconds,
            samples_per_s: samples as f64 / seconds,
            bytes_per_s: bytes as f64 / seconds,
            peak_rss_bytes: peak_rss_bytes(),
            retried_batches: dispatch.retried_batches,
            wait_seconds: dispatch.wait_seconds,
            decoded_bytes: dispatch.decoded_bytes,
            read_amplification: if dispatch.delivered_bytes == 0 {
                0.0
            } else {
                dispatch.decoded_bytes as f64 / dispatch.delivered_bytes as f64
            },
            epoch_boundaries: dispatch.epoch_boundaries,
            replicas: dispatch.replicas,
        }
    }
}
