//! Connections to one loader: transport tuning (TLS, tokens, HTTP/2 windows) over an address
//! [`crate::addr`] parsed.

use std::{path::Path, time::Duration};

use conveyor_proto::v1::loader_client::LoaderClient;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    addr::{ReplicaAddr, first_reachable, host_of, loader_uses_tls, parse_loader},
    error::ClientError,
};

/// A channel to one loader whose every call carries the bearer token, when there is one.
pub(crate) type Service = InterceptedService<Channel, AuthHeader>;

/// A connection to one loader: the generated client for the describe calls, and the channel
/// itself for the batch stream ([`crate::batch_stream`] decodes it without tonic's copy).
#[derive(Debug, Clone)]
pub(crate) struct Client {
    /// The generated client, with the message limits.
    pub loader: LoaderClient<Service>,
    /// The same channel, for calls made without the generated client.
    pub service: Service,
}

/// TLS settings for loader connections, as PEM bytes.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// CA certificates that sign the loaders' certificates; the system's roots when `None`.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and private key, for loaders that require mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the loaders' certificates must carry; each loader's host name when `None`.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<certificate and key>"))
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsOptions {
    /// Reads the PEM files of `--tls-ca`, `--tls-cert` and `--tls-key`.
    ///
    /// # Errors
    /// [`ClientError::TlsFile`] naming the flag and file.
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<TlsOptions, ClientError> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read(path).map_err(|error| ClientError::TlsFile { flag, path: path.to_owned(), error })
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read("--tls-cert", cert)?, read("--tls-key", key)?)),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => return Err(ClientError::TlsIdentityHalf),
        };
        Ok(TlsOptions { ca_pem: ca.map(|ca| read("--tls-ca", ca)).transpose()?, identity, domain: None })
    }

    fn config(&self, host: &str) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().domain_name(self.domain.clone().unwrap_or_else(|| host.to_owned()));
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }
}

/// A bearer token sent with every call (`authorization: Bearer ...`); never printed.
#[derive(Clone)]
pub struct AuthToken(MetadataValue<Ascii>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl AuthToken {
    /// Environment variable read when no token file is given.
    pub const ENV: &'static str = "CONVEYOR_AUTH_TOKEN";

    /// A token given as text.
    ///
    /// # Errors
    /// [`ClientError::BadToken`] when it is empty or not printable ASCII.
    pub fn new(token: &str) -> Result<AuthToken, ClientError> {
        let token = token.trim();
        let value = format!("Bearer {token}");
        match MetadataValue::try_from(value.as_str()) {
            Ok(value) if !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()) => Ok(AuthToken(value)),
            _ => Err(ClientError::BadToken { source_name: "the token".into() }),
        }
    }

    /// The first token in `path` (blank lines and `#` comments skipped).
    ///
    /// # Errors
    /// [`ClientError::TlsFile`]-like [`ClientError::TokenFile`] when it cannot be read,
    /// [`ClientError::BadToken`] when it holds no usable token.
    pub fn from_file(path: &Path) -> Result<AuthToken, ClientError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ClientError::TokenFile { path: path.to_owned(), error })?;
        let token = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
        AuthToken::new(token).map_err(|_| ClientError::BadToken { source_name: path.display().to_string() })
    }

    /// The token in `$CONVEYOR_AUTH_TOKEN`, if set.
    ///
    /// # Errors
    /// [`ClientError::BadToken`] when it is set but unusable.
    pub fn from_env() -> Result<Option<AuthToken>, ClientError> {
        match std::env::var(Self::ENV) {
            Ok(token) => {
                AuthToken::new(&token).map(Some).map_err(|_| ClientError::BadToken { source_name: Self::ENV.into() })
            }
            Err(_) => Ok(None),
        }
    }
}

/// Adds the token to every call.
#[derive(Debug, Clone)]
pub(crate) struct AuthHeader(Option<AuthToken>);

impl Interceptor for AuthHeader {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(AuthToken(value)) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Transport settings for every loader connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Largest gRPC message accepted; bounds the size of one received batch.
    pub max_message_bytes: usize,
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long one unary call may take (the catalog asked for on every connection, `info`): a
    /// loader that accepts a connection but never answers is reported, not waited for.
    pub call_timeout: Duration,
    /// HTTP/2 per-stream receive window.
    pub http2_stream_window: u32,
    /// HTTP/2 per-connection receive window.
    pub http2_connection_window: u32,
    /// Largest HTTP/2 frame the client accepts (16 KiB to 16 MiB - 1); the loader sends data
    /// frames up to this size. A batch that arrives in one frame is decoded in place (its
    /// tensors borrow the frame); one split across frames is copied once, so the default is the
    /// largest HTTP/2 allows. A frame is held until the last batch cut from it is dropped.
    pub http2_max_frame: u32,
    /// TLS for every loader connection (`https://` loaders); plain HTTP/2 when `None`.
    pub tls: Option<TlsOptions>,
    /// Bearer token for loaders started with `--auth-token-file`.
    pub auth_token: Option<AuthToken>,
    /// Largest shared-memory region to map per connection to a loader on this host (`unix:`, or
    /// a TCP loader whose socket the client finds; 0: none, every batch comes over the socket or
    /// TCP). The client's mapped memory is at most this per such loader.
    pub shm_bytes: u64,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            max_message_bytes: conveyor_proto::DEFAULT_MAX_MESSAGE_BYTES,
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            http2_stream_window: 16 << 20,
            http2_connection_window: 64 << 20,
            http2_max_frame: (1 << 24) - 1,
            tls: None,
            auth_token: None,
            shm_bytes: if crate::shm::enabled_by_env() { 256 << 20 } else { 0 },
        }
    }
}

/// Turns TLS on for every loader when one is given as `https://` (with the system's roots unless
/// `options` already has TLS settings), and refuses a plain `http://` loader beside TLS.
///
/// # Errors
/// [`ClientError::MixedTls`] naming the plain loader.
pub(crate) fn settle_tls(loaders: &[String], options: &mut ConnectOptions) -> Result<(), ClientError> {
    if options.tls.is_none() && loaders.iter().any(|l| loader_uses_tls(l)) {
        options.tls = Some(TlsOptions::default());
    }
    if let Some(plain) = loaders.iter().find(|l| options.tls.is_some() && l.starts_with("http://")) {
        return Err(ClientError::MixedTls { spec: plain.clone() });
    }
    Ok(())
}

/// A channel to one loader (`host:port`, `http://` or `https://host:port`) with `options`'
/// transport settings, for calls outside the Loader service (the health check).
///
/// # Errors
/// [`ClientError::BadAddress`], [`ClientError::MixedTls`] or [`ClientError::Connect`].
pub async fn open_channel(loader: &str, options: &ConnectOptions) -> Result<Channel, ClientError> {
    let mut options = options.clone();
    settle_tls(&[loader.to_owned()], &mut options)?;
    let name = parse_loader(loader)?;
    let host = host_of(&name);
    first_reachable(&name, |addr| {
        let (host, options) = (&host, &options);
        async move { channel(&addr, host, options).await }
    })
    .await
}

/// Opens a tuned connection to the loader at `addr`; `host` is the name its TLS certificate
/// must carry.
///
/// # Errors
/// [`ClientError::Connect`] when the loader cannot be reached.
pub(crate) async fn connect(addr: &ReplicaAddr, host: &str, options: &ConnectOptions) -> Result<Client, ClientError> {
    let channel = channel(addr, host, options).await?;
    let service = InterceptedService::new(channel, AuthHeader(options.auth_token.clone()));
    let loader = LoaderClient::new(service.clone())
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes);
    Ok(Client { loader, service })
}

async fn channel(addr: &ReplicaAddr, host: &str, options: &ConnectOptions) -> Result<Channel, ClientError> {
    let tcp = match addr {
        ReplicaAddr::Tcp(tcp) => tcp,
        ReplicaAddr::Unix(path) => {
            return unix_channel(path.clone(), options)
                .await
                .map_err(|source| ClientError::Connect { addr: addr.to_string(), source });
        }
    };
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{tcp}"))
        .map_err(|_| ClientError::BadAddress { spec: addr.to_string() })?;
    if let Some(tls) = &options.tls {
        endpoint = endpoint
            .tls_config(tls.config(host))
            .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
    }
    let endpoint = endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(options.http2_stream_window)
        .initial_connection_window_size(options.http2_connection_window)
        .max_frame_size(options.http2_max_frame);
    // connect_timeout bounds the TCP connect only; the TLS and HTTP/2 handshakes after it get as
    // long again, so that a peer which accepts and then says nothing cannot hold the client.
    let timeout = options.connect_timeout * 2;
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(channel) => channel.map_err(|source| ClientError::Connect { addr: addr.to_string(), source }),
        Err(_) => Err(ClientError::ConnectTimeout { addr: addr.to_string(), timeout }),
    }
}

/// A channel to a loader's Unix socket (plain HTTP/2: the socket never leaves the host), whose
/// connections ask for a shared-memory region of `options.shm_bytes`.
async fn unix_channel(
    path: std::sync::Arc<Path>,
    options: &ConnectOptions,
) -> Result<Channel, tonic::transport::Error> {
    let (shm_bytes, timeout) = (options.shm_bytes, options.connect_timeout);
    // The URI is required but unused: the connector below decides where to connect.
    let endpoint = Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .initial_stream_window_size(options.http2_stream_window)
        .initial_connection_window_size(options.http2_connection_window)
        .max_frame_size(options.http2_max_frame);
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let connection = crate::shm::connect_unix(&path, shm_bytes, timeout).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(connection))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_turns_tls_on_and_plain_http_beside_it_is_refused() {
        let mut options = ConnectOptions::default();
        settle_tls(&["a:1".into()], &mut options).expect("plain");
        assert!(options.tls.is_none());
        settle_tls(&["https://a:1".into(), "b:1".into()], &mut options).expect("tls");
        assert!(options.tls.is_some());
        let error = settle_tls(&["https://a:1".into(), "http://b:1".into()], &mut options).expect_err("mixed");
        assert!(error.to_string().contains("http://b:1"), "{error}");
    }

    #[test]
    fn tokens_are_never_printed() {
        let token = AuthToken::new(" s3cret-token ").expect("token");
        let options = ConnectOptions { auth_token: Some(token), ..ConnectOptions::default() };
        assert!(!format!("{options:?}").contains("s3cret"));
        assert!(AuthToken::new("").is_err());
        assert!(AuthToken::new("two words").is_err());
    }
}
