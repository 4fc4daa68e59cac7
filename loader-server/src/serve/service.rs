//! The `conveyor.v1.Loader` gRPC service over the shared [`LoaderState`]: dataset descriptions,
//! and the bidirectional batch stream (admitted under `--max-streams`, then served by
//! [`super::stream`]); refused while the loader drains.

use std::sync::Arc;

use conveyor_proto::{
    v1::{BatchRequest, DatasetInfo, DescribeDatasetRequest, ListDatasetsRequest, ListDatasetsResponse, SameHost},
    v1_gather::loader_server::Loader,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::{
    connection::ConnInfo,
    state::LoaderState,
    stream::{self, BatchStream, StreamConn},
};

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

#[tonic::async_trait]
impl Loader for LoaderService {
    async fn list_datasets(
        &self,
        request: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        let _call = ConnInfo::of(&request).map(|c| c.activity.begin());
        let max = self.state.config().max_batch_samples;
        let datasets = self.state.datasets().map(|d| d.info(max)).collect();
        Ok(Response::new(ListDatasetsResponse { datasets, same_host: self.same_host.clone() }))
    }

    async fn describe_dataset(
        &self,
        request: Request<DescribeDatasetRequest>,
    ) -> Result<Response<DatasetInfo>, Status> {
        let _call = ConnInfo::of(&request).map(|c| c.activity.begin());
        let dataset = self.state.dataset(&request.get_ref().dataset)?;
        Ok(Response::new(dataset.info(self.state.config().max_batch_samples)))
    }

    type StreamBatchesStream = stream::BatchStream;

    async fn stream_batches(&self, request: Request<Streaming<BatchRequest>>) -> Result<Response<BatchStream>, Status> {
        if *self.draining_rx.borrow() {
            return Err(Status::unavailable("loader is draining; connect to another replica"));
        }
        let conn = ConnInfo::of(&request);
        // Connections are told apart by their activity record (one per connection).
        let connection = conn.map_or(0, |c| Arc::as_ptr(&c.activity) as usize);
        let (stream_id, slot) = self.state.admit_stream(connection).ok_or_else(|| {
            self.state.stats.record_refused_stream();
            Status::resource_exhausted(format!(
                "this loader already serves {} streams (--max-streams), none of them idle on a connection holding more \
                 than yours; connect to another replica or raise --max-streams",
                self.state.config().max_streams
            ))
        })?;
        let peer = conn.and_then(|c| c.remote).map(|a| a.to_string()).unwrap_or_default();
        let call = conn.map(|c| c.activity.begin());
        let region = conn.and_then(|c| c.region.clone());
        let span = tracing::info_span!("stream", %peer);
        let conn = StreamConn { slot, stream_id, _call: call, region };
        Ok(Response::new(stream::open(self.state.clone(), request.into_inner(), self.draining_rx.clone(), conn, span)))
    }
}
