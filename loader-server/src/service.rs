//! The `conveyor.v1.Loader` gRPC service: dataset descriptions and the bidirectional batch
//! stream, with its bounds (streams, batches being gathered, bytes in flight) and draining.

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use bytes::Bytes;
use conveyor_proto::v1::{
    BatchRequest, BatchResponse, DatasetInfo, DescribeDatasetRequest, ListDatasetsRequest, ListDatasetsResponse,
    Tensor, loader_server::Loader,
};
use futures::{Stream, StreamExt, stream::FuturesUnordered};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{cache::ChunkCache, config::Config, dataset::Dataset, error::RequestError, stats::Stats};

/// A response ready to send, holding its share of the in-flight byte budget until tonic takes it.
type Outgoing = (BatchResponse, Option<OwnedSemaphorePermit>);

/// Shared state of all streams of one loader.
#[derive(Debug)]
pub struct LoaderState {
    /// Datasets by name.
    datasets: BTreeMap<String, Arc<Dataset>>,
    /// Limits from the flags.
    config: Config,
    /// One permit per concurrent stream (`--max-streams`).
    streams: Arc<Semaphore>,
    /// One permit per byte of batch data assembled or queued (`--max-inflight-bytes`).
    inflight_bytes: Arc<Semaphore>,
    /// One permit per batch being gathered (`--assemble-threads`).
    assemble_slots: Arc<Semaphore>,
    /// Decoded Zarr chunks shared by all streams (`--chunk-cache-bytes`).
    pub cache: ChunkCache,
    /// Counters the metrics endpoint and logs read.
    pub stats: Stats,
}

impl LoaderState {
    /// Builds the state over already opened datasets.
    pub fn new(datasets: Vec<Dataset>, config: Config) -> LoaderState {
        LoaderState {
            stats: Stats::new(datasets.iter().map(|d| d.name.clone())),
            datasets: datasets.into_iter().map(|d| (d.name.clone(), Arc::new(d))).collect(),
            streams: Arc::new(Semaphore::new(config.max_streams.get())),
            inflight_bytes: Arc::new(Semaphore::new(config.max_inflight_bytes as usize)),
            assemble_slots: Arc::new(Semaphore::new(config.assemble_threads.get())),
            cache: ChunkCache::new(config.chunk_cache_bytes, config.decode_threads.get()),
            config,
        }
    }

    /// Datasets by name.
    pub fn datasets(&self) -> impl Iterator<Item = &Arc<Dataset>> {
        self.datasets.values()
    }

    /// The flags the loader runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes of batch data currently assembled or queued.
    pub fn inflight_bytes(&self) -> u64 {
        self.config.max_inflight_bytes - self.inflight_bytes.available_permits() as u64
    }

    /// Streams currently open.
    pub fn active_streams(&self) -> usize {
        self.config.max_streams.get() - self.streams.available_permits()
    }

    fn dataset(&self, name: &str) -> Result<&Arc<Dataset>, RequestError> {
        self.datasets.get(name).ok_or_else(|| RequestError::UnknownDataset {
            name: name.to_owned(),
            available: self.datasets.keys().cloned().collect(),
        })
    }

    /// Checks a request against the dataset and the limits; returns the dataset and the bytes
    /// the batch will take.
    fn check(&self, request: &BatchRequest) -> Result<(Arc<Dataset>, u64), RequestError> {
        let dataset = self.dataset(&request.dataset)?;
        let num_samples = request.indices.len() as u64;
        if num_samples == 0 {
            return Err(RequestError::EmptyBatch { dataset: dataset.name.clone() });
        }
        let bytes = num_samples * dataset.bytes_per_sample() as u64;
        if num_samples > self.config.max_batch_samples || bytes > self.config.max_batch_bytes {
            return Err(RequestError::BatchTooLarge {
                dataset: dataset.name.clone(),
                num_samples,
                bytes,
                max_samples: self.config.max_batch_samples,
                max_bytes: self.config.max_batch_bytes,
            });
        }
        if let Some(&index) = request.indices.iter().find(|&&i| i >= dataset.num_samples) {
            return Err(RequestError::IndexOutOfRange {
                dataset: dataset.name.clone(),
                index,
                len: dataset.num_samples,
            });
        }
        Ok((dataset.clone(), bytes))
    }

    /// Serves one request: checks it, waits for budget, gathers rows off the runtime.
    async fn assemble(self: Arc<Self>, request: BatchRequest) -> Outgoing {
        let checked = self.check(&request);
        let BatchRequest { batch_id, indices, .. } = request;
        let (dataset, bytes) = match checked {
            Ok(ok) => ok,
            Err(error) => {
                tracing::warn!(batch_id, %error, "rejected batch request");
                return self.refuse(batch_id, indices, error);
            }
        };
        // Both semaphores live as long as the state and are never closed.
        let Ok(budget) = self.inflight_bytes.clone().acquire_many_owned(bytes as u32).await else {
            unreachable!("in-flight semaphore is never closed")
        };
        let Ok(slot) = self.assemble_slots.clone().acquire_owned().await else {
            unreachable!("assemble semaphore is never closed")
        };
        let state = self.clone();
        let gather_dataset = dataset.clone();
        let gathered = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let result = gather_dataset.gather(&indices, &state.cache);
            (indices, result)
        })
        .await;
        let (indices, buffers, decoded_bytes) = match gathered {
            Ok((indices, Ok((buffers, decoded)))) => (indices, buffers, decoded),
            Ok((indices, Err(error))) => {
                tracing::error!(batch_id, %error, "a chunk could not be read; failing this batch only");
                return self.refuse(batch_id, indices, RequestError::from(error));
            }
            Err(join_error) => {
                tracing::error!(batch_id, dataset = %dataset.name, %join_error, "gathering a batch failed");
                let error = RequestError::GatherFailed {
                    dataset: dataset.name.clone(),
                    batch_id,
                    reason: join_error.to_string(),
                };
                return self.refuse(batch_id, Vec::new(), error);
            }
        };
        let batch = indices.len() as u64;
        let tensors = dataset
            .fields
            .iter()
            .zip(buffers)
            .map(|(field, data)| Tensor {
                field: field.name.clone(),
                dtype: field.dtype as i32,
                shape: std::iter::once(batch).chain(field.sample_shape.iter().copied()).collect(),
                data: Bytes::from(data),
            })
            .collect();
        self.stats.record_batch(&dataset.name, bytes, decoded_bytes);
        (BatchResponse { batch_id, indices, tensors, error: None, decoded_bytes }, Some(budget))
    }
}

impl LoaderState {
    /// The answer to a request that cannot be served; the stream carries on.
    fn refuse(&self, batch_id: u64, indices: Vec<u64>, error: RequestError) -> Outgoing {
        self.stats.record_error(&error);
        let response = BatchResponse {
            batch_id,
            indices,
            tensors: Vec::new(),
            error: Some(error.to_batch_error()),
            decoded_bytes: 0,
        };
        (response, None)
    }
}

/// The gRPC handler over a shared [`LoaderState`].
#[derive(Debug, Clone)]
pub struct LoaderService {
    state: Arc<LoaderState>,
    /// Turns true when the loader starts draining.
    draining_rx: watch::Receiver<bool>,
}

impl LoaderService {
    /// A handler that stops taking work once `draining_rx` turns true.
    pub fn new(state: Arc<LoaderState>, draining_rx: watch::Receiver<bool>) -> LoaderService {
        LoaderService { state, draining_rx }
    }
}

/// Reads requests of one stream and answers each exactly once, at most
/// `--stream-parallelism` at a time; on drain, finishes what it has read and ends the stream.
async fn serve_stream(
    state: Arc<LoaderState>,
    mut inbound: Streaming<BatchRequest>,
    out_tx: mpsc::Sender<Result<Outgoing, Status>>,
    mut draining_rx: watch::Receiver<bool>,
    _stream_permit: OwnedSemaphorePermit,
) {
    let parallelism = state.config.stream_parallelism.get();
    let mut assembling = FuturesUnordered::new();
    let mut reading = true;
    let mut drained = *draining_rx.borrow();
    let (mut num_batches, mut num_bytes, mut num_refused) = (0u64, 0u64, 0u64);
    tracing::info!("stream opened");
    let ended = loop {
        tokio::select! {
            message = inbound.message(), if reading && !drained && assembling.len() < parallelism => match message {
                Ok(Some(request)) => assembling.push(state.clone().assemble(request)),
                Ok(None) => reading = false,
                Err(status) => {
                    tracing::debug!(%status, "client stream ended with an error");
                    reading = false;
                }
            },
            Some(outgoing) = assembling.next(), if !assembling.is_empty() => {
                match &outgoing.0.error {
                    None => {
                        num_batches += 1;
                        num_bytes += outgoing.0.tensors.iter().map(|t| t.data.len() as u64).sum::<u64>();
                    }
                    Some(_) => num_refused += 1,
                }
                if out_tx.send(Ok(outgoing)).await.is_err() {
                    break "the client left";
                }
            },
            // Only while reading: once the client closed its side, `else` must be able to end the loop.
            changed = draining_rx.changed(), if reading && !drained => {
                drained = changed.is_err() || *draining_rx.borrow();
            },
            else => break if drained { "the loader is draining" } else { "the client closed it" },
        }
    };
    if drained {
        let _ = out_tx
            .send(Err(Status::unavailable("loader is draining; send the remaining batches to another replica")))
            .await;
    }
    tracing::info!(batches = num_batches, bytes = num_bytes, refused = num_refused, "stream ended: {ended}");
    state.stats.log_read_amplification();
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<BatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Loader for LoaderService {
    async fn list_datasets(
        &self,
        _request: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        let max = self.state.config.max_batch_samples;
        let datasets = self.state.datasets().map(|d| d.info(max)).collect();
        Ok(Response::new(ListDatasetsResponse { datasets }))
    }

    async fn describe_dataset(
        &self,
        request: Request<DescribeDatasetRequest>,
    ) -> Result<Response<DatasetInfo>, Status> {
        let dataset = self.state.dataset(&request.get_ref().dataset)?;
        Ok(Response::new(dataset.info(self.state.config.max_batch_samples)))
    }

    type StreamBatchesStream = BatchStream;

    async fn stream_batches(&self, request: Request<Streaming<BatchRequest>>) -> Result<Response<BatchStream>, Status> {
        if *self.draining_rx.borrow() {
            return Err(Status::unavailable("loader is draining; connect to another replica"));
        }
        let stream_permit = self.state.streams.clone().try_acquire_owned().map_err(|_| {
            self.state.stats.record_refused_stream();
            Status::resource_exhausted(format!(
                "this loader already serves {} streams (--max-streams); connect to another replica or raise --max-streams",
                self.state.config.max_streams
            ))
        })?;
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let (out_tx, out_rx) = mpsc::channel(self.state.config.stream_parallelism.get());
        let span = tracing::info_span!("stream", %peer);
        let task =
            serve_stream(self.state.clone(), request.into_inner(), out_tx, self.draining_rx.clone(), stream_permit);
        tokio::spawn(tracing::Instrument::instrument(task, span));
        // The byte budget is released as tonic takes each response for encoding.
        let responses = ReceiverStream::new(out_rx).map(|item| item.map(|(response, _budget)| response));
        Ok(Response::new(Box::pin(responses)))
    }
}
