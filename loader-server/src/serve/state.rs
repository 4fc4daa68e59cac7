//! The loader's shared state, built once at start-up: the catalog of datasets it serves (stored
//! and derived), the bounds every stream shares (stream slots, the in-flight byte budget, gather
//! threads), the chunk cache, the tokens and the counters; and the per-batch pipeline every
//! request goes through (check, budget, gather off the runtime, transform, finish).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use bytes::Bytes;
use conveyor_proto::{
    v1::{BatchRequest, BatchResponse, DatasetInfo},
    wire::{OutgoingBatch, OutgoingTensor},
};
use tokio::sync::Semaphore;

use super::{
    auth::Tokens,
    budget::FairBudget,
    shm::SharedRegion,
    stats::Stats,
    stream_slots::{Slot, StreamSlots},
};
use crate::{
    config::{Config, OnBadSample},
    dataset::{Dataset, FieldRows, chunk_cache::ChunkCache},
    error::RequestError,
    transform::{
        Columns, Derived, FieldSchema, Transform,
        ops::Pipeline,
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

    /// Bytes of one sample as sent, ragged fields not counted (their samples' lengths decide).
    pub fn bytes_per_sample(&self) -> usize {
        self.schema().iter().filter(|f| !f.ragged).map(FieldSchema::bytes_per_sample).sum()
    }

    /// Its first ragged field, if any (a derived dataset's: of its output).
    fn ragged_field(&self) -> Option<&FieldSchema> {
        self.schema().iter().find(|f| f.ragged)
    }

    /// Bytes one sample holds while its batch is assembled: as sent, plus the gathered source
    /// rows for a derived dataset (fixed-shape fields; see [`Served::ragged_output_bytes`]).
    fn budget_bytes_per_sample(&self) -> usize {
        match self {
            Served::Stored { .. } => self.bytes_per_sample(),
            Served::Derived(derived) => self.bytes_per_sample() + derived.source.bytes_per_sample(),
        }
    }

    /// What a derived dataset's ragged outputs may take, on top of its fixed-shape bytes: a
    /// transform's ragged output is known only once it ran, and may be at most
    /// `max_batch_bytes`, so that much is budgeted.
    fn ragged_output_bytes(&self, max_batch_bytes: u64) -> u64 {
        match self {
            Served::Derived(_) if self.ragged_field().is_some() => max_batch_bytes,
            _ => 0,
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
    Gathered(Vec<FieldRows>),
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

    /// A place under `--max-streams` for a new stream of `connection` (any number that tells
    /// connections apart), with the stream's id; `None` when every place is held by a stream
    /// that cannot make way.
    pub(super) fn admit_stream(&self, connection: usize) -> Option<(u64, Slot)> {
        let stream_id = self.next_stream_id.fetch_add(1, Relaxed);
        Some((stream_id, self.stream_slots.admit(stream_id, connection)?))
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

    pub(super) fn dataset(&self, name: &str) -> Result<&Served, RequestError> {
        self.datasets.get(name).ok_or_else(|| RequestError::UnknownDataset {
            name: name.to_owned(),
            available: self.datasets.keys().cloned().collect(),
        })
    }

    /// Checks a request against the dataset and the limits; returns the dataset and the bytes
    /// the batch holds while it is assembled and queued, or `None` for a dataset with ragged
    /// fields (or derived from one), whose size its samples' lengths decide
    /// ([`LoaderState::check_bytes`] then runs once they are read).
    fn check(&self, request: &BatchRequest) -> Result<(Served, Option<u64>), RequestError> {
        let served = self.dataset(&request.dataset)?;
        let name = served.name();
        let num_samples = request.indices.len() as u64;
        if num_samples == 0 {
            return Err(RequestError::EmptyBatch { dataset: name.to_owned() });
        }
        // What the client receives decides whether it must read ragged fields; what is gathered,
        // whether the batch's size is known before its samples are read.
        if let Some(field) = served.ragged_field().filter(|_| !request.accepts_ragged) {
            return Err(RequestError::ClientTooOld { dataset: name.to_owned(), field: field.name.clone() });
        }
        let ragged_field = served.source().ragged_field();
        let derived = matches!(served, Served::Derived(_));
        let ragged = ragged_field.is_some();
        if !ragged || derived {
            self.check_bytes(served, num_samples, num_samples * served.bytes_per_sample() as u64)?;
        } else if num_samples > self.config.max_batch_samples {
            self.check_bytes(served, num_samples, 0)?;
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
        let ragged_output = served.ragged_output_bytes(self.config.max_batch_bytes);
        let budget = (!ragged).then(|| num_samples * served.budget_bytes_per_sample() as u64 + ragged_output);
        Ok((served.clone(), budget))
    }

    /// Checks a batch of `num_samples` samples and `bytes` bytes against the batch limits.
    fn check_bytes(&self, served: &Served, num_samples: u64, bytes: u64) -> Result<(), RequestError> {
        if num_samples > self.config.max_batch_samples || bytes > self.config.max_batch_bytes {
            return Err(RequestError::BatchTooLarge {
                dataset: served.name().to_owned(),
                num_samples,
                bytes,
                max_samples: self.config.max_batch_samples,
                max_bytes: self.config.max_batch_bytes,
            });
        }
        Ok(())
    }

    /// Serves one request within a stream's bounds: its share of the in-flight budget, a gather
    /// thread, its shared-memory region.
    pub(super) async fn assemble(
        self: Arc<Self>,
        stream_id: u64,
        request: BatchRequest,
        region: Option<Arc<SharedRegion>>,
    ) -> Outgoing {
        self.pipeline(request, Bounds::Stream { stream_id, region }).await
    }

    /// Serves one request on the calling thread through the same pipeline as a stream, but
    /// outside the stream bounds (budget, gather threads): for the fuzz targets and tests that
    /// drive the handler without a server.
    pub fn answer_blocking(self: &Arc<Self>, request: BatchRequest) -> BatchResponse {
        futures::executor::block_on(self.clone().pipeline(request, Bounds::Inline)).to_response()
    }

    /// The one batch pipeline: check, budget, gather off the runtime, transform, finish. Each
    /// failure answers this batch with its error; the stream carries on.
    async fn pipeline(self: Arc<Self>, request: BatchRequest, bounds: Bounds) -> Outgoing {
        let checked = self.check(&request);
        let BatchRequest { batch_id, indices, seed, epoch, .. } = request;
        let (served, bytes) = match checked {
            Ok(ok) => ok,
            Err(error) => {
                tracing::warn!(batch_id, %error, "rejected batch request");
                return self.refuse(batch_id, indices, error);
            }
        };
        let inline = matches!(bounds, Bounds::Inline);
        let bytes = match bytes {
            Some(bytes) => bytes,
            None => {
                // A ragged batch weighs what its samples do: their lengths are read off the
                // runtime, before it takes any budget.
                let (source, asked, state) = (served.source().clone(), indices.clone(), self.clone());
                let sized = offload(inline, move || source.batch_bytes(&asked, &state.cache)).await;
                let checked = sized.map_err(|reason| RequestError::GatherFailed {
                    dataset: served.name().to_owned(),
                    batch_id,
                    reason,
                });
                // A derived dataset's answer was checked already; its budget holds the encoded
                // source samples and the decoded output.
                let answer_bytes = indices.len() as u64 * served.bytes_per_sample() as u64
                    + served.ragged_output_bytes(self.config.max_batch_bytes);
                let checked = checked.and_then(|bytes| match served {
                    Served::Derived(_) => Ok(bytes + answer_bytes),
                    Served::Stored { .. } => self.check_bytes(&served, indices.len() as u64, bytes).map(|()| bytes),
                });
                match checked {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        tracing::warn!(batch_id, %error, "rejected batch request");
                        return self.refuse(batch_id, indices, error);
                    }
                }
            }
        };
        let (budget, slot, region) = match bounds {
            Bounds::Stream { stream_id, region } => {
                // A batch alone may not wait for more than the whole budget (a ragged output's allowance
                // on top of a large input can ask for that): it takes all of it.
                let budget = self.inflight_bytes.acquire(stream_id, bytes.min(self.config.max_inflight_bytes)).await;
                // The semaphore lives as long as the state and is never closed.
                let Ok(slot) = self.assemble_slots.clone().acquire_owned().await else {
                    unreachable!("assemble semaphore is never closed")
                };
                (Some(budget), Some(slot), region)
            }
            Bounds::Inline => (None, None, None),
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
        let gathered = offload(inline, move || {
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
                outgoing.hold = budget.map(|b| Box::new(b) as _);
                return outgoing;
            }
            Ok(Gathered::Rows(indices, rows, decoded)) => (indices, rows, decoded),
            Ok(Gathered::Failed(indices, error)) => {
                tracing::error!(batch_id, %error, "failing this batch only");
                return self.refuse(batch_id, indices, error);
            }
            Err(reason) => {
                tracing::error!(batch_id, dataset = %served.name(), %reason, "gathering a batch failed");
                let error = RequestError::GatherFailed { dataset: served.name().to_owned(), batch_id, reason };
                return self.refuse(batch_id, Vec::new(), error);
            }
        };
        let rows = match (served.transform(), rows) {
            (Some(Transform::Python(pool)), Rows::Gathered(buffers)) => {
                let started = std::time::Instant::now();
                let result = pool.run(buffers, indices.clone(), seed, epoch).await;
                self.stats.record_transform(served.name(), started.elapsed());
                match transformed(&served, pool, &indices, result, self.config.max_batch_bytes) {
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
        let finished = offload(inline, move || state.finish(outgoing, region.as_deref())).await;
        let Ok(mut outgoing) = finished else {
            let reason = "writing the batch out panicked".to_owned();
            let error = RequestError::GatherFailed { dataset: served.name().to_owned(), batch_id, reason };
            return self.refuse(batch_id, Vec::new(), error);
        };
        outgoing.hold = budget.map(|b| Box::new(b) as _);
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
                .map(|(field, FieldRows { data, offsets })| {
                    // A ragged field's offsets count rows of its values; the rows, the batch axis.
                    let row_bytes = (field.bytes_per_sample() as u64).max(1);
                    let rows = offsets.as_ref().map_or(batch, |_| data.len() as u64 / row_bytes);
                    let shape = std::iter::once(rows).chain(field.sample_shape.iter().copied()).collect();
                    let mut tensor = OutgoingTensor::owned(field.name.clone(), field.dtype, shape, Bytes::from(data));
                    tensor.offsets = offsets.map(|offsets| {
                        offsets.iter().flat_map(|&o| ((o / row_bytes) as i64).to_le_bytes()).collect::<Vec<u8>>().into()
                    });
                    tensor
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
    ) -> Result<(Rows, u64), RequestError> {
        let source = served.source();
        let Some(transform) = served.transform() else {
            let (tensors, decoded) = source.select(indices, &self.cache)?;
            return Ok((Rows::Selected(tensors), decoded));
        };
        let (rows, decoded) = source.gather(indices, &self.cache)?;
        let Transform::Pipeline(pipeline) = transform else {
            return Ok((Rows::Gathered(rows), decoded));
        };
        let started = std::time::Instant::now();
        let out = self.run_pipeline(served, pipeline, (rows, decoded), indices, seed, epoch);
        self.stats.record_transform(served.name(), started.elapsed());
        let (out, decoded) = out?;
        Ok((Rows::Gathered(out.into_iter().map(|data| FieldRows { data, offsets: None }).collect()), decoded))
    }

    /// Runs a built-in pipeline over gathered `rows` of `indices`. A sample it cannot decode
    /// fails the batch, or with `--on-bad-sample substitute` is replaced by another sample (the
    /// first of a sequence keyed by the seed, epoch and its index that decodes) and the batch is
    /// gathered and run again; the answer still names the requested indices. Returns the output
    /// and the bytes decoded from storage.
    fn run_pipeline(
        &self,
        served: &Served,
        pipeline: &Pipeline,
        (mut rows, mut decoded): (Vec<FieldRows>, u64),
        indices: &[u64],
        seed: u64,
        epoch: u64,
    ) -> Result<(Vec<Vec<u8>>, u64), RequestError> {
        let source = served.source();
        let mut used = indices.to_vec();
        loop {
            let bad = match pipeline.apply(rows, &used, seed, epoch) {
                Ok(out) => return Ok((out, decoded)),
                Err(bad) => bad,
            };
            let index = used[bad.row];
            let field = source.fields.iter().find(|f| f.name == bad.field);
            tracing::warn!(dataset = %served.name(), index, field = %bad.field, reason = %bad.reason, "bad sample");
            let substitute = match self.config.on_bad_sample {
                OnBadSample::Substitute => self.substitute(source, pipeline, index, seed, epoch),
                OnBadSample::Fail => None,
            };
            let Some(substitute) = substitute else {
                self.stats.bad_samples_failed.fetch_add(1, Relaxed);
                return Err(RequestError::BadSample {
                    dataset: served.name().to_owned(),
                    origin: field.map(|f| f.describe_sample(index)).unwrap_or_default(),
                    field: bad.field,
                    index,
                    reason: bad.reason,
                });
            };
            self.stats.bad_samples_substituted.fetch_add(1, Relaxed);
            used[bad.row] = substitute;
            let (again, more) = source.gather(&used, &self.cache)?;
            (rows, decoded) = (again, decoded + more);
        }
    }

    /// The sample served in place of `index` when it cannot be decoded: the first of up to
    /// [`SUBSTITUTE_TRIES`] candidates keyed by (seed, epoch, index) that the pipeline takes.
    fn substitute(&self, source: &Dataset, pipeline: &Pipeline, index: u64, seed: u64, epoch: u64) -> Option<u64> {
        let key = crate::transform::sample_key(seed, epoch, index);
        (1..=SUBSTITUTE_TRIES)
            .map(|attempt| crate::transform::mix64(key ^ attempt) % source.num_samples)
            .filter(|&candidate| candidate != index)
            .find(|&candidate| {
                source
                    .gather(&[candidate], &self.cache)
                    .is_ok_and(|(rows, _)| pipeline.apply(rows, &[candidate], seed, epoch).is_ok())
            })
    }
}

/// Candidates tried in place of a sample that cannot be decoded before its batch fails.
const SUBSTITUTE_TRIES: u64 = 8;

/// Where a batch's stages run.
enum Bounds {
    /// Within a stream's bounds: its share of the in-flight budget, a gather thread, and its
    /// connection's shared-memory region if it has one.
    Stream { stream_id: u64, region: Option<Arc<SharedRegion>> },
    /// On the caller's thread, outside the stream bounds.
    Inline,
}

/// Runs blocking work off the async runtime, or on the caller's thread for an inline batch
/// (where a panic is left to reach the caller: the fuzz targets look for them). A panic on a
/// gather thread becomes its message.
async fn offload<T: Send + 'static>(inline: bool, work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    if inline {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work).await.map_err(|join_error| join_error.to_string())
}

/// What a gather thread hands back.
enum Gathered {
    /// The batch, finished (its rows copied into its message or shared memory).
    Finished(Outgoing),
    /// The rows, for the transform still to run.
    Rows(Vec<u64>, Rows, u64),
    /// A chunk or range could not be read, or a sample decoded.
    Failed(Vec<u64>, RequestError),
}

/// A Python transform's result as the dataset's buffers, or the batch's error.
fn transformed(
    served: &Served,
    pool: &Pool,
    indices: &[u64],
    result: Result<Columns, TransformError>,
    max_batch_bytes: u64,
) -> Result<Vec<FieldRows>, RequestError> {
    let failed = |message: String| RequestError::TransformFailed {
        dataset: served.name().to_owned(),
        function: pool.function.clone(),
        samples: crate::error::describe_samples(indices),
        message,
    };
    match result {
        Ok(columns) => {
            let rows = columns.into_schema(served.schema()).map_err(failed)?;
            // Ragged outputs were budgeted at --max-batch-bytes (see Served::ragged_output_bytes).
            let bytes: u64 =
                rows.iter().map(|r| r.data.len() as u64 + r.offsets.as_ref().map_or(0, |o| o.len() as u64 * 8)).sum();
            if served.ragged_field().is_some() && bytes > max_batch_bytes {
                return Err(failed(format!(
                    "the output is {bytes} bytes, over --max-batch-bytes {max_batch_bytes}; ask for smaller batches or \
                     raise the flag on the loader"
                )));
            }
            Ok(rows)
        }
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
