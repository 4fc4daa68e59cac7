//! Typed errors of the loader: why a dataset cannot be opened (these stop the server at start-up)
//! and why one batch request cannot be served (these fail only that batch), with the one mapping
//! of each cause to a gRPC code and a wire error kind.

use std::path::PathBuf;

use conveyor_proto::v1::BatchError;
use conveyor_proto::v1::batch_error::Kind;

/// A dataset directory that cannot be served. Each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `--dataset` was not `NAME=DIR`.
    #[error("--dataset '{spec}' is not NAME=DIR; write for example --dataset chess=/data/chess")]
    BadSpec {
        /// The flag's value as given.
        spec: String,
    },
    /// Two `--dataset` flags with one name.
    #[error("dataset '{name}' is given twice; give each --dataset a distinct NAME")]
    DuplicateDataset {
        /// The repeated name.
        name: String,
    },
    /// A file or directory could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A `.npy` header is wrong.
    #[error("{}: {problem}", path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong with its header.
        problem: conveyor_proto::npy::HeaderError,
    },
    /// A WebDataset shard that cannot be served.
    #[error("{}: {problem}", shard.display())]
    WebDataset {
        /// The shard.
        shard: PathBuf,
        /// What is wrong (naming the sample and member), and the fix.
        problem: String,
    },
    /// A ragged field's offsets that do not describe its values.
    #[error("{}: {problem}", path.display())]
    BadOffsets {
        /// The offsets file.
        path: PathBuf,
        /// What is wrong, and the fix.
        problem: OffsetsProblem,
    },
    /// Offsets without exactly one values file beside them.
    #[error(
        "{} are the offsets of a ragged field '{field}', which needs exactly one {field}.npy beside them (found {values} \
         values files; ragged fields are not sharded): write the values with numpy.save('{field}.npy', values)",
        offsets.display()
    )]
    RaggedLayout {
        /// The field.
        field: String,
        /// Its offsets file.
        offsets: PathBuf,
        /// Values files found for it.
        values: usize,
    },
    /// A `.npy` file is shorter than its header says.
    #[error(
        "{}: truncated: the header promises {expected_bytes} bytes of data but the file holds {actual_bytes}; \
         rewrite it with numpy.save", path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Data bytes the header promises.
        expected_bytes: u64,
        /// Data bytes present.
        actual_bytes: u64,
    },
    /// An HDF5 (or netCDF-4) file: loaders read its conversion, not the file.
    #[error(
        "dataset '{dataset}': {} is an HDF5 file, which loaders do not read; convert it once with \
         `conveyor-convert {} OUT.zarr` (pip install 'conveyor[convert]') and serve OUT.zarr",
        path.display(),
        path.display()
    )]
    Hdf5File {
        /// Dataset name.
        dataset: String,
        /// The file.
        path: PathBuf,
    },
    /// A field whose name a client could not use safely (a path, a reserved name).
    #[error("dataset '{dataset}': {problem}")]
    BadFieldName {
        /// Dataset name.
        dataset: String,
        /// What is wrong, naming the field.
        problem: conveyor_proto::FieldNameError,
    },
    /// A directory with no `.npy` fields.
    #[error("dataset '{dataset}': {} holds no .npy files; put FIELD.npy or FIELD-00000.npy files in it", dir.display())]
    NoFields {
        /// Dataset name.
        dataset: String,
        /// The directory.
        dir: PathBuf,
    },
    /// Both `FIELD.npy` and `FIELD-NNNNN.npy` exist.
    #[error("field '{field}' is both a single file and shards in {}; keep one of them", dir.display())]
    AmbiguousField {
        /// Field name.
        field: String,
        /// The directory.
        dir: PathBuf,
    },
    /// Shards of a field whose sample counts add up past 2^64.
    #[error("field '{field}': its shards hold more than 2^64 samples together; a shard header in {} is corrupt", dir.display())]
    TooManySamples {
        /// Field name.
        field: String,
        /// The directory.
        dir: PathBuf,
    },
    /// Shards of a field disagree on dtype or per-sample shape.
    #[error(
        "{}: shard of field '{field}' has {found} but earlier shards have {expected}; \
         all shards of a field need the same dtype and per-sample shape", path.display()
    )]
    ShardMismatch {
        /// Field name.
        field: String,
        /// The disagreeing shard.
        path: PathBuf,
        /// What earlier shards have.
        expected: String,
        /// What this shard has.
        found: String,
    },
    /// A Zarr array or group that cannot be served.
    #[error("{}: {problem}", path.display())]
    Zarr {
        /// The array or group path.
        path: PathBuf,
        /// What is wrong.
        problem: ZarrProblem,
    },
    /// A `--transform` or `--pipeline` value that is not `NAME=SOURCE:...`.
    #[error("{flag} '{value}' is not {example}")]
    BadDerivedSpec {
        /// The flag.
        flag: &'static str,
        /// Its value as given.
        value: String,
        /// The form it needs, with an example.
        example: &'static str,
    },
    /// A derived dataset that cannot be set up.
    #[error("dataset '{name}' ({flag}): {problem}")]
    Derived {
        /// The derived dataset's name.
        name: String,
        /// `--transform` or `--pipeline`.
        flag: &'static str,
        /// What is wrong, naming the field, operator or function.
        problem: DerivedProblem,
    },
    /// A `--fields` name that the dataset does not have.
    #[error(
        "dataset '{dataset}': --fields names '{field}', which is not in {}; it has: {available}", location.display()
    )]
    UnknownField {
        /// Dataset name.
        dataset: String,
        /// The name given.
        field: String,
        /// The directory, archive or group.
        location: PathBuf,
        /// What it has, as a list for the message.
        available: String,
    },
    /// A `--windows` or `--token-dtype` value that cannot be used.
    #[error("{flag} '{value}' {problem}")]
    BadTokenFlag {
        /// The flag.
        flag: &'static str,
        /// Its value as given.
        value: String,
        /// What is wrong, and the fix.
        problem: String,
    },
    /// A token file or `--windows` that cannot be served.
    #[error("dataset '{dataset}': {problem}")]
    Tokens {
        /// The dataset.
        dataset: String,
        /// What is wrong, and the fix.
        problem: String,
    },
    /// A `--fields` value that is not `NAME=FIELD,...` for a `--dataset` NAME.
    #[error("--fields '{value}' {problem}")]
    BadFields {
        /// The flag's value as given.
        value: String,
        /// What is wrong, and the fix.
        problem: FieldsProblem,
    },
    /// An `.npz` archive that cannot be served.
    #[error("{}: {problem}", path.display())]
    Npz {
        /// The archive, with the member when one is at fault.
        path: PathBuf,
        /// What is wrong, and the fix.
        problem: NpzProblem,
    },
    /// A dataset in an object store that cannot be served.
    #[error("dataset '{dataset}' ({url}): {problem}")]
    Remote {
        /// Dataset name.
        dataset: String,
        /// The location (without credentials).
        url: String,
        /// What is wrong: missing bucket or object, access denied, endpoint unreachable ...
        problem: String,
    },
    /// The `--disk-cache` directory cannot be used.
    #[error("--disk-cache {}: {problem}", dir.display())]
    DiskCache {
        /// The directory.
        dir: PathBuf,
        /// What is wrong, and the fix.
        problem: DiskCacheProblem,
    },
    /// Fields with different sample counts.
    #[error(
        "dataset '{dataset}': field '{field}' has {len} samples but field '{first_field}' has {first_len}; \
         every field needs one entry per sample (serve only the fields that share a length with \
         --fields {dataset}=FIELD,...)"
    )]
    UnequalLengths {
        /// Dataset name.
        dataset: String,
        /// First field seen.
        first_field: String,
        /// Its length.
        first_len: u64,
        /// The disagreeing field.
        field: String,
        /// Its length.
        len: u64,
    },
}

/// A chunk of a dataset could not be read or decoded; only the batches that need it fail.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("dataset '{dataset}', field '{field}': cannot read the chunk holding rows {first_row}..{last_row}: {reason}")]
pub struct ReadError {
    /// Dataset name.
    pub dataset: String,
    /// Field name.
    pub field: String,
    /// First row of the chunk.
    pub first_row: u64,
    /// One past its last row.
    pub last_row: u64,
    /// What failed.
    pub reason: String,
    /// The failure is the storage's and transient ([`crate::storage::is_transient`]): the same
    /// read may succeed a moment later.
    pub transient: bool,
}

/// Why one batch request cannot be served. The stream and the server carry on.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// A dataset with a ragged field, asked for by a client that does not read offsets.
    #[error(
        "dataset '{dataset}' has field '{field}' whose samples differ in length (a ragged field), which this client \
         cannot read; upgrade trainer-client or the conveyor package"
    )]
    ClientTooOld {
        /// Dataset name.
        dataset: String,
        /// The ragged field.
        field: String,
    },
    /// No dataset of that name.
    #[error("unknown dataset '{name}'; this loader serves: {}", available.join(", "))]
    UnknownDataset {
        /// The requested name.
        name: String,
        /// Names this server holds.
        available: Vec<String>,
    },
    /// An index past the end.
    #[error("sample index {index} is out of range for dataset '{dataset}' with {len} samples (valid: 0..{len})")]
    IndexOutOfRange {
        /// Dataset name.
        dataset: String,
        /// The bad index.
        index: u64,
        /// Number of samples.
        len: u64,
    },
    /// A batch over the server's limits.
    #[error(
        "batch of {num_samples} samples ({bytes} bytes) from dataset '{dataset}' exceeds this loader's limit of \
         {max_samples} samples / {max_bytes} bytes; request smaller batches or raise --max-batch-bytes"
    )]
    BatchTooLarge {
        /// Dataset name.
        dataset: String,
        /// Requested samples.
        num_samples: u64,
        /// Bytes they would take.
        bytes: u64,
        /// Sample limit.
        max_samples: u64,
        /// Byte limit.
        max_bytes: u64,
    },
    /// A request with no indices.
    #[error("batch request for dataset '{dataset}' names no sample indices")]
    EmptyBatch {
        /// Dataset name.
        dataset: String,
    },
    /// A chunk the batch needs could not be read or decoded.
    #[error(transparent)]
    ReadFailed(#[from] ReadError),
    /// The dataset's transform refused the batch: the function raised or broke the schema.
    #[error("dataset '{dataset}': {function} failed on {samples}: {message}")]
    TransformFailed {
        /// Derived dataset name.
        dataset: String,
        /// The function or pipeline.
        function: String,
        /// Which samples, for example `4 samples (indices 8, 3, 9, 1)`.
        samples: String,
        /// The exception or what broke the schema.
        message: String,
    },
    /// Transform workers failed twice on the batch (out of memory, crash, timeout); another
    /// replica may serve it.
    #[error("dataset '{dataset}': the workers running {function} failed on {samples}: {detail}")]
    WorkerFailed {
        /// Derived dataset name.
        dataset: String,
        /// The function.
        function: String,
        /// Which samples.
        samples: String,
        /// What happened to each worker.
        detail: String,
    },
    /// A batch whose data would not fit a transform worker's shared region.
    #[error(
        "batch of {num_samples} samples from dataset '{dataset}' needs {bytes} bytes of a transform worker's shared \
         region, which holds {shm_bytes}; request smaller batches or raise --transform-shm-bytes"
    )]
    RegionTooSmall {
        /// Dataset name.
        dataset: String,
        /// Requested samples.
        num_samples: u64,
        /// Bytes the region would need.
        bytes: u64,
        /// `--transform-shm-bytes`.
        shm_bytes: u64,
    },
    /// A sample that cannot be decoded (a corrupt or truncated image, one too large).
    #[error(
        "dataset '{dataset}': sample {index} of field '{field}' ({origin}) {reason}; the batch fails and the loader \
         serves on (with --on-bad-sample substitute the loader serves another sample in its place)"
    )]
    BadSample {
        /// Dataset name.
        dataset: String,
        /// The source field.
        field: String,
        /// The sample's index.
        index: u64,
        /// Where it is stored: its file, or shard and member.
        origin: String,
        /// What the decoder or the size check said.
        reason: String,
    },
    /// Gathering the batch failed unexpectedly (the reader panicked); the loader carries on.
    #[error("loader failed to read batch {batch_id} of dataset '{dataset}': {reason}")]
    GatherFailed {
        /// Dataset name.
        dataset: String,
        /// The request's batch id.
        batch_id: u64,
        /// What failed.
        reason: String,
    },
}

impl RequestError {
    /// The wire kind of this cause: the one mapping every batch error goes through.
    pub fn kind(&self) -> Kind {
        match self {
            RequestError::UnknownDataset { .. } => Kind::UnknownDataset,
            RequestError::IndexOutOfRange { .. } => Kind::IndexOutOfRange,
            RequestError::BatchTooLarge { .. } | RequestError::RegionTooSmall { .. } => Kind::BatchTooLarge,
            RequestError::EmptyBatch { .. } => Kind::EmptyBatch,
            RequestError::ReadFailed(error) if error.transient => Kind::StorageUnavailable,
            RequestError::ReadFailed(_) | RequestError::GatherFailed { .. } | RequestError::BadSample { .. } => {
                Kind::ReadFailed
            }
            RequestError::TransformFailed { .. } => Kind::TransformFailed,
            RequestError::WorkerFailed { .. } => Kind::WorkerFailed,
            RequestError::ClientTooOld { .. } => Kind::ClientTooOld,
        }
    }

    /// The wire form sent in a `BatchResponse`.
    pub fn to_batch_error(&self) -> BatchError {
        BatchError { kind: self.kind() as i32, message: self.to_string() }
    }
}

impl From<RequestError> for tonic::Status {
    fn from(error: RequestError) -> tonic::Status {
        tonic::Status::new(error_kind(error.kind()).code, error.to_string())
    }
}

/// What a wire kind of batch error means to gRPC and to operators.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind {
    /// The wire kind.
    pub kind: Kind,
    /// The `kind` label of `conveyor_loader_request_errors_total`.
    pub label: &'static str,
    /// The gRPC status of a call that fails with it.
    pub code: tonic::Code,
}

/// The one table every batch error goes through (after [`RequestError::kind`]): its metric label
/// and its gRPC code. [`crate::serve::stats::Stats`] keeps one counter per row, in this order.
pub const ERROR_KINDS: [ErrorKind; 9] = [
    ErrorKind { kind: Kind::UnknownDataset, label: "unknown_dataset", code: tonic::Code::NotFound },
    ErrorKind { kind: Kind::IndexOutOfRange, label: "index_out_of_range", code: tonic::Code::OutOfRange },
    ErrorKind { kind: Kind::BatchTooLarge, label: "batch_too_large", code: tonic::Code::ResourceExhausted },
    ErrorKind { kind: Kind::EmptyBatch, label: "empty_batch", code: tonic::Code::InvalidArgument },
    ErrorKind { kind: Kind::ReadFailed, label: "read_failed", code: tonic::Code::DataLoss },
    ErrorKind { kind: Kind::StorageUnavailable, label: "storage_unavailable", code: tonic::Code::Unavailable },
    ErrorKind { kind: Kind::TransformFailed, label: "transform_failed", code: tonic::Code::FailedPrecondition },
    ErrorKind { kind: Kind::WorkerFailed, label: "worker_failed", code: tonic::Code::Unavailable },
    ErrorKind { kind: Kind::ClientTooOld, label: "client_too_old", code: tonic::Code::FailedPrecondition },
];

/// The row of [`ERROR_KINDS`] for `kind`.
pub fn error_kind(kind: Kind) -> ErrorKind {
    ERROR_KINDS[error_kind_index(kind)]
}

/// The position of `kind` in [`ERROR_KINDS`] (an unspecified kind counts as a failed read).
pub fn error_kind_index(kind: Kind) -> usize {
    ERROR_KINDS.iter().position(|row| row.kind == kind).unwrap_or(4)
}

/// A batch's samples for messages: the count and the first few indices in request order.
pub fn describe_samples(indices: &[u64]) -> String {
    const SHOWN: usize = 6;
    let shown: Vec<String> = indices.iter().take(SHOWN).map(u64::to_string).collect();
    let more = if indices.len() > SHOWN { ", ..." } else { "" };
    format!("{} samples (indices {}{more})", indices.len(), shown.join(", "))
}

/// Why a ragged field's offsets are refused; each message says the fix. Offsets are `int64`, one
/// per sample plus one, starting at 0 and never decreasing, the last the values' row count
/// (numpy: `numpy.save('FIELD.offsets.npy', numpy.cumsum([0, *lengths]))`).
#[derive(Debug, thiserror::Error)]
pub enum OffsetsProblem {
    /// Not `int64`.
    #[error("offsets must be int64, found {dtype}; save them with .astype('<i8')")]
    NotInt64 {
        /// The element type found.
        dtype: &'static str,
    },
    /// Not 1-D.
    #[error("offsets must be 1-D (one per sample plus one), found shape {shape:?}")]
    NotOneDimensional {
        /// The shape found.
        shape: Vec<u64>,
    },
    /// No entries at all.
    #[error("holds no offsets; N samples need N + 1 offsets, the first 0")]
    Empty,
    /// The first is not 0.
    #[error("the first offset is {first}, not 0")]
    NotFromZero {
        /// The first offset.
        first: i64,
    },
    /// One that is smaller than the one before.
    #[error("offsets[{index}] = {at} is above offsets[{}] = {next}; offsets never decrease", index + 1)]
    Decreasing {
        /// The position of the larger one.
        index: u64,
        /// Its value.
        at: i64,
        /// The next one.
        next: i64,
    },
    /// The last is not the values' row count.
    #[error(
        "the last offset is {last} but {} holds {rows} rows; the last offset must be the values' length",
        values.display()
    )]
    WrongEnd {
        /// The last offset.
        last: i64,
        /// Rows of the values.
        rows: u64,
        /// The values file.
        values: PathBuf,
    },
}

/// Why a derived dataset cannot be set up; each message says the fix.
#[derive(Debug, thiserror::Error)]
pub enum DerivedProblem {
    /// Its name is a stored dataset's or an earlier derived one's.
    #[error("a dataset of that name exists already; give the derived dataset its own name")]
    NameTaken,
    /// No stored dataset of the source's name.
    #[error(
        "no stored dataset '{source_name}' to derive it from; give one with --dataset (derived datasets cannot \
         be sources); stored: {stored}"
    )]
    NoSource {
        /// The source named.
        source_name: String,
        /// The stored datasets, as a list for the message.
        stored: String,
    },
    /// `--pipeline NAME=SOURCE:@FILE` whose file cannot be read.
    #[error("cannot read the pipeline file {}: {error}", path.display())]
    PipelineFile {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A pipeline that does not parse or does not fit the source's fields (names the operator).
    #[error("{0}")]
    Pipeline(String),
    /// A source without samples to call the function on at start-up.
    #[error("the source '{source_name}' has no samples to probe the function with")]
    NothingToProbe {
        /// The source.
        source_name: String,
    },
    /// The probe batch could not be read.
    #[error("reading the probe batch: {0}")]
    Probe(ReadError),
    /// The Python function cannot be loaded or its probe output does not make a schema.
    #[error("{0}")]
    Function(String),
    /// An output field whose name cannot be served.
    #[error("{0}")]
    FieldName(conveyor_proto::FieldNameError),
}

/// What is wrong with a `--fields` value; each message says the fix.
#[derive(Debug, thiserror::Error)]
pub enum FieldsProblem {
    /// No `=`.
    #[error("is not NAME=FIELD,...; write for example --fields eeg=eeg,label")]
    NotNamed,
    /// A dataset no `--dataset` gives.
    #[error("names dataset '{name}', which no --dataset gives; the datasets are: {known}")]
    UnknownDataset {
        /// The name given.
        name: String,
        /// The datasets, as a list for the message.
        known: String,
    },
    /// `a,,b` or a trailing comma.
    #[error("has an empty field name; list fields separated by single commas")]
    EmptyName,
    /// The same dataset in two `--fields` values.
    #[error("gives dataset '{name}' a second time; list all its fields in one --fields")]
    Repeated {
        /// The dataset.
        name: String,
    },
}

/// Why a Zarr array or group cannot be served; each message says the fix. zarrs' own errors are
/// kept whole (and shown in the message).
#[derive(Debug, thiserror::Error)]
pub enum ZarrProblem {
    /// Metadata zarrs refuses.
    #[error("invalid {node} metadata: {error}")]
    Metadata {
        /// `array` or `group`.
        node: &'static str,
        /// zarrs' error.
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store or a key in it that zarrs refuses.
    #[error("{0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
    /// A metadata document cannot be read.
    #[error("cannot read it: {0}")]
    Unreadable(Box<dyn std::error::Error + Send + Sync>),
    /// A metadata document that is not JSON.
    #[error("is not valid JSON ({0}); rewrite the metadata")]
    NotJson(serde_json::Error),
    /// A metadata document that is JSON but not an object.
    #[error("is not a JSON object; rewrite the metadata")]
    NotObject,
    /// `.zmetadata` without its `metadata` object.
    #[error("has no \"metadata\" object; rewrite it with zarr.consolidate_metadata")]
    NoConsolidatedMetadata,
    /// A group whose members cannot be listed.
    #[error(
        "cannot list the group ({0}); a group served over plain HTTP needs consolidated metadata \
         (zarr.consolidate_metadata)"
    )]
    CannotList(Box<dyn std::error::Error + Send + Sync>),
    /// A group without arrays.
    #[error("the group holds no arrays; each array of a group is a field")]
    EmptyGroup,
    /// An element type Conveyor does not serve.
    #[error("unsupported data type {data_type}; use bool, int8/16/32/64, uint8/16/32/64 or float16/32/64")]
    UnsupportedDtype {
        /// The type as zarrs names it.
        data_type: String,
    },
    /// An object array whose codecs do not say how its objects are stored.
    #[error(
        "unsupported data type {data_type}: an object array without a variable-length codec; write strings with \
         VLenUTF8, bytes with VLenBytes and arrays with VLenArray (zarr-python: dtype=VariableLengthUTF8() and the like)"
    )]
    ObjectWithoutCodec {
        /// The type as zarrs names it.
        data_type: String,
    },
    /// A 0-d array has no samples axis.
    #[error("array is 0-dimensional; axis 0 must index samples")]
    ZeroDimensional,
    /// A variable-length array must hold one value per sample.
    #[error(
        "a variable-length array must be 1-dimensional (one value per sample) but has shape {shape:?}; write one \
         array of shape (num_samples,)"
    )]
    VlenNotOneDimensional {
        /// Its shape.
        shape: Vec<u64>,
    },
    /// One sample larger than the loader serves.
    #[error(
        "one sample of array '{array}' (shape {sample_shape:?} after the sample axis, {dtype}) is over {max_bytes} \
         bytes; chunk the data so that a sample is one row of a smaller array, or serve a slice of it"
    )]
    SampleTooLarge {
        /// The array.
        array: String,
        /// Its shape after the sample axis.
        sample_shape: Vec<u64>,
        /// Its element type.
        dtype: &'static str,
        /// The largest sample served.
        max_bytes: u64,
    },
    /// xarray dimension names that name no sample dimension.
    #[error(
        "no data variable has a named first dimension to take as the sample dimension; choose the fields with \
         --fields NAME=FIELD,..."
    )]
    NoSampleDimension,
    /// Data variables (or chosen fields) that start with different dimensions.
    #[error(
        "{what} start with different dimensions: {starts}; the sample dimension must be the first dimension of \
         every field, so choose fields that share it with --fields NAME=FIELD,..."
    )]
    MixedSampleDimensions {
        /// Which arrays: the data variables, or the fields chosen with `--fields`.
        what: &'static str,
        /// Each with its first dimension.
        starts: String,
    },
    /// A `--fields` name whose array cannot be a field.
    #[error("--fields names '{name}', which cannot be a field: {reason}")]
    NotAField {
        /// The array.
        name: String,
        /// Why (its dimensions).
        reason: String,
    },
    /// No array runs along the sample dimension.
    #[error("no array starts with the sample dimension '{sample_dim}'")]
    NoFieldAlong {
        /// The sample dimension.
        sample_dim: String,
    },
}

/// Why the `--disk-cache` directory cannot be used; each message says the fix.
#[derive(Debug, thiserror::Error)]
pub enum DiskCacheProblem {
    /// A file-system call failed (its error in the message).
    #[error("cannot {action}: {error}")]
    Io {
        /// What the loader was doing.
        action: &'static str,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Another loader holds the directory's lock.
    #[error(
        "is in use by another loader (it holds the lock on .lock); give each loader its own --disk-cache directory"
    )]
    InUse,
    /// The hard open-file limit is below what `--disk-cache-open-files` needs.
    #[error(
        "--disk-cache-open-files {open_files} needs {need} file descriptors but the hard open-file limit is \
         {maximum} (ulimit -Hn); lower --disk-cache-open-files or raise the limit"
    )]
    OpenFileLimit {
        /// The flag's value.
        open_files: usize,
        /// Descriptors it needs, with the loader's others.
        need: u64,
        /// The hard limit.
        maximum: u64,
    },
    /// The soft open-file limit could not be raised.
    #[error("cannot raise the open-file limit to {need} for --disk-cache-open-files: {error}")]
    RaiseOpenFileLimit {
        /// Descriptors needed.
        need: u64,
        /// Why.
        error: std::io::Error,
    },
}

/// Why an `.npz` archive cannot be served; each message says the fix.
#[derive(Debug, thiserror::Error)]
pub enum NpzProblem {
    /// Not a zip archive the zip reader accepts (its error in the message).
    #[error("not a readable zip archive ({0}); write it with numpy.savez")]
    NotZip(zip::result::ZipError),
    /// An entry of the zip directory cannot be read.
    #[error("cannot read entry {index} of the zip directory ({error}); the archive is damaged")]
    DamagedEntry {
        /// Its position in the directory.
        index: usize,
        /// The zip reader's error (in the message, so that it is not printed twice as a source).
        error: zip::result::ZipError,
    },
    /// An encrypted member.
    #[error("encrypted; the loader serves only unencrypted members (np.savez)")]
    Encrypted,
    /// A compressed member, which cannot be mapped in place.
    #[error(
        "compressed ({compression}); members are memory-mapped in place, so save the arrays with np.savez \
         instead of np.savez_compressed, or convert the archive once: conveyor-convert {} {stem}.zarr",
        archive.display()
    )]
    Compressed {
        /// The compression method.
        compression: String,
        /// The archive.
        archive: PathBuf,
        /// Its file stem, for the converted store's name.
        stem: String,
    },
    /// A member without a readable local header.
    #[error("no readable local header; the archive is damaged")]
    NoLocalHeader,
    /// Two members claim the same bytes.
    #[error(
        "members {first} and {second} overlap in the archive (its zip directory was crafted or damaged); write it \
         again with numpy.savez"
    )]
    Overlap {
        /// The member that starts first.
        first: String,
        /// The member that starts inside it.
        second: String,
    },
    /// No `.npy` member at all.
    #[error("dataset '{dataset}': the archive holds no .npy members; write it with numpy.savez")]
    NoMembers {
        /// The dataset.
        dataset: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_kind_has_one_row_with_its_own_label() {
        let kinds: Vec<Kind> = (1..=9).map(|n| Kind::try_from(n).expect("a wire kind")).collect();
        for kind in &kinds {
            assert_eq!(ERROR_KINDS.iter().filter(|row| row.kind == *kind).count(), 1, "{kind:?}");
        }
        let mut labels: Vec<&str> = ERROR_KINDS.iter().map(|row| row.label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ERROR_KINDS.len(), "labels are distinct");
        assert_eq!(error_kind(Kind::IndexOutOfRange).code, tonic::Code::OutOfRange);
        let error = RequestError::EmptyBatch { dataset: "d".into() };
        assert_eq!(tonic::Status::from(error).code(), tonic::Code::InvalidArgument);
    }
}
