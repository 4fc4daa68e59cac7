//! One replica's connection: the [`Connector`] seam ("open a batch stream to this address",
//! "resolve this name"), its gRPC implementation, and the task that runs one connection attempt
//! and reports what happens to the pool as [`Event`]s.

use crate::addr::ReplicaAddr;
use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use conveyor_proto::v1::{BatchRequest, BatchResponse, DatasetInfo, SameHost};
use futures::{Stream, StreamExt, future::BoxFuture};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    addr::host_of,
    catalog::list_datasets,
    client::{Client, ConnectOptions, connect},
    error::ClientError,
};

/// Answers arriving on one replica's batch stream.
pub(crate) type Responses = Pin<Box<dyn Stream<Item = Result<BatchResponse, tonic::Status>> + Send>>;

/// An open batch stream to one replica, with the datasets it said it serves.
pub(crate) struct ReplicaStream {
    /// The replica's catalog; the pool decides whether it agrees with the others.
    pub datasets: Vec<DatasetInfo>,
    /// Where requests go; holds up to the prefetch window.
    pub requests_tx: mpsc::Sender<BatchRequest>,
    /// Where answers come from.
    pub responses: Responses,
}

/// How the pool reaches replicas: the real one speaks gRPC, the unit tests' one is in memory.
pub(crate) trait Connector: Send + Sync + 'static {
    /// Connects to `addr`, asks for its catalog and opens a batch stream whose request channel
    /// holds `window` requests.
    fn open(&self, addr: ReplicaAddr, window: usize) -> BoxFuture<'static, Result<ReplicaStream, ClientError>>;

    /// The addresses `name` (`host:port`) resolves to now.
    fn resolve(&self, name: &str) -> BoxFuture<'static, std::io::Result<Vec<ReplicaAddr>>> {
        let name = name.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.map(ReplicaAddr::Tcp).collect()) })
    }
}

/// The gRPC connector.
pub(crate) struct GrpcConnector {
    /// Transport settings for every connection.
    options: ConnectOptions,
    /// The host name each resolved address came from: a TLS certificate is checked against
    /// the name the user gave, not the address it resolved to.
    hosts: Arc<Mutex<HashMap<ReplicaAddr, String>>>,
}

impl GrpcConnector {
    /// A connector with these transport settings.
    pub(super) fn new(options: ConnectOptions) -> GrpcConnector {
        GrpcConnector { options, hosts: Arc::default() }
    }
}

impl Connector for GrpcConnector {
    fn open(&self, addr: ReplicaAddr, window: usize) -> BoxFuture<'static, Result<ReplicaStream, ClientError>> {
        let options = self.options.clone();
        let host = self.hosts.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).cloned();
        let host = host.unwrap_or_else(|| match &addr {
            ReplicaAddr::Tcp(tcp) => tcp.ip().to_string(),
            ReplicaAddr::Unix(_) => "localhost".to_owned(),
        });
        Box::pin(async move {
            let name = addr.to_string();
            let mut client = connect(&addr, &host, &options).await?;
            let catalog = list_datasets(&mut client, &name, &options).await?;
            let datasets = catalog.datasets;
            // A TCP loader on this host that serves shared memory: stream through it instead.
            if let (ReplicaAddr::Tcp(_), Some(same_host)) = (&addr, catalog.same_host)
                && options.shm_bytes > 0
            {
                match same_host_client(&same_host, &options).await {
                    Ok(local) => {
                        tracing::info!(replica = %name, socket = %same_host.unix_socket, "loader is on this host: streaming through its Unix socket and shared memory");
                        client = local;
                    }
                    Err(why) => {
                        tracing::debug!(replica = %name, socket = %same_host.unix_socket, %why, "staying on TCP")
                    }
                }
            }
            let (requests_tx, requests_rx) = mpsc::channel(window);
            let requests = ReceiverStream::new(requests_rx);
            let responses = crate::batch_stream::open(client.service, requests, options.max_message_bytes)
                .await
                .map_err(|source| ClientError::Rpc { addr: name, status: Box::new(source) })?;
            // Tensors sent through shared memory become bytes over the region; a slice that
            // cannot be resolved fails the stream like a broken message would.
            let responses = responses.map(|answer| {
                let mut response = answer?;
                crate::shm::resolve(&mut response).map_err(tonic::Status::data_loss)?;
                Ok(response)
            });
            Ok(ReplicaStream { datasets, requests_tx, responses: Box::pin(responses) })
        })
    }

    fn resolve(&self, name: &str) -> BoxFuture<'static, std::io::Result<Vec<ReplicaAddr>>> {
        let name = name.to_owned();
        let hosts = self.hosts.clone();
        Box::pin(async move {
            if let Some(unix) = ReplicaAddr::unix(&name) {
                return unix_sockets(unix).await;
            }
            let addrs: Vec<ReplicaAddr> = tokio::net::lookup_host(&name).await?.map(ReplicaAddr::Tcp).collect();
            let host = host_of(&name);
            let mut hosts = hosts.lock().unwrap_or_else(|p| p.into_inner());
            for addr in &addrs {
                hosts.insert(addr.clone(), host.clone());
            }
            Ok(addrs)
        })
    }
}

/// A client over the Unix socket a TCP loader named in its catalog, if that socket is reachable
/// from here and answers as the same loader process (its `instance_id`).
///
/// # Errors
/// Why the client stays on TCP: no socket there, it refused the connection, or it belongs to
/// another loader.
async fn same_host_client(same_host: &SameHost, options: &ConnectOptions) -> Result<Client, String> {
    let path = std::path::Path::new(&same_host.unix_socket);
    if !path.is_absolute() {
        return Err("the socket path is not absolute".to_owned());
    }
    let addr = ReplicaAddr::Unix(std::sync::Arc::from(path));
    let name = addr.to_string();
    let mut client = connect(&addr, "localhost", options).await.map_err(|e| crate::error::chain(&e))?;
    let catalog = list_datasets(&mut client, &name, options).await.map_err(|e| crate::error::chain(&e))?;
    match catalog.same_host {
        Some(there) if there.instance_id == same_host.instance_id => Ok(client),
        _ => Err("the socket belongs to another loader".to_owned()),
    }
}

/// A `unix:PATH` loader: the socket, or for a directory (where scaled replicas each put
/// `loader-HOSTNAME.sock`) every socket in it, sorted; re-read at every resolve, so replicas
/// join and leave as their sockets come and go.
///
/// # Errors
/// When a directory holds no socket yet (the resolver then keeps its last answer).
async fn unix_sockets(addr: ReplicaAddr) -> std::io::Result<Vec<ReplicaAddr>> {
    let ReplicaAddr::Unix(path) = &addr else { return Ok(vec![addr]) };
    if !path.is_dir() {
        return Ok(vec![addr]);
    }
    let dir = path.to_path_buf();
    let list = move || -> std::io::Result<Vec<ReplicaAddr>> {
        use std::os::unix::fs::FileTypeExt;
        let mut sockets = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_socket() {
                sockets.push(ReplicaAddr::Unix(std::sync::Arc::from(entry.path())));
            }
        }
        sockets.sort();
        if sockets.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no loader socket in {} yet", dir.display()),
            ));
        }
        Ok(sockets)
    };
    tokio::task::spawn_blocking(list).await.map_err(std::io::Error::other)?
}

/// What connection tasks and the resolver report to the pool.
#[derive(Debug)]
pub(crate) enum Event {
    /// A `--loader` name (by position) resolved.
    Resolved { spec: usize, addrs: Vec<ReplicaAddr> },
    /// A connection is open; the pool checks its catalog before using it.
    Up { addr: ReplicaAddr, generation: u64, datasets: Vec<DatasetInfo>, requests_tx: mpsc::Sender<BatchRequest> },
    /// An answer arrived.
    Answer { addr: ReplicaAddr, generation: u64, response: BatchResponse },
    /// A connection failed or ended.
    Down { addr: ReplicaAddr, generation: u64, error: ClientError },
}

/// One connection attempt to one replica: after `delay`, open it and forward its answers until
/// the stream ends. The pool aborts the task when it drops the connection.
pub(crate) async fn run_connection(
    connector: Arc<dyn Connector>,
    addr: ReplicaAddr,
    generation: u64,
    delay: Duration,
    window: usize,
    events_tx: mpsc::Sender<Event>,
) {
    tokio::time::sleep(delay).await;
    let ReplicaStream { datasets, requests_tx, mut responses } = match connector.open(addr.clone(), window).await {
        Ok(opened) => opened,
        Err(error) => {
            let _ = events_tx.send(Event::Down { addr, generation, error }).await;
            return;
        }
    };
    if events_tx.send(Event::Up { addr: addr.clone(), generation, datasets, requests_tx }).await.is_err() {
        return;
    }
    let error = loop {
        match responses.next().await {
            Some(Ok(response)) => {
                if events_tx.send(Event::Answer { addr: addr.clone(), generation, response }).await.is_err() {
                    return;
                }
            }
            None => break ClientError::StreamEnded { addr: addr.to_string() },
            Some(Err(source)) => break ClientError::Rpc { addr: addr.to_string(), status: Box::new(source) },
        }
    };
    let _ = events_tx.send(Event::Down { addr, generation, error }).await;
}
