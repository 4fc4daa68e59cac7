//! A run: the batches of one or more epochs, requested through the pool within the prefetch
//! window and handed to the caller in order, each exactly once. The window runs straight across
//! epoch boundaries, so the next epoch's first batches are on their way while the caller still
//! consumes the last ones of this epoch.

use crate::addr::ReplicaAddr;
use std::{
    collections::{BTreeMap, BTreeSet},
    pin::Pin,
    task::{Context, Poll},
};

use conveyor_proto::v1::{BatchResponse, DatasetInfo};
use futures::Stream;
use tokio::time::Instant;

use super::{
    DispatchStats, EpochBoundary, Loaders,
    pool::{Ask, Outcome},
};
use crate::{
    batch::Batch,
    catalog::block_len,
    cursor::Cursor,
    error::{BatchErrorKind, ClientError},
    plan::{RunSpec, Schedule},
    sampler::EpochPlan,
};

/// Called with the run's cursor after each batch the caller consumed.
type ConsumedHook = Box<dyn FnMut(&Cursor) + Send>;

/// The batches of a [`RunSpec`], in order, as an owned [`Stream`]; see [`Loaders::run`].
///
/// A batch counts as consumed when the caller asks for the next one; the hook set by
/// [`Run::on_consumed`] then sees the cursor after it. Dropping the run (or
/// [`Run::into_loaders`]) abandons what is in flight; late answers are ignored.
pub struct Run {
    pub(super) loaders: Loaders,
    spec: RunSpec,
    info: DatasetInfo,
    schedule: Schedule,
    /// This run's key in the pool.
    key: u64,
    /// Samples per block of the dataset, for replica affinity (1: unchunked).
    block_len: u64,
    /// Plans of the epochs being requested (at most a few: the window spans few epochs).
    plans: Vec<EpochPlan>,
    /// Lowest run batch never sent.
    next_send: u64,
    /// Run batch the caller gets next.
    next_deliver: u64,
    /// Batches whose replica failed, to send again (lowest first).
    retry: BTreeSet<u64>,
    /// Batches a replica answered with a retryable error (`KIND_WORKER_FAILED`): the replica
    /// that failed each last, and how many times it has failed.
    worker_failures: BTreeMap<u64, (ReplicaAddr, u32)>,
    /// Batches the storage failed transiently (`KIND_STORAGE_UNAVAILABLE`): when the first
    /// failure came (they are asked for again until `--storage-retry-timeout` after it).
    storage_failures: BTreeMap<u64, Instant>,
    /// Answers that arrived ahead of `next_deliver`; at most `prefetch` of them.
    ready: BTreeMap<u64, Batch>,
    /// Batches reported to the hook as consumed.
    num_reported: u64,
    hook: Option<ConsumedHook>,
    /// Since when the caller has been waiting for `next_deliver`.
    waiting_since: Option<Instant>,
    /// When the last batch was handed over.
    last_delivery: Option<Instant>,
    /// Set after the last batch or an error.
    finished: bool,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("spec", &self.spec)
            .field("next_deliver", &self.next_deliver)
            .field("num_batches", &self.schedule.len)
            .finish_non_exhaustive()
    }
}

impl Run {
    /// Checks `spec` against the catalog and starts nothing yet: requests go out when the
    /// stream is first polled.
    pub(crate) fn new(mut loaders: Loaders, spec: RunSpec) -> Result<Run, ClientError> {
        let (info, schedule) = loaders.check_run(&spec)?;
        let key = loaders.pool.new_run();
        Ok(Run {
            block_len: block_len(&info),
            loaders,
            spec,
            info,
            schedule,
            key,
            plans: Vec::new(),
            next_send: 0,
            next_deliver: 0,
            retry: BTreeSet::new(),
            worker_failures: BTreeMap::new(),
            storage_failures: BTreeMap::new(),
            ready: BTreeMap::new(),
            num_reported: 0,
            hook: None,
            waiting_since: None,
            last_delivery: None,
            finished: false,
        })
    }

    /// Calls `hook` with the cursor after each batch the caller has consumed (when it asks for
    /// the next one, and once more when the run ends). The hook runs on the caller's task; keep
    /// it cheap (a [`crate::CursorWriter`] writes files on its own thread).
    pub fn on_consumed(mut self, hook: impl FnMut(&Cursor) + Send + 'static) -> Run {
        self.hook = Some(Box::new(hook));
        self
    }

    /// What this run streams.
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The dataset being streamed.
    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Batches this run delivers in all.
    pub fn num_batches(&self) -> u64 {
        self.schedule.len
    }

    /// Batches delivered so far.
    pub fn num_delivered(&self) -> u64 {
        self.next_deliver
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> u64 {
        self.schedule.per_epoch
    }

    /// The cursor after the last batch delivered: where a run resumed from it starts. Store it
    /// with the model after the training step on that batch.
    pub fn cursor(&self) -> Cursor {
        self.spec.cursor_at(&self.schedule, self.next_deliver)
    }

    /// Counters so far.
    pub fn stats(&self) -> DispatchStats {
        self.loaders.stats()
    }

    /// Adds a loader replica while streaming; see [`Loaders::add_loader`].
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] for a malformed value.
    pub fn add_loader(&mut self, loader: &str) -> Result<(), ClientError> {
        self.loaders.add_loader(loader)
    }

    /// Ends the run (abandoning what is in flight) and gives the connections back.
    pub fn into_loaders(self) -> Loaders {
        self.loaders
    }

    /// The next batch in order, `None` at the end of the run: the same as `StreamExt::next`
    /// with the `Option` and `Result` swapped.
    ///
    /// # Errors
    /// See [`Run::poll_batch`].
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, ClientError> {
        std::future::poll_fn(|cx| self.poll_batch(cx)).await.transpose()
    }

    /// Polls for the next batch.
    ///
    /// Errors end the run: [`ClientError::BatchRefused`] when a loader refuses a batch (with
    /// the wire's error kind), [`ClientError::BadResponse`] for a malformed one,
    /// [`ClientError::Unavailable`] when no replica is reachable for longer than the
    /// unavailable timeout.
    pub fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Batch, ClientError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        self.report_consumed();
        loop {
            let arrived = self.loaders.pool.drain_ready();
            if let Err(error) = self.take_all(arrived) {
                return self.fail(error);
            }
            if let Some(batch) = self.ready.remove(&self.next_deliver) {
                self.deliver(&batch);
                return Poll::Ready(Some(Ok(batch)));
            }
            if self.next_deliver >= self.schedule.len {
                self.finished = true;
                return Poll::Ready(None);
            }
            self.waiting_since.get_or_insert_with(Instant::now);
            self.fill();
            let taken = match self.loaders.pool.poll_event(cx) {
                Poll::Ready(Ok(outcomes)) => self.take_all(outcomes),
                Poll::Ready(Err(error)) => Err(error),
                Poll::Pending => return Poll::Pending,
            };
            if let Err(error) = taken {
                return self.fail(error);
            }
        }
    }

    fn fail(&mut self, error: ClientError) -> Poll<Option<Result<Batch, ClientError>>> {
        self.finished = true;
        Poll::Ready(Some(Err(error)))
    }

    fn report_consumed(&mut self) {
        if self.num_reported < self.next_deliver {
            self.num_reported = self.next_deliver;
            if let Some(hook) = self.hook.as_mut() {
                hook(&self.spec.cursor_at(&self.schedule, self.next_deliver));
            }
        }
    }

    /// Bookkeeping of a batch handed over: the window moves on, waits and epoch gaps are counted.
    fn deliver(&mut self, batch: &Batch) {
        let now = Instant::now();
        let waited = self.waiting_since.take().map(|since| (now - since).as_secs_f64()).unwrap_or(0.0);
        let stats = &mut self.loaders.pool.stats;
        stats.wait_seconds += waited;
        let boundary = batch.index == 0 && self.next_deliver > 0;
        if let Some(last) = self.last_delivery.filter(|_| boundary)
            && stats.epoch_boundaries.len() < DispatchStats::MAX_EPOCH_BOUNDARIES
        {
            stats.epoch_boundaries.push(EpochBoundary {
                epoch: batch.epoch,
                gap_seconds: (now - last).as_secs_f64(),
                wait_seconds: waited,
            });
        }
        self.last_delivery = Some(now);
        self.next_deliver += 1;
        self.fill();
    }

    /// The plan of `epoch`, kept while its batches are being requested.
    fn plan(&mut self, epoch: u64) -> &EpochPlan {
        let oldest_needed = self.schedule.position(self.next_deliver).0;
        self.plans.retain(|p| p.epoch() >= oldest_needed);
        let at = match self.plans.iter().position(|p| p.epoch() == epoch) {
            Some(at) => at,
            None => {
                let plan =
                    EpochPlan::new(self.spec.plan.clone(), epoch).expect("the plan was checked when the run was made");
                self.plans.push(plan);
                self.plans.len() - 1
            }
        };
        &self.plans[at]
    }

    fn indices(&mut self, seq: u64) -> Vec<u64> {
        let (epoch, batch) = self.schedule.position(seq);
        self.plan(epoch).batch(batch)
    }

    /// Sends as many requests as the window and the replicas' credit allow.
    fn fill(&mut self) {
        let window = self.loaders.pool.options().prefetch.get() as u64;
        loop {
            let seq = match self.retry.first() {
                Some(&seq) => seq,
                None if self.next_send < self.schedule.len && self.next_send < self.next_deliver + window => {
                    self.next_send
                }
                None => return,
            };
            let indices = self.indices(seq);
            let ask = Ask {
                dataset: &self.info.name,
                run: self.key,
                seq,
                indices,
                block_len: self.block_len,
                seed: self.spec.plan.seed,
                epoch: self.schedule.position(seq).0,
                avoid: self.worker_failures.get(&seq).map(|(addr, _)| addr.clone()),
            };
            if !self.loaders.pool.send(ask) {
                return;
            }
            if self.retry.first() == Some(&seq) {
                self.retry.pop_first();
            } else {
                self.next_send += 1;
            }
        }
    }

    fn take_all(&mut self, outcomes: Vec<Outcome>) -> Result<(), ClientError> {
        outcomes.into_iter().try_for_each(|outcome| self.take(outcome))
    }

    fn take(&mut self, outcome: Outcome) -> Result<(), ClientError> {
        match outcome {
            Outcome::Lost { run, seq } if run == self.key => {
                self.loaders.pool.stats.retried_batches += 1;
                self.retry.insert(seq);
            }
            Outcome::Answered { run, seq, addr, response } if run == self.key => {
                if self.retry_elsewhere(seq, addr.clone(), &response) {
                    return Ok(());
                }
                let batch = self.check(seq, addr.clone(), response)?;
                self.loaders.pool.record_delivery(addr, batch.num_bytes(), batch.decoded_bytes);
                self.ready.insert(seq, batch);
            }
            // Answers and losses of an abandoned run.
            Outcome::Lost { .. } | Outcome::Answered { .. } => {}
        }
        Ok(())
    }

    /// Queues `seq` again when its answer is a retryable failure of that replica's own
    /// (`KIND_WORKER_FAILED`), at most [`Run::MAX_WORKER_FAILURES`] times per batch, on another
    /// replica when one is up.
    fn retry_elsewhere(&mut self, seq: u64, addr: ReplicaAddr, response: &BatchResponse) -> bool {
        if response.error.as_ref().is_some_and(|e| e.kind() == BatchErrorKind::StorageUnavailable) {
            return self.retry_storage(seq, addr, response);
        }
        self.storage_failures.remove(&seq);
        let retryable = response.error.as_ref().is_some_and(|e| e.kind() == BatchErrorKind::WorkerFailed);
        let failures = self.worker_failures.get(&seq).map_or(0, |(_, n)| *n);
        if !retryable || failures + 1 >= Self::MAX_WORKER_FAILURES {
            self.worker_failures.remove(&seq);
            return false;
        }
        let message = response.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default();
        tracing::warn!(replica = %addr, seq, message, "a loader failed a batch on its side; sending it again");
        self.worker_failures.insert(seq, (addr, failures + 1));
        self.loaders.pool.stats.retried_batches += 1;
        self.retry.insert(seq);
        true
    }

    /// Answers with `KIND_WORKER_FAILED` one batch may get before the run fails.
    const MAX_WORKER_FAILURES: u32 = 3;

    /// Queues `seq` again after a transient storage failure, until `storage_retry_timeout` has
    /// passed since its first one (then the run fails with the loader's message). Each answer
    /// comes after the loader's own retries with backoff, which pace these.
    fn retry_storage(&mut self, seq: u64, addr: ReplicaAddr, response: &BatchResponse) -> bool {
        let now = Instant::now();
        let first = *self.storage_failures.entry(seq).or_insert(now);
        if now.duration_since(first) >= self.loaders.pool.options().storage_retry_timeout {
            self.storage_failures.remove(&seq);
            return false;
        }
        let message = response.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default();
        tracing::warn!(replica = %addr, seq, message, "the storage failed transiently; asking for the batch again");
        self.loaders.pool.stats.retried_batches += 1;
        self.retry.insert(seq);
        true
    }

    fn check(&mut self, seq: u64, addr: ReplicaAddr, response: BatchResponse) -> Result<Batch, ClientError> {
        let (epoch, batch) = self.schedule.position(seq);
        if let Some(error) = response.error {
            return Err(ClientError::BatchRefused {
                epoch,
                batch,
                addr: addr.to_string(),
                kind: BatchErrorKind::try_from(error.kind).unwrap_or(BatchErrorKind::Unspecified),
                message: error.message,
            });
        }
        let requested = self.indices(seq);
        Batch::from_response(response, &requested, &self.info, epoch, batch)
            .map_err(|source| ClientError::BadResponse { addr: addr.to_string(), source: Box::new(source) })
    }
}

impl Stream for Run {
    type Item = Result<Batch, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_batch(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.finished { 0 } else { (self.schedule.len - self.next_deliver) as usize };
        (0, Some(left))
    }
}
