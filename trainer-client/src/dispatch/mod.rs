//! Streams runs of epochs from a changing set of loader replicas, in each epoch's deterministic
//! order, with every batch delivered exactly once.
//!
//! * [`resolve`]: every `--loader` value is resolved every `resolve_interval`; each address it
//!   resolves to is one replica (a Docker or Kubernetes headless service name answers with one
//!   address per replica). New addresses join; vanished ones leave.
//! * [`connection`]: each replica has its own connection task, bidirectional stream and credit
//!   window, opened through the [`connection::Connector`] seam (gRPC, or in memory in the tests).
//! * [`pool`]: the next batch goes to the up replica with the fewest unanswered requests, so
//!   faster replicas do more; on chunked datasets ([`affinity`]) to the replica its chunks went
//!   to, while that one has at most a little more work. When a replica's stream fails, or it
//!   leaves a request unanswered past `request_timeout`, its requests are lost and it is retried
//!   with exponential backoff. Every send uses a fresh batch id, so a late answer from a dropped
//!   connection is recognised and ignored ([`in_flight`]): nothing is delivered twice.
//! * [`run`]: a run hands batches to the caller in order, re-sends lost ones, and requests at
//!   most `prefetch` batches past the one the caller waits for, across epoch boundaries, which
//!   bounds the reorder buffer and the client's memory.

mod affinity;
mod connection;
#[cfg(test)]
mod fake;
mod in_flight;
mod pool;
mod replica;
mod resolve;
mod run;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, num::NonZeroUsize, sync::Arc, time::Duration};

use conveyor_proto::v1::DatasetInfo;
use serde::Serialize;

pub use self::run::Run;
use self::{
    connection::{Connector, GrpcConnector},
    pool::Pool,
};
use crate::{
    addr::parse_loader,
    client::{ConnectOptions, settle_tls},
    error::ClientError,
    plan::{PlanSettings, RunSpec, Schedule, check_plan},
    sampler::PlanSpec,
};

/// Streaming settings.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Transport settings.
    pub connect: ConnectOptions,
    /// Batches requested ahead of the one the caller waits for, over all replicas.
    pub prefetch: NonZeroUsize,
    /// A replica that leaves a request unanswered this long is dropped and retried.
    pub request_timeout: Duration,
    /// Fail when no replica has been reachable for this long.
    pub unavailable_timeout: Duration,
    /// How often loader names are resolved again.
    pub resolve_interval: Duration,
    /// First retry delay after a replica fails; doubles per failure.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How long a batch the storage fails transiently (`KIND_STORAGE_UNAVAILABLE`: a timeout, a
    /// 5xx answer, a reset, after the loader's own retries) is asked for again before the run
    /// fails: an object store outage shorter than this costs time, not the run.
    pub storage_retry_timeout: Duration,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            connect: ConnectOptions::default(),
            prefetch: NonZeroUsize::new(8).expect("nonzero"),
            request_timeout: Duration::from_secs(30),
            unavailable_timeout: Duration::from_secs(60),
            resolve_interval: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(3),
            storage_retry_timeout: Duration::from_secs(120),
        }
    }
}

/// Per-replica counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplicaStats {
    /// Batches this replica answered that were delivered.
    pub batches: u64,
    /// Tensor bytes of those batches.
    pub bytes: u64,
    /// Times its connection failed or timed out.
    pub failures: u64,
}

/// How the stream crossed from one epoch into the next.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochBoundary {
    /// The epoch that started.
    pub epoch: u64,
    /// Seconds between handing over the last batch of the previous epoch and the first of this
    /// one (includes the caller's own time on that last batch).
    pub gap_seconds: f64,
    /// Of those, seconds the caller waited for the first batch: 0 when it had been prefetched.
    pub wait_seconds: f64,
}

/// Counters over a pool's life.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DispatchStats {
    /// Batches re-sent after their replica failed.
    pub retried_batches: u64,
    /// Seconds the caller spent waiting for a batch that was not there yet.
    pub wait_seconds: f64,
    /// Tensor bytes delivered.
    pub delivered_bytes: u64,
    /// Bytes the loaders decoded from storage for those batches.
    pub decoded_bytes: u64,
    /// Epoch boundaries crossed within runs (the first [`DispatchStats::MAX_EPOCH_BOUNDARIES`]).
    pub epoch_boundaries: Vec<EpochBoundary>,
    /// Per replica address.
    pub replicas: BTreeMap<String, ReplicaStats>,
}

impl DispatchStats {
    /// Boundaries kept, so that the counters stay small over any number of epochs.
    pub const MAX_EPOCH_BOUNDARIES: usize = 1024;
}

/// The loader replicas and their connections; lives across runs.
#[derive(Debug)]
pub struct Loaders {
    pool: Pool,
}

impl Loaders {
    /// Resolves `loaders` (each `host:port` or `http://host:port`) and waits until one replica
    /// is up and has described its datasets.
    ///
    /// # Errors
    /// [`ClientError::NoLoaders`], [`ClientError::BadAddress`] for a malformed value,
    /// [`ClientError::Unavailable`] when no replica comes up within the unavailable timeout.
    pub async fn connect(loaders: &[String], options: StreamOptions) -> Result<Loaders, ClientError> {
        let mut options = options;
        settle_tls(loaders, &mut options.connect)?;
        let connector = Arc::new(GrpcConnector::new(options.connect.clone()));
        Loaders::connect_with(loaders, options, connector).await
    }

    pub(crate) async fn connect_with(
        loaders: &[String],
        options: StreamOptions,
        connector: Arc<dyn Connector>,
    ) -> Result<Loaders, ClientError> {
        if loaders.is_empty() {
            return Err(ClientError::NoLoaders);
        }
        let names = loaders.iter().map(|l| parse_loader(l)).collect::<Result<Vec<_>, _>>()?;
        let mut pool = Pool::new(names, options, connector);
        pool.wait_for_catalog().await?;
        Ok(Loaders { pool })
    }

    /// Adds a loader (`host:port` or `http://host:port`), as if it had been given to
    /// [`Loaders::connect`]; it joins as soon as it answers.
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] for a malformed value.
    pub fn add_loader(&mut self, loader: &str) -> Result<(), ClientError> {
        self.pool.add_loader(loader)
    }

    /// The datasets the replicas serve.
    pub fn catalog(&self) -> &[DatasetInfo] {
        self.pool.catalog()
    }

    /// The description of `dataset`.
    ///
    /// # Errors
    /// [`ClientError::UnknownDataset`] naming what exists.
    pub fn dataset(&self, name: &str) -> Result<&DatasetInfo, ClientError> {
        let catalog = self.catalog();
        catalog.iter().find(|d| d.name == name).ok_or_else(|| ClientError::UnknownDataset {
            name: name.to_owned(),
            available: catalog.iter().map(|d| d.name.clone()).collect(),
        })
    }

    /// The plan for `dataset` under `settings`, with its size and chunk length from the catalog.
    ///
    /// # Errors
    /// [`ClientError::UnknownDataset`], or see [`PlanSettings::plan_for`].
    pub fn plan(&self, dataset: &str, settings: &PlanSettings) -> Result<PlanSpec, ClientError> {
        settings.plan_for(self.dataset(dataset)?, self.pool.options().connect.max_message_bytes)
    }

    /// Checks that `spec` can be streamed, without starting it: what [`Loaders::run`] checks
    /// first, for callers that must keep the connections when a spec is refused.
    ///
    /// # Errors
    /// As [`Loaders::run`].
    pub fn check(&self, spec: &RunSpec) -> Result<(), ClientError> {
        self.check_run(spec).map(|_| ())
    }

    /// The dataset and the schedule of a spec the loaders can serve.
    fn check_run(&self, spec: &RunSpec) -> Result<(DatasetInfo, Schedule), ClientError> {
        let info = self.dataset(&spec.dataset)?;
        check_plan(&spec.plan, info, self.pool.options().connect.max_message_bytes)?;
        Ok((info.clone(), spec.schedule()?))
    }

    /// Streams `spec`; the returned [`Run`] owns the connections until
    /// [`Run::into_loaders`].
    ///
    /// # Errors
    /// [`ClientError::UnknownDataset`], [`ClientError::DatasetSizeChanged`] (a cursor from an
    /// older dataset), or a plan the loaders cannot serve (see [`PlanSettings::plan_for`]).
    pub fn run(self, spec: RunSpec) -> Result<Run, ClientError> {
        Run::new(self, spec)
    }

    /// Streams epoch `epoch` of `plan`.
    ///
    /// # Errors
    /// As [`Loaders::run`].
    pub fn epoch(self, dataset: &str, plan: PlanSpec, epoch: u64) -> Result<Run, ClientError> {
        self.run(RunSpec::new(dataset, plan, epoch..epoch + 1))
    }

    /// Counters so far.
    pub fn stats(&self) -> DispatchStats {
        self.pool.stats()
    }

    /// Replicas whose connection is up now.
    pub fn num_up(&self) -> usize {
        self.pool.num_up()
    }
}
