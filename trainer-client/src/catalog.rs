//! What loaders serve: their catalogs (the ListDatasets call), how two catalogs differ, and the
//! block length dispatch and block shuffle use.

use conveyor_proto::v1::{DatasetInfo, ListDatasetsRequest, ListDatasetsResponse};

use crate::{
    addr::{first_reachable, host_of, parse_loader},
    client::{Client, ConnectOptions, connect, settle_tls},
    error::ClientError,
};

/// The datasets one loader serves (`host:port` or `http://host:port`), as `trainer-client info`
/// prints them.
///
/// # Errors
/// [`ClientError::BadAddress`], [`ClientError::Unresolved`], [`ClientError::Connect`] or
/// [`ClientError::Rpc`], naming it.
pub async fn fetch_catalog(loader: &str, options: &ConnectOptions) -> Result<Vec<DatasetInfo>, ClientError> {
    let mut options = options.clone();
    settle_tls(&[loader.to_owned()], &mut options)?;
    let name = parse_loader(loader)?;
    let host = host_of(&name);
    let mut client = first_reachable(&name, |addr| {
        let (host, options) = (&host, &options);
        async move { connect(&addr, host, options).await }
    })
    .await?;
    Ok(list_datasets(&mut client, &name, &options).await?.datasets)
}

/// The datasets a loader serves.
///
/// # Errors
/// [`ClientError::Rpc`] when the call fails.
pub(crate) async fn list_datasets(
    client: &mut Client,
    addr: &str,
    options: &ConnectOptions,
) -> Result<ListDatasetsResponse, ClientError> {
    let call = client.loader.list_datasets(ListDatasetsRequest {});
    let answer = tokio::time::timeout(options.call_timeout, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "no answer to ListDatasets within {:?}; check that {addr} is a Conveyor loader and that it is not stalled",
            options.call_timeout
        )))
    });
    let response = answer.map_err(|status| {
        // What a plain-text client sees of a TLS loader: say what to change.
        let message = status.message();
        let status = if options.tls.is_none()
            && (message.contains("h2 protocol error") || message.contains("transport error"))
        {
            tonic::Status::new(
                status.code(),
                format!(
                    "{}; if this loader serves TLS, give it as https://{addr} (with --tls-ca when its CA is not a system root)",
                    status.message()
                ),
            )
        } else if options.tls.as_ref().is_some_and(|tls| tls.identity.is_none())
            && (status.code() == tonic::Code::Cancelled
                || (status.code() == tonic::Code::Unknown && message.contains("transport error")))
        {
            // What a client without a certificate sees of a loader that requires one: the
            // handshake completes, then the loader closes the connection. Said as the refusal
            // it is, so the connect fails at once rather than after --unavailable-timeout.
            tonic::Status::permission_denied(format!(
                "{}: the loader closed the TLS connection after the handshake, as a loader that requires client \
                 certificates (mutual TLS) does when none is given; give --tls-cert and --tls-key",
                status.message()
            ))
        } else {
            status
        };
        ClientError::Rpc { addr: addr.to_owned(), status: Box::new(status) }
    })?;
    Ok(response.into_inner())
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
    use std::time::Duration;

    use super::*;

    /// A peer that takes connections and never says a word (what a loader serving TLS looks like
    /// to some plain-text clients, or a wrong port): the catalog call is reported, not awaited.
    #[tokio::test]
    async fn a_silent_peer_is_reported_within_the_timeouts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let options = ConnectOptions {
            connect_timeout: Duration::from_millis(200),
            call_timeout: Duration::from_millis(300),
            ..ConnectOptions::default()
        };
        let answer = tokio::time::timeout(Duration::from_secs(30), fetch_catalog(&addr, &options)).await;
        let error = answer.expect("an answer, not a hang").expect_err("a silent peer serves no catalog");
        let text = crate::error::chain(&error);
        assert!(text.contains(&addr) && text.contains("within"), "{text}");
        hold.abort();
    }
}
