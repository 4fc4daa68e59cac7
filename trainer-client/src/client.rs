//! Connections to one loader: address parsing, transport tuning, and the describe calls.

use std::time::Duration;

use conveyor_proto::v1::{DatasetInfo, ListDatasetsRequest, loader_client::LoaderClient};
use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;

/// Transport settings for every loader connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Largest gRPC message accepted; bounds the size of one received batch.
    pub max_message_bytes: usize,
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// HTTP/2 per-stream receive window.
    pub http2_stream_window: u32,
    /// HTTP/2 per-connection receive window.
    pub http2_connection_window: u32,
    /// Largest HTTP/2 frame the client accepts; the loader sends data frames up to this size,
    /// so large frames cut per-frame overhead on big batches.
    pub http2_max_frame: u32,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            max_message_bytes: conveyor_proto::DEFAULT_MAX_MESSAGE_BYTES,
            connect_timeout: Duration::from_secs(5),
            http2_stream_window: 16 << 20,
            http2_connection_window: 64 << 20,
            http2_max_frame: 1 << 20,
        }
    }
}

/// Strips an optional `http://` from a `--loader` value and checks it is `host:port`.
///
/// # Errors
/// [`ClientError::BadAddress`] naming the value.
pub fn parse_loader(spec: &str) -> Result<String, ClientError> {
    let bad = || ClientError::BadAddress { spec: spec.to_owned() };
    let rest = spec.strip_prefix("http://").unwrap_or(spec).trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() || rest.contains('/') {
        return Err(bad());
    }
    Ok(rest.to_owned())
}

/// The datasets one loader serves (`host:port` or `http://host:port`), as `trainer-client info`
/// prints them.
///
/// # Errors
/// [`ClientError::BadAddress`], [`ClientError::Connect`] or [`ClientError::Rpc`], naming it.
pub async fn fetch_catalog(loader: &str, options: &ConnectOptions) -> Result<Vec<DatasetInfo>, ClientError> {
    let addr = parse_loader(loader)?;
    let mut client = connect(&addr, options).await?;
    list_datasets(&mut client, &addr).await
}

/// Opens a tuned connection to the loader at `host:port`.
///
/// # Errors
/// [`ClientError::Connect`] when the loader cannot be reached.
pub(crate) async fn connect(addr: &str, options: &ConnectOptions) -> Result<LoaderClient<Channel>, ClientError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ClientError::BadAddress { spec: addr.to_owned() })?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(options.http2_stream_window)
        .initial_connection_window_size(options.http2_connection_window)
        .max_frame_size(options.http2_max_frame);
    let channel = endpoint.connect().await.map_err(|source| ClientError::Connect { addr: addr.to_owned(), source })?;
    Ok(LoaderClient::new(channel)
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes))
}

/// The datasets a loader serves.
///
/// # Errors
/// [`ClientError::Rpc`] when the call fails.
pub(crate) async fn list_datasets(
    client: &mut LoaderClient<Channel>,
    addr: &str,
) -> Result<Vec<DatasetInfo>, ClientError> {
    let response = client
        .list_datasets(ListDatasetsRequest {})
        .await
        .map_err(|source| ClientError::Rpc { addr: addr.to_owned(), status: Box::new(source) })?;
    Ok(response.into_inner().datasets)
}

/// Samples per block of a dataset: its longest chunk along the sample axis (1 when unchunked).
/// Block shuffle keeps chunks together in blocks of this length, and dispatch sends batches
/// sharing a block to the same replica.
pub fn block_len(info: &DatasetInfo) -> u64 {
    info.fields.iter().map(|f| f.chunk_len).max().unwrap_or(1).max(1)
}

/// Why two loaders' catalogs differ, if they do (ignoring per-loader limits).
pub(crate) fn catalog_difference(expected: &[DatasetInfo], found: &[DatasetInfo]) -> Option<String> {
    let key = |d: &DatasetInfo| {
        let fields: Vec<_> = d.fields.iter().map(|f| (f.name.clone(), f.dtype, f.sample_shape.clone())).collect();
        (d.name.clone(), d.num_samples, fields)
    };
    let mut a: Vec<_> = expected.iter().map(key).collect();
    let mut b: Vec<_> = found.iter().map(key).collect();
    a.sort();
    b.sort();
    if a == b {
        return None;
    }
    type Key = (String, u64, Vec<(String, i32, Vec<u64>)>);
    let summary = |v: &[Key]| {
        v.iter().map(|(name, n, f)| format!("{name}({n} samples, {} fields)", f.len())).collect::<Vec<_>>().join(", ")
    };
    Some(format!("expected [{}] but it serves [{}]", summary(&a), summary(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_addresses() {
        assert_eq!(parse_loader("127.0.0.1:7070").expect("valid"), "127.0.0.1:7070");
        assert_eq!(parse_loader("http://loader:7070/").expect("valid"), "loader:7070");
        assert!(parse_loader("loader").is_err());
        assert!(parse_loader("loader:port").is_err());
        assert!(parse_loader("http://a:1/x").is_err());
    }
}
