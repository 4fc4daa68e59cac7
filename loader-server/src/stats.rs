//! Counters of what the loader served, read by the metrics endpoint and the periodic log line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::RequestError;

/// Monotonic counters, shared by all streams.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches answered with data.
    pub batches_served: AtomicU64,
    /// Tensor bytes answered.
    pub bytes_served: AtomicU64,
    /// Requests rejected for naming an unknown dataset.
    pub errors_unknown_dataset: AtomicU64,
    /// Requests rejected for an index out of range.
    pub errors_index_out_of_range: AtomicU64,
    /// Requests rejected for exceeding the batch limits.
    pub errors_batch_too_large: AtomicU64,
    /// Requests rejected for naming no indices.
    pub errors_empty_batch: AtomicU64,
    /// Streams refused because `--max-streams` were open.
    pub streams_refused: AtomicU64,
}

impl Stats {
    /// Counts one served batch of `bytes` tensor bytes.
    pub fn record_batch(&self, bytes: u64) {
        self.batches_served.fetch_add(1, Relaxed);
        self.bytes_served.fetch_add(bytes, Relaxed);
    }

    /// Counts one rejected request by cause.
    pub fn record_error(&self, error: &RequestError) {
        let counter = match error {
            RequestError::UnknownDataset { .. } => &self.errors_unknown_dataset,
            RequestError::IndexOutOfRange { .. } => &self.errors_index_out_of_range,
            RequestError::BatchTooLarge { .. } => &self.errors_batch_too_large,
            RequestError::EmptyBatch { .. } => &self.errors_empty_batch,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Counts one refused stream.
    pub fn record_refused_stream(&self) {
        self.streams_refused.fetch_add(1, Relaxed);
    }
}
