//! The replica pool: which replicas exist (from the resolver), their connections and backoff,
//! the catalog they must agree on, the requests in flight and their timeouts, and where the next
//! request goes. It knows nothing of epochs: runs hand it `(run, seq)` pairs and get back
//! [`Outcome`]s.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use conveyor_proto::v1::{BatchRequest, BatchResponse, DatasetInfo};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, Sleep},
};

use super::{
    DispatchStats, ReplicaStats, StreamOptions,
    affinity::{BlockAffinity, blocks_of, choose_replica},
    connection::{Connector, Event, run_connection},
    in_flight::{InFlight, Requests},
    replica::Replica,
    resolve::resolve_forever,
};
use crate::{
    addr::{ReplicaAddr, parse_loader},
    catalog::catalog_difference,
    error::{ClientError, ReplicaFailure},
};

/// One batch request for [`Pool::send`].
#[derive(Debug)]
pub(crate) struct Ask<'a> {
    /// Dataset name.
    pub dataset: &'a str,
    /// Key of the run asking.
    pub run: u64,
    /// The batch's position in its run.
    pub seq: u64,
    /// Global sample indices, in order.
    pub indices: Vec<u64>,
    /// Samples per storage block, for replica affinity.
    pub block_len: u64,
    /// Shuffle seed and epoch of the run, which derived datasets seed their transforms from.
    pub seed: u64,
    pub epoch: u64,
    /// A replica that failed this batch with a retryable error.
    pub avoid: Option<ReplicaAddr>,
}

/// What an event means for the runs.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// An answer to request `seq` of run `run`.
    Answered { run: u64, seq: u64, addr: ReplicaAddr, response: BatchResponse },
    /// Request `seq` of run `run` will not be answered: send it again.
    Lost { run: u64, seq: u64 },
}

/// The replicas and their connections; lives across runs.
pub(crate) struct Pool {
    options: StreamOptions,
    connector: Arc<dyn Connector>,
    /// The `--loader` names (`host:port`), watched by the resolver.
    names_tx: watch::Sender<Vec<String>>,
    /// Resolved addresses per name.
    resolved: Vec<BTreeSet<ReplicaAddr>>,
    replicas: BTreeMap<ReplicaAddr, Replica>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    /// The datasets of the first replica that came up; others must agree.
    catalog: Option<Vec<DatasetInfo>>,
    /// The requests sent and not yet answered or lost.
    in_flight: Requests,
    next_run: u64,
    resolver: JoinHandle<()>,
    /// Since when no replica has been up.
    down_since: Option<Instant>,
    /// Wakes the pool at the next request or unavailable timeout.
    timer: Pin<Box<Sleep>>,
    /// Counters the runs add to.
    pub stats: DispatchStats,
    /// Replicas that left, kept for the stats.
    departed: BTreeMap<String, ReplicaStats>,
    /// Which replica recent blocks were sent to.
    affinity: BlockAffinity,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let in_flight = self.in_flight.len();
        f.debug_struct("Pool").field("replicas", &self.replicas.keys()).field("in_flight", &in_flight).finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.resolver.abort();
        for replica in self.replicas.values() {
            replica.task.abort();
        }
    }
}

impl Pool {
    /// Starts resolving `loaders` (already parsed `host:port` names). Must run inside a Tokio
    /// runtime.
    pub(super) fn new(names: Vec<String>, options: StreamOptions, connector: Arc<dyn Connector>) -> Pool {
        // Room for every answer in the window plus a few state changes per replica; a full
        // channel only pauses the connection tasks, which HTTP/2 flow control then passes on.
        let (events_tx, events_rx) = mpsc::channel(options.prefetch.get() * 2 + 64);
        let resolved = vec![BTreeSet::new(); names.len()];
        let (names_tx, names_rx) = watch::channel(names);
        let resolver =
            tokio::spawn(resolve_forever(connector.clone(), names_rx, options.resolve_interval, events_tx.clone()));
        Pool {
            options,
            connector,
            names_tx,
            resolved,
            replicas: BTreeMap::new(),
            events_tx,
            events_rx,
            catalog: None,
            in_flight: Requests::default(),
            next_run: 0,
            resolver,
            down_since: Some(Instant::now()),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            stats: DispatchStats::default(),
            departed: BTreeMap::new(),
            affinity: BlockAffinity::default(),
        }
    }

    /// Waits until a replica is up and has described its datasets.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when none comes up within the unavailable timeout.
    pub(super) async fn wait_for_catalog(&mut self) -> Result<(), ClientError> {
        while self.catalog.is_none() {
            std::future::poll_fn(|cx| self.poll_event(cx)).await?;
        }
        Ok(())
    }

    /// The settings.
    pub(super) fn options(&self) -> &StreamOptions {
        &self.options
    }

    /// The datasets the replicas serve (empty until one has answered).
    pub(super) fn catalog(&self) -> &[DatasetInfo] {
        self.catalog.as_deref().unwrap_or_default()
    }

    /// Adds a loader name, resolved at once by the resolver.
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] for a malformed value.
    pub(super) fn add_loader(&mut self, loader: &str) -> Result<(), ClientError> {
        let name = parse_loader(loader)?;
        self.resolved.push(BTreeSet::new());
        self.names_tx.send_modify(|names| names.push(name));
        Ok(())
    }

    /// A key for a new run; answers to older runs' requests will not match it. Affinity is
    /// forgotten, since block numbers of another run may mean other chunks.
    pub(super) fn new_run(&mut self) -> u64 {
        self.affinity.clear();
        self.next_run += 1;
        self.next_run
    }

    /// Counters so far, with every replica that ever served.
    pub(super) fn stats(&self) -> DispatchStats {
        let mut stats = self.stats.clone();
        stats.replicas = self.departed.clone();
        for (addr, replica) in &self.replicas {
            stats.replicas.insert(addr.to_string(), replica.stats.clone());
        }
        stats
    }

    /// Counts a delivered batch of `bytes` answered by `addr`.
    pub(super) fn record_delivery(&mut self, addr: ReplicaAddr, bytes: u64, decoded_bytes: u64) {
        if let Some(replica) = self.replicas.get_mut(&addr) {
            replica.stats.batches += 1;
            replica.stats.bytes += bytes;
        }
        self.stats.delivered_bytes += bytes;
        self.stats.decoded_bytes += decoded_bytes;
    }

    /// Replicas whose connection is up now.
    pub(super) fn num_up(&self) -> usize {
        self.replicas.values().filter(|r| r.requests_tx.is_some()).count()
    }

    /// Handles the next event or timeout; `Ready` with the outcomes for the runs (possibly
    /// none), `Pending` when nothing happened yet.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when no replica has been up for the unavailable timeout.
    pub(super) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<Outcome>, ClientError>> {
        let outcomes = self.expire(Instant::now())?;
        if !outcomes.is_empty() {
            return Poll::Ready(Ok(outcomes));
        }
        if let Poll::Ready(Some(event)) = self.events_rx.poll_recv(cx) {
            return Poll::Ready(Ok(self.handle(event)));
        }
        let Some(deadline) = self.next_deadline() else { return Poll::Pending };
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            // The next call expires what is due.
            Poll::Ready(()) => Poll::Ready(Ok(Vec::new())),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Handles every event that has already arrived, without waiting: answers free credit, so
    /// the next requests are placed on current counts rather than on counts a backlog left stale.
    pub(super) fn drain_ready(&mut self) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        while let Ok(event) = self.events_rx.try_recv() {
            outcomes.extend(self.handle(event));
        }
        outcomes
    }

    /// The next request or unavailable timeout.
    fn next_deadline(&self) -> Option<Instant> {
        let oldest = self.in_flight.next_deadline(self.options.request_timeout);
        let unavailable_at = self.down_since.map(|since| since + self.options.unavailable_timeout);
        oldest.into_iter().chain(unavailable_at).min()
    }

    /// Fails replicas whose oldest request is past the request timeout; fails the whole pool
    /// when no replica has been up for the unavailable timeout.
    fn expire(&mut self, now: Instant) -> Result<Vec<Outcome>, ClientError> {
        let timeout = self.options.request_timeout;
        let late = self.in_flight.late(now, timeout);
        let mut outcomes = Vec::new();
        for addr in late {
            let error = ClientError::RequestTimeout { addr: addr.to_string(), timeout };
            outcomes.extend(self.fail_replica(addr, error, false));
        }
        // Every replica refused the credentials (a missing or wrong token): waiting changes nothing.
        let all_refused = !self.replicas.is_empty()
            && self.replicas.values().all(|r| r.last_error.as_ref().is_some_and(|e| e.is_refusal()));
        match self.down_since {
            Some(_) if all_refused => Err(ClientError::Refused { last_errors: self.last_errors() }),
            Some(since) if now >= since + self.options.unavailable_timeout => {
                Err(ClientError::Unavailable { waited: now.duration_since(since), last_errors: self.last_errors() })
            }
            _ => Ok(outcomes),
        }
    }

    /// Each replica's last error, for an error that gives up on all of them.
    fn last_errors(&self) -> Vec<ReplicaFailure> {
        let failure = |(addr, r): (&ReplicaAddr, &Replica)| ReplicaFailure {
            addr: addr.to_string(),
            error: r.last_error.clone(),
        };
        self.replicas.iter().map(failure).collect()
    }

    /// Handles `event` as if a connection task or the resolver had sent it.
    #[cfg(test)]
    pub(crate) fn inject(&mut self, event: Event) -> Vec<Outcome> {
        self.handle(event)
    }

    fn handle(&mut self, event: Event) -> Vec<Outcome> {
        match event {
            Event::Resolved { spec, addrs } => {
                if let Some(slot) = self.resolved.get_mut(spec) {
                    *slot = addrs.into_iter().collect();
                }
                let wanted: BTreeSet<ReplicaAddr> = self.resolved.iter().flatten().cloned().collect();
                let gone: Vec<ReplicaAddr> = self.replicas.keys().filter(|a| !wanted.contains(a)).cloned().collect();
                for addr in wanted {
                    if !self.replicas.contains_key(&addr) {
                        self.add_replica(addr);
                    }
                }
                gone.into_iter()
                    .flat_map(|addr| {
                        let departed = ClientError::Departed { addr: addr.to_string() };
                        self.fail_replica(addr, departed, true)
                    })
                    .collect()
            }
            Event::Up { addr, generation, datasets, requests_tx } => {
                if self.replicas.get(&addr).is_none_or(|r| r.generation != generation) {
                    return Vec::new();
                }
                // The catalog is decided here, by the owner: the first replica up sets it, and
                // one that disagrees is dropped and retried like a failed one.
                match &self.catalog {
                    None => self.catalog = Some(datasets),
                    Some(expected) => {
                        if let Some(difference) = catalog_difference(expected, &datasets) {
                            tracing::error!(replica = %addr, %difference, "refusing a replica that serves other datasets");
                            let error = ClientError::CatalogMismatch { addr: addr.to_string(), difference };
                            return self.fail_replica(addr, error, false);
                        }
                    }
                }
                if let Some(replica) = self.replicas.get_mut(&addr) {
                    tracing::info!(replica = %addr, "replica up");
                    replica.requests_tx = Some(requests_tx);
                }
                self.note_availability();
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
                // A fresh id per send: an answer on a dropped connection, or to a request that
                // was re-sent, no longer has an entry and is ignored.
                let Some(flight) = self.in_flight.answered(response.batch_id) else {
                    return Vec::new();
                };
                replica.num_in_flight = replica.num_in_flight.saturating_sub(1);
                replica.failures = 0;
                vec![Outcome::Answered { run: flight.run, seq: flight.seq, addr, response }]
            }
        }
    }

    fn add_replica(&mut self, addr: ReplicaAddr) {
        tracing::info!(replica = %addr, "replica joined");
        let task = self.spawn_connection(addr.clone(), 0, Duration::ZERO);
        let stats = self.departed.remove(&addr.to_string()).unwrap_or_default();
        self.replicas.insert(addr, Replica::new(task, stats));
    }

    fn spawn_connection(&self, addr: ReplicaAddr, generation: u64, delay: Duration) -> JoinHandle<()> {
        tokio::spawn(run_connection(
            self.connector.clone(),
            addr,
            generation,
            delay,
            self.options.prefetch.get(),
            self.events_tx.clone(),
        ))
    }

    /// Drops a replica's connection, returns its unanswered requests and, unless it is leaving,
    /// schedules a reconnect after the backoff.
    fn fail_replica(&mut self, addr: ReplicaAddr, error: ClientError, leaving: bool) -> Vec<Outcome> {
        let Some(replica) = self.replicas.get_mut(&addr) else {
            return Vec::new();
        };
        let delay = replica.drop_connection(&self.options);
        if leaving {
            tracing::info!(replica = %addr, "replica left");
        } else {
            tracing::warn!(replica = %addr, error = %crate::error::chain(&error), retry_in = ?delay, "replica failed");
        }
        replica.last_error = Some(Arc::new(error));
        let generation = replica.generation;
        if leaving {
            if let Some(replica) = self.replicas.remove(&addr) {
                self.departed.insert(addr.to_string(), replica.stats);
            }
        } else {
            let task = self.spawn_connection(addr.clone(), generation, delay);
            if let Some(replica) = self.replicas.get_mut(&addr) {
                replica.task = task;
            }
        }
        let outcomes =
            self.in_flight.lost_with(&addr).into_iter().map(|f| Outcome::Lost { run: f.run, seq: f.seq }).collect();
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

    /// Sends request `seq` of run `run` to an up replica with credit: the one its blocks went to
    /// (see [`BlockAffinity`]) unless that one has more than a little more work than the least
    /// loaded, else the least loaded. `false` when no replica has credit.
    /// A replica named in `ask.avoid` (it failed this batch) is passed over while another one
    /// is up.
    pub(super) fn send(&mut self, ask: Ask<'_>) -> bool {
        let Ask { dataset, run, seq, indices, block_len, seed, epoch, avoid } = ask;
        let window = self.options.prefetch.get();
        let blocks = blocks_of(&indices, block_len);
        let mut skip: Vec<ReplicaAddr> = avoid.filter(|_| self.num_up() > 1).into_iter().collect();
        loop {
            let loads: Vec<(ReplicaAddr, usize)> = self
                .replicas
                .iter()
                .filter(|(a, r)| r.requests_tx.is_some() && r.num_in_flight < window && !skip.contains(a))
                .map(|(a, r)| (a.clone(), r.num_in_flight))
                .collect();
            let Some(addr) = choose_replica(&loads, self.affinity.preferred(&blocks), window, self.num_up()) else {
                return false;
            };
            let batch_id = self.in_flight.next_batch_id();
            let Some(replica) = self.replicas.get_mut(&addr) else { return false };
            let Some(requests_tx) = replica.requests_tx.as_ref() else { return false };
            let request = BatchRequest {
                batch_id,
                dataset: dataset.to_owned(),
                indices: indices.clone(),
                seed,
                epoch,
                accepts_ragged: true,
            };
            match requests_tx.try_send(request) {
                Ok(()) => {
                    replica.num_in_flight += 1;
                    self.affinity.record(&blocks, addr.clone());
                    self.in_flight.sent(InFlight { addr, run, seq, sent_at: Instant::now() });
                    return true;
                }
                // The channel holds `window` requests and this replica has fewer in flight, so
                // it is never full; skip it this time if it ever is.
                Err(mpsc::error::TrySendError::Full(_)) => skip.push(addr),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // Its connection task ended; the Down event will follow. Stop using it now.
                    replica.requests_tx = None;
                    self.note_availability();
                }
            }
        }
    }
}
