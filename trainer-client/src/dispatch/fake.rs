//! An in-memory replica set behind the [`Connector`] seam, for the dispatcher's unit tests: each
//! replica answers every request with the requested indices as an `int64` field `x`, after a
//! scripted delay, and can fail, stall, refuse or serve another catalog.

use crate::addr::ReplicaAddr;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use conveyor_proto::v1::{BatchError, BatchRequest, BatchResponse, DatasetInfo, FieldInfo, Tensor, batch_error::Kind};
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::connection::{Connector, ReplicaStream};
use crate::error::ClientError;

/// The dataset every fake replica serves: `num_samples` int64 samples, chunks of `chunk_len`.
pub(super) fn catalog(num_samples: u64, chunk_len: u64) -> Vec<DatasetInfo> {
    vec![DatasetInfo {
        name: "d".into(),
        num_samples,
        fields: vec![FieldInfo {
            name: "x".into(),
            dtype: conveyor_proto::DType::Int64 as i32,
            sample_shape: Vec::new(),
            bytes_per_sample: 8,
            chunk_len,
            dimension_names: Vec::new(),
            ..FieldInfo::default()
        }],
        max_batch_samples: 1 << 20,
        derivation: String::new(),
        coordinates: Vec::new(),
    }]
}

/// How one fake replica behaves.
#[derive(Debug, Clone)]
pub(super) struct Behaviour {
    /// Time to answer a request.
    pub delay: Duration,
    /// Extra delay of requests whose first index is even, so answers overtake each other.
    pub even_extra_delay: Duration,
    /// After answering this many requests, end the stream with UNAVAILABLE.
    pub fail_after: Option<usize>,
    /// Answers nothing at all.
    pub silent: bool,
    /// Refuses connections.
    pub down: bool,
    /// Refuses every call with UNAUTHENTICATED, as a loader whose token the client lacks.
    pub refuses_token: bool,
    /// Answers every request with `KIND_WORKER_FAILED`, as a loader whose transform workers die.
    pub workers_fail: bool,
    /// Answers the first this many requests of each stream with `KIND_STORAGE_UNAVAILABLE`, as
    /// a loader whose object store is down for a while.
    pub storage_outage: usize,
    /// What it says it serves.
    pub catalog: Vec<DatasetInfo>,
}

impl Behaviour {
    /// Answers every request after `delay`.
    pub(super) fn answering(delay: Duration, catalog: Vec<DatasetInfo>) -> Behaviour {
        Behaviour {
            delay,
            even_extra_delay: Duration::ZERO,
            fail_after: None,
            silent: false,
            down: false,
            refuses_token: false,
            workers_fail: false,
            storage_outage: 0,
            catalog,
        }
    }
}

/// The fake replica set: addresses, what names resolve to, and a log of requests received.
#[derive(Debug, Default)]
pub(super) struct FakeReplicas {
    behaviours: Mutex<HashMap<ReplicaAddr, Behaviour>>,
    names: Mutex<HashMap<String, Vec<ReplicaAddr>>>,
    /// Every request a replica received: (replica, indices).
    log: Log,
    /// `(seed, epoch)` of every request received, in the order of `log`.
    seeds: Seeds,
}

/// `127.0.0.1:port`.
pub(super) fn addr(port: u16) -> ReplicaAddr {
    ReplicaAddr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

impl FakeReplicas {
    /// A set with these replicas, each also resolvable by its `127.0.0.1:port` literal.
    pub(super) fn new(replicas: impl IntoIterator<Item = (ReplicaAddr, Behaviour)>) -> Arc<FakeReplicas> {
        let fake = FakeReplicas::default();
        fake.behaviours.lock().expect("lock").extend(replicas);
        Arc::new(fake)
    }

    /// Makes `name` resolve to `addrs`.
    pub(super) fn set_name(&self, name: &str, addrs: Vec<ReplicaAddr>) {
        self.names.lock().expect("lock").insert(name.to_owned(), addrs);
    }

    /// Adds or changes a replica.
    pub(super) fn set(&self, addr: ReplicaAddr, behaviour: Behaviour) {
        self.behaviours.lock().expect("lock").insert(addr, behaviour);
    }

    /// Requests each replica received so far, by replica.
    pub(super) fn requests(&self) -> Vec<(ReplicaAddr, Vec<u64>)> {
        self.log.lock().expect("lock").clone()
    }

    /// `(seed, epoch)` of every request received.
    pub(super) fn seeds(&self) -> Vec<(u64, u64)> {
        self.seeds.lock().expect("lock").clone()
    }

    /// Number of requests `addr` received.
    pub(super) fn num_requests(&self, addr: ReplicaAddr) -> usize {
        self.log.lock().expect("lock").iter().filter(|(a, _)| *a == addr).count()
    }
}

impl Connector for FakeReplicas {
    fn open(&self, addr: ReplicaAddr, window: usize) -> BoxFuture<'static, Result<ReplicaStream, ClientError>> {
        let behaviour = self.behaviours.lock().expect("lock").get(&addr).cloned();
        let log = self.log.clone();
        let seeds = self.seeds.clone();
        Box::pin(async move {
            if behaviour.as_ref().is_some_and(|b| b.refuses_token) {
                return Err(ClientError::Rpc {
                    addr: addr.to_string(),
                    status: Box::new(tonic::Status::unauthenticated("this loader requires a token")),
                });
            }
            let Some(behaviour) = behaviour.filter(|b| !b.down) else {
                return Err(ClientError::Rpc {
                    addr: addr.to_string(),
                    status: Box::new(tonic::Status::unavailable("connection refused")),
                });
            };
            let (requests_tx, requests_rx) = mpsc::channel::<BatchRequest>(window);
            let (responses_tx, responses_rx) = mpsc::channel(window + 1);
            tokio::spawn(serve(addr, behaviour.clone(), requests_rx, responses_tx, (log, seeds)));
            Ok(ReplicaStream {
                datasets: behaviour.catalog,
                requests_tx,
                responses: Box::pin(ReceiverStream::new(responses_rx)),
            })
        })
    }

    fn resolve(&self, name: &str) -> BoxFuture<'static, std::io::Result<Vec<ReplicaAddr>>> {
        let answer = match self.names.lock().expect("lock").get(name) {
            Some(addrs) => Ok(addrs.clone()),
            None => {
                name.parse::<std::net::SocketAddr>().map(|a| vec![ReplicaAddr::Tcp(a)]).map_err(std::io::Error::other)
            }
        };
        Box::pin(async move { answer })
    }
}

/// Requests received, shared with the replica tasks.
type Log = Arc<Mutex<Vec<(ReplicaAddr, Vec<u64>)>>>;

/// `(seed, epoch)` of the requests received, in the order of the [`Log`].
type Seeds = Arc<Mutex<Vec<(u64, u64)>>>;

async fn serve(
    addr: ReplicaAddr,
    behaviour: Behaviour,
    mut requests_rx: mpsc::Receiver<BatchRequest>,
    responses_tx: mpsc::Sender<Result<BatchResponse, tonic::Status>>,
    (log, seeds): (Log, Seeds),
) {
    let mut num_answered = 0;
    let mut num_received = 0;
    let mut pending = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            request = requests_rx.recv() => {
                let Some(request) = request else { return };
                log.lock().expect("lock").push((addr.clone(), request.indices.clone()));
                seeds.lock().expect("lock").push((request.seed, request.epoch));
                if behaviour.silent {
                    continue;
                }
                let mut delay = behaviour.delay;
                if request.indices.first().is_some_and(|i| i % 2 == 0) {
                    delay += behaviour.even_extra_delay;
                }
                let workers_fail = behaviour.workers_fail;
                num_received += 1;
                let storage_down = num_received <= behaviour.storage_outage;
                pending.push(async move {
                    tokio::time::sleep(delay).await;
                    if workers_fail {
                        return worker_failed(request);
                    }
                    if storage_down {
                        return storage_unavailable(request);
                    }
                    answer(request)
                });
            }
            Some(response) = futures::StreamExt::next(&mut pending), if !pending.is_empty() => {
                if behaviour.fail_after.is_some_and(|n| num_answered >= n) {
                    let _ = responses_tx.send(Err(tonic::Status::unavailable("replica crashed"))).await;
                    return;
                }
                num_answered += 1;
                if responses_tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn worker_failed(request: BatchRequest) -> BatchResponse {
    BatchResponse {
        batch_id: request.batch_id,
        indices: request.indices,
        tensors: Vec::new(),
        error: Some(BatchError {
            kind: Kind::WorkerFailed as i32,
            message: "the workers running t:f failed: killed by SIGKILL".into(),
        }),
        decoded_bytes: 0,
    }
}

fn storage_unavailable(request: BatchRequest) -> BatchResponse {
    BatchResponse {
        batch_id: request.batch_id,
        indices: request.indices,
        tensors: Vec::new(),
        error: Some(BatchError {
            kind: Kind::StorageUnavailable as i32,
            message: "object s3://data/x.npy: Server returned non-2xx status code: 503 Service Unavailable".into(),
        }),
        decoded_bytes: 0,
    }
}

fn answer(request: BatchRequest) -> BatchResponse {
    let data: Vec<u8> = request.indices.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    BatchResponse {
        batch_id: request.batch_id,
        tensors: vec![Tensor {
            field: "x".into(),
            dtype: conveyor_proto::DType::Int64 as i32,
            shape: vec![request.indices.len() as u64],
            data: Bytes::from(data),
            offsets: Bytes::new(),
            shared: None,
        }],
        indices: request.indices,
        error: None,
        decoded_bytes: 0,
    }
}
