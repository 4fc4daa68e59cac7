//! The client for callers without an async runtime (a plain training script, the Python
//! package): the same [`crate::Loaders`] and [`crate::Run`], driven by a runtime the library owns.
//!
//! ```no_run
//! # fn example() -> Result<(), trainer_client::ClientError> {
//! use trainer_client::{PlanSettings, RunSpec, StreamOptions, blocking};
//! let loaders = blocking::Loaders::connect(&["127.0.0.1:7070".into()], StreamOptions::default())?;
//! let plan = loaders.plan("chess", &PlanSettings { batch_size: 256, ..PlanSettings::default() })?;
//! for batch in loaders.run(RunSpec::new("chess", plan, 0..2))? {
//!     let batch = batch?;
//!     assert!(batch.field("board").is_some());
//! }
//! # Ok(()) }
//! ```

use std::sync::Arc;

use conveyor_proto::v1::DatasetInfo;

use crate::{Batch, ClientError, Cursor, DispatchStats, PlanSettings, PlanSpec, RunSpec, StreamOptions};

/// Worker threads of the owned runtime: the connection tasks (HTTP/2 decoding) run there while
/// the caller's thread trains.
const RUNTIME_THREADS: usize = 2;

/// [`crate::Loaders`] with its own runtime.
#[derive(Debug)]
pub struct Loaders {
    // Declared first: dropped (its tasks aborted) before the runtime.
    loaders: crate::Loaders,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Loaders {
    /// Starts a runtime and connects; see [`crate::Loaders::connect`].
    ///
    /// # Errors
    /// [`ClientError::Runtime`] when the runtime cannot start, or as [`crate::Loaders::connect`].
    pub fn connect(loaders: &[String], options: StreamOptions) -> Result<Loaders, ClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("conveyor-client")
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        let loaders = runtime.block_on(crate::Loaders::connect(loaders, options))?;
        Ok(Loaders { loaders, runtime: Arc::new(runtime) })
    }

    /// See [`crate::Loaders::catalog`].
    pub fn catalog(&self) -> &[DatasetInfo] {
        self.loaders.catalog()
    }

    /// See [`crate::Loaders::dataset`].
    ///
    /// # Errors
    /// [`ClientError::UnknownDataset`].
    pub fn dataset(&self, name: &str) -> Result<&DatasetInfo, ClientError> {
        self.loaders.dataset(name)
    }

    /// See [`crate::Loaders::plan`].
    ///
    /// # Errors
    /// As [`crate::Loaders::plan`].
    pub fn plan(&self, dataset: &str, settings: &PlanSettings) -> Result<PlanSpec, ClientError> {
        self.loaders.plan(dataset, settings)
    }

    /// See [`crate::Loaders::add_loader`].
    ///
    /// # Errors
    /// [`ClientError::BadAddress`].
    pub fn add_loader(&mut self, loader: &str) -> Result<(), ClientError> {
        self.loaders.add_loader(loader)
    }

    /// See [`crate::Loaders::stats`].
    pub fn stats(&self) -> DispatchStats {
        self.loaders.stats()
    }

    /// See [`crate::Loaders::check`].
    ///
    /// # Errors
    /// As [`crate::Loaders::run`].
    pub fn check(&self, spec: &RunSpec) -> Result<(), ClientError> {
        self.loaders.check(spec)
    }

    /// Streams `spec` as an iterator; see [`crate::Loaders::run`].
    ///
    /// # Errors
    /// As [`crate::Loaders::run`].
    pub fn run(self, spec: RunSpec) -> Result<Run, ClientError> {
        let runtime = self.runtime;
        let run = {
            let _entered = runtime.enter();
            self.loaders.run(spec)?
        };
        Ok(Run { run, runtime })
    }
}

/// [`crate::Run`] as a blocking iterator.
#[derive(Debug)]
pub struct Run {
    run: crate::Run,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Run {
    /// See [`crate::Run::on_consumed`].
    pub fn on_consumed(self, hook: impl FnMut(&Cursor) + Send + 'static) -> Run {
        Run { run: self.run.on_consumed(hook), runtime: self.runtime }
    }

    /// See [`crate::Run::cursor`].
    pub fn cursor(&self) -> Cursor {
        self.run.cursor()
    }

    /// See [`crate::Run::stats`].
    pub fn stats(&self) -> DispatchStats {
        self.run.stats()
    }

    /// See [`crate::Run::num_batches`].
    pub fn num_batches(&self) -> u64 {
        self.run.num_batches()
    }

    /// The next batch if one arrives within `timeout`; `None` when none did (call again: nothing
    /// is lost). Lets a caller check for interrupts (Python's Ctrl-C) while it waits.
    pub fn next_timeout(&mut self, timeout: std::time::Duration) -> Option<Option<Result<Batch, ClientError>>> {
        let run = &mut self.run;
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, std::future::poll_fn(|cx| run.poll_batch(cx))).await.ok() })
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> u64 {
        self.run.batches_per_epoch()
    }

    /// Ends the run and gives the connections back.
    pub fn into_loaders(self) -> Loaders {
        Loaders { loaders: self.run.into_loaders(), runtime: self.runtime }
    }
}

impl Iterator for Run {
    type Item = Result<Batch, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let run = &mut self.run;
        self.runtime.block_on(std::future::poll_fn(|cx| run.poll_batch(cx)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        futures::Stream::size_hint(&self.run)
    }
}
