//! How batches leave the loader: the gRPC service and its shared state (the catalog of datasets,
//! the per-batch pipeline, the per-stream loop), the connections it accepts and their bounds,
//! bearer tokens and TLS, the in-flight byte budget and the fair share of stream slots, shared
//! memory for same-host clients, and the counters the metrics endpoint reads.
//!
//! It reads datasets through [`crate::dataset`] and derives them through [`crate::transform`];
//! neither of those imports anything from here.

pub mod auth;
pub mod batch_route;
pub mod budget;
pub mod connection;
pub mod service;
#[allow(unsafe_code)]
pub mod shm;
pub mod state;
pub mod stats;
pub mod stream;
pub mod stream_slots;
pub mod throttle;
pub mod tls;
