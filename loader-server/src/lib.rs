//! Conveyor's loader server: opens datasets — directories of memory-mapped `.npy` fields, or
//! chunked, compressed Zarr arrays and groups — and serves ready-made batches over the
//! `conveyor.v1.Loader` gRPC service, with the standard gRPC health service beside it.
//!
//! [`open`] loads and validates every dataset (start-up errors name the file and the fix);
//! [`serve`] runs on an already bound listener until `shutdown` resolves, then drains.

pub mod cache;
pub mod config;
pub mod dataset;
pub mod error;
pub mod metrics;
pub mod mmap;
pub mod npy;
pub mod service;
pub mod stats;
pub mod zarr;

use std::{future::Future, sync::Arc};

use conveyor_proto::v1::loader_server::LoaderServer;
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;
pub use dataset::Dataset;
pub use error::{LoadError, RequestError};
pub use service::{LoaderService, LoaderState};

/// Why the loader could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A dataset could not be opened.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The flags contradict each other.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Validates `config` and opens every dataset it names.
///
/// # Errors
/// [`ServeError::Config`] for contradicting flags, [`ServeError::Load`] for a dataset that
/// cannot be served.
pub fn open(config: Config) -> Result<Arc<LoaderState>, ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let mut datasets = Vec::new();
    for (name, dir) in config.dataset_specs()? {
        let dataset = Dataset::open(&name, &dir, config.zarr_missing_chunks)?;
        tracing::info!(
            dataset = %name,
            dir = %dir.display(),
            num_samples = dataset.num_samples,
            bytes_per_sample = dataset.bytes_per_sample(),
            fields = ?dataset.fields.iter().map(|f| format!("{}:{}{:?}", f.name, f.dtype.name(), f.sample_shape)).collect::<Vec<_>>(),
            "dataset opened"
        );
        datasets.push(dataset);
    }
    Ok(Arc::new(LoaderState::new(datasets, config)))
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
    let config = state.config().clone();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<LoaderServer<LoaderService>>().await;
    let (draining_tx, draining_rx) = watch::channel(false);
    // Held until `serve` returns, so that streams read only `true` as the drain, never a drop.
    let draining_tx = Arc::new(draining_tx);
    let signal_draining_tx = draining_tx.clone();
    let (drain_started_tx, drain_started_rx) = tokio::sync::oneshot::channel::<()>();

    let loader = LoaderServer::new(LoaderService::new(state, draining_rx))
        .max_encoding_message_size(config.max_message_bytes())
        .max_decoding_message_size(config.max_message_bytes());
    let signal = async move {
        shutdown.await;
        tracing::info!(drain_timeout = ?config.drain_timeout, "draining: refusing new streams, finishing in-flight batches");
        health_reporter.set_not_serving::<LoaderServer<LoaderService>>().await;
        signal_draining_tx.send_replace(true);
        let _ = drain_started_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(config.http2_stream_window)
        .initial_connection_window_size(config.http2_connection_window)
        .max_frame_size(config.http2_max_frame)
        .add_service(health_service)
        .add_service(loader)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
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
    drop(draining_tx);
    result
}
