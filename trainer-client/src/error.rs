//! Typed errors of the trainer client: one variant per cause, each naming the loader, dataset,
//! batch or flag at fault and keeping its source.

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

pub use conveyor_proto::v1::batch_error::Kind as BatchErrorKind;

/// Why connecting, planning or streaming could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No loader address was given.
    #[error("no --loader given; name at least one loader as host:port")]
    NoLoaders,
    /// A loader address is not `host:port` or `http://host:port`.
    #[error("--loader '{spec}' is not host:port, http://host:port or https://host:port")]
    BadAddress {
        /// The value as given.
        spec: String,
    },
    /// A TLS file cannot be read.
    #[error("cannot read {flag} {}: {error}", path.display())]
    TlsFile {
        /// The option naming the file.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Only one of the client certificate and its key was given.
    #[error("--tls-cert and --tls-key go together (mutual TLS); give both or neither")]
    TlsIdentityHalf,
    /// A plain `http://` loader beside TLS settings.
    #[error(
        "--loader '{spec}' is plain http:// but TLS is on (an https:// loader or --tls-ca is given); use https:// for every loader or for none"
    )]
    MixedTls {
        /// The plain loader.
        spec: String,
    },
    /// The token file cannot be read.
    #[error("cannot read --auth-token-file {}: {error}", path.display())]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A token that cannot be sent in a gRPC header.
    #[error("{source_name} holds no usable token; give one token of printable ASCII without spaces")]
    BadToken {
        /// Where the token came from (a file or the environment variable).
        source_name: String,
    },
    /// A loader could not be reached.
    #[error("cannot connect to loader {addr}")]
    Connect {
        /// The loader address.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A `--loader` name resolves to no address.
    #[error("loader {spec} does not resolve to an address; check the host name")]
    Unresolved {
        /// The value as given.
        spec: String,
        /// The resolver's answer.
        #[source]
        source: std::io::Error,
    },
    /// A loader took the TCP connection but did not finish the TLS and HTTP/2 handshakes in time.
    #[error(
        "loader {addr} did not complete the connection handshake within {} (a loader serving TLS \
         reached without https://, or not a Conveyor loader?)",
        seconds(*timeout)
    )]
    ConnectTimeout {
        /// The loader address.
        addr: String,
        /// How long the client waited: twice `ConnectOptions::connect_timeout` (the TCP connect,
        /// then the handshakes).
        timeout: Duration,
    },
    /// A loader answered a call, or ended its batch stream, with an error status.
    #[error("loader {addr} failed: {}: {}", status.code(), status.message())]
    Rpc {
        /// The loader address.
        addr: String,
        /// The gRPC status (boxed: it is large, and errors travel in every `Result`). Not a
        /// `source`: its code and message are this error's text already, and its own `Display`
        /// repeats them.
        status: Box<tonic::Status>,
    },
    /// A loader closed its batch stream without an error.
    #[error("loader {addr} ended its batch stream")]
    StreamEnded {
        /// The loader address.
        addr: String,
    },
    /// A loader left a request unanswered for too long.
    #[error("loader {addr} sent no answer within {} (--request-timeout)", seconds(*timeout))]
    RequestTimeout {
        /// The loader address.
        addr: String,
        /// The request timeout.
        timeout: Duration,
    },
    /// A replica's name no longer resolves to its address.
    #[error("loader {addr} is no longer resolved by its --loader name")]
    Departed {
        /// The address that left.
        addr: String,
    },
    /// A replica serves other datasets than the first replica that answered.
    #[error("refused loader {addr}: it serves other datasets than the other replicas: {difference}")]
    CatalogMismatch {
        /// The refused replica.
        addr: String,
        /// How its datasets differ.
        difference: String,
    },
    /// The loaders hold no dataset of that name.
    #[error("unknown dataset '{name}'; the loaders serve: {}", available.join(", "))]
    UnknownDataset {
        /// Requested name.
        name: String,
        /// What the loaders serve.
        available: Vec<String>,
    },
    /// A batch would be larger than the client accepts in one message.
    #[error(
        "a batch of {batch_size} samples of '{dataset}' takes {batch_bytes} bytes, over the client's message limit of \
         {limit_bytes} bytes; lower --batch-size or raise --max-message-bytes"
    )]
    BatchOverMessageLimit {
        /// Dataset name.
        dataset: String,
        /// Samples per batch.
        batch_size: u64,
        /// Tensor bytes of one batch.
        batch_bytes: u64,
        /// `--max-message-bytes`.
        limit_bytes: usize,
    },
    /// A batch has more samples than the loaders serve in one request.
    #[error(
        "--batch-size {batch_size} is over the loaders' limit of {limit} samples per batch (their --max-batch-samples)"
    )]
    BatchOverLoaderLimit {
        /// Samples per batch.
        batch_size: u64,
        /// The loaders' limit.
        limit: u64,
    },
    /// A plan (from a cursor, say) was made for another size of the dataset.
    #[error("the plan is for {planned} samples but dataset '{dataset}' has {found}; start a fresh run")]
    DatasetSizeChanged {
        /// Dataset name.
        dataset: String,
        /// Samples the plan was made for.
        planned: u64,
        /// Samples the loaders serve now.
        found: u64,
    },
    /// A loader refused a batch.
    #[error("batch {batch} of epoch {epoch} was refused by loader {addr} ({}): {message}", kind.as_str_name())]
    BatchRefused {
        /// Epoch number.
        epoch: u64,
        /// Batch number within the epoch.
        batch: u64,
        /// Loader that answered.
        addr: String,
        /// Why, as the wire says (`KIND_READ_FAILED`, `KIND_INDEX_OUT_OF_RANGE`...).
        kind: BatchErrorKind,
        /// The loader's message.
        message: String,
    },
    /// A loader answered with a batch that does not match its request.
    #[error("loader {addr} sent a malformed batch")]
    BadResponse {
        /// Loader that answered.
        addr: String,
        /// What is wrong.
        #[source]
        source: Box<ResponseError>,
    },
    /// No loader answered for too long.
    #[error(
        "no loader was reachable for {} (--unavailable-timeout); last errors: {}",
        seconds(*waited),
        Failures(last_errors)
    )]
    Unavailable {
        /// How long the client waited.
        waited: Duration,
        /// The last error of each replica.
        last_errors: Vec<ReplicaFailure>,
    },
    /// Every loader refused the client's credentials (token or certificate).
    #[error(
        "every loader refused this client's credentials, or the TLS handshake failed on a certificate: {}",
        Failures(last_errors)
    )]
    Refused {
        /// The last error of each replica.
        last_errors: Vec<ReplicaFailure>,
    },
    /// An epoch plan could not be made.
    #[error(transparent)]
    Plan(#[from] crate::sampler::PlanError),
    /// A cursor could not be read or written.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// The blocking API could not start its runtime.
    #[error("cannot start the client's async runtime")]
    Runtime(#[source] std::io::Error),
}

/// What rustls says when a TLS handshake fails on a certificate.
const TLS_REFUSALS: [&str; 3] = ["invalid peer certificate", "received fatal alert", "peer is incompatible"];

/// The last failure of one replica, for [`ClientError::Unavailable`].
#[derive(Debug, Clone)]
pub struct ReplicaFailure {
    /// Replica address (or the `--loader` names when none resolved).
    pub addr: String,
    /// Its last error; `None` when it never connected and never failed yet.
    pub error: Option<Arc<ClientError>>,
}

impl ClientError {
    /// Whether a loader refused the credentials (UNAUTHENTICATED or PERMISSION_DENIED), or the
    /// TLS handshake failed on a certificate (one this client does not trust, or a fatal alert
    /// from the loader): retrying cannot fix either, so the connect fails at once with the cause.
    pub fn is_refusal(&self) -> bool {
        match self {
            ClientError::Rpc { status, .. } => {
                matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
            }
            ClientError::Connect { .. } => {
                let text = chain(self);
                TLS_REFUSALS.iter().any(|cause| text.contains(cause))
            }
            _ => false,
        }
    }
}

struct Failures<'a>(&'a [ReplicaFailure]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "no --loader name resolved to any address");
        }
        for (i, failure) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            match &failure.error {
                Some(error) => write!(f, "{}: {}", failure.addr, chain(error.as_ref()))?,
                None => write!(f, "{}: not connected yet", failure.addr)?,
            }
        }
        Ok(())
    }
}

/// `error: source: source...`, skipping a source whose text its parent already holds (tonic's
/// transport errors repeat themselves: "tcp connect error: tcp connect error").
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// What is wrong with a loader's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Other sample indices than requested.
    #[error("batch {batch} came back with other sample indices than requested")]
    WrongIndices {
        /// Batch number.
        batch: u64,
    },
    /// Another number of tensors than the dataset has fields.
    #[error("batch {batch} has {tensors} tensors for {fields} fields")]
    TensorCount {
        /// Batch number.
        batch: u64,
        /// Tensors received.
        tensors: usize,
        /// Fields of the dataset.
        fields: usize,
    },
    /// A tensor whose name, dtype or shape does not match its field.
    #[error(
        "batch {batch}: tensor '{tensor}' (dtype {dtype}, shape {shape:?}) does not match field '{field}' (shape {expected_shape:?})"
    )]
    TensorMismatch {
        /// Batch number.
        batch: u64,
        /// Tensor name received.
        tensor: String,
        /// Its wire dtype number.
        dtype: i32,
        /// Its shape.
        shape: Vec<u64>,
        /// The field expected at this position.
        field: String,
        /// The shape expected.
        expected_shape: Vec<u64>,
    },
    /// A ragged field whose offsets do not describe its rows.
    #[error("batch {batch}: ragged field '{field}': {problem}")]
    BadOffsets {
        /// Batch number.
        batch: u64,
        /// Field name.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A tensor whose byte count does not match its shape and dtype.
    #[error("batch {batch}: field '{field}' has {got} bytes, expected {expected}")]
    ByteCount {
        /// Batch number.
        batch: u64,
        /// Field name.
        field: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
}

/// A cursor file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// The file could not be read or written.
    #[error("cannot {action} cursor {}", path.display())]
    Io {
        /// "read" or "write".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a cursor.
    #[error("{} is not a cursor written by --save-cursor", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An epoch no run reaches: the file was edited or damaged.
    #[error(
        "cursor {} names epoch {epoch}, beyond the last epoch a run can stream ({}); it was not written by \
         --save-cursor: start without --resume-from or restore the file",
        path.display(),
        crate::Cursor::MAX_EPOCH
    )]
    EpochOutOfRange {
        /// The file.
        path: PathBuf,
        /// The epoch it names (its epoch or end epoch).
        epoch: u64,
    },
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_skip_repeated_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect to loader a:1")]
        struct Top(#[source] Outer);
        assert_eq!(chain(&Top(Outer(Inner))), "cannot connect to loader a:1: tcp connect error");
    }

    #[test]
    fn unavailable_names_every_replica_and_its_cause() {
        let error = ClientError::Unavailable {
            waited: Duration::from_millis(1500),
            last_errors: vec![
                ReplicaFailure {
                    addr: "10.0.0.1:7070".into(),
                    error: Some(Arc::new(ClientError::StreamEnded { addr: "10.0.0.1:7070".into() })),
                },
                ReplicaFailure { addr: "10.0.0.2:7070".into(), error: None },
            ],
        };
        let text = error.to_string();
        assert!(text.contains("1.5s (--unavailable-timeout)"), "{text}");
        assert!(text.contains("10.0.0.1:7070: loader 10.0.0.1:7070 ended its batch stream"), "{text}");
        assert!(text.contains("10.0.0.2:7070: not connected yet"), "{text}");
        let none = ClientError::Unavailable { waited: Duration::ZERO, last_errors: Vec::new() };
        assert!(none.to_string().contains("no --loader name resolved"));
    }
}
