//! Conveyor's trainer client: connects to loader replicas, plans deterministic epochs, and
//! streams their batches in order, exactly once, through replica failures.
//!
//! The embedding API is what this page lists at the top level: [`Loaders`] (connect, catalog,
//! plan), [`PlanSettings`] → [`PlanSpec`], [`RunSpec`] (epochs, resume from a [`Cursor`], a
//! batch limit), [`Run`] (an owned `Stream` of [`Batch`]es, `Send + 'static`), [`DispatchStats`],
//! [`ClientError`], and [`blocking`] for callers without an async runtime. With the `torch`
//! feature, `tensor` turns batches into libtorch tensors. Embedders can turn off the default
//! `cli` feature, which only adds the command-line tool and its built-in example.
//!
//! ```no_run
//! # async fn example() -> Result<(), trainer_client::ClientError> {
//! use futures::StreamExt;
//! use trainer_client::{Loaders, PlanSettings, RunSpec, StreamOptions};
//!
//! let loaders = Loaders::connect(&["127.0.0.1:7070".into()], StreamOptions::default()).await?;
//! let plan = loaders.plan("chess", &PlanSettings { batch_size: 256, seed: 7, ..PlanSettings::default() })?;
//! // Epochs 0..3; the next epoch's first batches are requested while this one's last are used.
//! let mut run = loaders.run(RunSpec::new("chess", plan, 0..3))?;
//! while let Some(batch) = run.next().await {
//!     let batch = batch?;
//!     let board = batch.field("board").expect("the dataset has a board field");
//!     // board.data: little-endian bytes of shape board.shape
//!     let _checkpoint = run.cursor(); // store beside the model; RunSpec::resume continues there
//! }
//! println!("{:?}", run.stats().replicas);
//! # Ok(()) }
//! ```

pub mod addr;
mod batch;
mod batch_stream;
pub mod blocking;
mod catalog;
mod client;
mod cursor;
#[cfg(feature = "cli")]
pub mod demo;
mod dispatch;
mod error;
mod plan;
mod sampler;
#[allow(unsafe_code)]
pub mod shm;
#[cfg(feature = "torch")]
pub mod tensor;

pub use addr::{ReplicaAddr, parse_loader};
pub use batch::{Batch, FieldBatch};
pub use catalog::{block_len, fetch_catalog};
pub use client::{AuthToken, ConnectOptions, TlsOptions, open_channel};
pub use conveyor_proto::{
    DType,
    v1::{DatasetInfo, FieldInfo},
};
pub use cursor::{Cursor, CursorWriter};
pub use dispatch::{DispatchStats, EpochBoundary, Loaders, ReplicaStats, Run, StreamOptions};
pub use error::{BatchErrorKind, ClientError, CursorError, ReplicaFailure, ResponseError, chain as error_chain};
pub use plan::{PlanSettings, RunSpec};
pub use sampler::{EpochPlan, PlanError, PlanSpec, Shuffle};
