//! Conveyor's loader server: opens datasets — directories of memory-mapped `.npy` fields, or
//! chunked, compressed Zarr arrays and groups — and serves ready-made batches over the
//! `conveyor.v1.Loader` gRPC service, with the standard gRPC health service beside it.
//!
//! [`open`] loads and validates every dataset (start-up errors name the file and the fix);
//! [`run`] serves a whole loader on already bound [`Listeners`] (gRPC, the Unix socket, the
//! metrics endpoint, the token reload on SIGHUP, the allocator's trim) until `shutdown`
//! resolves, then drains; [`serve`] is its gRPC server alone.

#[allow(unsafe_code)]
pub mod allocator;
pub mod config;
pub mod dataset;
pub mod error;
pub mod metrics;
pub mod serve;
pub mod storage;
pub mod transform;

use std::{future::Future, sync::Arc};

use dataset::chunk_cache::ChunkCache;
use serve::{auth, batch_route, connection, tls};

use conveyor_proto::v1_gather::loader_server::LoaderServer;
use tokio::{net::TcpListener, sync::watch};
use tonic::service::interceptor::InterceptedService;

pub use config::Config;
pub use dataset::Dataset;
pub use error::{LoadError, RequestError};
pub use serve::{service::LoaderService, state::LoaderState, tls::tls_config};

/// Why the loader could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A dataset could not be opened.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The flags contradict each other.
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// The token file cannot be used.
    #[error(transparent)]
    Tokens(#[from] auth::TokenFileError),
    /// A TLS file cannot be read.
    #[error("cannot read {flag} {}", path.display())]
    TlsFile {
        /// The flag naming it.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// A TLS file is not PEM.
    #[error("{flag} {} is not a PEM file; give a PEM certificate or key", path.display())]
    NotPem {
        /// The flag naming it.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The threads object-store requests run on cannot be started.
    #[error("cannot start the object-storage I/O threads")]
    IoThreads(#[source] std::io::Error),
    /// A signal the loader acts on cannot be listened for.
    #[error("cannot listen for {signal} ({purpose})")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// What the loader does on it.
        purpose: &'static str,
        /// Why.
        #[source]
        error: std::io::Error,
    },
}

/// Validates `config` and opens every dataset it names.
///
/// # Errors
/// [`ServeError::Config`] for contradicting flags, [`ServeError::Load`] for a dataset that
/// cannot be served.
pub fn open(config: Config) -> Result<Arc<LoaderState>, ServeError> {
    config.validate()?;
    let mut datasets = Vec::new();
    let disk_cache = match &config.disk_cache {
        Some(dir) => Some(Arc::new(storage::disk_cache::DiskCache::open(
            dir,
            config.disk_cache_bytes,
            config.disk_cache_open_files,
        )?)),
        None => None,
    };
    let io = storage::object::IoRuntime::start().map_err(ServeError::IoThreads)?;
    let store_options = config.store_options(disk_cache, io);
    for spec in config.dataset_specs()? {
        let (name, dir) = (&spec.name, &spec.path);
        let location = storage::Location::parse(name, &dir.to_string_lossy(), &store_options)?;
        let zarr_options = dataset::zarr::ZarrOptions {
            missing: config.zarr_missing_chunks,
            max_vlen_chunk_bytes: config.max_vlen_chunk_bytes,
        };
        let dataset = match &location {
            storage::Location::Local(path) if dataset::tokens::is_token_file(path) => {
                dataset::tokens::open_bin(name, path, spec.token_dtype)?
            }
            _ => Dataset::open(name, &location, zarr_options, spec.fields.as_deref())?,
        };
        let dataset = match (spec.window, spec.pack) {
            (Some(_), Some(_)) => {
                let problem = "--windows and --pack both name it; use one".to_owned();
                return Err(LoadError::Tokens { dataset: name.clone(), problem }.into());
            }
            (Some(length), None) => dataset::tokens::into_windows(dataset, length)?,
            (None, Some(options)) => dataset::tokens::into_packed(dataset, options)?,
            (None, None) => dataset,
        };
        for field in &dataset.fields {
            conveyor_proto::check_field_name(&field.name)
                .map_err(|problem| LoadError::BadFieldName { dataset: name.clone(), problem })?;
        }
        for coordinate in &dataset.coordinates {
            tracing::info!(
                dataset = %name,
                array = %coordinate.name,
                role = coordinate.role.as_str(),
                dtype = %coordinate.dtype,
                shape = ?coordinate.shape,
                dims = ?coordinate.dims,
                reason = %coordinate.reason,
                "array not served as a field"
            );
        }
        tracing::info!(
            dataset = %name,
            dir = %dir.display(),
            metadata = dataset.metadata_source.unwrap_or("files"),
            num_samples = dataset.num_samples,
            bytes_per_sample = dataset.bytes_per_sample(),
            fields = ?dataset.fields.iter().map(|f| {
                let ragged = if f.is_ragged() { " ragged" } else { "" };
                format!("{}:{}{:?}{ragged}", f.name, f.dtype.name(), f.sample_shape)
            }).collect::<Vec<_>>(),
            "dataset opened"
        );
        datasets.push(Arc::new(dataset));
    }
    let cache = ChunkCache::new(config.chunk_cache_bytes, config.decode_threads.get());
    let derived = transform::open_derived(&config, &datasets, &cache)?;
    for derived in &derived {
        tracing::info!(
            dataset = %derived.name,
            derivation = %derived.derivation,
            fields = ?derived.schema.iter().map(transform::FieldSchema::describe).collect::<Vec<_>>(),
            "derived dataset ready"
        );
    }
    let tokens = match &config.auth_token_file {
        Some(path) => Some(Arc::new(auth::Tokens::load(path)?)),
        None => None,
    };
    // Read the TLS files now, so that a wrong path or PEM stops the loader at start-up.
    tls_config(&config)?;
    tls::warn_if_not_valid(&config);
    Ok(Arc::new(LoaderState::new(datasets, derived, cache, tokens, config)))
}

/// The sockets a loader serves on, bound by the caller (so that tests bind port 0 and read the
/// addresses back).
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC listener (`--listen`).
    pub grpc: TcpListener,
    /// The same-host Unix socket (`--listen-unix`), if any.
    pub unix: Option<tokio::net::UnixListener>,
    /// The Prometheus endpoint (`--metrics-listen`), if any.
    pub metrics: Option<TcpListener>,
}

/// Runs a loader until `shutdown` resolves, then drains: the gRPC server on both listeners,
/// the metrics endpoint, the token file reloaded on SIGHUP, and the allocator kept within
/// `--allocator-retain-bytes`. Returns once the server and the metrics endpoint have stopped.
///
/// # Errors
/// [`ServeError::Signal`] when SIGHUP cannot be listened for (with a token file), and
/// [`ServeError::Transport`] when the gRPC server fails.
pub async fn run(
    listeners: Listeners,
    state: Arc<LoaderState>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Listeners { grpc, unix, metrics } = listeners;
    // Dropped or set when the server stops; ends the tasks beside it.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut stop_rx: watch::Receiver<bool>| async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    #[cfg(unix)]
    if let Some(tokens) = state.tokens().cloned() {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|error| ServeError::Signal { signal: "SIGHUP", purpose: "--auth-token-file reloads", error })?;
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    Some(()) = hangup.recv() => match tokens.reload() {
                        Ok(count) => tracing::info!(file = %tokens.path().display(), count, "SIGHUP: reloaded the tokens"),
                        Err(error) => tracing::error!(%error, "SIGHUP: keeping the tokens in use"),
                    },
                }
            }
        });
    }
    let retain_state = state.clone();
    let retain_stop = stopped(stop_rx.clone());
    tokio::spawn(async move {
        let limit = retain_state.config().allocator_retain_bytes;
        allocator::run(limit, &retain_state.stats.allocator, retain_stop).await;
    });
    let metrics_task =
        metrics.map(|listener| tokio::spawn(metrics::serve_metrics(listener, state.clone(), stopped(stop_rx))));
    let result = serve_with_unix(grpc, unix, state, shutdown).await;
    stop_tx.send_replace(true);
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    result
}

/// What the loader tells clients about its same-host path: the Unix socket's absolute path and
/// a random id for this process. `None` without shared memory (`--shm-bytes 0`: moving to the
/// socket would gain nothing) or when the socket's path cannot be named.
fn same_host(unix: &tokio::net::UnixListener, config: &Config) -> Option<conveyor_proto::v1::SameHost> {
    if config.shm_bytes == 0 {
        return None;
    }
    let local = unix.local_addr().ok()?;
    let path = std::path::absolute(local.as_pathname()?).ok()?;
    let mut id = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).ok()?;
    Some(conveyor_proto::v1::SameHost {
        unix_socket: path.to_string_lossy().into_owned(),
        instance_id: u64::from_le_bytes(id),
    })
}

/// Says loudly at start-up when the loader can be reached from other hosts without TLS or
/// without tokens.
fn warn_if_exposed(listener: &TcpListener, config: &Config, has_tokens: bool) {
    let Ok(local) = listener.local_addr() else { return };
    if local.ip().is_loopback() {
        return;
    }
    let tls = config.tls_cert.is_some();
    match (tls, has_tokens) {
        (false, false) => tracing::warn!(
            %local,
            "THIS LOADER IS OPEN: it listens beyond loopback with neither TLS nor tokens, so anyone who reaches \
             {local} can list and stream every dataset in clear text; set --tls-cert/--tls-key and --auth-token-file, \
             or listen on 127.0.0.1"
        ),
        (false, true) => tracing::warn!(
            %local,
            "tokens and batches travel in clear text: this loader listens beyond loopback without TLS; set --tls-cert/--tls-key"
        ),
        (true, false) => tracing::warn!(
            %local,
            "this loader listens beyond loopback with TLS but no tokens or client certificates: anyone who reaches it \
             can stream every dataset; set --auth-token-file or --tls-client-ca"
        ),
        (true, true) => {}
    }
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains: health turns
/// NOT_SERVING, new streams are refused, streams finish the batches they have read and end with
/// UNAVAILABLE, and the server exits within `--drain-timeout`.
///
/// # Errors
/// [`ServeError::Transport`] when the gRPC server fails.
pub async fn serve(
    listener: TcpListener,
    state: Arc<LoaderState>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_with_unix(listener, None, state, shutdown).await
}

/// [`serve`], and also on a Unix socket (`--listen-unix`) for trainers on the same host: the
/// same service without TLS, whose connections may ask for a shared-memory region.
///
/// # Errors
/// [`ServeError::Transport`] when either gRPC server fails.
pub async fn serve_with_unix(
    listener: TcpListener,
    unix: Option<tokio::net::UnixListener>,
    state: Arc<LoaderState>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let config = state.config().clone();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<LoaderServer<LoaderService>>().await;
    let (draining_tx, draining_rx) = watch::channel(false);
    // Held until `serve` returns, so that streams read only `true` as the drain, never a drop.
    let draining_tx = Arc::new(draining_tx);
    let signal_draining_tx = draining_tx.clone();
    let (drain_started_tx, drain_started_rx) = tokio::sync::oneshot::channel::<()>();

    warn_if_exposed(&listener, &config, state.tokens().is_some() || config.tls_client_ca.is_some());
    let same_host = unix.as_ref().and_then(|unix| same_host(unix, &config));
    let loader = |draining_rx| {
        let service = LoaderService::new(state.clone(), draining_rx).with_same_host(same_host.clone());
        let route = batch_route::BatchRoute::new(
            service,
            serve::stream::request_limit_bytes(&config),
            config.max_message_bytes(),
        );
        InterceptedService::new(route, auth::TokenCheck::new(state.tokens().cloned(), state.stats.clone()))
    };
    let unix_draining_rx = draining_rx.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!(drain_timeout = ?config.drain_timeout, "draining: refusing new streams, finishing in-flight batches");
        health_reporter.set_not_serving::<LoaderServer<LoaderService>>().await;
        signal_draining_tx.send_replace(true);
        let _ = drain_started_tx.send(());
    };
    let limits = connection::ConnectionLimits {
        max_connections: config.max_connections.get(),
        handshake_timeout: config.handshake_timeout,
        idle_timeout: config.idle_timeout,
    };
    let http2 = |builder: tonic::transport::Server| {
        builder
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .max_concurrent_streams(u32::try_from(config.max_streams_per_connection.get()).unwrap_or(u32::MAX))
            .initial_stream_window_size(config.http2_stream_window)
            .initial_connection_window_size(config.http2_connection_window)
            .max_frame_size(config.http2_max_frame)
    };
    // The Unix socket's server: no TLS, and it stops when the drain starts (its streams drain
    // like the TCP ones, through the same watch).
    let unix_server = unix.map(|unix| {
        let access = connection::UnixAccess {
            allow_uid: config.unix_allow_uid.clone(),
            shm_bytes: config.shm_bytes,
            max_shm_bytes: config.max_shm_bytes,
        };
        let incoming = connection::incoming_unix(unix, limits, access, state.stats.clone());
        let mut draining = unix_draining_rx.clone();
        let stop = async move {
            let _ = draining.wait_for(|draining| *draining).await;
        };
        http2(tonic::transport::Server::builder())
            .add_service(health_service.clone())
            .add_service(loader(unix_draining_rx))
            .serve_with_incoming_shutdown(incoming, stop)
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&config)? {
        builder = builder.tls_config(tls)?;
    }
    let incoming = connection::incoming(listener, limits, state.stats.clone());
    let server = http2(builder)
        .add_service(health_service)
        .add_service(loader(draining_rx))
        .serve_with_incoming_shutdown(incoming, signal);
    let unix_task = unix_server.map(tokio::spawn);
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result.map_err(ServeError::from),
        _ = drain_started_rx => match tokio::time::timeout(config.drain_timeout, server).await {
            Ok(result) => result.map_err(ServeError::from),
            Err(_) => {
                tracing::warn!(drain_timeout = ?config.drain_timeout, "drain timeout reached; exiting with streams still open");
                Ok(())
            }
        },
    };
    if let Some(task) = unix_task {
        // The drain has started (or the TCP server failed): give the Unix server what is left of
        // the drain timeout, then stop it.
        draining_tx.send_replace(true);
        match tokio::time::timeout(config.drain_timeout, task).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the Unix-socket server failed"),
            Ok(_) => {}
            Err(_) => tracing::warn!("drain timeout reached on the Unix socket; exiting with streams still open"),
        }
    }
    drop(draining_tx);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_proto::v1::{ListDatasetsRequest, loader_client::LoaderClient};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn run_serves_grpc_and_metrics_on_bound_listeners_until_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut x = conveyor_proto::npy_header(conveyor_proto::DType::Uint8, &[4, 2]);
        x.extend_from_slice(&[0; 8]);
        std::fs::write(dir.path().join("x.npy"), x).expect("x.npy");
        let state = open(Config::for_datasets([format!("d={}", dir.path().display())])).expect("opens");
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (grpc_addr, metrics_addr) = (grpc.local_addr().expect("addr"), metrics.local_addr().expect("addr"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        let listeners = Listeners { grpc, unix: None, metrics: Some(metrics) };
        let loader = tokio::spawn(run(listeners, state, shutdown));

        let mut client = LoaderClient::connect(format!("http://{grpc_addr}")).await.expect("connects");
        let listed = client.list_datasets(ListDatasetsRequest {}).await.expect("lists").into_inner();
        assert_eq!(listed.datasets.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["d"]);
        let mut http = tokio::net::TcpStream::connect(metrics_addr).await.expect("metrics connects");
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("asks");
        let mut page = String::new();
        http.read_to_string(&mut page).await.expect("reads");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("conveyor_loader_"), "the loader's counters: {page}");

        drop(client);
        stop_tx.send(()).expect("loader still running");
        loader.await.expect("joins").expect("stops cleanly");
        assert!(tokio::net::TcpStream::connect(metrics_addr).await.is_err(), "the metrics endpoint stopped too");
    }
}
