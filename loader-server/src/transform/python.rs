//! Python transforms: a pool of worker processes that the loader starts, feeds and supervises.
//! The loader process never runs user code.
//!
//! Each worker is `python -c worker.py MODULE FUNCTION CAP` with two inherited descriptors: fd 0
//! is its shared-memory region (an anonymous `memfd`, `--transform-shm-bytes`), fd 1 one end of
//! a Unix socket pair for control messages (4-byte little-endian length + JSON). For a batch the
//! loader writes the gathered fields and the indices into the region, sends their offsets, and
//! the worker hands the function numpy arrays that are views of the region (no copy), then
//! writes the returned arrays back into the region's output part. Memory: each worker's address
//! space is capped by `RLIMIT_AS` (`--transform-worker-memory`), set by the worker itself after
//! its imports, before any batch.
//!
//! Supervision: one thread per worker takes jobs from a bounded queue (`--transform-queue`). A
//! worker that runs out of memory, crashes, or does not answer within `--transform-timeout` is
//! killed and replaced, and its batch runs once more on the fresh worker; a second failure
//! answers the batch with `KIND_WORKER_FAILED`, which clients send to another replica. A worker
//! is also replaced after `--transform-max-batches` batches (leaks stay bounded). The worker's
//! exceptions and schema mistakes fail only their batch (`KIND_TRANSFORM_FAILED`).

use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    os::unix::{fs::FileExt, net::UnixStream, process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use conveyor_proto::DType;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Column, Columns, FieldRows, FieldSchema, indices_digest};
use crate::dataset::ragged::check_offset_bytes;

/// The worker's program, run with `python -c`: the `Ragged` class of the Python package, then
/// the worker itself.
const WORKER_SCRIPT: &str =
    concat!(include_str!("../../../python/conveyor/_ragged.py"), "\n", include_str!("worker.py"));

/// Alignment of arrays in the shared region (cache lines; numpy needs at most 8).
const ALIGN: u64 = 64;

/// How often a worker waited on is checked for having exited.
const EXIT_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How the workers are started and bounded (from the `--transform-*` flags).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Interpreter (`--python`).
    pub python: PathBuf,
    /// Directories put in front of `PYTHONPATH` (`--transform-pythonpath`).
    pub pythonpath: Vec<PathBuf>,
    /// Worker processes (`--transform-workers`).
    pub workers: usize,
    /// Address-space cap of each worker in bytes, 0 for none (`--transform-worker-memory`).
    pub memory_cap_bytes: u64,
    /// Size of each worker's shared region (`--transform-shm-bytes`).
    pub shm_bytes: u64,
    /// Longest a batch may take (`--transform-timeout`).
    pub timeout: Duration,
    /// Batches after which a worker is replaced, 0 for never (`--transform-max-batches`).
    pub max_batches: u64,
    /// Batches waiting for a worker (`--transform-queue`).
    pub queue: usize,
}

/// Why a worker was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartCause {
    /// It allocated past `--transform-worker-memory` (or was SIGKILLed, as the OOM killer does).
    Memory,
    /// It died otherwise (a segfault, `os._exit`, a signal).
    Crashed,
    /// It did not answer within `--transform-timeout`.
    Timeout,
    /// It served `--transform-max-batches` batches.
    Recycled,
}

impl RestartCause {
    /// Every cause, for the metrics.
    pub const ALL: [RestartCause; 4] =
        [RestartCause::Memory, RestartCause::Crashed, RestartCause::Timeout, RestartCause::Recycled];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RestartCause::Memory => "memory",
            RestartCause::Crashed => "crashed",
            RestartCause::Timeout => "timeout",
            RestartCause::Recycled => "recycled",
        }
    }
}

/// Counters of one pool.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Worker replacements, by [`RestartCause`] (indexed by its discriminant, in `ALL` order).
    restarts: [AtomicU64; 4],
    /// Batches waiting for a worker.
    pub queued: AtomicU64,
    /// Nanoseconds spent in the function itself, summed over the batches it returned (the
    /// dataset's transform time adds the queue wait and the copies).
    pub function_nanos: AtomicU64,
}

impl PoolStats {
    fn restarted(&self, cause: RestartCause) {
        self.restarts[cause as usize].fetch_add(1, Relaxed);
    }

    /// Replacements for `cause` so far.
    pub fn restarts_for(&self, cause: RestartCause) -> u64 {
        self.restarts[cause as usize].load(Relaxed)
    }
}

/// Why a batch came back without data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransformError {
    /// The function raised (every replica would too).
    Raised {
        /// `Type: message`.
        message: String,
        /// The last lines of the traceback.
        traceback: String,
    },
    /// The output broke the rules (not a dict of arrays, wrong rows, too large, unservable dtype).
    Schema(String),
    /// Workers failed twice on this batch (memory, crash, timeout); another replica may succeed.
    WorkerFailed(String),
}

/// A job for a worker thread.
#[derive(Debug)]
struct Job {
    /// Gathered source rows, one per source field.
    input: Vec<FieldRows>,
    indices: Vec<u64>,
    entropy: [u64; 3],
    reply_tx: oneshot::Sender<Result<Columns, TransformError>>,
}

/// A pool of Python workers running one function.
#[derive(Debug)]
pub struct Pool {
    /// `module:function`.
    pub function: String,
    /// Bounded queue to the worker threads (`--transform-queue`).
    jobs_tx: mpsc::Sender<Job>,
    /// Counters.
    pub stats: Arc<PoolStats>,
    /// The layout every job needs, to refuse batches that cannot fit.
    layout: Arc<Layout>,
}

/// What the workers need to know, shared by the pool's threads.
#[derive(Debug)]
struct Layout {
    module: String,
    function: String,
    options: WorkerOptions,
    /// The source's fields, in order.
    source: Vec<FieldSchema>,
    /// Bytes per sample of the fixed-shape outputs (0 until the probe ran).
    fixed_out_bytes_per_sample: u64,
    /// Output fields (0 until the probe ran); each may start up to `ALIGN - 1` bytes later,
    /// and a ragged one adds its offsets.
    num_out_fields: u64,
}

/// Where a batch's parts go in a worker's region: each input field's values and (ragged) its
/// offsets, the indices, and the start of the output area.
struct Placement {
    fields: Vec<(u64, Option<u64>)>,
    indices: u64,
    out: u64,
}

impl Layout {
    /// The placement of a batch of `n` samples whose gathered fields are `input`.
    fn place(&self, input: &[FieldRows], n: u64) -> Placement {
        let mut at = 0;
        let mut fields = Vec::with_capacity(input.len());
        for rows in input {
            let values = at;
            at = align(at + rows.data.len() as u64);
            let offsets = rows.offsets.as_ref().map(|_| {
                let offsets = at;
                at = align(at + (n + 1) * 8);
                offsets
            });
            fields.push((values, offsets));
        }
        let indices = at;
        Placement { fields, indices, out: align(indices + 8 * n) }
    }

    /// The region a batch of `n` samples needs at least: its fixed-shape inputs and outputs,
    /// offsets, indices and alignment (ragged values come on top, known once gathered).
    fn min_region_bytes(&self, n: u64) -> u64 {
        let mut at = 0;
        for field in &self.source {
            at = align(at + if field.ragged { (n + 1) * 8 } else { n * field.bytes_per_sample() as u64 });
        }
        let out = align(at + 8 * n);
        out + n * self.fixed_out_bytes_per_sample + (ALIGN + (n + 1) * 8) * self.num_out_fields
    }
}

fn align(at: u64) -> u64 {
    at.div_ceil(ALIGN) * ALIGN
}

impl Pool {
    /// Starts `options.workers` workers for `module:function`, runs the function once on
    /// `probe` (the first samples of the source, seed 0, epoch 0) to learn the output schema,
    /// and returns the pool and that schema.
    ///
    /// # Errors
    /// A message naming the function and what failed (import, the probe's exception, output).
    pub fn start(
        spec: &str,
        options: WorkerOptions,
        source: Vec<FieldSchema>,
        probe: (Vec<FieldRows>, Vec<u64>),
    ) -> Result<(Pool, Vec<FieldSchema>), String> {
        let (module, function) = spec
            .rsplit_once(':')
            .filter(|(m, f)| !m.is_empty() && !f.is_empty())
            .ok_or_else(|| format!("'{spec}' is not module:function; write for example my_transforms:augment"))?;
        let mut layout = Layout {
            module: module.to_owned(),
            function: function.to_owned(),
            options: options.clone(),
            source,
            fixed_out_bytes_per_sample: 0,
            num_out_fields: 0,
        };
        let mut workers = Vec::with_capacity(options.workers);
        for _ in 0..options.workers {
            workers.push(Worker::spawn(&layout).map_err(|e| format!("{spec}: {e}"))?);
        }
        let (input, indices) = probe;
        let job_input = JobInput { input: &input, indices: &indices, entropy: [0, 0, indices_digest(&indices)] };
        let probed = workers[0].run(&layout, &job_input).map_err(|failure| match failure {
            Failure::Raised { message, traceback } => {
                format!("{spec} raised on the probe batch (samples {indices:?}): {message}\n{traceback}")
            }
            Failure::Schema(message) => format!("{spec} on the probe batch (samples {indices:?}): {message}"),
            Failure::Died { detail, .. } => format!("{spec}: the worker died on the probe batch: {detail}"),
        })?;
        let schema: Vec<FieldSchema> = probed.columns.into_iter().map(|c| c.schema).collect();
        layout.fixed_out_bytes_per_sample =
            schema.iter().filter(|f| !f.ragged).map(|f| f.bytes_per_sample() as u64).sum();
        layout.num_out_fields = schema.len() as u64;

        let layout = Arc::new(layout);
        let stats = Arc::new(PoolStats::default());
        let (jobs_tx, jobs_rx) = mpsc::channel(options.queue.max(1));
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        for (slot, worker) in workers.into_iter().enumerate() {
            let (layout, stats, jobs_rx) = (layout.clone(), stats.clone(), jobs_rx.clone());
            std::thread::Builder::new()
                .name(format!("transform-{slot}"))
                .spawn(move || serve_jobs(slot, worker, &layout, &stats, &jobs_rx))
                .map_err(|e| format!("cannot start a transform thread: {e}"))?;
        }
        Ok((Pool { function: spec.to_owned(), jobs_tx, stats, layout }, schema))
    }

    /// Bytes of shared region a batch of `n` samples needs at least (ragged values come on
    /// top: a batch whose input does not fit then fails naming `--transform-shm-bytes`).
    pub fn region_bytes(&self, n: u64) -> u64 {
        self.layout.min_region_bytes(n)
    }

    /// Size of each worker's region.
    pub fn shm_bytes(&self) -> u64 {
        self.layout.options.shm_bytes
    }

    /// A job for the queue, counted as queued until a worker thread takes it.
    fn job(&self, input: Vec<FieldRows>, indices: Vec<u64>, seed: u64, epoch: u64) -> (Job, JobReply) {
        self.stats.queued.fetch_add(1, Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let entropy = [seed, epoch, indices_digest(&indices)];
        (Job { input, indices, entropy, reply_tx }, reply_rx)
    }

    /// Runs the function on a gathered batch of the source; waits for a place in the queue,
    /// then for a worker.
    pub async fn run(
        &self,
        input: Vec<FieldRows>,
        indices: Vec<u64>,
        seed: u64,
        epoch: u64,
    ) -> Result<Columns, TransformError> {
        let (job, reply_rx) = self.job(input, indices, seed, epoch);
        if self.jobs_tx.send(job).await.is_err() {
            return Err(self.gone());
        }
        reply_rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// The answer when the worker threads have stopped; the job was never taken.
    fn gone(&self) -> TransformError {
        self.stats.queued.fetch_sub(1, Relaxed);
        gone()
    }
}

type JobReply = oneshot::Receiver<Result<Columns, TransformError>>;

fn gone() -> TransformError {
    TransformError::WorkerFailed("the transform pool has stopped".into())
}

/// One worker thread: takes jobs until the pool is dropped, replacing its worker as needed.
fn serve_jobs(slot: usize, first: Worker, layout: &Layout, stats: &PoolStats, jobs_rx: &Mutex<mpsc::Receiver<Job>>) {
    let mut worker = Some(first);
    loop {
        // One thread waits in the queue at a time; the others wait for the lock.
        let job = match jobs_rx.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => None,
        };
        let Some(job) = job else { break };
        stats.queued.fetch_sub(1, Relaxed);
        let input = JobInput { input: &job.input, indices: &job.indices, entropy: job.entropy };
        let result = run_job(slot, &mut worker, layout, stats, &input);
        let _ = job.reply_tx.send(result);
    }
    if let Some(worker) = worker {
        worker.stop();
    }
}

/// Runs one job on `worker` (started first when there is none), and once more on a fresh
/// worker when it dies; leaves in `worker` the one to use next, if any.
fn run_job(
    slot: usize,
    worker: &mut Option<Worker>,
    layout: &Layout,
    stats: &PoolStats,
    input: &JobInput<'_>,
) -> Result<Columns, TransformError> {
    let mut failures = Vec::new();
    for _attempt in 0..2 {
        let mut current = match worker.take() {
            Some(w) => w,
            None => match Worker::spawn(layout) {
                Ok(w) => w,
                Err(e) => {
                    failures.push(format!("a new worker could not start: {e}"));
                    break;
                }
            },
        };
        match current.run(layout, input) {
            Ok(columns) => {
                stats.function_nanos.fetch_add((current.last_function_seconds * 1e9) as u64, Relaxed);
                current.batches += 1;
                if layout.options.max_batches > 0 && current.batches >= layout.options.max_batches {
                    current.stop();
                    stats.restarted(RestartCause::Recycled);
                    tracing::debug!(slot, "transform worker recycled after --transform-max-batches");
                } else {
                    *worker = Some(current);
                }
                return Ok(columns);
            }
            Err(Failure::Raised { message, traceback }) => {
                *worker = Some(current);
                return Err(TransformError::Raised { message, traceback });
            }
            Err(Failure::Schema(message)) => {
                *worker = Some(current);
                return Err(TransformError::Schema(message));
            }
            Err(Failure::Died { cause, detail }) => {
                stats.restarted(cause);
                tracing::warn!(slot, cause = cause.label(), %detail, "transform worker replaced");
                failures.push(detail);
            }
        }
    }
    Err(TransformError::WorkerFailed(failures.join("; then, on a fresh worker: ")))
}

/// A job's data, borrowed for each attempt.
struct JobInput<'a> {
    input: &'a [FieldRows],
    indices: &'a [u64],
    entropy: [u64; 3],
}

/// How one attempt failed.
#[derive(Debug)]
enum Failure {
    Raised { message: String, traceback: String },
    Schema(String),
    Died { cause: RestartCause, detail: String },
}

#[derive(Serialize)]
struct RunMessage<'a> {
    op: &'static str,
    /// Echoed in the reply: a reply for another request (a stray write on the control socket)
    /// is caught instead of being taken for this batch's.
    id: u64,
    num_samples: u64,
    fields: Vec<FieldPlacement<'a>>,
    indices_offset: u64,
    entropy: [u64; 3],
    out_offset: u64,
    out_capacity: u64,
}

#[derive(Serialize)]
struct FieldPlacement<'a> {
    name: &'a str,
    dtype: String,
    /// A sample's shape; a ragged field's row shape.
    shape: &'a [u64],
    offset: u64,
    /// A ragged field's offsets (`num_samples + 1` int64 rows, from 0) and its rows of values.
    #[serde(skip_serializing_if = "Option::is_none")]
    offsets: Option<u64>,
    rows: u64,
    utf8: bool,
}

#[derive(Deserialize, Default)]
struct Reply {
    status: String,
    /// The request it answers (absent on `ready`).
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    message: String,
    #[serde(default)]
    traceback: String,
    #[serde(default)]
    fields: Vec<OutputPlacement>,
    #[serde(default)]
    seconds: f64,
}

#[derive(Deserialize)]
struct OutputPlacement {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offset: u64,
    nbytes: u64,
    /// A ragged output's offsets (`num_samples + 1` int64 rows, from 0) and its rows.
    #[serde(default)]
    offsets: Option<u64>,
    #[serde(default)]
    rows: u64,
    #[serde(default)]
    utf8: bool,
}

/// One worker process and its two channels.
#[derive(Debug)]
struct Worker {
    /// The worker, leader of its own process group: processes its function starts are in the
    /// group and are killed with it.
    child: Child,
    control: UnixStream,
    region: File,
    /// Batches this worker has served (also the id of its next request).
    batches: u64,
    /// Requests sent, the id of the next one.
    next_id: u64,
    /// Seconds the function took on the last batch, as the worker measured.
    last_function_seconds: f64,
}

impl Worker {
    /// Starts a worker and waits until it has imported the function.
    fn spawn(layout: &Layout) -> Result<Worker, String> {
        let options = &layout.options;
        let memfd = rustix::fs::memfd_create("conveyor-transform", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| format!("cannot create the shared region (memfd_create): {e}"))?;
        let region = File::from(memfd);
        region.set_len(options.shm_bytes).map_err(|e| {
            format!("cannot size the shared region to --transform-shm-bytes {}: {e}", options.shm_bytes)
        })?;
        let (control, theirs) = UnixStream::pair().map_err(|e| format!("cannot create the control socket: {e}"))?;
        let region_for_child = region.try_clone().map_err(|e| format!("cannot share the region: {e}"))?;
        let mut pythonpath: Vec<PathBuf> = options.pythonpath.clone();
        if let Some(existing) = std::env::var_os("PYTHONPATH") {
            pythonpath.extend(std::env::split_paths(&existing));
        }
        let mut command = Command::new(&options.python);
        command
            .arg("-c")
            .arg(WORKER_SCRIPT)
            .arg(&layout.module)
            .arg(&layout.function)
            .arg(options.memory_cap_bytes.to_string())
            .stdin(Stdio::from(region_for_child))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::inherit())
            .env("PYTHONUNBUFFERED", "1")
            // One thread per worker for the math libraries: the pool is the parallelism, and
            // each extra thread pool costs address space under the cap.
            .env("OMP_NUM_THREADS", "1")
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            // Its own process group: whatever the user's function forks goes with the worker.
            .process_group(0);
        if !pythonpath.is_empty() {
            let joined = std::env::join_paths(&pythonpath).map_err(|e| format!("bad --transform-pythonpath: {e}"))?;
            command.env("PYTHONPATH", joined);
        }
        let child =
            command.spawn().map_err(|e| format!("cannot start {} (--python): {e}", options.python.display()))?;
        // The child's ends are closed here when `command` drops, so that a dead worker reads
        // as end-of-file on the control socket.
        drop(command);
        let mut worker = Worker { child, control, region, batches: 0, next_id: 0, last_function_seconds: 0.0 };
        let startup = options.timeout.max(Duration::from_secs(60));
        match worker.receive(startup) {
            Ok(reply) if reply.status == "ready" => Ok(worker),
            Ok(reply) if reply.status == "import_failed" => {
                worker.kill();
                Err(format!(
                    "cannot load {}:{}: {} (the module is looked up on --transform-pythonpath and PYTHONPATH, with {})",
                    layout.module,
                    layout.function,
                    reply.message,
                    options.python.display()
                ))
            }
            Ok(reply) => {
                worker.kill();
                Err(format!("the worker said '{}' instead of ready", reply.status))
            }
            Err(failure) => Err(match failure {
                Failure::Died { detail, .. } => format!("the worker did not start: {detail}"),
                Failure::Raised { message, .. } | Failure::Schema(message) => message,
            }),
        }
    }

    /// Runs one batch.
    fn run(&mut self, layout: &Layout, job: &JobInput<'_>) -> Result<Columns, Failure> {
        let n = job.indices.len() as u64;
        let placement = layout.place(job.input, n);
        let (indices_offset, out_offset) = (placement.indices, placement.out);
        let shm_bytes = layout.options.shm_bytes;
        let needed = out_offset + n * layout.fixed_out_bytes_per_sample;
        if needed > shm_bytes {
            return Err(Failure::Schema(format!(
                "the batch takes {needed} bytes of the worker's shared region before its ragged outputs, more than \
                 --transform-shm-bytes {shm_bytes}; raise the flag on the loader or ask for smaller batches"
            )));
        }
        let mut fields = Vec::with_capacity(layout.source.len());
        for ((schema, rows), &(offset, offsets_at)) in layout.source.iter().zip(job.input).zip(&placement.fields) {
            self.write_region(&rows.data, offset)?;
            let row_bytes = (schema.bytes_per_sample() as u64).max(1);
            if let (Some(byte_offsets), Some(at)) = (&rows.offsets, offsets_at) {
                let offsets: Vec<u8> =
                    byte_offsets.iter().flat_map(|&o| ((o / row_bytes) as i64).to_le_bytes()).collect();
                self.write_region(&offsets, at)?;
            }
            fields.push(FieldPlacement {
                name: &schema.name,
                dtype: format!("<{}", schema.dtype.numpy_code()),
                shape: &schema.sample_shape,
                offset,
                offsets: offsets_at,
                rows: rows.data.len() as u64 / row_bytes,
                utf8: schema.utf8,
            });
        }
        let indices: Vec<u8> = job.indices.iter().flat_map(|i| i.to_le_bytes()).collect();
        self.write_region(&indices, indices_offset)?;
        let id = self.next_id;
        self.next_id += 1;
        let message = RunMessage {
            op: "run",
            id,
            num_samples: n,
            fields,
            indices_offset,
            entropy: job.entropy,
            out_offset,
            out_capacity: shm_bytes.saturating_sub(out_offset),
        };
        let body = serde_json::to_vec(&message).map_err(|e| died(RestartCause::Crashed, format!("encoding: {e}")))?;
        self.send(&body)?;
        let reply = self.receive(layout.options.timeout)?;
        if reply.id != Some(id) {
            self.kill();
            return Err(died(
                RestartCause::Crashed,
                format!(
                    "its reply was for request {:?} while request {id} was waiting: something else wrote on the \
                     control socket (the function or a process it started), so the worker was killed",
                    reply.id
                ),
            ));
        }
        match reply.status.as_str() {
            "ok" => self.read_output(reply, n, shm_bytes),
            "error" => Err(Failure::Raised { message: reply.message, traceback: reply.traceback }),
            "schema" => Err(Failure::Schema(reply.message)),
            "memory" => {
                self.kill();
                Err(died(RestartCause::Memory, reply.message))
            }
            other => {
                self.kill();
                Err(died(RestartCause::Crashed, format!("unexpected reply status '{other}'")))
            }
        }
    }

    fn read_output(&mut self, reply: Reply, n: u64, shm_bytes: u64) -> Result<Columns, Failure> {
        self.last_function_seconds = reply.seconds;
        let mut columns = Vec::with_capacity(reply.fields.len());
        for field in reply.fields {
            let Some(dtype) = DType::from_numpy_code(&field.dtype) else {
                return Err(Failure::Schema(format!("output field '{}' has dtype {}", field.name, field.dtype)));
            };
            let ragged = field.offsets.is_some();
            let schema =
                FieldSchema { name: field.name, dtype, sample_shape: field.shape, ragged, utf8: field.utf8 && ragged };
            let row_bytes = schema.bytes_per_sample() as u64;
            let expected = if ragged { field.rows.saturating_mul(row_bytes) } else { n * row_bytes };
            let within = |offset: u64, bytes: u64| offset.checked_add(bytes).is_some_and(|end| end <= shm_bytes);
            if field.nbytes != expected
                || !within(field.offset, field.nbytes)
                || field.offsets.is_some_and(|at| !within(at, (n + 1) * 8))
            {
                self.kill();
                return Err(died(
                    RestartCause::Crashed,
                    format!("the worker placed output field '{}' outside its region", schema.name),
                ));
            }
            let data = self.read_region(field.offset, field.nbytes)?;
            let offsets = match field.offsets {
                Some(at) => {
                    let raw = self.read_region(at, (n + 1) * 8)?;
                    check_offset_bytes(&raw, false, field.rows, std::path::Path::new("its values")).map_err(
                        |problem| Failure::Schema(format!("ragged output field '{}': {problem}", schema.name)),
                    )?;
                    let rows = raw.chunks_exact(8).map(|o| i64::from_le_bytes(o.try_into().unwrap_or_default()));
                    Some(rows.map(|o| o as u64 * row_bytes).collect())
                }
                None => None,
            };
            columns.push(Column { schema, rows: FieldRows { data, offsets } });
        }
        Ok(Columns { num_samples: n as usize, columns })
    }

    /// `bytes` bytes of the region from `offset` (checked inside it by the caller).
    fn read_region(&mut self, offset: u64, bytes: u64) -> Result<Vec<u8>, Failure> {
        let mut data = vec![0u8; bytes as usize];
        self.region
            .read_exact_at(&mut data, offset)
            .map_err(|e| died(RestartCause::Crashed, format!("reading the shared region: {e}")))?;
        Ok(data)
    }

    fn write_region(&mut self, data: &[u8], offset: u64) -> Result<(), Failure> {
        self.region
            .write_all_at(data, offset)
            .map_err(|e| died(RestartCause::Crashed, format!("writing the shared region: {e}")))
    }

    fn send(&mut self, body: &[u8]) -> Result<(), Failure> {
        let length = u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes();
        let sent = self.control.write_all(&length).and_then(|()| self.control.write_all(body));
        sent.map_err(|e| self.exit_failure(format!("sending: {e}")))
    }

    /// The next reply, or how the worker failed: it died (end of file), or said nothing for
    /// `timeout` (it is killed).
    fn receive(&mut self, timeout: Duration) -> Result<Reply, Failure> {
        let deadline = Instant::now() + timeout;
        let mut length = [0u8; 4];
        self.read_until(&mut length, deadline)?;
        let length = u32::from_le_bytes(length) as usize;
        if length > 16 << 20 {
            self.kill();
            return Err(died(RestartCause::Crashed, format!("a reply of {length} bytes")));
        }
        let mut body = vec![0u8; length];
        self.read_until(&mut body, deadline)?;
        serde_json::from_slice(&body).map_err(|e| {
            self.kill();
            died(RestartCause::Crashed, format!("an unreadable reply: {e}"))
        })
    }

    fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), Failure> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.kill();
                return Err(died(
                    RestartCause::Timeout,
                    "no answer within --transform-timeout; the worker was killed".to_owned(),
                ));
            }
            // Waits in slices, watching the worker's process: a worker that exits while a process
            // it started holds the socket open is noticed within a slice, not at the timeout.
            let _ = self.control.set_read_timeout(Some(left.min(EXIT_CHECK_INTERVAL)));
            match self.control.read(&mut buf[filled..]) {
                Ok(0) => return Err(self.exit_failure("the worker exited".into())),
                Ok(read) => filled += read,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    if matches!(self.child.try_wait(), Ok(Some(_))) {
                        return Err(
                            self.exit_failure("the worker exited (a process it started kept its socket)".into())
                        );
                    }
                }
                Err(e) => return Err(self.exit_failure(format!("reading its reply: {e}"))),
            }
        }
        Ok(())
    }

    /// How a worker that closed its socket (or exited) ended; what it started is killed.
    fn exit_failure(&mut self, what: String) -> Failure {
        use std::os::unix::process::ExitStatusExt;
        // Its own exit status first (it is exiting); then whatever it started.
        let status = self.child.wait();
        self.kill_group();
        let (cause, how) = match status {
            Ok(status) => match status.signal() {
                Some(9) => (
                    RestartCause::Memory,
                    "killed by SIGKILL (the kernel's OOM killer sends it when memory runs out)".to_owned(),
                ),
                Some(signal) => (RestartCause::Crashed, format!("killed by signal {signal}")),
                None => (RestartCause::Crashed, format!("exited with {status}")),
            },
            Err(e) => (RestartCause::Crashed, format!("could not be waited for: {e}")),
        };
        died(cause, format!("{what}: {how}"))
    }

    /// Kills the worker and every process of its group (what its function started).
    fn kill(&mut self) {
        self.kill_group();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL to the worker's process group. Its id stays the worker's pid while any member
    /// lives (even once the worker is reaped), so it names no other process.
    fn kill_group(&self) {
        if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }

    /// Asks the worker to exit and waits up to a second for it to close its socket (it does
    /// as it exits); kills it otherwise.
    fn stop(mut self) {
        if self.send(br#"{"op":"exit"}"#).is_ok() {
            let _ = self.control.set_read_timeout(Some(Duration::from_secs(1)));
            let mut rest = [0u8; 64];
            while matches!(self.control.read(&mut rest), Ok(n) if n > 0) {}
        }
        self.kill();
    }
}

fn died(cause: RestartCause, detail: String) -> Failure {
    Failure::Died { cause, detail }
}
