//! The end-to-end tests, one binary.
mod cli;
mod limits;
mod npy;
mod ragged;
mod replicas;
mod security;
mod shm;
mod transforms;
mod zarr;
