//! The `conveyor.v1.Loader` gRPC service: dataset descriptions and the bidirectional batch
//! stream, with its bounds (streams, batches being gathered, bytes in flight) and draining.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use conveyor_proto::{
    v1::{
        BatchRequest, BatchResponse, DatasetInfo, DescribeDatasetRequest, ListDatasetsRequest, ListDatasetsResponse,
        SameHost,
    },
    v1_gather::loader_server::Loader,
    wire::{OutgoingBatch, OutgoingTensor},
};
use futures::{Stream, StreamExt, stream::FuturesUnordered};
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::{
    auth::Tokens,
    budget::FairBudget,
    connection::{CallGuard, ConnInfo},
    shm::SharedRegion,
    stats::Stats,
    stream_slots::{Slot, StreamSlots},
};
use crate::{
    config::Config,
    dataset::{Dataset, chunk_cache::ChunkCache},
    error::ReadError,
    error::RequestError,
    transform::{
        Columns, Derived, FieldSchema, Transform,
        python::{Pool, TransformError},
        schema_of,
    },
};

/// A dataset clients can request: stored, or derived from a stored one by a transform.
#[derive(Debug, Clone)]
pub enum Served {
    /// Served as stored.
    Stored {
        /// The dataset.
        dataset: Arc<Dataset>,
        /// Its fields' schema, for the responses.
        schema: Arc<Vec<FieldSchema>>,
    },
    /// Transformed on the way out.
    Derived(Arc<Derived>),
}

impl Served {
    /// A stored dataset.
    pub fn stored(dataset: Arc<Dataset>) -> Served {
        Served::Stored { schema: Arc::new(schema_of(&dataset)), dataset }
    }

    /// Name clients use.
    pub fn name(&self) -> &str {
        match self {
            Served::Stored { dataset, .. } => &dataset.name,
            Served::Derived(derived) => &derived.name,
        }
    }

    /// The stored dataset whose rows are gathered.
    pub fn source(&self) -> &Arc<Dataset> {
        match self {
            Served::Stored { dataset, .. } => dataset,
            Served::Derived(derived) => &derived.source,
        }
    }

    /// The fields of its batches.
    pub fn schema(&self) -> &[FieldSchema] {
        match self {
            Served::Stored { schema, .. } => schema,
            Served::Derived(derived) => &derived.schema,
        }
    }

    /// Bytes of one sample as sent.
    pub fn bytes_per_sample(&self) -> usize {
        self.schema().iter().map(FieldSchema::bytes_per_sample).sum()
    }

    /// Bytes one sample holds while its batch is assembled: as sent, plus the gathered source
    /// rows for a derived dataset.
    fn budget_bytes_per_sample(&self) -> usize {
        match self {
            Served::Stored { .. } => self.bytes_per_sample(),
            Served::Derived(derived) => self.bytes_per_sample() + derived.source.bytes_per_sample(),
        }
    }

    /// Wire description, given the server's per-batch sample limit.
    pub fn info(&self, max_batch_samples: u64) -> DatasetInfo {
        match self {
            Served::Stored { dataset, .. } => dataset.info(max_batch_samples),
            Served::Derived(derived) => derived.info(max_batch_samples),
        }
    }

    /// The transform of a derived dataset.
    fn transform(&self) -> Option<&Transform> {
        match self {
            Served::Derived(derived) => Some(&derived.transform),
            Served::Stored { .. } => None,
        }
    }
}

/// A response ready to send. Its rows are copied into the outgoing buffer when tonic encodes
/// it; until then it holds its share of the in-flight byte budget ([`OutgoingBatch::hold`]).
type Outgoing = OutgoingBatch;

/// A batch's rows before they are answered.
enum Rows {
    /// Selected in place (a stored dataset): copied once, as the response is encoded.
    Selected(Vec<OutgoingTensor>),
    /// Gathered into one buffer per field (the input or output of a transform).
    Gathered(Vec<Vec<u8>>),
}

/// Shared state of all streams of one loader.
#[derive(Debug)]
pub struct LoaderState {
    /// Datasets by name, stored and derived.
    datasets: BTreeMap<String, Served>,
    /// Limits from the flags.
    config: Config,
    /// The concurrent streams (`--max-streams`), shared fairly between connections.
    stream_slots: Arc<StreamSlots>,
    /// Bytes of batch data assembled or queued (`--max-inflight-bytes`), shared fairly.
    inflight_bytes: Arc<FairBudget>,
    /// Numbers streams for the budget's accounting.
    next_stream_id: AtomicU64,
    /// Accepted bearer tokens (`--auth-token-file`), when the loader requires one.
    tokens: Option<Arc<Tokens>>,
    /// One permit per batch being gathered (`--assemble-threads`).
    assemble_slots: Arc<Semaphore>,
    /// Decoded Zarr chunks shared by all streams (`--chunk-cache-bytes`).
    cache: ChunkCache,
    /// Counters the metrics endpoint and logs read.
    pub stats: Arc<Stats>,
}

impl LoaderState {
    /// Builds the state, in one pass, over already opened stored datasets, the datasets derived
    /// from them, the chunk cache those were probed through, and the accepted tokens.
    pub fn new(
        stored: Vec<Arc<Dataset>>,
        derived: Vec<Derived>,
        cache: ChunkCache,
        tokens: Option<Arc<Tokens>>,
        config: Config,
    ) -> LoaderState {
        let names = stored.iter().map(|d| d.name.clone()).chain(derived.iter().map(|d| d.name.clone()));
        let stats = Arc::new(Stats::new(names));
        let stored = stored.into_iter().map(|d| (d.name.clone(), Served::stored(d)));
        let derived = derived.into_iter().map(|d| (d.name.clone(), Served::Derived(Arc::new(d))));
        LoaderState {
            stats,
            datasets: stored.chain(derived).collect(),
            stream_slots: Arc::new(StreamSlots::new(config.max_streams.get())),
            inflight_bytes: Arc::new(FairBudget::new(config.max_inflight_bytes)),
            next_stream_id: AtomicU64::new(0),
            tokens,
            assemble_slots: Arc::new(Semaphore::new(config.assemble_threads.get())),
            cache,
            config,
        }
    }

    /// The accepted bearer tokens, when the loader requires one.
    pub fn tokens(&self) -> Option<&Arc<Tokens>> {
        self.tokens.as_ref()
    }

    /// The decoded-chunk cache shared by every stream.
    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// Datasets by name, stored and derived.
    pub fn datasets(&self) -> impl Iterator<Item = &Served> {
        self.datasets.values()
    }

    /// The derived datasets.
    pub fn derived(&self) -> impl Iterator<Item = &Arc<Derived>> {
        self.datasets.values().filter_map(|d| match d {
            Served::Derived(derived) => Some(derived),
            Served::Stored { .. } => None,
        })
    }

    /// The flags the loader runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes of batch data currently assembled or queued.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes.used()
    }

    /// Streams currently open.
    pub fn active_streams(&self) -> usize {
        self.stream_slots.open()
    }

    fn dataset(&self, name: &str) -> Result<&Served, RequestError> {
        self.datasets.get(name).ok_or_else(|| RequestError::UnknownDataset {
            name: name.to_owned(),
            available: self.datasets.keys().cloned().collect(),
        })
    }

    /// Checks a request against the dataset and the limits; returns the dataset and the bytes
    /// the batch holds while it is assembled and queued.
    fn check(&self, request: &BatchRequest) -> Result<(Served, u64), RequestError> {
        let served = self.dataset(&request.dataset)?;
        let name = served.name();
        let num_samples = request.indices.len() as u64;
        if num_samples == 0 {
            return Err(RequestError::EmptyBatch { dataset: name.to_owned() });
        }
        let bytes = num_samples * served.bytes_per_sample() as u64;
        if num_samples > self.config.max_batch_samples || bytes > self.config.max_batch_bytes {
            return Err(RequestError::BatchTooLarge {
                dataset: name.to_owned(),
                num_samples,
                bytes,
                max_samples: self.config.max_batch_samples,
                max_bytes: self.config.max_batch_bytes,
            });
        }
        let len = served.source().num_samples;
        if let Some(&index) = request.indices.iter().find(|&&i| i >= len) {
            return Err(RequestError::IndexOutOfRange { dataset: name.to_owned(), index, len });
        }
        if let Some(Transform::Python(pool)) = served.transform() {
            let region_bytes = pool.region_bytes(num_samples);
            if region_bytes > pool.shm_bytes() {
                return Err(RequestError::RegionTooSmall {
                    dataset: name.to_owned(),
                    num_samples,
                    bytes: region_bytes,
                    shm_bytes: pool.shm_bytes(),
                });
            }
        }
        Ok((served.clone(), num_samples * served.budget_bytes_per_sample() as u64))
    }

    /// Serves one request: checks it, waits for budget, gathers rows off the runtime, and
    /// transforms them for a derived dataset.
    async fn assemble(
        self: Arc<Self>,
        stream_id: u64,
        request: BatchRequest,
        region: Option<Arc<SharedRegion>>,
    ) -> Outgoing {
        let checked = self.check(&request);
        let BatchRequest { batch_id, indices, seed, epoch, .. } = request;
        let (served, bytes) = match checked {
            Ok(ok) => ok,
            Err(error) => {
                tracing::warn!(batch_id, %error, "rejected batch request");
                return self.refuse(batch_id, indices, error);
            }
        };
        let budget = self.inflight_bytes.acquire(stream_id, bytes).await;
        // The semaphore lives as long as the state and is never closed.
        let Ok(slot) = self.assemble_slots.clone().acquire_owned().await else {
            unreachable!("assemble semaphore is never closed")
        };
        let state = self.clone();
        let gather_served = served.clone();
        // Unless a Python transform is still to run, the batch is finished on the thread that
        // gathers it: its rows copied once, into the connection's shared memory or into the
        // gRPC message the connection's task hands to HTTP/2 as it is. The copies then run in
        // parallel on the gather threads, and the blocks or ranges the rows point into are let go
        // as soon as they are copied.
        let finish_here = !matches!(served.transform(), Some(Transform::Python(_)));
        let gather_region = region.clone();
        let gathered = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            match state.gather_blocking(&gather_served, &indices, seed, epoch) {
                Ok((rows, decoded)) if finish_here => {
                    let outgoing = state.respond(&gather_served, batch_id, indices, rows, decoded);
                    Gathered::Finished(state.finish(outgoing, gather_region.as_deref()))
                }
                Ok((rows, decoded)) => Gathered::Rows(indices, rows, decoded),
                Err(error) => Gathered::Failed(indices, error),
            }
        })
        .await;
        let (indices, rows, decoded_bytes) = match gathered {
            Ok(Gathered::Finished(mut outgoing)) => {
                outgoing.hold = Some(Box::new(budget));
                return outgoing;
            }
            Ok(Gathered::Rows(indices, rows, decoded)) => (indices, rows, decoded),
            Ok(Gathered::Failed(indices, error)) => {
                tracing::error!(batch_id, %error, "a chunk could not be read; failing this batch only");
                return self.refuse(batch_id, indices, RequestError::from(error));
            }
            Err(join_error) => {
                tracing::error!(batch_id, dataset = %served.name(), %join_error, "gathering a batch failed");
                let error = RequestError::GatherFailed {
                    dataset: served.name().to_owned(),
                    batch_id,
                    reason: join_error.to_string(),
                };
                return self.refuse(batch_id, Vec::new(), error);
            }
        };
        let rows = match (served.transform(), rows) {
            (Some(Transform::Python(pool)), Rows::Gathered(buffers)) => {
                let started = std::time::Instant::now();
                let result = pool.run(buffers, indices.clone(), seed, epoch).await;
                self.stats.record_transform(served.name(), started.elapsed());
                match transformed(&served, pool, &indices, result) {
                    Ok(buffers) => Rows::Gathered(buffers),
                    Err(error) => {
                        tracing::warn!(batch_id, %error, "transform failed; failing this batch only");
                        return self.refuse(batch_id, indices, error);
                    }
                }
            }
            (_, rows) => rows,
        };
        let outgoing = self.respond(&served, batch_id, indices, rows, decoded_bytes);
        let state = self.clone();
        let finished = tokio::task::spawn_blocking(move || state.finish(outgoing, region.as_deref())).await;
        let Ok(mut outgoing) = finished else {
            let reason = "writing the batch out panicked".to_owned();
            let error = RequestError::GatherFailed { dataset: served.name().to_owned(), batch_id, reason };
            return self.refuse(batch_id, Vec::new(), error);
        };
        outgoing.hold = Some(Box::new(budget));
        outgoing
    }

    /// The answer carrying a batch's rows.
    fn respond(&self, served: &Served, batch_id: u64, indices: Vec<u64>, rows: Rows, decoded_bytes: u64) -> Outgoing {
        let batch = indices.len() as u64;
        let tensors = match rows {
            Rows::Selected(tensors) => tensors,
            Rows::Gathered(buffers) => served
                .schema()
                .iter()
                .zip(buffers)
                .map(|(field, data)| {
                    let shape = std::iter::once(batch).chain(field.sample_shape.iter().copied()).collect();
                    OutgoingTensor::owned(field.name.clone(), field.dtype, shape, Bytes::from(data))
                })
                .collect(),
        };
        let outgoing = OutgoingBatch::new(batch_id, indices, tensors, decoded_bytes);
        self.stats.record_batch(served.name(), outgoing.data_len() as u64, decoded_bytes);
        outgoing
    }

    /// The one copy of a batch's rows, on the calling thread (off the runtime): into the
    /// connection's shared-memory region when it has one with room (the gRPC message then only
    /// says where), else into the batch's gRPC message itself.
    fn finish(&self, mut outgoing: Outgoing, region: Option<&SharedRegion>) -> Outgoing {
        if let Some(region) = region {
            let placed = region.place(&mut outgoing);
            let counter = if placed { &self.stats.shm_batches } else { &self.stats.shm_full };
            counter.fetch_add(1, Relaxed);
        }
        outgoing.encode_message();
        outgoing
    }

    /// Serves one request on the calling thread with the same checks and gather as a stream,
    /// but outside the stream bounds (budget, gather threads): for the fuzz targets and tests
    /// that drive the handler without a server.
    pub fn answer_blocking(&self, request: BatchRequest) -> BatchResponse {
        let checked = self.check(&request);
        let BatchRequest { batch_id, indices, seed, epoch, .. } = request;
        let (served, _) = match checked {
            Ok(ok) => ok,
            Err(error) => return self.refuse(batch_id, indices, error).to_response(),
        };
        let (rows, decoded) = match self.gather_blocking(&served, &indices, seed, epoch) {
            Ok(ok) => ok,
            Err(error) => return self.refuse(batch_id, indices, RequestError::from(error)).to_response(),
        };
        let rows = match (served.transform(), rows) {
            (Some(Transform::Python(pool)), Rows::Gathered(buffers)) => {
                let result = pool.run_blocking(buffers, indices.clone(), seed, epoch);
                match transformed(&served, pool, &indices, result) {
                    Ok(buffers) => Rows::Gathered(buffers),
                    Err(error) => return self.refuse(batch_id, indices, error).to_response(),
                }
            }
            (_, rows) => rows,
        };
        self.respond(&served, batch_id, indices, rows, decoded).to_response()
    }

    /// Selects the rows of `indices` for a stored dataset; for a derived one, gathers the source
    /// rows and runs a built-in pipeline over them (CPU work like the gather, so it runs on the
    /// same thread). Returns the rows and the bytes decoded from storage. Blocks: call it off the
    /// async runtime.
    fn gather_blocking(
        &self,
        served: &Served,
        indices: &[u64],
        seed: u64,
        epoch: u64,
    ) -> Result<(Rows, u64), ReadError> {
        let source = served.source();
        let Some(transform) = served.transform() else {
            let (tensors, decoded) = source.select(indices, &self.cache)?;
            return Ok((Rows::Selected(tensors), decoded));
        };
        let (buffers, decoded) = source.gather(indices, &self.cache)?;
        let Transform::Pipeline(pipeline) = transform else { return Ok((Rows::Gathered(buffers), decoded)) };
        let started = std::time::Instant::now();
        let out = pipeline.apply(buffers, indices, seed, epoch);
        self.stats.record_transform(served.name(), started.elapsed());
        Ok((Rows::Gathered(out), decoded))
    }
}

/// What a gather thread hands back.
enum Gathered {
    /// The batch, finished (its rows copied into its message or shared memory).
    Finished(Outgoing),
    /// The rows, for the transform still to run.
    Rows(Vec<u64>, Rows, u64),
    /// A chunk or range could not be read.
    Failed(Vec<u64>, ReadError),
}

/// A Python transform's result as the dataset's buffers, or the batch's error.
fn transformed(
    served: &Served,
    pool: &Pool,
    indices: &[u64],
    result: Result<Columns, TransformError>,
) -> Result<Vec<Vec<u8>>, RequestError> {
    let failed = |message: String| RequestError::TransformFailed {
        dataset: served.name().to_owned(),
        function: pool.function.clone(),
        samples: crate::error::describe_samples(indices),
        message,
    };
    match result {
        Ok(columns) => columns.into_schema(served.schema()).map_err(failed),
        Err(TransformError::Raised { message, traceback }) => Err(failed(format!("{message}\n{traceback}"))),
        Err(TransformError::Schema(message)) => Err(failed(message)),
        Err(TransformError::WorkerFailed(detail)) => Err(RequestError::WorkerFailed {
            dataset: served.name().to_owned(),
            function: pool.function.clone(),
            samples: crate::error::describe_samples(indices),
            detail,
        }),
    }
}

impl LoaderState {
    /// The answer to a request that cannot be served; the stream carries on.
    fn refuse(&self, batch_id: u64, indices: Vec<u64>, error: RequestError) -> Outgoing {
        self.stats.record_error(&error);
        OutgoingBatch::refused(batch_id, indices, error.to_batch_error())
    }
}

/// The gRPC handler over a shared [`LoaderState`].
#[derive(Debug, Clone)]
pub struct LoaderService {
    state: Arc<LoaderState>,
    /// Turns true when the loader starts draining.
    draining_rx: watch::Receiver<bool>,
    /// The same-host path this loader tells clients about in its catalog, if it has one.
    same_host: Option<SameHost>,
}

impl LoaderService {
    /// A handler that stops taking work once `draining_rx` turns true.
    pub fn new(state: Arc<LoaderState>, draining_rx: watch::Receiver<bool>) -> LoaderService {
        LoaderService { state, draining_rx, same_host: None }
    }

    /// Tells clients in `ListDatasets` where this loader's Unix socket with shared memory is,
    /// so that one on the same host can move its batch streams there.
    #[must_use]
    pub fn with_same_host(mut self, same_host: Option<SameHost>) -> LoaderService {
        self.same_host = same_host;
        self
    }
}

/// What a stream holds of its loader and connection while it runs.
struct StreamConn {
    /// Its place under `--max-streams` (notified when another connection's stream takes it).
    slot: Slot,
    /// Numbers the stream for the budget's accounting.
    stream_id: u64,
    /// Marks a call in progress on the connection (against `--idle-timeout`).
    _call: Option<CallGuard>,
    /// The connection's shared-memory region, where its batches are written when one is granted.
    region: Option<Arc<SharedRegion>>,
}

/// Reads requests of one stream and answers each exactly once, at most
/// `--stream-parallelism` at a time; on drain, finishes what it has read and ends the stream.
/// Ends the stream with a status when its client stops reading (`--write-timeout`), sends no
/// request for `--stream-idle-timeout`, or sends a request that cannot be decoded.
async fn serve_stream(
    state: Arc<LoaderState>,
    mut inbound: Streaming<BatchRequest>,
    outbox: Arc<Outbox>,
    out_tx: mpsc::Sender<Result<Outgoing, Status>>,
    mut draining_rx: watch::Receiver<bool>,
    conn: StreamConn,
) {
    let region = conn.region.clone();
    let config = &state.config;
    let parallelism = config.stream_parallelism.get();
    let stream_id = conn.stream_id;
    let evict = conn.slot.evict.clone();
    let mut assembling = FuturesUnordered::new();
    let mut reading = true;
    let mut drained = *draining_rx.borrow();
    let mut last_request = tokio::time::Instant::now();
    let mut failure: Option<Status> = None;
    let (mut num_batches, mut num_bytes, mut num_refused) = (0u64, 0u64, 0u64);
    tracing::info!(shared_memory = region.is_some(), "stream opened");
    let ended = loop {
        let idle_deadline = last_request + config.stream_idle_timeout;
        // Busy while it assembles (a response already built stays queued for its client).
        conn.slot.set_busy(!assembling.is_empty());
        tokio::select! {
            message = inbound.message(), if reading && !drained && assembling.len() < parallelism => match message {
                Ok(Some(request)) => {
                    last_request = tokio::time::Instant::now();
                    assembling.push(state.clone().assemble(stream_id, request, region.clone()));
                }
                Ok(None) => reading = false,
                Err(status) if is_decode_error(&status) => {
                    state.stats.requests_malformed.fetch_add(1, Relaxed);
                    tracing::warn!(%status, "refusing a request message that cannot be decoded; ending the stream after the batches it has read");
                    failure = Some(undecodable_request(&status, config));
                    reading = false;
                }
                // The client reset its side or the connection broke: nobody is left to answer.
                Err(status) => {
                    tracing::debug!(%status, "client stream ended with an error");
                    reading = false;
                }
            },
            Some(outgoing) = assembling.next(), if !assembling.is_empty() => {
                match &outgoing.error {
                    None => {
                        num_batches += 1;
                        num_bytes += outgoing.data_len() as u64;
                    }
                    Some(_) => num_refused += 1,
                }
                outbox.note_queued();
                match tokio::time::timeout(config.write_timeout, out_tx.send(Ok(outgoing))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        outbox.abort(Status::cancelled("the client left"));
                        break "the client left";
                    }
                    Err(_) => {
                        state.stats.streams_timed_out.fetch_add(1, Relaxed);
                        outbox.abort(write_timeout_status(config));
                        break "the client stopped reading (--write-timeout)";
                    }
                }
            },
            // Responses are queued and the client has taken none for --write-timeout.
            () = tokio::time::sleep_until(outbox.stall_deadline(config.write_timeout)),
                if outbox.has_queued() && (reading || !assembling.is_empty()) => {
                if outbox.stalled(config.write_timeout) {
                    state.stats.streams_timed_out.fetch_add(1, Relaxed);
                    outbox.abort(write_timeout_status(config));
                    break "the client stopped reading (--write-timeout)";
                }
            },
            () = tokio::time::sleep_until(idle_deadline), if reading && !drained && assembling.is_empty() => {
                state.stats.streams_timed_out.fetch_add(1, Relaxed);
                outbox.abort(Status::deadline_exceeded(format!(
                    "no batch request for {:?} (--stream-idle-timeout on the loader); open a new stream when you need batches",
                    config.stream_idle_timeout
                )));
                break "no request for --stream-idle-timeout";
            },
            // Its slot went to a stream of a connection holding fewer (it was idle): make way.
            // Only while reading, as below.
            () = evict.notified(), if reading => {
                outbox.abort(Status::unavailable(
                    "this stream was idle and its slot went to another client's stream (--max-streams are shared \
                     fairly between connections); open a new stream when you need batches",
                ));
                break "its slot went to another connection's stream";
            },
            // Only while reading: once the client closed its side, `else` must be able to end the loop.
            changed = draining_rx.changed(), if reading && !drained => {
                drained = changed.is_err() || *draining_rx.borrow();
            },
            else => break if failure.is_some() {
                "a request could not be decoded"
            } else if drained {
                "the loader is draining"
            } else {
                "the client closed it"
            },
        }
    };
    let last = match failure {
        Some(status) => Some(status),
        None if drained => {
            Some(Status::unavailable("loader is draining; send the remaining batches to another replica"))
        }
        None => None,
    };
    if let Some(status) = last {
        let _ = tokio::time::timeout(config.write_timeout, out_tx.send(Err(status))).await;
    }
    // What is queued still holds budget: a client that closed its side but reads nothing loses
    // it after the write timeout too.
    loop {
        let emptied = outbox.emptied.notified();
        tokio::pin!(emptied);
        emptied.as_mut().enable();
        if !outbox.has_queued() {
            break;
        }
        tokio::select! {
            () = emptied => {}
            () = tokio::time::sleep_until(outbox.stall_deadline(config.write_timeout)) => {
                if outbox.stalled(config.write_timeout) {
                    state.stats.streams_timed_out.fetch_add(1, Relaxed);
                    outbox.abort(write_timeout_status(config));
                    break;
                }
            }
        }
    }
    tracing::info!(batches = num_batches, bytes = num_bytes, refused = num_refused, "stream ended: {ended}");
    state.stats.log_read_amplification();
}

fn write_timeout_status(config: &Config) -> Status {
    Status::deadline_exceeded(format!(
        "the client read no response for {:?} (--write-timeout on the loader); \
         the stream ended and its share of --max-inflight-bytes went to other clients",
        config.write_timeout
    ))
}

/// Whether tonic failed to decode a request message (over the size limit, or not protobuf of the
/// request's type), as opposed to the stream breaking.
fn is_decode_error(status: &Status) -> bool {
    status.code() == tonic::Code::OutOfRange || status.message().starts_with("failed to decode Protobuf message")
}

/// The status that ends a stream whose request message could not be decoded (over the size
/// limit, or not a `BatchRequest`).
fn undecodable_request(status: &Status, config: &Config) -> Status {
    let limit = request_limit_bytes(config);
    if status.code() == tonic::Code::OutOfRange {
        Status::out_of_range(format!(
            "a batch request message is over this loader's {limit}-byte request limit ({}); \
             send at most --max-batch-samples ({}) indices per request",
            status.message(),
            config.max_batch_samples
        ))
    } else {
        Status::invalid_argument(format!(
            "a batch request message could not be decoded ({}); send conveyor.v1.BatchRequest messages of at most {limit} bytes",
            status.message()
        ))
    }
}

/// Largest request message a loader decodes: the indices of the largest batch as varints plus
/// room for the dataset name and the other fields.
pub fn request_limit_bytes(config: &Config) -> usize {
    (config.max_batch_samples as usize).saturating_mul(10).saturating_add(64 << 10)
}

/// One stream's responses on their way to tonic. The stream task can empty it and end the call
/// with a status, which releases the budget held by responses the client never read.
#[derive(Debug)]
struct Outbox {
    state: Mutex<OutboxState>,
    /// Woken when tonic takes the last queued response.
    emptied: tokio::sync::Notify,
}

#[derive(Debug)]
struct OutboxState {
    responses_rx: mpsc::Receiver<Result<Outgoing, Status>>,
    /// Sent after the queue is emptied by [`Outbox::abort`].
    ending: Option<Status>,
    /// Responses queued and not yet taken by tonic.
    queued: usize,
    /// When tonic last took a response, or the queue last became non-empty.
    progress_at: tokio::time::Instant,
}

impl Outbox {
    fn new(responses_rx: mpsc::Receiver<Result<Outgoing, Status>>) -> Outbox {
        let state = OutboxState { responses_rx, ending: None, queued: 0, progress_at: tokio::time::Instant::now() };
        Outbox { state: Mutex::new(state), emptied: tokio::sync::Notify::new() }
    }

    /// Counts a response about to be queued.
    fn note_queued(&self) {
        let mut state = self.lock();
        if state.queued == 0 {
            state.progress_at = tokio::time::Instant::now();
        }
        state.queued += 1;
    }

    fn has_queued(&self) -> bool {
        self.lock().queued > 0
    }

    /// When the queue counts as stalled if tonic takes nothing before.
    fn stall_deadline(&self, write_timeout: std::time::Duration) -> tokio::time::Instant {
        self.lock().progress_at + write_timeout
    }

    /// Whether responses have waited `write_timeout` with none taken.
    fn stalled(&self, write_timeout: std::time::Duration) -> bool {
        let state = self.lock();
        state.queued > 0 && state.progress_at.elapsed() >= write_timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops every queued response (releasing its budget) and ends the call with `status`.
    fn abort(&self, status: Status) {
        let mut state = self.lock();
        state.responses_rx.close();
        while state.responses_rx.try_recv().is_ok() {}
        state.queued = 0;
        state.ending = Some(status);
    }
}

/// The response stream tonic polls; the budget of a response is released once tonic has encoded
/// it (copied its rows into the outgoing buffer).
struct OutboxStream(Arc<Outbox>);

impl Drop for OutboxStream {
    /// The call is over (the client left or reset it): queued responses release their budget
    /// now, and the stream task's next send fails, which ends it.
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.responses_rx.close();
        while state.responses_rx.try_recv().is_ok() {}
        state.queued = 0;
        drop(state);
        self.0.emptied.notify_waiters();
    }
}

impl Stream for OutboxStream {
    type Item = Result<Outgoing, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.0.lock();
        match state.responses_rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if item.is_ok() {
                    state.queued = state.queued.saturating_sub(1);
                    state.progress_at = tokio::time::Instant::now();
                    if state.queued == 0 {
                        self.0.emptied.notify_waiters();
                    }
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => Poll::Ready(state.ending.take().map(Err)),
            Poll::Pending => Poll::Pending,
        }
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

#[tonic::async_trait]
impl Loader for LoaderService {
    async fn list_datasets(
        &self,
        request: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        let _call = ConnInfo::of(&request).map(|c| c.activity.begin());
        let max = self.state.config.max_batch_samples;
        let datasets = self.state.datasets().map(|d| d.info(max)).collect();
        Ok(Response::new(ListDatasetsResponse { datasets, same_host: self.same_host.clone() }))
    }

    async fn describe_dataset(
        &self,
        request: Request<DescribeDatasetRequest>,
    ) -> Result<Response<DatasetInfo>, Status> {
        let _call = ConnInfo::of(&request).map(|c| c.activity.begin());
        let dataset = self.state.dataset(&request.get_ref().dataset)?;
        Ok(Response::new(dataset.info(self.state.config.max_batch_samples)))
    }

    type StreamBatchesStream = BatchStream;

    async fn stream_batches(&self, request: Request<Streaming<BatchRequest>>) -> Result<Response<BatchStream>, Status> {
        if *self.draining_rx.borrow() {
            return Err(Status::unavailable("loader is draining; connect to another replica"));
        }
        let conn = ConnInfo::of(&request);
        // Connections are told apart by their activity record (one per connection).
        let connection = conn.map_or(0, |c| Arc::as_ptr(&c.activity) as usize);
        let stream_id = self.state.next_stream_id.fetch_add(1, Relaxed);
        let slot = self.state.stream_slots.admit(stream_id, connection).ok_or_else(|| {
            self.state.stats.record_refused_stream();
            Status::resource_exhausted(format!(
                "this loader already serves {} streams (--max-streams), none of them idle on a connection holding more \
                 than yours; connect to another replica or raise --max-streams",
                self.state.config.max_streams
            ))
        })?;
        let peer = conn.and_then(|c| c.remote).map(|a| a.to_string()).unwrap_or_default();
        let call = conn.map(|c| c.activity.begin());
        let region = conn.and_then(|c| c.region.clone());
        let (out_tx, out_rx) = mpsc::channel(self.state.config.stream_parallelism.get());
        let outbox = Arc::new(Outbox::new(out_rx));
        let span = tracing::info_span!("stream", %peer);
        let task = serve_stream(
            self.state.clone(),
            request.into_inner(),
            outbox.clone(),
            out_tx,
            self.draining_rx.clone(),
            StreamConn { slot, stream_id, _call: call, region },
        );
        tokio::spawn(tracing::Instrument::instrument(task, span));
        Ok(Response::new(Box::pin(OutboxStream(outbox))))
    }
}
