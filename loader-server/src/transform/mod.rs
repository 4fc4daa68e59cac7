//! Derived datasets: a served dataset passed through a transform on the loader, so that the
//! user's per-sample work (crops, flips, windows, normalisation, their own Python function)
//! runs here and not in the training process.
//!
//! Two kinds of transform: a pipeline of built-in operators ([`ops`], Rust, run on the gather
//! threads) and a Python function ([`python`], run in a supervised pool of worker processes; the
//! loader process never runs user code). Both are deterministic: the randomness of a batch comes
//! from the request's `(seed, epoch)` and its sample indices only, so any replica, any retry and
//! any resume give the same bytes.

pub mod image;
pub mod ops;
pub mod python;

use std::sync::Arc;

use conveyor_proto::{
    DType,
    v1::{DatasetInfo, FieldInfo},
};

pub use crate::dataset::FieldRows;
use crate::{
    config::Config,
    dataset::{Dataset, chunk_cache::ChunkCache},
    error::{DerivedProblem, LoadError},
};

/// Dtype and per-sample shape of one field, without its storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSchema {
    /// Field name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of one sample (without the batch axis); of one row of a ragged field's values.
    pub sample_shape: Vec<u64>,
    /// Whether samples differ in length (rows of `sample_shape` each, values plus offsets).
    pub ragged: bool,
    /// Whether a ragged `uint8` field's samples are UTF-8 text.
    pub utf8: bool,
}

impl FieldSchema {
    /// Bytes of one sample.
    pub fn bytes_per_sample(&self) -> usize {
        self.sample_shape.iter().product::<u64>() as usize * self.dtype.size_bytes()
    }

    /// `name: dtype[shape]` (`dtype[*, shape]` when ragged), for messages.
    pub fn describe(&self) -> String {
        match self.ragged {
            true => format!("'{}' ragged {}[*, {:?}]", self.name, self.dtype.name(), self.sample_shape),
            false => format!("'{}' {}{:?}", self.name, self.dtype.name(), self.sample_shape),
        }
    }
}

/// One field of a batch in memory: `num_samples` samples of little-endian, C-order elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// What the rows hold.
    pub schema: FieldSchema,
    /// The samples' bytes and, for a ragged field, where each starts.
    pub rows: FieldRows,
}

/// A batch in memory, one column per field.
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    /// Rows in every column.
    pub num_samples: usize,
    /// The fields, in the dataset's order.
    pub columns: Vec<Column>,
}

/// What a derived dataset's batches must look like, and how to say so when one does not.
impl Columns {
    /// Checks names, dtypes, shapes and raggedness against `schema` (in its order) and returns
    /// the fields in that order.
    ///
    /// # Errors
    /// A message naming the field that breaks the schema and how.
    pub fn into_schema(self, schema: &[FieldSchema]) -> Result<Vec<FieldRows>, String> {
        let mut columns = self.columns;
        let mut out = Vec::with_capacity(schema.len());
        for expected in schema {
            let Some(at) = columns.iter().position(|c| c.schema.name == expected.name) else {
                return Err(format!(
                    "the output has no field '{}' (the probe batch at start-up had {})",
                    expected.name,
                    names(schema)
                ));
            };
            let column = columns.swap_remove(at);
            if column.schema.dtype != expected.dtype
                || column.schema.sample_shape != expected.sample_shape
                || column.schema.ragged != expected.ragged
            {
                return Err(format!(
                    "output field {} differs from the probe batch at start-up, which gave {}; every batch must give \
                     the same fields, dtypes and per-sample shapes",
                    column.schema.describe(),
                    expected.describe()
                ));
            }
            out.push(column.rows);
        }
        if let Some(extra) = columns.first() {
            return Err(format!(
                "the output has a field '{}' that the probe batch at start-up did not have ({})",
                extra.schema.name,
                names(schema)
            ));
        }
        Ok(out)
    }
}

fn names(schema: &[FieldSchema]) -> String {
    schema.iter().map(|f| format!("'{}'", f.name)).collect::<Vec<_>>().join(", ")
}

/// How a derived dataset turns source batches into its own.
#[derive(Debug)]
pub enum Transform {
    /// Built-in operators, run on the gather thread.
    Pipeline(ops::Pipeline),
    /// A Python function, run by the worker pool.
    Python(python::Pool),
}

/// A dataset the loader derives from a served one.
#[derive(Debug)]
pub struct Derived {
    /// Name clients request.
    pub name: String,
    /// The dataset whose rows are transformed.
    pub source: Arc<Dataset>,
    /// Output fields, found when the transform was set up.
    pub schema: Vec<FieldSchema>,
    /// The transform.
    pub transform: Transform,
    /// `SOURCE | ...`, as `describe` reports it.
    pub derivation: String,
}

impl Derived {
    /// Wire description, given the server's per-batch sample limit. Chunk lengths are the
    /// source's where the field keeps its name (they still say which samples are read together).
    pub fn info(&self, max_batch_samples: u64) -> DatasetInfo {
        let fields = self
            .schema
            .iter()
            .map(|f| FieldInfo {
                name: f.name.clone(),
                dtype: f.dtype as i32,
                sample_shape: f.sample_shape.clone(),
                bytes_per_sample: if f.ragged { 0 } else { f.bytes_per_sample() as u64 },
                chunk_len: self.source.fields.iter().map(|s| s.chunk_len).max().unwrap_or(1),
                // Operators change shapes, so the source's dimension names no longer apply.
                dimension_names: Vec::new(),
                ragged: f.ragged,
                utf8: f.utf8,
            })
            .collect();
        DatasetInfo {
            name: self.name.clone(),
            num_samples: self.source.num_samples,
            fields,
            max_batch_samples,
            derivation: self.derivation.clone(),
            coordinates: Vec::new(),
        }
    }
}

/// The schema of a stored dataset's fields.
pub fn schema_of(dataset: &Dataset) -> Vec<FieldSchema> {
    dataset
        .fields
        .iter()
        .map(|f| FieldSchema {
            name: f.name.clone(),
            dtype: f.dtype,
            sample_shape: f.sample_shape.clone(),
            ragged: f.is_ragged(),
            utf8: f.info().utf8,
        })
        .collect()
}

/// A `--transform` or `--pipeline` value split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedSpec {
    /// Name of the derived dataset.
    pub name: String,
    /// Name of the dataset it is derived from.
    pub source: String,
    /// What follows `SOURCE:`: `module:function` or the pipeline text.
    pub body: String,
}

impl DerivedSpec {
    /// Parses `NAME=SOURCE:BODY`; `flag` and `example` go into the message when it is not that.
    ///
    /// # Errors
    /// [`LoadError::BadDerivedSpec`].
    pub fn parse(flag: &'static str, value: &str, example: &'static str) -> Result<DerivedSpec, LoadError> {
        let bad = || LoadError::BadDerivedSpec { flag, value: value.to_owned(), example };
        let (name, rest) = value.split_once('=').ok_or_else(bad)?;
        let (source, body) = rest.split_once(':').ok_or_else(bad)?;
        let (name, source, body) = (name.trim(), source.trim(), body.trim());
        if name.is_empty() || source.is_empty() || body.is_empty() {
            return Err(bad());
        }
        Ok(DerivedSpec { name: name.to_owned(), source: source.to_owned(), body: body.to_owned() })
    }
}

/// Sets up every `--pipeline` and `--transform` of the loader's flags over its stored datasets:
/// pipelines are fitted to their source's fields; Python functions get their worker pool and
/// run once on a probe batch (the source's first samples, seed 0, epoch 0) that fixes their
/// output schema.
///
/// # Errors
/// [`LoadError`] naming the derived dataset, the flag and the problem.
pub fn open_derived(config: &Config, stored: &[Arc<Dataset>], cache: &ChunkCache) -> Result<Vec<Derived>, LoadError> {
    let mut specs = Vec::new();
    for value in &config.pipelines {
        specs.push(("--pipeline", DerivedSpec::parse("--pipeline", value, PIPELINE_FORM)?));
    }
    for value in &config.transforms {
        specs.push(("--transform", DerivedSpec::parse("--transform", value, TRANSFORM_FORM)?));
    }
    let mut names: Vec<String> = stored.iter().map(|d| d.name.clone()).collect();
    let mut derived = Vec::with_capacity(specs.len());
    for (flag, spec) in specs {
        let fail = |problem: DerivedProblem| LoadError::Derived { name: spec.name.clone(), flag, problem };
        if names.contains(&spec.name) {
            return Err(fail(DerivedProblem::NameTaken));
        }
        let source = stored.iter().find(|d| d.name == spec.source).cloned().ok_or_else(|| {
            let stored = stored.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
            fail(DerivedProblem::NoSource { source_name: spec.source.clone(), stored })
        })?;
        let source_schema = schema_of(&source);
        let (transform, schema, derivation) = if flag == "--pipeline" {
            let text = match spec.body.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|error| fail(DerivedProblem::PipelineFile { path: path.into(), error }))?,
                None => spec.body.clone(),
            };
            let pipeline = ops::Pipeline::new(&text, &source_schema, config.max_image_pixels)
                .map_err(|e| fail(DerivedProblem::Pipeline(e)))?;
            let schema = pipeline.schema().to_vec();
            let derivation = format!(
                "{} | pipeline {}",
                spec.source,
                ops::without_comments(&text).split_whitespace().collect::<Vec<_>>().join(" ")
            );
            (Transform::Pipeline(pipeline), schema, derivation)
        } else {
            let probe_indices: Vec<u64> = (0..source.num_samples.min(4)).collect();
            if probe_indices.is_empty() {
                return Err(fail(DerivedProblem::NothingToProbe { source_name: spec.source.clone() }));
            }
            let (probe, _) = source.gather(&probe_indices, cache).map_err(|e| fail(DerivedProblem::Probe(e)))?;
            let options = python::WorkerOptions {
                python: config.python.clone(),
                pythonpath: config.transform_pythonpath.clone(),
                workers: config.transform_workers.get(),
                memory_cap_bytes: config.transform_worker_memory,
                shm_bytes: config.transform_shm_bytes,
                timeout: config.transform_timeout,
                max_batches: config.transform_max_batches,
                queue: config.transform_queue.get(),
            };
            let (pool, schema) = python::Pool::start(&spec.body, options, source_schema, (probe, probe_indices))
                .map_err(|e| fail(DerivedProblem::Function(e)))?;
            (Transform::Python(pool), schema, format!("{} | python {}", spec.source, spec.body))
        };
        for field in &schema {
            conveyor_proto::check_field_name(&field.name).map_err(|e| fail(DerivedProblem::FieldName(e)))?;
        }
        names.push(spec.name.clone());
        derived.push(Derived { name: spec.name, source, schema, transform, derivation });
    }
    Ok(derived)
}

const PIPELINE_FORM: &str =
    "NAME=SOURCE:PIPELINE; write for example --pipeline 'aug=images:image: random_crop(56, 56) | flip(axis=-1)'";
const TRANSFORM_FORM: &str =
    "NAME=SOURCE:module:function; write for example --transform aug=images:my_transforms:augment";

pub use conveyor_proto::mix64;

/// The key of one sample's randomness in built-in operators: a function of the run's seed, the
/// epoch and the sample's global index only, so a sample is augmented the same way whichever
/// batch, replica or retry serves it.
pub fn sample_key(seed: u64, epoch: u64, index: u64) -> u64 {
    mix64(mix64(mix64(seed ^ 0x7261_6e64_6f6d) ^ epoch) ^ index)
}

/// A digest of a batch's indices in order, given to Python functions with the seed and epoch
/// to seed their generator.
pub fn indices_digest(indices: &[u64]) -> u64 {
    indices.iter().fold(mix64(indices.len() as u64), |acc, &i| mix64(acc ^ i))
}

/// A SplitMix64 stream: small, fast and fully determined by its key, which is all the built-in
/// operators need (a crop offset, a coin flip per sample).
#[derive(Debug, Clone)]
pub struct SampleRng {
    state: u64,
}

impl SampleRng {
    /// The stream of `key`.
    pub fn new(key: u64) -> SampleRng {
        SampleRng { state: key }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(conveyor_proto::GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (Lemire's method with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_at_the_first_equals_and_colon() {
        let spec = DerivedSpec::parse("--transform", "aug=images:my.mod:fn", "x").expect("valid");
        assert_eq!((spec.name.as_str(), spec.source.as_str(), spec.body.as_str()), ("aug", "images", "my.mod:fn"));
        for bad in ["aug", "aug=images", "=images:m:f", "aug=:m:f", "aug=images:"] {
            let error = DerivedSpec::parse("--transform", bad, "NAME=SOURCE:module:function").expect_err(bad);
            assert!(error.to_string().contains("NAME=SOURCE:module:function"), "{error}");
        }
    }

    #[test]
    fn sample_keys_depend_on_every_part() {
        let base = sample_key(1, 2, 3);
        assert_eq!(base, sample_key(1, 2, 3));
        assert_ne!(base, sample_key(0, 2, 3));
        assert_ne!(base, sample_key(1, 3, 3));
        assert_ne!(base, sample_key(1, 2, 4));
        assert_ne!(indices_digest(&[1, 2]), indices_digest(&[2, 1]));
    }

    #[test]
    fn below_is_uniform_enough_and_in_range() {
        let mut rng = SampleRng::new(7);
        let mut counts = [0u32; 5];
        for _ in 0..50_000 {
            counts[rng.below(5) as usize] += 1;
        }
        // Each bucket expects 10 000; 5 sigma is about 450.
        assert!(counts.iter().all(|&c| (9_550..=10_450).contains(&c)), "{counts:?}");
        assert!((0..1000).all(|_| (0.0..1.0).contains(&rng.unit())));
    }

    #[test]
    fn into_schema_names_the_field_that_differs() {
        let schema = vec![
            FieldSchema { name: "x".into(), dtype: DType::Float32, sample_shape: vec![2], ragged: false, utf8: false },
            FieldSchema { name: "y".into(), dtype: DType::Uint8, sample_shape: vec![], ragged: false, utf8: false },
        ];
        let column = |name: &str, dtype, shape: Vec<u64>, n: usize| Column {
            schema: FieldSchema { name: name.into(), dtype, sample_shape: shape, ragged: false, utf8: false },
            rows: FieldRows { data: vec![0; n], offsets: None },
        };
        let good = Columns {
            num_samples: 1,
            columns: vec![column("y", DType::Uint8, vec![], 1), column("x", DType::Float32, vec![2], 8)],
        };
        let data = good.into_schema(&schema).expect("fits");
        assert_eq!(data.iter().map(|rows| rows.data.len()).collect::<Vec<_>>(), [8, 1], "reordered to the schema");
        let wrong_dtype = Columns {
            num_samples: 1,
            columns: vec![column("x", DType::Float64, vec![2], 16), column("y", DType::Uint8, vec![], 1)],
        };
        let error = wrong_dtype.into_schema(&schema).expect_err("dtype");
        assert!(error.contains("'x' float64[2]") && error.contains("'x' float32[2]"), "{error}");
        let missing = Columns { num_samples: 1, columns: vec![column("x", DType::Float32, vec![2], 8)] };
        assert!(missing.into_schema(&schema).expect_err("missing").contains("no field 'y'"));
    }
}
