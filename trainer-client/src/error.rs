//! Typed errors of the trainer client, each naming the loader, dataset, batch or flag at fault.

use std::time::Duration;

/// Why streaming could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--loader` is not `host:port` or `http://host:port`.
    #[error("--loader '{spec}' is not host:port or http://host:port")]
    BadAddress {
        /// The flag's value.
        spec: String,
    },
    /// A loader could not be reached.
    #[error("cannot connect to loader {addr}")]
    Connect {
        /// The loader address.
        addr: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// A loader answered a call with an error status.
    #[error("loader {addr} failed: {}: {}", status.code(), status.message())]
    Rpc {
        /// The loader address.
        addr: String,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The loaders hold no dataset of that name.
    #[error("unknown dataset '{name}'; the loaders serve: {}", available.join(", "))]
    UnknownDataset {
        /// Requested name.
        name: String,
        /// What the loaders serve.
        available: Vec<String>,
    },
    /// A loader refused a batch.
    #[error("batch {batch} of epoch {epoch} was refused by loader {addr}: {message}")]
    BatchRefused {
        /// Epoch number.
        epoch: u64,
        /// Batch number within the epoch.
        batch: u64,
        /// Loader that answered.
        addr: String,
        /// The loader's message.
        message: String,
    },
    /// A loader answered with a batch that does not match its request.
    #[error("loader {addr} sent a malformed batch: {reason}")]
    BadResponse {
        /// Loader that answered.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// No loader answered for too long.
    #[error(
        "no loader was reachable for {} (--unavailable-timeout); last errors: {last_errors}",
        humantime(*waited)
    )]
    Unavailable {
        /// How long the client waited.
        waited: Duration,
        /// The last error of each loader.
        last_errors: String,
    },
    /// Settings that cannot work.
    #[error("{0}")]
    Invalid(String),
    /// An epoch plan could not be made.
    #[error(transparent)]
    Plan(#[from] crate::sampler::PlanError),
}

fn humantime(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}
