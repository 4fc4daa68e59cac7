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

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use conveyor_proto::v1::DatasetInfo;

use crate::{Batch, ClientError, Cursor, DispatchStats, PlanSettings, PlanSpec, RunSpec, StreamOptions};

/// Worker threads of the owned runtime: the connection tasks (HTTP/2 decoding) run there while
/// the caller's thread trains.
const RUNTIME_THREADS: usize = 2;

/// A connect in progress, waited for in slices so that the caller can look up between them
/// (the Python package checks for Ctrl-C every 50 ms while no loader answers).
pub struct Connecting {
    // Declared first: dropped (its tasks aborted) before the runtime.
    future: Pin<Box<dyn Future<Output = Result<crate::Loaders, ClientError>> + Send>>,
    /// Taken by the connections' owner once the connect is over.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Connecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connecting").field("done", &self.runtime.is_none()).finish_non_exhaustive()
    }
}

impl Drop for Connecting {
    /// An abandoned connect (Ctrl-C in Python) returns at once: its runtime's threads are left
    /// to end on their own (a name lookup in progress, say) instead of being waited for.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // The connect first, inside its runtime (its timers and tasks belong there).
            let future = std::mem::replace(&mut self.future, Box::pin(std::future::pending()));
            {
                let _inside = runtime.enter();
                drop(future);
            }
            runtime.shutdown_background();
        }
    }
}

impl Connecting {
    /// Starts a runtime and begins connecting; see [`crate::Loaders::connect`]. Dropping the
    /// result before it is ready abandons the connect.
    ///
    /// # Errors
    /// [`ClientError::Runtime`] when the runtime cannot start.
    pub fn start(loaders: &[String], options: StreamOptions) -> Result<Connecting, ClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("conveyor-client")
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        let loaders = loaders.to_vec();
        let future = Box::pin(async move { crate::Loaders::connect(&loaders, options).await });
        Ok(Connecting { future, runtime: Some(runtime) })
    }

    /// Waits up to `timeout` for the connect: `None` while it is still going on (or after its
    /// result was returned once).
    pub fn wait(&mut self, timeout: Duration) -> Option<Result<Loaders, ClientError>> {
        let future = &mut self.future;
        // The timer is made inside the runtime (block_on enters it), which it needs.
        let result =
            self.runtime.as_ref()?.block_on(async move { tokio::time::timeout(timeout, future).await }).ok()?;
        let runtime = self.runtime.take()?;
        Some(result.map(|loaders| Loaders { loaders, runtime: Arc::new(runtime) }))
    }
}

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
        let mut connecting = Connecting::start(loaders, options)?;
        loop {
            if let Some(result) = connecting.wait(Duration::from_secs(3600)) {
                return result;
            }
        }
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
