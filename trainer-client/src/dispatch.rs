//! Streams an epoch from a changing set of loader replicas, in the epoch's deterministic order,
//! with every batch delivered exactly once.
//!
//! * Every `--loader` value is resolved every `resolve_interval`; each address it resolves to is
//!   one replica (a Docker or Kubernetes headless service name answers with one address per
//!   replica). New addresses join; vanished ones leave.
//! * Each replica has its own connection task, bidirectional stream and credit window. The next
//!   batch goes to the up replica with the fewest unanswered requests, so faster replicas do more.
//! * Chunked datasets (Zarr): a batch whose blocks (chunks) were recently sent to one replica
//!   goes to that replica too, while it has at most a little more work than the least loaded
//!   one, so each block is decoded by one replica's cache rather than by all of them (with two
//!   loaders and `--shuffle block`, read amplification fell from 1.58 to 1.14).
//! * Batches are handed to the caller in batch order. At most `prefetch` batches are requested
//!   past the one the caller waits for, which bounds the reorder buffer and the client's memory.
//! * When a replica's stream fails, or it leaves the answer to a request unanswered past
//!   `request_timeout`, its unanswered batches go to other replicas and it is retried with
//!   exponential backoff. Every send uses a fresh batch id, so a late answer from a dropped
//!   connection is recognised and ignored: nothing is delivered twice.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use conveyor_proto::v1::{BatchRequest, BatchResponse, DatasetInfo};
use serde::Serialize;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    batch::Batch,
    client::{ConnectOptions, block_len, catalog_difference, connect, list_datasets, parse_loader},
    error::ClientError,
    sampler::EpochPlan,
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
        }
    }
}

/// What replica tasks and the resolver report.
#[derive(Debug)]
enum Event {
    /// A loader name resolved.
    Resolved { spec: usize, addrs: Vec<SocketAddr> },
    /// A connection is ready for requests.
    Up { addr: SocketAddr, generation: u64, requests_tx: mpsc::Sender<BatchRequest> },
    /// An answer arrived.
    Answer { addr: SocketAddr, generation: u64, response: BatchResponse },
    /// A connection failed or ended.
    Down { addr: SocketAddr, generation: u64, error: String },
}

/// A replica's state as the dispatcher sees it.
#[derive(Debug)]
struct Replica {
    /// Bumped on every new connection attempt, so events of older ones are ignored.
    generation: u64,
    /// The connection task of this generation.
    task: JoinHandle<()>,
    /// Set while the connection is up.
    requests_tx: Option<mpsc::Sender<BatchRequest>>,
    /// Requests sent on this connection and not answered yet.
    num_in_flight: usize,
    /// Consecutive failures, for the backoff.
    failures: u32,
    /// Last failure, for error messages.
    last_error: Option<String>,
    /// Counters for `--stats-json`.
    stats: ReplicaStats,
}

/// Per-replica counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaStats {
    /// Batches this replica answered that were delivered.
    pub batches: u64,
    /// Tensor bytes of those batches.
    pub bytes: u64,
    /// Times its connection failed or timed out.
    pub failures: u64,
}

/// Counters over the whole run.
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
    /// Per replica address.
    pub replicas: BTreeMap<String, ReplicaStats>,
}

/// A request in flight.
#[derive(Debug)]
struct InFlight {
    addr: SocketAddr,
    /// The epoch stream it belongs to.
    epoch_key: u64,
    /// Batch number within that epoch.
    batch: u64,
    sent_at: Instant,
}

/// What handling an event means for the epoch in progress.
enum Outcome {
    Answered { epoch_key: u64, batch: u64, addr: SocketAddr, response: BatchResponse },
    Lost { epoch_key: u64, batch: u64 },
}

/// The set of loader replicas and their connections; lives across epochs.
#[derive(Debug)]
pub struct Loaders {
    options: StreamOptions,
    /// The `--loader` values (`host:port`), shared with the resolver task.
    specs: Arc<Mutex<Vec<String>>>,
    /// Resolved addresses per `--loader` value.
    resolved: Vec<BTreeSet<SocketAddr>>,
    replicas: BTreeMap<SocketAddr, Replica>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    /// The datasets of the first replica that answered; others must agree.
    catalog: Arc<Mutex<Option<Vec<DatasetInfo>>>>,
    in_flight: HashMap<u64, InFlight>,
    next_batch_id: u64,
    next_epoch_key: u64,
    resolver: JoinHandle<()>,
    /// Since when no replica has been up.
    down_since: Option<Instant>,
    stats: DispatchStats,
    /// Replicas that ever left, kept for stats.
    departed: BTreeMap<String, ReplicaStats>,
    /// Which replica recent blocks were sent to.
    affinity: BlockAffinity,
}

/// Which replica each recently requested block (a chunk of a chunked dataset) was sent to, for
/// at most [`BlockAffinity::CAPACITY`] blocks; the oldest entry is forgotten first.
#[derive(Debug, Default)]
struct BlockAffinity {
    owner: HashMap<u64, SocketAddr>,
    order: VecDeque<u64>,
}

impl BlockAffinity {
    /// Enough for the windows of many batches in flight; 4096 entries are about 150 KiB.
    const CAPACITY: usize = 4096;

    /// The replica most of `blocks` were sent to, if any was.
    fn preferred(&self, blocks: &[u64]) -> Option<SocketAddr> {
        let mut votes: Vec<(SocketAddr, usize)> = Vec::new();
        for addr in blocks.iter().filter_map(|b| self.owner.get(b)) {
            match votes.iter_mut().find(|(a, _)| a == addr) {
                Some((_, n)) => *n += 1,
                None => votes.push((*addr, 1)),
            }
        }
        votes.into_iter().max_by_key(|&(_, n)| n).map(|(addr, _)| addr)
    }

    fn record(&mut self, blocks: &[u64], addr: SocketAddr) {
        for &block in blocks {
            if self.owner.insert(block, addr).is_none() {
                self.order.push_back(block);
            }
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.owner.remove(&old);
            }
        }
    }

    fn clear(&mut self) {
        self.owner.clear();
        self.order.clear();
    }
}

/// The distinct blocks of `block_len` samples that `indices` touch (none when `block_len` is 1:
/// unchunked data has nothing to share).
fn blocks_of(indices: &[u64], block_len: u64) -> Vec<u64> {
    if block_len <= 1 {
        return Vec::new();
    }
    let mut blocks: Vec<u64> = indices.iter().map(|i| i / block_len).collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

impl Drop for Loaders {
    fn drop(&mut self) {
        self.resolver.abort();
        for replica in self.replicas.values() {
            replica.task.abort();
        }
    }
}

impl Loaders {
    /// Resolves `loaders` (each `host:port` or `http://host:port`) and waits until one replica
    /// is up and has described its datasets.
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] for a malformed value, [`ClientError::Unavailable`] when no
    /// replica comes up within the unavailable timeout.
    pub async fn connect(loaders: &[String], options: StreamOptions) -> Result<Loaders, ClientError> {
        if loaders.is_empty() {
            return Err(ClientError::Invalid("no --loader given; name at least one loader as host:port".into()));
        }
        let specs = loaders.iter().map(|l| parse_loader(l)).collect::<Result<Vec<_>, _>>()?;
        // Room for every answer in the window plus a few state changes per replica; a full
        // channel only pauses the connection tasks, which HTTP/2 flow control then passes on.
        let (events_tx, events_rx) = mpsc::channel(options.prefetch.get() * 2 + 64);
        let resolved = vec![BTreeSet::new(); specs.len()];
        let specs = Arc::new(Mutex::new(specs));
        let resolver = tokio::spawn(resolve_forever(specs.clone(), options.resolve_interval, events_tx.clone()));
        let mut loaders = Loaders {
            specs,
            resolved,
            options,
            replicas: BTreeMap::new(),
            events_tx,
            events_rx,
            catalog: Arc::new(Mutex::new(None)),
            in_flight: HashMap::new(),
            next_batch_id: 0,
            next_epoch_key: 0,
            resolver,
            down_since: Some(Instant::now()),
            stats: DispatchStats::default(),
            departed: BTreeMap::new(),
            affinity: BlockAffinity::default(),
        };
        while loaders.catalog().is_none() {
            loaders.wait_event(None).await?;
        }
        Ok(loaders)
    }

    /// Adds a loader (`host:port` or `http://host:port`) while streaming, as if it had been
    /// given to [`Loaders::connect`]; it joins as soon as it answers.
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] for a malformed value.
    pub async fn add_loader(&mut self, loader: &str) -> Result<(), ClientError> {
        let spec = parse_loader(loader)?;
        let index = {
            let mut specs = self.specs.lock().expect("specs lock");
            specs.push(spec.clone());
            specs.len() - 1
        };
        self.resolved.push(BTreeSet::new());
        if let Ok(addrs) = tokio::net::lookup_host(spec.as_str()).await {
            self.handle(Event::Resolved { spec: index, addrs: addrs.collect() });
        }
        Ok(())
    }

    /// The datasets the replicas serve, once one has answered.
    pub fn catalog(&self) -> Option<Vec<DatasetInfo>> {
        self.catalog.lock().expect("catalog lock").clone()
    }

    /// The description of `dataset`.
    ///
    /// # Errors
    /// [`ClientError::UnknownDataset`] naming what exists.
    pub fn dataset(&self, name: &str) -> Result<DatasetInfo, ClientError> {
        let catalog = self.catalog().unwrap_or_default();
        catalog.iter().find(|d| d.name == name).cloned().ok_or_else(|| ClientError::UnknownDataset {
            name: name.to_owned(),
            available: catalog.iter().map(|d| d.name.clone()).collect(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> DispatchStats {
        let mut stats = self.stats.clone();
        stats.replicas = self.departed.clone();
        for (addr, replica) in &self.replicas {
            stats.replicas.insert(addr.to_string(), replica.stats.clone());
        }
        stats
    }

    /// Replicas whose connection is up now.
    pub fn num_up(&self) -> usize {
        self.replicas.values().filter(|r| r.requests_tx.is_some()).count()
    }

    /// Streams `plan`'s batches of `dataset` from batch `start_batch` on.
    ///
    /// # Errors
    /// [`ClientError::UnknownDataset`], or [`ClientError::Invalid`] when a batch cannot fit in
    /// one message.
    pub fn epoch(&mut self, dataset: &str, plan: EpochPlan, start_batch: u64) -> Result<Epoch<'_>, ClientError> {
        let info = self.dataset(dataset)?;
        let bytes_per_sample: u64 = info.fields.iter().map(|f| f.bytes_per_sample).sum();
        let batch_size = plan.spec().batch_size;
        let batch_bytes = batch_size * bytes_per_sample;
        let message_bytes =
            batch_bytes as usize + conveyor_proto::message_overhead_bytes(batch_size as usize, info.fields.len());
        if message_bytes > self.options.connect.max_message_bytes {
            return Err(ClientError::Invalid(format!(
                "a batch of {batch_size} samples of '{dataset}' takes {batch_bytes} bytes, over the client's message limit of {} \
                 bytes; lower --batch-size or raise --max-message-bytes",
                self.options.connect.max_message_bytes
            )));
        }
        if plan.spec().num_samples != info.num_samples {
            return Err(ClientError::Invalid(format!(
                "the plan is for {} samples but dataset '{dataset}' has {}",
                plan.spec().num_samples,
                info.num_samples
            )));
        }
        if batch_size > info.max_batch_samples {
            return Err(ClientError::Invalid(format!(
                "--batch-size {batch_size} is over the loaders' limit of {} samples per batch",
                info.max_batch_samples
            )));
        }
        let epoch_key = self.next_epoch_key;
        self.next_epoch_key += 1;
        let start = start_batch.min(plan.num_batches());
        self.affinity.clear();
        let block_len = block_len(&info);
        Ok(Epoch {
            loaders: self,
            info,
            plan,
            epoch_key,
            next_send: start,
            next_deliver: start,
            retry: VecDeque::new(),
            ready: BTreeMap::new(),
            block_len,
        })
    }

    fn add_replica(&mut self, addr: SocketAddr) {
        tracing::info!(replica = %addr, "replica joined");
        let task = self.spawn_connection(addr, 0, Duration::ZERO);
        let stats = self.departed.remove(&addr.to_string()).unwrap_or_default();
        self.replicas.insert(
            addr,
            Replica { generation: 0, task, requests_tx: None, num_in_flight: 0, failures: 0, last_error: None, stats },
        );
    }

    fn spawn_connection(&self, addr: SocketAddr, generation: u64, delay: Duration) -> JoinHandle<()> {
        tokio::spawn(run_connection(
            addr,
            generation,
            delay,
            self.options.connect.clone(),
            self.options.prefetch.get(),
            self.catalog.clone(),
            self.events_tx.clone(),
        ))
    }

    /// Drops a replica's connection, returns its unanswered batches and, unless it is leaving,
    /// schedules a reconnect after the backoff.
    fn fail_replica(&mut self, addr: SocketAddr, error: String, leaving: bool) -> Vec<Outcome> {
        let Some(replica) = self.replicas.get_mut(&addr) else {
            return Vec::new();
        };
        replica.task.abort();
        replica.requests_tx = None;
        replica.num_in_flight = 0;
        replica.generation += 1;
        replica.failures = replica.failures.saturating_add(1);
        replica.stats.failures += 1;
        let delay = self
            .options
            .backoff_min
            .saturating_mul(1u32 << replica.failures.min(16).saturating_sub(1))
            .min(self.options.backoff_max);
        if leaving {
            tracing::info!(replica = %addr, "replica left");
        } else {
            tracing::warn!(replica = %addr, %error, retry_in = ?delay, "replica failed");
        }
        replica.last_error = Some(error);
        let generation = replica.generation;
        if leaving {
            if let Some(replica) = self.replicas.remove(&addr) {
                self.departed.insert(addr.to_string(), replica.stats);
            }
        } else {
            let task = self.spawn_connection(addr, generation, delay);
            if let Some(replica) = self.replicas.get_mut(&addr) {
                replica.task = task;
            }
        }
        let lost: Vec<u64> = self.in_flight.iter().filter(|(_, f)| f.addr == addr).map(|(id, _)| *id).collect();
        let outcomes = lost
            .into_iter()
            .filter_map(|id| self.in_flight.remove(&id))
            .map(|f| Outcome::Lost { epoch_key: f.epoch_key, batch: f.batch })
            .collect();
        self.note_availability();
        outcomes
    }

    fn note_availability(&mut self) {
        if self.num_up() > 0 {
            self.down_since = None;
        } else if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
        }
    }

    fn handle(&mut self, event: Event) -> Vec<Outcome> {
        match event {
            Event::Resolved { spec, addrs } => {
                self.resolved[spec] = addrs.into_iter().collect();
                let wanted: BTreeSet<SocketAddr> = self.resolved.iter().flatten().copied().collect();
                let gone: Vec<SocketAddr> = self.replicas.keys().filter(|a| !wanted.contains(a)).copied().collect();
                for addr in wanted {
                    if !self.replicas.contains_key(&addr) {
                        self.add_replica(addr);
                    }
                }
                gone.into_iter().flat_map(|addr| self.fail_replica(addr, "no longer resolved".into(), true)).collect()
            }
            Event::Up { addr, generation, requests_tx } => {
                if let Some(replica) = self.replicas.get_mut(&addr).filter(|r| r.generation == generation) {
                    tracing::info!(replica = %addr, "replica up");
                    replica.requests_tx = Some(requests_tx);
                    self.note_availability();
                }
                Vec::new()
            }
            Event::Down { addr, generation, error } => {
                if self.replicas.get(&addr).is_some_and(|r| r.generation == generation) {
                    self.fail_replica(addr, error, false)
                } else {
                    Vec::new()
                }
            }
            Event::Answer { addr, generation, response } => {
                let Some(replica) = self.replicas.get_mut(&addr).filter(|r| r.generation == generation) else {
                    return Vec::new();
                };
                let Some(flight) = self.in_flight.remove(&response.batch_id) else {
                    return Vec::new();
                };
                replica.num_in_flight = replica.num_in_flight.saturating_sub(1);
                replica.failures = 0;
                vec![Outcome::Answered { epoch_key: flight.epoch_key, batch: flight.batch, addr, response }]
            }
        }
    }

    /// Waits for the next event (or until `deadline`), handles it, and fails replicas whose
    /// oldest request is past the request timeout.
    async fn wait_event(&mut self, deadline: Option<Instant>) -> Result<Vec<Outcome>, ClientError> {
        let now = Instant::now();
        let oldest = self.in_flight.values().map(|f| f.sent_at + self.options.request_timeout).min();
        let unavailable_at = self.down_since.map(|since| since + self.options.unavailable_timeout);
        let wake = [deadline, oldest, unavailable_at].into_iter().flatten().min();
        let event = match wake {
            Some(at) => tokio::time::timeout_at(at.max(now).into(), self.events_rx.recv()).await.ok().flatten(),
            None => self.events_rx.recv().await,
        };
        let mut outcomes = match event {
            Some(event) => self.handle(event),
            None => Vec::new(),
        };
        let now = Instant::now();
        let late: BTreeSet<SocketAddr> = self
            .in_flight
            .values()
            .filter(|f| now >= f.sent_at + self.options.request_timeout)
            .map(|f| f.addr)
            .collect();
        for addr in late {
            let error = format!("no answer within {:?} (--request-timeout)", self.options.request_timeout);
            outcomes.extend(self.fail_replica(addr, error, false));
        }
        if let Some(since) =
            self.down_since.filter(|since| now.duration_since(*since) >= self.options.unavailable_timeout)
        {
            let mut last_errors: Vec<String> = self
                .replicas
                .iter()
                .map(|(addr, r)| format!("{addr}: {}", r.last_error.as_deref().unwrap_or("not connected yet")))
                .collect();
            if last_errors.is_empty() {
                last_errors.push("no --loader name resolved to any address".into());
            }
            return Err(ClientError::Unavailable {
                waited: now.duration_since(since),
                last_errors: last_errors.join("; "),
            });
        }
        Ok(outcomes)
    }

    /// Sends a batch request to an up replica with credit: the one its blocks went to (see
    /// [`BlockAffinity`]) unless that one has more than a little more work than the least loaded,
    /// else the least loaded. `None` when no replica has credit.
    fn send(&mut self, dataset: &str, epoch_key: u64, batch: u64, indices: Vec<u64>, block_len: u64) -> Option<()> {
        let window = self.options.prefetch.get();
        let blocks = blocks_of(&indices, block_len);
        loop {
            let usable = |r: &Replica| r.requests_tx.is_some() && r.num_in_flight < window;
            let (least, least_in_flight) = self
                .replicas
                .iter()
                .filter(|(_, r)| usable(r))
                .min_by_key(|(_, r)| r.num_in_flight)
                .map(|(a, r)| (*a, r.num_in_flight))?;
            let num_up = self.replicas.values().filter(|r| r.requests_tx.is_some()).count().max(1);
            // How much more work than the least loaded a replica may take for cache locality:
            // half an even share of the prefetch window, at least one batch.
            let slack = (window / (2 * num_up)).max(1);
            let addr = self
                .affinity
                .preferred(&blocks)
                .filter(|a| {
                    self.replicas.get(a).is_some_and(|r| usable(r) && r.num_in_flight <= least_in_flight + slack)
                })
                .unwrap_or(least);
            let batch_id = self.next_batch_id;
            self.next_batch_id += 1;
            let replica = self.replicas.get_mut(&addr).expect("picked from the map");
            let requests_tx = replica.requests_tx.as_ref().expect("picked an up replica");
            let request = BatchRequest { batch_id, dataset: dataset.to_owned(), indices: indices.clone() };
            // The channel holds `window` requests and this replica has fewer in flight, so it
            // is only ever closed, never full.
            match requests_tx.try_send(request) {
                Ok(()) => {
                    replica.num_in_flight += 1;
                    self.in_flight.insert(batch_id, InFlight { addr, epoch_key, batch, sent_at: Instant::now() });
                    self.affinity.record(&blocks, addr);
                    return Some(());
                }
                Err(_) => {
                    // Its connection task ended; the Down event will follow. Stop using it now.
                    replica.requests_tx = None;
                    self.note_availability();
                }
            }
        }
    }
}

/// The batches of one epoch, in order; see [`Loaders::epoch`].
#[derive(Debug)]
pub struct Epoch<'a> {
    loaders: &'a mut Loaders,
    info: DatasetInfo,
    plan: EpochPlan,
    epoch_key: u64,
    /// Lowest batch number never sent.
    next_send: u64,
    /// Batch number the caller gets next.
    next_deliver: u64,
    /// Batches whose replica failed, to send again (lowest first).
    retry: VecDeque<u64>,
    /// Answers that arrived ahead of `next_deliver`; at most `prefetch` of them.
    ready: BTreeMap<u64, Batch>,
    /// Samples per block of the dataset, for replica affinity (1: unchunked).
    block_len: u64,
}

impl Epoch<'_> {
    /// The plan being streamed.
    pub fn plan(&self) -> &EpochPlan {
        &self.plan
    }

    /// The dataset being streamed.
    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Adds a loader replica while this epoch streams; see [`Loaders::add_loader`].
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] for a malformed value.
    pub async fn add_loader(&mut self, loader: &str) -> Result<(), ClientError> {
        self.loaders.add_loader(loader).await
    }

    /// Counters so far; see [`Loaders::stats`].
    pub fn stats(&self) -> DispatchStats {
        self.loaders.stats()
    }

    /// Number of the batch [`Epoch::next`] returns next.
    pub fn next_batch(&self) -> u64 {
        self.next_deliver
    }

    /// The next batch in order, or `None` at the end of the epoch.
    ///
    /// # Errors
    /// [`ClientError::BatchRefused`] when a loader refuses a batch, [`ClientError::BadResponse`]
    /// for a malformed one, [`ClientError::Unavailable`] when no replica is reachable for longer
    /// than the unavailable timeout.
    pub async fn next(&mut self) -> Result<Option<Batch>, ClientError> {
        let started = Instant::now();
        let mut waited = false;
        loop {
            if let Some(batch) = self.ready.remove(&self.next_deliver) {
                self.next_deliver += 1;
                self.fill();
                if waited {
                    self.loaders.stats.wait_seconds += started.elapsed().as_secs_f64();
                }
                return Ok(Some(batch));
            }
            if self.next_deliver >= self.plan.num_batches() {
                return Ok(None);
            }
            self.fill();
            waited = true;
            for outcome in self.loaders.wait_event(None).await? {
                self.take(outcome)?;
            }
        }
    }

    /// Sends as many requests as the window and the replicas' credit allow.
    fn fill(&mut self) {
        let window = self.loaders.options.prefetch.get() as u64;
        loop {
            let batch = match self.retry.front() {
                Some(&batch) => batch,
                None if self.next_send < self.plan.num_batches() && self.next_send < self.next_deliver + window => {
                    self.next_send
                }
                None => return,
            };
            let indices = self.plan.batch(batch);
            if self.loaders.send(&self.info.name, self.epoch_key, batch, indices, self.block_len).is_none() {
                return;
            }
            if self.retry.front() == Some(&batch) {
                self.retry.pop_front();
            } else {
                self.next_send += 1;
            }
        }
    }

    fn take(&mut self, outcome: Outcome) -> Result<(), ClientError> {
        match outcome {
            Outcome::Lost { epoch_key, batch } if epoch_key == self.epoch_key => {
                self.loaders.stats.retried_batches += 1;
                let at = self.retry.partition_point(|&b| b < batch);
                self.retry.insert(at, batch);
            }
            Outcome::Answered { epoch_key, batch, addr, response } if epoch_key == self.epoch_key => {
                if let Some(error) = response.error {
                    return Err(ClientError::BatchRefused {
                        epoch: self.plan.epoch(),
                        batch,
                        addr: addr.to_string(),
                        message: error.message,
                    });
                }
                let requested = self.plan.batch(batch);
                let batch = Batch::from_response(response, &requested, &self.info, self.plan.epoch(), batch)
                    .map_err(|reason| ClientError::BadResponse { addr: addr.to_string(), reason })?;
                if let Some(replica) = self.loaders.replicas.get_mut(&addr) {
                    replica.stats.batches += 1;
                    replica.stats.bytes += batch.num_bytes();
                }
                self.loaders.stats.delivered_bytes += batch.num_bytes();
                self.loaders.stats.decoded_bytes += batch.decoded_bytes;
                self.ready.insert(batch.index, batch);
            }
            // Answers and losses of an abandoned epoch stream.
            Outcome::Lost { .. } | Outcome::Answered { .. } => {}
        }
        Ok(())
    }
}

/// Resolves every loader name now and then every `interval`.
async fn resolve_forever(specs: Arc<Mutex<Vec<String>>>, interval: Duration, events_tx: mpsc::Sender<Event>) {
    loop {
        let names = specs.lock().expect("specs lock").clone();
        for (spec, name) in names.iter().enumerate() {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => {
                    let addrs = addrs.collect();
                    if events_tx.send(Event::Resolved { spec, addrs }).await.is_err() {
                        return;
                    }
                }
                // A name that does not resolve yet (a service still starting) keeps its last
                // answer; the unavailable timeout catches one that never does.
                Err(error) => tracing::debug!(loader = %name, %error, "cannot resolve loader name"),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One connection attempt to one replica: after `delay`, connect, check its catalog, open the
/// batch stream, and forward answers until the stream ends.
async fn run_connection(
    addr: SocketAddr,
    generation: u64,
    delay: Duration,
    options: ConnectOptions,
    window: usize,
    catalog: Arc<Mutex<Option<Vec<DatasetInfo>>>>,
    events_tx: mpsc::Sender<Event>,
) {
    tokio::time::sleep(delay).await;
    let name = addr.to_string();
    let opened = async {
        let mut client = connect(&name, &options).await?;
        let datasets = list_datasets(&mut client, &name).await?;
        {
            let mut catalog = catalog.lock().expect("catalog lock");
            match catalog.as_ref() {
                None => *catalog = Some(datasets),
                Some(expected) => {
                    if let Some(difference) = catalog_difference(expected, &datasets) {
                        tracing::error!(replica = %name, %difference, "refusing a replica that serves other datasets");
                        return Err(ClientError::Invalid(format!("refused: serves other datasets: {difference}")));
                    }
                }
            }
        }
        let (requests_tx, requests_rx) = mpsc::channel(window);
        let responses = client
            .stream_batches(ReceiverStream::new(requests_rx))
            .await
            .map_err(|status| ClientError::Rpc { addr: name.clone(), status })?
            .into_inner();
        Ok((requests_tx, responses))
    }
    .await;
    let (requests_tx, mut responses) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            let _ = events_tx.send(Event::Down { addr, generation, error: error.to_string() }).await;
            return;
        }
    };
    if events_tx.send(Event::Up { addr, generation, requests_tx }).await.is_err() {
        return;
    }
    let error = loop {
        match responses.message().await {
            Ok(Some(response)) => {
                if events_tx.send(Event::Answer { addr, generation, response }).await.is_err() {
                    return;
                }
            }
            Ok(None) => break "stream ended".to_owned(),
            Err(status) => break format!("{}: {}", status.code(), status.message()),
        }
    };
    let _ = events_tx.send(Event::Down { addr, generation, error }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn blocks_are_the_distinct_chunks_a_batch_touches() {
        assert_eq!(blocks_of(&[70, 3, 64, 130, 5], 64), vec![0, 1, 2]);
        assert!(blocks_of(&[70, 3], 1).is_empty(), "unchunked data has no blocks to share");
    }

    #[test]
    fn a_batch_goes_where_most_of_its_blocks_went_and_old_blocks_are_forgotten() {
        let mut affinity = BlockAffinity::default();
        assert_eq!(affinity.preferred(&[1, 2]), None);
        affinity.record(&[1, 2], addr(1));
        affinity.record(&[3], addr(2));
        assert_eq!(affinity.preferred(&[1, 2, 3]), Some(addr(1)));
        assert_eq!(affinity.preferred(&[3, 9]), Some(addr(2)));
        let many: Vec<u64> = (100..100 + BlockAffinity::CAPACITY as u64).collect();
        affinity.record(&many, addr(3));
        assert_eq!(affinity.owner.len(), BlockAffinity::CAPACITY);
        assert_eq!(affinity.preferred(&[1, 2, 3]), None, "the oldest blocks were forgotten first");
    }
}
