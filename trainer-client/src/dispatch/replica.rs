//! One replica as the pool sees it: its connection task and generation, its credit, and the
//! backoff after failures.

use std::{sync::Arc, time::Duration};

use conveyor_proto::v1::BatchRequest;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{ReplicaStats, StreamOptions};
use crate::error::ClientError;

/// A replica and its current connection.
#[derive(Debug)]
pub(crate) struct Replica {
    /// Bumped on every new connection attempt, so events of older ones are ignored.
    pub generation: u64,
    /// The connection task of this generation.
    pub task: JoinHandle<()>,
    /// Set while the connection is up and its catalog agrees.
    pub requests_tx: Option<mpsc::Sender<BatchRequest>>,
    /// Requests sent on this connection and not answered yet.
    pub num_in_flight: usize,
    /// Consecutive failures, for the backoff.
    pub failures: u32,
    /// Last failure, for [`ClientError::Unavailable`].
    pub last_error: Option<Arc<ClientError>>,
    /// Counters for the stats.
    pub stats: ReplicaStats,
}

impl Replica {
    /// A replica whose first connection attempt is `task`.
    pub(super) fn new(task: JoinHandle<()>, stats: ReplicaStats) -> Replica {
        Replica { generation: 0, task, requests_tx: None, num_in_flight: 0, failures: 0, last_error: None, stats }
    }

    /// Drops the connection after a failure; returns how long to wait before the next attempt:
    /// `backoff_min` doubling per consecutive failure up to `backoff_max`.
    pub(super) fn drop_connection(&mut self, options: &StreamOptions) -> Duration {
        self.task.abort();
        self.requests_tx = None;
        self.num_in_flight = 0;
        self.generation += 1;
        self.failures = self.failures.saturating_add(1);
        self.stats.failures += 1;
        options.backoff_min.saturating_mul(1u32 << self.failures.min(16).saturating_sub(1)).min(options.backoff_max)
    }
}
