//! `conveyor._native`: the thin Python-facing layer over the trainer-client library's blocking
//! API. The Pythonic API (`StreamingDataset`, output conversion, ranks, state) is in
//! `conveyor/__init__.py`; this module only connects, plans, streams and hands out each field as
//! a `uint8` numpy array that borrows the received message (no copy).

use std::{path::PathBuf, sync::Mutex, time::Duration};

use bytes::Bytes;
use numpy::{PyArray1, ndarray::ArrayView1};
use pyo3::{create_exception, exceptions::PyException, prelude::*};
use trainer_client::{
    AuthToken, Batch, ClientError, ConnectOptions, DType, PlanSettings, PlanSpec, RunSpec, Shuffle, StreamOptions,
    TlsOptions, blocking, error_chain,
};

/// The extension's allocator: jemalloc reuses a dropped batch's pages for the next one, where the
/// interpreter's malloc (glibc) gave them back and faulted them in again.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

create_exception!(conveyor, ConveyorError, PyException, "Base class of every Conveyor error.");
create_exception!(
    conveyor,
    LoaderUnavailableError,
    ConveyorError,
    "No loader could be reached (or none stayed reachable for the unavailable timeout)."
);
create_exception!(conveyor, UnknownDatasetError, ConveyorError, "The loaders serve no dataset of that name.");
create_exception!(
    conveyor,
    InvalidSettingsError,
    ConveyorError,
    "Settings the loaders cannot serve: a bad address, batch size, rank, window or state."
);
create_exception!(conveyor, BatchError, ConveyorError, "A loader refused a batch or sent a malformed one.");
create_exception!(
    conveyor,
    AuthenticationError,
    ConveyorError,
    "Every loader refused the client's credentials: a missing or wrong token or client certificate."
);

/// The client library's messages name the command line's flags; a Python user sets arguments.
const PYTHON_NAMES: &[(&str, &str)] = &[
    ("--unavailable-timeout", "unavailable_timeout"),
    ("--request-timeout", "request_timeout"),
    ("--storage-retry-timeout", "storage_retry_timeout"),
    ("--max-message-bytes", "max_message_bytes"),
    ("--shuffle-window", "shuffle_window"),
    ("--auth-token-file", "auth_token_file"),
    ("--batch-size", "batch_size"),
    ("--world-size", "world_size"),
    ("--tls-cert", "tls_cert"),
    ("--tls-key", "tls_key"),
    ("--tls-ca", "tls_ca"),
    ("--rank", "rank"),
    ("no --loader given", "loaders=[] is empty"),
    ("by its --loader name", "by its name in loaders"),
    ("no --loader name", "no name in loaders"),
    ("--loader", "loaders entry"),
];

/// `message` with the client's flags named as the Python arguments that set them.
fn python_names(message: String) -> String {
    // The loaders' own flags ("their --max-batch-samples") stay as they are.
    PYTHON_NAMES.iter().fold(message, |message, (flag, argument)| {
        let mut out = String::with_capacity(message.len());
        let mut rest = message.as_str();
        while let Some(at) = rest.find(flag) {
            let end = at + flag.len();
            let whole = !rest[end..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-');
            let theirs = rest[..at].ends_with("their ");
            out.push_str(&rest[..at]);
            out.push_str(if whole && !theirs { argument } else { flag });
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    })
}

/// The Python exception for a client error, with the whole cause chain as its message.
fn to_py(error: ClientError) -> PyErr {
    let message = python_names(error_chain(&error));
    match error {
        ClientError::UnknownDataset { .. } => UnknownDatasetError::new_err(message),
        ClientError::NoLoaders
        | ClientError::Connect { .. }
        | ClientError::ConnectTimeout { .. }
        | ClientError::Rpc { .. }
        | ClientError::StreamEnded { .. }
        | ClientError::RequestTimeout { .. }
        | ClientError::Departed { .. }
        | ClientError::CatalogMismatch { .. }
        | ClientError::Unavailable { .. }
        | ClientError::Runtime(_) => LoaderUnavailableError::new_err(message),
        ClientError::Refused { .. } => AuthenticationError::new_err(message),
        ClientError::BatchRefused { .. } | ClientError::BadResponse { .. } => BatchError::new_err(message),
        ClientError::BadAddress { .. }
        | ClientError::Unresolved { .. }
        | ClientError::BatchOverMessageLimit { .. }
        | ClientError::BatchOverLoaderLimit { .. }
        | ClientError::DatasetSizeChanged { .. }
        | ClientError::Plan(_)
        | ClientError::TlsFile { .. }
        | ClientError::TlsIdentityHalf
        | ClientError::MixedTls { .. }
        | ClientError::TokenFile { .. }
        | ClientError::BadToken { .. }
        | ClientError::Cursor(_) => InvalidSettingsError::new_err(message),
    }
}

fn json_error(error: serde_json::Error) -> PyErr {
    InvalidSettingsError::new_err(format!("not a Conveyor plan or cursor: {error}"))
}

/// Received bytes kept alive for as long as numpy arrays view them.
#[pyclass(module = "conveyor._native", frozen)]
struct Buffer {
    data: Bytes,
}

/// A field's bytes as a `uint8` array borrowing them.
fn borrowed_array<'py>(py: Python<'py>, data: Bytes) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let owner = Bound::new(py, Buffer { data })?;
    let view = ArrayView1::from(&owner.get().data[..]);
    // SAFETY: the array's memory is the `Bytes` held by `owner`, which becomes the array's base
    // object: it lives as long as the array, and `Bytes` never moves or reallocates its memory.
    #[allow(unsafe_code)]
    let array = unsafe { PyArray1::borrow_from_array(&view, owner.clone().into_any()) };
    Ok(array)
}

/// One field of a batch as Python values: `(field, uint8 array, dtype, shape, offsets)`, the
/// offsets (int64, batch + 1) only for a ragged field.
type PyField<'py> = (String, Bound<'py, PyArray1<u8>>, &'static str, Vec<u64>, Option<Bound<'py, PyArray1<i64>>>);

/// One batch as Python values: `(epoch, index, indices, [field])`.
type PyBatch<'py> = (u64, u64, Bound<'py, PyArray1<u64>>, Vec<PyField<'py>>);

fn to_python(py: Python<'_>, batch: Batch) -> PyResult<PyBatch<'_>> {
    let indices = PyArray1::from_vec(py, batch.indices);
    let fields = batch
        .fields
        .into_iter()
        .map(|f| {
            let dtype = if f.dtype == DType::Unspecified { "V0" } else { f.dtype.numpy_code() };
            // Offsets are 8 bytes a sample: copied, where the values are borrowed.
            let offsets = f.offsets.map(|o| PyArray1::from_vec(py, o.into_iter().map(|o| o as i64).collect()));
            Ok((f.name, borrowed_array(py, f.data)?, dtype, f.shape, offsets))
        })
        .collect::<PyResult<_>>()?;
    Ok((batch.epoch, batch.index, indices, fields))
}

/// What a client holds: connections, or a run that owns them for a while.
enum State {
    Idle(Box<blocking::Loaders>),
    Running(Box<blocking::Run>),
    /// Given up (forked child, or closed).
    Gone,
}

/// Connections to loader replicas and at most one run at a time.
#[pyclass(module = "conveyor._native", weakref)]
struct Client {
    state: Mutex<State>,
    /// Samples and batches delivered by the current run.
    delivered: Mutex<(u64, u64)>,
}

/// How often a waiting `next()` checks for Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

impl Client {
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> PyResult<T>) -> PyResult<T> {
        let mut state =
            self.state.lock().map_err(|_| ConveyorError::new_err("the client is poisoned; make a new one"))?;
        f(&mut state)
    }
}

fn closed() -> PyErr {
    ConveyorError::new_err("the client was closed (or inherited across fork); make a new one")
}

/// The TLS and token arguments, as the Python layer passes them: one dict with every key, each
/// value `None` when not given.
#[derive(Debug, Default, FromPyObject)]
#[pyo3(from_item_all)]
struct Security {
    /// CA bundle that verifies the loaders (`tls_ca`).
    tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (`tls_cert`).
    tls_cert: Option<PathBuf>,
    /// Its key (`tls_key`).
    tls_key: Option<PathBuf>,
    /// The name the loaders' certificate must carry, when not the address's host (`tls_domain`).
    tls_domain: Option<String>,
    /// A bearer token (`auth_token`).
    auth_token: Option<String>,
    /// A file holding one (`auth_token_file`).
    auth_token_file: Option<PathBuf>,
}

impl Security {
    /// TLS when any TLS argument is given.
    fn tls(&self) -> PyResult<Option<TlsOptions>> {
        if self.tls_ca.is_none() && self.tls_cert.is_none() && self.tls_key.is_none() && self.tls_domain.is_none() {
            return Ok(None);
        }
        let mut tls = TlsOptions::from_files(self.tls_ca.as_deref(), self.tls_cert.as_deref(), self.tls_key.as_deref())
            .map_err(to_py)?;
        tls.domain.clone_from(&self.tls_domain);
        Ok(Some(tls))
    }

    /// The token given, or the one `CONVEYOR_AUTH_TOKEN` names.
    fn auth_token(&self) -> PyResult<Option<AuthToken>> {
        match (&self.auth_token, &self.auth_token_file) {
            (Some(_), Some(_)) => Err(InvalidSettingsError::new_err("give auth_token or auth_token_file, not both")),
            (Some(token), None) => AuthToken::new(token).map(Some).map_err(to_py),
            (None, Some(path)) => AuthToken::from_file(path).map(Some).map_err(to_py),
            (None, None) => AuthToken::from_env().map_err(to_py),
        }
    }
}

#[pymethods]
impl Client {
    /// Connects to `loaders` (`host:port`); waits until one replica has described its datasets.
    #[new]
    #[pyo3(signature = (loaders, prefetch=8, request_timeout=30.0, unavailable_timeout=60.0, resolve_interval=3.0, max_message_bytes=None, security=None, storage_retry_timeout=120.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        loaders: Vec<String>,
        prefetch: usize,
        request_timeout: f64,
        unavailable_timeout: f64,
        resolve_interval: f64,
        max_message_bytes: Option<usize>,
        security: Option<Security>,
        storage_retry_timeout: f64,
    ) -> PyResult<Client> {
        let seconds = |value: f64, name: &str| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| InvalidSettingsError::new_err(format!("{name}={value} is not a number of seconds >= 0")))
        };
        let security = security.unwrap_or_default();
        let (tls, auth_token) = (security.tls()?, security.auth_token()?);
        let options = StreamOptions {
            connect: ConnectOptions {
                max_message_bytes: max_message_bytes.unwrap_or(ConnectOptions::default().max_message_bytes),
                tls,
                auth_token,
                ..ConnectOptions::default()
            },
            prefetch: prefetch
                .try_into()
                .map_err(|_| InvalidSettingsError::new_err("prefetch=0: request at least 1 batch ahead"))?,
            request_timeout: seconds(request_timeout, "request_timeout")?,
            unavailable_timeout: seconds(unavailable_timeout, "unavailable_timeout")?,
            resolve_interval: seconds(resolve_interval, "resolve_interval")?,
            storage_retry_timeout: seconds(storage_retry_timeout, "storage_retry_timeout")?,
            ..StreamOptions::default()
        };
        // Waited for in slices, so that Ctrl-C stops a wait for loaders that are not up.
        let mut connecting = blocking::Connecting::start(&loaders, options).map_err(to_py)?;
        let loaders = loop {
            if let Some(result) = py.detach(|| connecting.wait(SIGNAL_CHECK)) {
                break result.map_err(to_py)?;
            }
            py.check_signals()?;
        };
        Ok(Client { state: Mutex::new(State::Idle(Box::new(loaders))), delivered: Mutex::new((0, 0)) })
    }

    /// The datasets the loaders serve, as JSON (a list of `DatasetInfo`).
    fn catalog(&self) -> PyResult<String> {
        self.with_state(|state| match state {
            State::Idle(loaders) => Ok(catalog_json(loaders.catalog())),
            State::Running(_) => Err(ConveyorError::new_err("a run is in progress; finish or stop it first")),
            State::Gone => Err(closed()),
        })
    }

    /// The plan for `dataset` (JSON), validated against the loaders' catalog.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        dataset: &str,
        batch_size: u64,
        shuffle: &str,
        seed: u64,
        shuffle_window: u64,
        rank: u64,
        world_size: u64,
        drop_last: bool,
    ) -> PyResult<String> {
        let shuffle: Shuffle =
            shuffle.parse().map_err(|e: String| InvalidSettingsError::new_err(format!("shuffle: {e}")))?;
        let settings = PlanSettings { batch_size, shuffle, seed, shuffle_window, rank, world_size, drop_last };
        self.with_state(|state| match state {
            State::Idle(loaders) => {
                let plan = loaders.plan(dataset, &settings).map_err(to_py)?;
                serde_json::to_string(&plan).map_err(json_error)
            }
            State::Running(_) => Err(ConveyorError::new_err("a run is in progress; finish or stop it first")),
            State::Gone => Err(closed()),
        })
    }

    /// Batches per epoch of a plan (JSON) for its rank.
    #[staticmethod]
    #[pyo3(signature = (plan, epoch=0))]
    fn batches_per_epoch(plan: &str, epoch: u64) -> PyResult<u64> {
        let plan: PlanSpec = serde_json::from_str(plan).map_err(json_error)?;
        Ok(trainer_client::EpochPlan::new(plan, epoch).map_err(|e| to_py(e.into()))?.num_batches())
    }

    /// The plan (JSON) for rank `rank` of `world_size` resuming where every rank of `plan` had
    /// taken `next_batch` batches of `epoch`: the rest of that epoch split among the new ranks.
    #[staticmethod]
    fn reshard(plan: &str, epoch: u64, next_batch: u64, rank: u64, world_size: u64) -> PyResult<String> {
        let plan: PlanSpec = serde_json::from_str(plan).map_err(json_error)?;
        let resharded = plan.resharded(epoch, next_batch, rank, world_size).map_err(|e| to_py(e.into()))?;
        serde_json::to_string(&resharded).map_err(json_error)
    }

    /// Starts streaming epochs `first_epoch..end_epoch` of `plan` from `start_batch`, as worker
    /// `worker` of `num_workers` (each takes every `num_workers`-th batch).
    #[pyo3(signature = (dataset, plan, first_epoch, end_epoch, start_batch=0, worker=0, num_workers=1))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        dataset: &str,
        plan: &str,
        first_epoch: u64,
        end_epoch: u64,
        start_batch: u64,
        worker: u64,
        num_workers: u64,
    ) -> PyResult<()> {
        let plan: PlanSpec = serde_json::from_str(plan).map_err(json_error)?;
        let spec = RunSpec { start_batch, ..RunSpec::new(dataset, plan, first_epoch..end_epoch) }
            .for_worker(worker, num_workers.max(1));
        *self.delivered.lock().map_err(|_| closed())? = (0, 0);
        self.with_state(|state| {
            let loaders = match std::mem::replace(state, State::Gone) {
                State::Idle(loaders) => *loaders,
                State::Running(run) => run.into_loaders(),
                State::Gone => return Err(closed()),
            };
            // Checked before `run` consumes the connections, so a refused spec keeps them.
            if let Err(error) = loaders.check(&spec) {
                *state = State::Idle(Box::new(loaders));
                return Err(to_py(error));
            }
            match loaders.run(spec) {
                Ok(run) => {
                    *state = State::Running(Box::new(run));
                    Ok(())
                }
                Err(error) => Err(to_py(error)),
            }
        })
    }

    /// The next batch of the run, or `None` at its end. Waits with the GIL released and checks
    /// for Ctrl-C every 50 ms.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Option<PyBatch<'py>>> {
        loop {
            let waited = py.detach(|| {
                self.with_state(|state| match state {
                    State::Running(run) => Ok(run.next_timeout(SIGNAL_CHECK)),
                    State::Idle(_) => Ok(Some(None)),
                    State::Gone => Err(closed()),
                })
            })?;
            match waited {
                Some(Some(Ok(batch))) => {
                    if let Ok(mut delivered) = self.delivered.lock() {
                        delivered.0 += batch.indices.len() as u64;
                        delivered.1 += 1;
                    }
                    return to_python(py, batch).map(Some);
                }
                Some(Some(Err(error))) => return Err(to_py(error)),
                Some(None) => return Ok(None),
                None => py.check_signals()?,
            }
        }
    }

    /// The position after the last batch delivered (cursor JSON), while a run is active.
    fn cursor(&self) -> PyResult<Option<String>> {
        self.with_state(|state| match state {
            State::Running(run) => serde_json::to_string(&run.cursor()).map(Some).map_err(json_error),
            _ => Ok(None),
        })
    }

    /// Counters (JSON): the dispatcher's stats plus samples and batches of the current run.
    fn stats(&self) -> PyResult<String> {
        let (samples, batches) = *self.delivered.lock().map_err(|_| closed())?;
        self.with_state(|state| {
            let stats = match state {
                State::Running(run) => run.stats(),
                State::Idle(loaders) => loaders.stats(),
                State::Gone => return Err(closed()),
            };
            let mut json = serde_json::to_value(stats).map_err(json_error)?;
            json["samples"] = samples.into();
            json["batches"] = batches.into();
            Ok(json.to_string())
        })
    }

    /// Ends the current run, keeping the connections.
    fn stop(&self) -> PyResult<()> {
        self.with_state(|state| {
            *state = match std::mem::replace(state, State::Gone) {
                State::Running(run) => State::Idle(Box::new(run.into_loaders())),
                other => other,
            };
            Ok(())
        })
    }

    /// Closes the connections and stops the client's runtime.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let state = self.with_state(|state| Ok(std::mem::replace(state, State::Gone)))?;
        py.detach(move || drop(state));
        Ok(())
    }

    /// Forgets the client without stopping anything: for a forked child, whose copy of the
    /// client's runtime has no threads (stopping it would wait for them forever).
    fn abandon(&self) {
        if let Ok(mut state) = self.state.lock() {
            std::mem::forget(std::mem::replace(&mut *state, State::Gone));
        }
    }
}

fn catalog_json(catalog: &[trainer_client::DatasetInfo]) -> String {
    let datasets: Vec<serde_json::Value> = catalog
        .iter()
        .map(|d| {
            let fields: Vec<serde_json::Value> = d
                .fields
                .iter()
                .map(|f| {
                    let dtype = DType::try_from(f.dtype).unwrap_or(DType::Unspecified);
                    serde_json::json!({
                        "name": f.name,
                        "dtype": dtype.numpy_code(),
                        "sample_shape": f.sample_shape,
                        "bytes_per_sample": f.bytes_per_sample,
                        "chunk_len": f.chunk_len,
                        "dimension_names": f.dimension_names,
                        "ragged": f.ragged,
                        "utf8": f.utf8,
                    })
                })
                .collect();
            let coordinates: Vec<serde_json::Value> = d
                .coordinates
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "name": c.name,
                        "dtype": c.dtype,
                        "shape": c.shape,
                        "dimension_names": c.dimension_names,
                        "role": c.role,
                        "units": c.units,
                        "calendar": c.calendar,
                        "reason": c.reason,
                    })
                })
                .collect();
            serde_json::json!({
                "name": d.name,
                "num_samples": d.num_samples,
                "fields": fields,
                "derivation": d.derivation,
                "coordinates": coordinates,
            })
        })
        .collect();
    serde_json::Value::from(datasets).to_string()
}

/// The datasets the loaders at `loaders` serve (JSON), without keeping a connection.
#[pyfunction]
#[pyo3(signature = (loaders, unavailable_timeout=10.0, security=None))]
fn datasets(
    py: Python<'_>,
    loaders: Vec<String>,
    unavailable_timeout: f64,
    security: Option<Security>,
) -> PyResult<String> {
    let client = Client::new(py, loaders, 1, 30.0, unavailable_timeout, 3.0, None, security, 120.0)?;
    let catalog = client.catalog();
    client.close(py)?;
    catalog
}

/// The native part of the `conveyor` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_function(wrap_pyfunction!(datasets, m)?)?;
    let py = m.py();
    m.add("ConveyorError", py.get_type::<ConveyorError>())?;
    m.add("LoaderUnavailableError", py.get_type::<LoaderUnavailableError>())?;
    m.add("UnknownDatasetError", py.get_type::<UnknownDatasetError>())?;
    m.add("InvalidSettingsError", py.get_type::<InvalidSettingsError>())?;
    m.add("BatchError", py.get_type::<BatchError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    Ok(())
}
