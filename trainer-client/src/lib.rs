//! Conveyor's trainer client: connects to loader replicas, plans deterministic epochs, and
//! streams their batches in order, exactly once, through replica failures.
//!
//! ```no_run
//! # async fn example() -> Result<(), trainer_client::ClientError> {
//! use trainer_client::{Loaders, StreamOptions, EpochPlan, PlanSpec, Shuffle};
//! let mut loaders = Loaders::connect(&["127.0.0.1:7070".into()], StreamOptions::default()).await?;
//! let info = loaders.dataset("chess")?;
//! let spec = PlanSpec { num_samples: info.num_samples, batch_size: 256, drop_last: false,
//!                       shuffle: Shuffle::Full, seed: 0, rank: 0, world_size: 1,
//!                       block_len: 1, shuffle_window: 1 };
//! let mut epoch = loaders.epoch("chess", EpochPlan::new(spec, 0)?, 0)?;
//! while let Some(batch) = epoch.next().await? {
//!     let board = batch.field("board").expect("field exists");
//!     // board.data: little-endian bytes of shape board.shape
//! }
//! # Ok(()) }
//! ```

pub mod batch;
pub mod client;
pub mod cursor;
pub mod demo;
pub mod dispatch;
pub mod dump;
pub mod error;
pub mod report;
pub mod sampler;
#[cfg(feature = "torch")]
pub mod tensor;
#[cfg(feature = "torch")]
pub mod train;

pub use batch::{Batch, FieldBatch};
pub use client::ConnectOptions;
pub use cursor::Cursor;
pub use dispatch::{Epoch, Loaders, StreamOptions};
pub use error::ClientError;
pub use sampler::{EpochPlan, PlanSpec, Shuffle};
