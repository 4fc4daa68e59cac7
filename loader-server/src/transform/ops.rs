//! Built-in operators, composed into named pipelines with `--pipeline NAME=SOURCE:TEXT`.
//!
//! The text gives each field its chain of operators; fields not named pass through unchanged:
//!
//! ```text
//! image: random_crop(56, 56) | flip(axis=-1, p=0.5) | cast(float32, scale=1/255) | normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]);
//! eeg: random_window(200, axis=-1)
//! ```
//!
//! A ragged field of encoded images starts its chain with `decode_image` and the image
//! operators of [`super::image`] (`resize`, `center_crop`, `random_resized_crop`), which must
//! end in one size; the `uint8[H, W, C]` samples they give then take any operator below:
//!
//! ```text
//! image: decode_image | random_resized_crop(224) | flip(axis=1) | to_chw | cast(float32, scale=1/255) | normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
//! ```
//!
//! Axes count within one sample (the batch axis is not one of them); negative axes count from
//! the end. Random operators draw from a stream keyed by (seed, epoch, sample index, field,
//! step) only ([`super::sample_key`]), so a sample is augmented the same way whichever batch,
//! replica or retry serves it. Shapes and dtypes are worked out when the loader starts, so a
//! pipeline that cannot apply to its source fails then, naming the field and the operator.

use conveyor_proto::DType;

use super::{
    Column, Columns, FieldRows, FieldSchema, SampleRng,
    image::{ImageHead, ImageOp, Interpolation, Mode, Size},
    mix64, sample_key,
};

/// One operator as written, before it meets a field's shape.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    /// `center_crop(..)` / `random_crop(..)`: the last `sizes.len()` axes cut to `sizes`.
    Crop { sizes: Vec<u64>, random: bool },
    /// `random_window(length, axis=-1)`: `length` consecutive entries along `axis`.
    Window { axis: i64, length: u64 },
    /// `flip(axis=-1, p=0.5)`: reversed along `axis` with probability `p`.
    Flip { axis: i64, p: f64 },
    /// `cast(dtype, scale=1, offset=0)`: `x * scale + offset`, rounded and saturated for integers.
    Cast { dtype: DType, scale: f64, offset: f64 },
    /// `normalize(mean=[..], std=[..], axis=0)`: `(x - mean[c]) / std[c]` along `axis`, to float32
    /// (float64 stays float64).
    Normalize { axis: i64, mean: Vec<f64>, std: Vec<f64> },
    /// `clip(min=.., max=..)`: values limited to `[min, max]`, dtype kept.
    Clip { min: f64, max: f64 },
    /// `decode_image(mode=rgb)`: encoded image bytes to `uint8[H, W, C]` (the head of a chain).
    DecodeImage { mode: Mode },
    /// `resize(..)`, `random_resized_crop(..)`: image operators (after `decode_image`).
    Image(ImageOp),
    /// `to_chw`: `[H, W, C]` samples to `[C, H, W]`.
    ToChw,
}

/// An operator fitted to its input: axes resolved, shapes known.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Copy a region (`starts` fixed, or drawn per sample where `random`), optionally
    /// reversed along one axis with probability `flip_p`.
    Region { out_shape: Vec<u64>, random_axes: Vec<usize>, flip_axis: Option<usize>, flip_p: f64 },
    /// Cast, normalize and clip; consecutive ones are fused to run in one pass (one output
    /// buffer instead of one per step), each result rounded to its operator's dtype as if it ran
    /// alone.
    Elementwise { ops: Vec<ElemOp>, to: DType },
    /// `[H, W, C]` to `[C, H, W]`.
    ToChw,
}

/// One element-wise operator of a fused [`Step::Elementwise`].
#[derive(Debug, Clone, PartialEq)]
struct ElemOp {
    kind: ElemKind,
    /// Its output dtype, which every value is rounded to.
    dtype: DType,
    /// Per channel `(a, b)`: `x * a + b` (affine), `(x - a) * b` (normalize), `clamp(a, b)`;
    /// one entry unless it normalizes.
    params: Vec<(f64, f64)>,
    /// Elements per channel run (normalize: the product of the axes after the channel axis).
    inner: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElemKind {
    Affine,
    Normalize,
    Clip,
}

/// Fuses runs of element-wise steps into one [`Step::Elementwise`], and a flip that follows a
/// crop or window into that copy: fewer passes and fewer fresh buffers per batch.
fn fuse(steps: Vec<(Step, FieldSchema)>) -> Vec<(Step, FieldSchema)> {
    let mut fused: Vec<(Step, FieldSchema)> = Vec::with_capacity(steps.len());
    for (step, input) in steps {
        if let Step::Elementwise { ops: more, to: last } = &step
            && let Some((Step::Elementwise { ops, to }, _)) = fused.last_mut()
        {
            ops.extend(more.iter().cloned());
            *to = *last;
            continue;
        }
        if let Step::Region { random_axes, flip_axis: Some(axis), flip_p, out_shape } = &step
            && random_axes.is_empty()
            && *out_shape == input.sample_shape
            && let Some((Step::Region { flip_axis: previous @ None, flip_p: previous_p, .. }, _)) = fused.last_mut()
        {
            *previous = Some(*axis);
            *previous_p = *flip_p;
            continue;
        }
        fused.push((step, input));
    }
    fused
}

/// A field's chain of steps, with the schema before and after each.
#[derive(Debug, Clone)]
struct FieldChain {
    /// Position of the field in the source dataset.
    field: usize,
    /// Decoding and image operators, when the field holds encoded images: they turn each
    /// ragged sample into one of the fixed shape the steps start from.
    head: Option<ImageHead>,
    /// `(step, its input schema)` in order.
    steps: Vec<(Step, FieldSchema)>,
    /// What the chain gives.
    output: FieldSchema,
}

/// A parsed, checked pipeline over a source schema.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Chains of the fields it changes.
    chains: Vec<FieldChain>,
    /// Output schema: the source's fields, changed where a chain applies.
    schema: Vec<FieldSchema>,
}

/// `text` without its comment lines (lines starting with `#`, as pipeline files have): what a
/// pipeline is parsed from, and what a derived dataset's `derivation` publishes (comments may say
/// things their authors never meant clients to read).
pub fn without_comments(text: &str) -> String {
    text.lines().filter(|line| !line.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n")
}

impl Pipeline {
    /// Parses `text` and fits it to `source` (the source dataset's fields); images may declare
    /// at most `max_image_pixels` pixels.
    ///
    /// # Errors
    /// A message naming the field, the operator and what to change.
    pub fn new(text: &str, source: &[FieldSchema], max_image_pixels: u64) -> Result<Pipeline, String> {
        let mut chains: Vec<FieldChain> = Vec::new();
        let text = without_comments(text);
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (field_name, ops_text) = part.split_once(':').ok_or_else(|| {
                format!("'{part}' does not name its field; write FIELD: op | op, for example image: flip(axis=-1)")
            })?;
            let field_name = field_name.trim();
            let field = source.iter().position(|f| f.name == field_name).ok_or_else(|| {
                format!(
                    "the source has no field '{field_name}'; its fields are {}",
                    source.iter().map(|f| format!("'{}'", f.name)).collect::<Vec<_>>().join(", ")
                )
            })?;
            if chains.iter().any(|c| c.field == field) {
                return Err(format!("field '{field_name}' has two chains; join them with |"));
            }
            let mut schema = source[field].clone();
            let mut steps = Vec::new();
            let mut ops = ops_text.split('|').map(str::trim).peekable();
            let head = if schema.ragged {
                let (head, output) = fit_image_head(&mut ops, &schema, max_image_pixels)
                    .map_err(|e| format!("field '{field_name}', {e}"))?;
                schema = output;
                Some(head)
            } else {
                None
            };
            for op_text in ops {
                let op = parse_op(op_text).map_err(|e| format!("field '{field_name}', '{op_text}': {e}"))?;
                let (step, output) =
                    fit(&op, &schema).map_err(|e| format!("field '{field_name}', '{op_text}': {e}"))?;
                steps.push((step, schema));
                schema = output;
            }
            let steps = fuse(steps);
            chains.push(FieldChain { field, head, steps, output: schema });
        }
        if chains.is_empty() {
            return Err("the pipeline names no field; write FIELD: op | op".into());
        }
        if let Some(ragged) =
            source.iter().enumerate().find(|(at, f)| f.ragged && !chains.iter().any(|c| c.field == *at))
        {
            return Err(format!(
                "field '{}' holds samples of different lengths and the pipeline gives it no chain; a derived dataset's \
                 fields each have one shape: decode it (for example {}: decode_image | center_crop(224)) or leave it \
                 out of the source with --fields",
                ragged.1.name, ragged.1.name
            ));
        }
        let mut schema = source.to_vec();
        for chain in &chains {
            schema[chain.field] = chain.output.clone();
        }
        Ok(Pipeline { chains, schema })
    }

    /// The fields this pipeline gives.
    pub fn schema(&self) -> &[FieldSchema] {
        &self.schema
    }

    /// Applies the pipeline to a gathered batch of the source (`columns` in the source's field
    /// order) whose samples are `indices`.
    ///
    /// # Errors
    /// The first sample whose image cannot be decoded or is refused: the rest of the batch is
    /// fine, and the caller decides between failing it and substituting the sample.
    pub fn apply(
        &self,
        mut columns: Vec<FieldRows>,
        indices: &[u64],
        seed: u64,
        epoch: u64,
    ) -> Result<Vec<Vec<u8>>, BadSample> {
        for (chain_no, chain) in self.chains.iter().enumerate() {
            let rows = std::mem::take(&mut columns[chain.field]);
            let rng_of = |step_no: u64, index: u64| {
                let stream = mix64(((chain.field as u64) << 32 | step_no) ^ (chain_no as u64) << 48);
                SampleRng::new(sample_key(seed, epoch, index) ^ stream)
            };
            let mut data = match (&chain.head, rows.offsets) {
                (Some(head), Some(offsets)) => {
                    let mut out = Vec::with_capacity(indices.len() * head.sample_bytes());
                    for (row, &index) in indices.iter().enumerate() {
                        let encoded = &rows.data[offsets[row] as usize..offsets[row + 1] as usize];
                        // The head's stream is apart from the steps' (which count from 0).
                        let mut rng = rng_of(u64::from(u32::MAX), index);
                        head.run(encoded, &mut rng, &mut out).map_err(|reason| BadSample {
                            row,
                            field: self.schema[chain.field].name.clone(),
                            reason,
                        })?;
                    }
                    out
                }
                (Some(_), None) => {
                    return Err(BadSample {
                        row: 0,
                        field: self.schema[chain.field].name.clone(),
                        reason: "holds fixed-shape rows where encoded images (values and offsets) were expected".into(),
                    });
                }
                (None, _) => rows.data,
            };
            for (step_no, (step, input)) in chain.steps.iter().enumerate() {
                data = run_step(step, input, &data, indices, |index| rng_of(step_no as u64, index));
            }
            columns[chain.field] = FieldRows { data, offsets: None };
        }
        Ok(columns.into_iter().map(|c| c.data).collect())
    }

    /// Applies the pipeline to whole fixed-shape [`Columns`] (tests and examples).
    ///
    /// # Errors
    /// As [`Pipeline::apply`].
    pub fn apply_columns(&self, batch: Columns, indices: &[u64], seed: u64, epoch: u64) -> Result<Columns, BadSample> {
        let rows = batch.columns.into_iter().map(|c| c.rows).collect();
        let data = self.apply(rows, indices, seed, epoch)?;
        Ok(Columns {
            num_samples: batch.num_samples,
            columns: self
                .schema
                .iter()
                .cloned()
                .zip(data)
                .map(|(schema, data)| Column { schema, rows: FieldRows { data, offsets: None } })
                .collect(),
        })
    }

    /// Whether a field's chain decodes images (then its samples may be bad).
    pub fn decodes(&self) -> bool {
        self.chains.iter().any(|c| c.head.is_some())
    }
}

/// A sample a pipeline could not turn into its output: an image that does not decode or
/// declares too many pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSample {
    /// Its row in the batch.
    pub row: usize,
    /// The field whose chain failed.
    pub field: String,
    /// Why, from the decoder or the size check.
    pub reason: String,
}

/// A parsed argument value.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Number(f64),
    List(Vec<f64>),
    Word(String),
}

fn parse_number(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let parse = |t: &str| t.trim().parse::<f64>().map_err(|_| format!("'{t}' is not a number"));
    match text.split_once('/') {
        Some((a, b)) => Ok(parse(a)? / parse(b)?),
        None => parse(text),
    }
}

/// An operator call as written: its name, positional and keyword values.
type Call = (String, Vec<Value>, Vec<(String, Value)>);

/// Splits `name(a, b=[1, 2], c=x)` into the name, positional and keyword values.
fn parse_call(text: &str) -> Result<Call, String> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        // A bare name (`to_chw`, `decode_image`): no arguments.
        return Ok((text.to_owned(), Vec::new(), Vec::new()));
    }
    let open = text.find('(').ok_or("write the operator as name(arguments), for example flip(axis=-1)")?;
    let name = text[..open].trim().to_owned();
    let inner = text[open + 1..].strip_suffix(')').ok_or("the argument list does not end with ')'")?;
    let mut args = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                args.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    args.push(&inner[start..]);
    let (mut positional, mut keywords) = (Vec::new(), Vec::new());
    for arg in args.into_iter().map(str::trim).filter(|a| !a.is_empty()) {
        let (key, value) = match arg.split_once('=') {
            Some((k, v)) => (Some(k.trim().to_owned()), v.trim()),
            None => (None, arg),
        };
        let value = if let Some(list) = value.strip_prefix('[') {
            let list = list.strip_suffix(']').ok_or_else(|| format!("'{value}' does not end with ']'"))?;
            Value::List(list.split(',').map(parse_number).collect::<Result<_, _>>()?)
        } else if value.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.' || c == '+') {
            Value::Number(parse_number(value)?)
        } else {
            Value::Word(value.to_owned())
        };
        match key {
            Some(key) => keywords.push((key, value)),
            None if keywords.is_empty() => positional.push(value),
            None => return Err(format!("positional argument '{arg}' after keyword arguments")),
        }
    }
    Ok((name, positional, keywords))
}

/// Arguments of one call, taken by position or keyword.
struct Args {
    positional: std::vec::IntoIter<Value>,
    keywords: Vec<(String, Value)>,
}

impl Args {
    fn take(&mut self, key: &str) -> Option<Value> {
        match self.keywords.iter().position(|(k, _)| k == key) {
            Some(at) => Some(self.keywords.remove(at).1),
            None => self.positional.next(),
        }
    }

    fn number(&mut self, key: &str, default: Option<f64>) -> Result<f64, String> {
        match self.take(key) {
            Some(Value::Number(n)) => Ok(n),
            Some(other) => Err(format!("{key} must be a number, not {other:?}")),
            None => default.ok_or_else(|| format!("missing argument {key}")),
        }
    }

    fn whole(&mut self, key: &str, default: Option<i64>) -> Result<i64, String> {
        let n = self.number(key, default.map(|d| d as f64))?;
        if n.fract() != 0.0 {
            return Err(format!("{key} must be a whole number, not {n}"));
        }
        Ok(n as i64)
    }

    fn list(&mut self, key: &str) -> Result<Vec<f64>, String> {
        match self.take(key) {
            Some(Value::List(l)) => Ok(l),
            Some(Value::Number(n)) => Ok(vec![n]),
            Some(other) => Err(format!("{key} must be a list of numbers, not {other:?}")),
            None => Err(format!("missing argument {key}")),
        }
    }

    fn finish(mut self) -> Result<(), String> {
        if let Some(extra) = self.positional.next() {
            return Err(format!("unexpected argument {extra:?}"));
        }
        match self.keywords.first() {
            Some((key, _)) => Err(format!("unknown argument '{key}'")),
            None => Ok(()),
        }
    }
}

fn parse_op(text: &str) -> Result<Op, String> {
    let (name, positional, keywords) = parse_call(text)?;
    let mut args = Args { positional: positional.into_iter(), keywords };
    let op = match name.as_str() {
        "center_crop" | "random_crop" => {
            let given = size_values(&mut args);
            let mut sizes = Vec::with_capacity(given.len());
            for value in given {
                match value {
                    Value::Number(n) if n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64 => sizes.push(n as u64),
                    other => return Err(format!("crop sizes must be whole numbers >= 1, not {other:?}")),
                }
            }
            if sizes.is_empty() {
                return Err("give the sizes of the last axes, for example random_crop(56, 56)".into());
            }
            Op::Crop { sizes, random: name == "random_crop" }
        }
        "random_window" => {
            let length = args.whole("length", None)?;
            if length < 1 {
                return Err("length must be at least 1".into());
            }
            Op::Window { length: length as u64, axis: args.whole("axis", Some(-1))? }
        }
        "flip" => {
            let axis = args.whole("axis", Some(-1))?;
            let p = args.number("p", Some(0.5))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("p must be within 0..1, not {p}"));
            }
            Op::Flip { axis, p }
        }
        "cast" => {
            let dtype = match args.take("dtype") {
                Some(Value::Word(word)) => dtype_named(&word)?,
                _ => return Err("give the dtype first, for example cast(float32, scale=1/255)".into()),
            };
            let scale = args.number("scale", Some(1.0))?;
            let offset = args.number("offset", Some(0.0))?;
            if let Some((key, bad)) = [("scale", scale), ("offset", offset)].into_iter().find(|(_, v)| !v.is_finite()) {
                return Err(format!("{key} must be a finite number, not {bad}"));
            }
            Op::Cast { dtype, scale, offset }
        }
        "normalize" => {
            let mean = args.list("mean")?;
            let std = args.list("std")?;
            if let Some(bad) = std.iter().find(|s| **s == 0.0 || !s.is_finite()) {
                return Err(format!("std must be finite and non-zero, not {bad}"));
            }
            if let Some(bad) = mean.iter().find(|m| !m.is_finite()) {
                return Err(format!("mean must be finite, not {bad}"));
            }
            Op::Normalize { mean, std, axis: args.whole("axis", Some(0))? }
        }
        "clip" => {
            let min = args.number("min", Some(f64::NEG_INFINITY))?;
            let max = args.number("max", Some(f64::INFINITY))?;
            if let Some(bad) = [("min", min), ("max", max)].into_iter().find(|(_, v)| v.is_nan()) {
                return Err(format!("{} must be a number, not NaN", bad.0));
            }
            if min > max {
                return Err(format!("min {min} is above max {max}"));
            }
            Op::Clip { min, max }
        }
        "decode_image" => {
            let mode = match args.take("mode") {
                None => Mode::Rgb,
                Some(Value::Word(word)) if word == "rgb" || word == "RGB" => Mode::Rgb,
                Some(Value::Word(word)) if word == "gray" || word == "L" => Mode::Gray,
                Some(other) => return Err(format!("mode must be rgb or gray, not {other:?}")),
            };
            Op::DecodeImage { mode }
        }
        "resize" => {
            let sizes = image_sizes(&mut args)?;
            let size = match sizes[..] {
                [short] => Size::Shorter(short),
                [height, width] => Size::Exact(height, width),
                _ => return Err("give one size (the shorter side) or two (height, width)".into()),
            };
            let interpolation = interpolation(&mut args)?;
            let antialias = match args.take("antialias") {
                None => true,
                Some(Value::Word(word)) if word == "true" || word == "True" => true,
                Some(Value::Word(word)) if word == "false" || word == "False" => false,
                Some(other) => return Err(format!("antialias must be true or false, not {other:?}")),
            };
            Op::Image(ImageOp::Resize { size, interpolation, antialias })
        }
        "random_resized_crop" => {
            let (height, width) = match image_sizes(&mut args)?[..] {
                [side] => (side, side),
                [height, width] => (height, width),
                _ => return Err("give one size (square) or two (height, width)".into()),
            };
            let pair = |args: &mut Args, key: &str, default: (f64, f64)| -> Result<(f64, f64), String> {
                match args.take(key) {
                    None => Ok(default),
                    Some(Value::List(list)) if list.len() == 2 && list[0] > 0.0 && list[0] <= list[1] => {
                        Ok((list[0], list[1]))
                    }
                    Some(other) => Err(format!("{key} must be [low, high] with 0 < low <= high, not {other:?}")),
                }
            };
            let scale = pair(&mut args, "scale", (0.08, 1.0))?;
            let ratio = pair(&mut args, "ratio", (3.0 / 4.0, 4.0 / 3.0))?;
            if scale.1 > 1.0 {
                return Err(format!("scale is a share of the image's area, at most 1, not {}", scale.1));
            }
            let interpolation = interpolation(&mut args)?;
            Op::Image(ImageOp::RandomResizedCrop { height, width, scale, ratio, interpolation })
        }
        "to_chw" => Op::ToChw,
        other => {
            return Err(format!(
                "unknown operator '{other}'; the built-in operators are center_crop, random_crop, random_window, flip, \
                 cast, normalize, clip, to_chw, and for images decode_image, resize, random_resized_crop"
            ));
        }
    };
    args.finish()?;
    Ok(op)
}

/// The values given as sizes: positional arguments and `size=N` / `size=[..]`, lists flattened.
fn size_values(args: &mut Args) -> Vec<Value> {
    let mut given: Vec<Value> = args.positional.by_ref().collect();
    given.extend(args.take("size"));
    given
        .into_iter()
        .flat_map(|value| match value {
            Value::List(list) => list.into_iter().map(Value::Number).collect(),
            other => vec![other],
        })
        .collect()
}

/// The sizes of an image operator: positional numbers, or `size=N` / `size=[H, W]`.
fn image_sizes(args: &mut Args) -> Result<Vec<u32>, String> {
    let sizes = size_values(args).into_iter().map(image_size).collect::<Result<Vec<_>, _>>()?;
    if sizes.is_empty() {
        return Err("give the size, for example random_resized_crop(224) or resize([256, 256])".into());
    }
    Ok(sizes)
}

/// One image side: a whole number of pixels, 1..=65535.
fn image_size(value: Value) -> Result<u32, String> {
    match value {
        Value::Number(n) if (1.0..=65535.0).contains(&n) && n.fract() == 0.0 => Ok(n as u32),
        other => Err(format!("image sizes must be whole numbers of pixels within 1..=65535, not {other:?}")),
    }
}

fn interpolation(args: &mut Args) -> Result<Interpolation, String> {
    match args.take("interpolation") {
        None => Ok(Interpolation::Bilinear),
        Some(Value::Word(word)) => Interpolation::named(&word),
        Some(other) => Err(format!("interpolation must be bilinear, bicubic or nearest, not {other:?}")),
    }
}

/// Fits the head of a chain over a ragged field of encoded images: `decode_image`, then the
/// image operators that follow it, which must leave every sample one size. Consumes those
/// operators from `ops`.
fn fit_image_head<'a>(
    ops: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
    input: &FieldSchema,
    max_pixels: u64,
) -> Result<(ImageHead, FieldSchema), String> {
    let first = ops.next().unwrap_or_default();
    let mode = match parse_op(first) {
        Ok(Op::DecodeImage { mode }) if input.dtype == DType::Uint8 && input.sample_shape.is_empty() => mode,
        Ok(Op::DecodeImage { .. }) => {
            return Err(format!(
                "'{first}': decode_image takes encoded image bytes (a ragged uint8 field), and the field is {}",
                input.describe()
            ));
        }
        Ok(_) => {
            return Err(format!(
                "'{first}': the field holds samples of different lengths; start its chain with decode_image (for \
                 encoded images), which with resize, center_crop or random_resized_crop gives every sample one shape"
            ));
        }
        Err(e) => return Err(format!("'{first}': {e}")),
    };
    let mut image_ops: Vec<ImageOp> = Vec::new();
    let mut size: Option<(u32, u32)> = None;
    let mut last_text = first;
    while let Some(&text) = ops.peek() {
        let op = match parse_op(text) {
            Ok(Op::Image(op)) => op,
            Ok(Op::Crop { sizes, random: false }) => match sizes[..] {
                [side] if side <= 65535 => ImageOp::CenterCrop { height: side as u32, width: side as u32 },
                [height, width] if height <= 65535 && width <= 65535 => {
                    ImageOp::CenterCrop { height: height as u32, width: width as u32 }
                }
                _ => {
                    return Err(format!(
                        "'{text}': center_crop of an image takes one size (square) or two (height, width)"
                    ));
                }
            },
            Ok(Op::Crop { random: true, .. }) if size.is_none() => {
                return Err(format!(
                    "'{text}': random_crop takes samples of one shape; after decode_image use random_resized_crop, or \
                     resize or center_crop to one size first"
                ));
            }
            Ok(Op::DecodeImage { .. }) => return Err(format!("'{text}': the image is decoded already")),
            Ok(_) => break,
            Err(e) => return Err(format!("'{text}': {e}")),
        };
        size = op.fixed_size().or(match op {
            ImageOp::Resize { .. } => None,
            _ => size,
        });
        image_ops.push(op);
        last_text = text;
        ops.next();
    }
    let Some((height, width)) = size else {
        return Err(format!(
            "after '{last_text}' images still differ in size; end the image operators with center_crop(H, W), \
             random_resized_crop(H, W) or resize([H, W]) so that every sample has one shape"
        ));
    };
    let output = FieldSchema {
        name: input.name.clone(),
        dtype: DType::Uint8,
        sample_shape: vec![u64::from(height), u64::from(width), mode.channels()],
        ragged: false,
        utf8: false,
    };
    Ok((ImageHead { mode, ops: image_ops, size: (height, width), max_pixels }, output))
}

fn dtype_named(word: &str) -> Result<DType, String> {
    conveyor_proto::ALL_DTYPES.into_iter().find(|d| d.name() == word).ok_or_else(|| {
        format!(
            "unknown dtype '{word}'; use one of {}",
            conveyor_proto::ALL_DTYPES.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
        )
    })
}

fn resolve_axis(axis: i64, shape: &[u64]) -> Result<usize, String> {
    let rank = shape.len() as i64;
    let resolved = if axis < 0 { axis + rank } else { axis };
    if !(0..rank).contains(&resolved) {
        return Err(format!("axis {axis} is outside a sample of shape {shape:?} (axes count within one sample)"));
    }
    Ok(resolved as usize)
}

fn numeric(schema: &FieldSchema) -> Result<(), String> {
    match schema.dtype {
        DType::Bool | DType::Float16 | DType::Unspecified => Err(format!(
            "this operator works on integer and float32/float64 fields, and the field is {}",
            schema.dtype.name()
        )),
        _ => Ok(()),
    }
}

/// Fits `op` to a field of `input` schema: the step and its output schema.
fn fit(op: &Op, input: &FieldSchema) -> Result<(Step, FieldSchema), String> {
    let shape = &input.sample_shape;
    let with = |dtype: DType, sample_shape: Vec<u64>| FieldSchema {
        name: input.name.clone(),
        dtype,
        sample_shape,
        ragged: false,
        utf8: false,
    };
    Ok(match op {
        Op::Crop { sizes, random } => {
            if sizes.len() > shape.len() {
                return Err(format!("{} sizes given but a sample has shape {shape:?}", sizes.len()));
            }
            let first = shape.len() - sizes.len();
            let mut out_shape = shape.clone();
            for (axis, &size) in (first..).zip(sizes) {
                if size > shape[axis] {
                    return Err(format!("size {size} is larger than axis {axis} of a sample of shape {shape:?}"));
                }
                out_shape[axis] = size;
            }
            let random_axes = if *random { (first..shape.len()).collect() } else { Vec::new() };
            (
                Step::Region { out_shape: out_shape.clone(), random_axes, flip_axis: None, flip_p: 0.0 },
                with(input.dtype, out_shape),
            )
        }
        Op::Window { axis, length } => {
            let axis = resolve_axis(*axis, shape)?;
            if *length > shape[axis] {
                return Err(format!("length {length} is longer than axis {axis} of a sample of shape {shape:?}"));
            }
            let mut out_shape = shape.clone();
            out_shape[axis] = *length;
            (
                Step::Region { out_shape: out_shape.clone(), random_axes: vec![axis], flip_axis: None, flip_p: 0.0 },
                with(input.dtype, out_shape),
            )
        }
        Op::Flip { axis, p } => {
            let axis = resolve_axis(*axis, shape)?;
            (
                Step::Region { out_shape: shape.clone(), random_axes: Vec::new(), flip_axis: Some(axis), flip_p: *p },
                input.clone(),
            )
        }
        Op::Cast { dtype, scale, offset } => {
            numeric(input)?;
            numeric(&with(*dtype, Vec::new()))?;
            let op =
                ElemOp { kind: ElemKind::Affine, dtype: *dtype, params: vec![(*scale, *offset)], inner: usize::MAX };
            (Step::Elementwise { ops: vec![op], to: *dtype }, with(*dtype, shape.clone()))
        }
        Op::Normalize { axis, mean, std } => {
            numeric(input)?;
            let axis = resolve_axis(*axis, shape)?;
            let len = shape[axis] as usize;
            let widen = |v: &Vec<f64>, what: &str| match v.len() {
                1 => Ok(vec![v[0]; len]),
                n if n == len => Ok(v.clone()),
                n => Err(format!(
                    "{what} has {n} values but axis {axis} of a sample of shape {shape:?} has {len} entries"
                )),
            };
            let mean = widen(mean, "mean")?;
            let inv_std = widen(std, "std")?.into_iter().map(|s| 1.0 / s);
            let dtype = if input.dtype == DType::Float64 { DType::Float64 } else { DType::Float32 };
            let op = ElemOp {
                kind: ElemKind::Normalize,
                dtype,
                params: mean.into_iter().zip(inv_std).collect(),
                inner: shape[axis + 1..].iter().product::<u64>() as usize,
            };
            (Step::Elementwise { ops: vec![op], to: dtype }, with(dtype, shape.clone()))
        }
        Op::Clip { min, max } => {
            numeric(input)?;
            let op = ElemOp { kind: ElemKind::Clip, dtype: input.dtype, params: vec![(*min, *max)], inner: usize::MAX };
            (Step::Elementwise { ops: vec![op], to: input.dtype }, input.clone())
        }
        Op::ToChw => match shape[..] {
            [h, w, c] => (Step::ToChw, with(input.dtype, vec![c, h, w])),
            _ => return Err(format!("to_chw takes samples of shape [H, W, C], and a sample has shape {shape:?}")),
        },
        Op::DecodeImage { .. } => {
            return Err("decode_image takes encoded images, a ragged uint8 field; this field's samples have one \
                        shape already"
                .into());
        }
        Op::Image(_) => {
            return Err("resize and random_resized_crop follow decode_image (they take images of any size); for \
                        samples of one shape use center_crop or random_crop"
                .into());
        }
    })
}

/// Runs one step over a batch whose rows are `data` (schema `input`).
fn run_step(
    step: &Step,
    input: &FieldSchema,
    data: &[u8],
    indices: &[u64],
    rng_of: impl Fn(u64) -> SampleRng,
) -> Vec<u8> {
    let in_bytes = input.bytes_per_sample();
    match step {
        Step::Region { out_shape, random_axes, flip_axis, flip_p } => {
            let elem = input.dtype.size_bytes();
            let shape = &input.sample_shape;
            let out_bytes = out_shape.iter().product::<u64>() as usize * elem;
            let mut out = Vec::with_capacity(indices.len() * out_bytes);
            let mut starts = vec![0u64; shape.len()];
            // Trailing axes copied whole (neither cut nor flipped) count as one element: a flip of
            // an image's width moves pixels, not single channel values.
            let mut rank = shape.len();
            let mut elem_bytes = elem;
            while rank > 1 && out_shape[rank - 1] == shape[rank - 1] && *flip_axis != Some(rank - 1) {
                rank -= 1;
                elem_bytes *= shape[rank] as usize;
            }
            for (row, &index) in indices.iter().enumerate() {
                let mut rng = rng_of(index);
                for axis in 0..shape.len() {
                    let slack = shape[axis] - out_shape[axis];
                    starts[axis] = if random_axes.contains(&axis) { rng.below(slack + 1) } else { slack / 2 };
                }
                let flip = flip_axis.filter(|_| *flip_p >= 1.0 || (*flip_p > 0.0 && rng.unit() < *flip_p));
                let sample = &data[row * in_bytes..(row + 1) * in_bytes];
                copy_region(sample, &shape[..rank], elem_bytes, &starts[..rank], &out_shape[..rank], flip, &mut out);
            }
            out
        }
        Step::Elementwise { ops, to } => run_elementwise(ops, input.dtype, *to, data),
        Step::ToChw => {
            let [h, w, c] = input.sample_shape[..] else { unreachable!("to_chw is fitted to [H, W, C] samples") };
            let (h, w, c) = (h as usize, w as usize, c as usize);
            let elem = input.dtype.size_bytes();
            let mut out = vec![0u8; data.len()];
            for (sample, target) in data.chunks_exact(in_bytes).zip(out.chunks_exact_mut(in_bytes)) {
                if elem == 1 {
                    // Images: one plane per channel, read with a stride.
                    for (channel, plane) in target.chunks_exact_mut(h * w).enumerate() {
                        for (value, pixel) in plane.iter_mut().zip(sample[channel..].iter().step_by(c)) {
                            *value = *pixel;
                        }
                    }
                    continue;
                }
                for (pixel, source) in sample.chunks_exact(c * elem).enumerate() {
                    for (channel, element) in source.chunks_exact(elem).enumerate() {
                        let at = (channel * h * w + pixel) * elem;
                        target[at..at + elem].copy_from_slice(element);
                    }
                }
            }
            out
        }
    }
}

/// Appends to `out` the region of one sample (`shape`, elements of `elem` bytes) that starts at
/// `starts` and has `out_shape`, reversed along `flip` when given.
fn copy_region(
    sample: &[u8],
    shape: &[u64],
    elem: usize,
    starts: &[u64],
    out_shape: &[u64],
    flip: Option<usize>,
    out: &mut Vec<u8>,
) {
    let rank = shape.len();
    if rank == 0 {
        out.extend_from_slice(sample);
        return;
    }
    // Element strides of the sample.
    let mut strides = vec![1u64; rank];
    for axis in (0..rank - 1).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    let last = rank - 1;
    let run = out_shape[last] as usize;
    let mut position = vec![0u64; rank]; // odometer over the output's axes before the last
    loop {
        let mut offset = 0u64;
        for axis in 0..last {
            let i = if flip == Some(axis) { out_shape[axis] - 1 - position[axis] } else { position[axis] };
            offset += (starts[axis] + i) * strides[axis];
        }
        let begin = (offset + starts[last]) as usize * elem;
        let source = &sample[begin..begin + run * elem];
        if flip == Some(last) && elem == 1 {
            out.extend(source.iter().rev());
        } else if flip == Some(last) {
            for element in source.chunks_exact(elem).rev() {
                out.extend_from_slice(element);
            }
        } else {
            out.extend_from_slice(source);
        }
        // Advance the odometer over axes 0..last.
        let mut axis = last;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            position[axis] += 1;
            if position[axis] < out_shape[axis] {
                break;
            }
            position[axis] = 0;
        }
    }
}

/// A numeric element type (not bool or float16) read from and written to little-endian bytes.
trait Element: Copy {
    const SIZE: usize;
    fn read(bytes: &[u8]) -> Self;
    fn write_into(self, out: &mut [u8]);
    fn to_f64(self) -> f64;
    /// Floats convert as `as` does; integers round to nearest and saturate (NaN gives 0).
    fn from_f64(value: f64) -> Self;
}

macro_rules! element {
    ($t:ty, float) => {
        element!(@impl $t, |v: f64| v as $t);
    };
    ($t:ty, int) => {
        element!(@impl $t, |v: f64| v.round() as $t);
    };
    (@impl $t:ty, $from:expr) => {
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn read(bytes: &[u8]) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                <$t>::from_le_bytes(raw)
            }
            fn write_into(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(value: f64) -> Self {
                ($from)(value)
            }
        }
    };
}
element!(i8, int);
element!(i16, int);
element!(i32, int);
element!(i64, int);
element!(u8, int);
element!(u16, int);
element!(u32, int);
element!(u64, int);
element!(f32, float);
element!(f64, float);

/// Calls `$body` with `$t` bound to the Rust type of `$dtype` (numeric dtypes only; the
/// pipeline refuses the others when it starts).
macro_rules! with_element {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::Int8 => {
                type $t = i8;
                $body
            }
            DType::Int16 => {
                type $t = i16;
                $body
            }
            DType::Int32 => {
                type $t = i32;
                $body
            }
            DType::Int64 => {
                type $t = i64;
                $body
            }
            DType::Uint8 => {
                type $t = u8;
                $body
            }
            DType::Uint16 => {
                type $t = u16;
                $body
            }
            DType::Uint32 => {
                type $t = u32;
                $body
            }
            DType::Uint64 => {
                type $t = u64;
                $body
            }
            DType::Float32 => {
                type $t = f32;
                $body
            }
            DType::Float64 => {
                type $t = f64;
                $body
            }
            DType::Bool | DType::Float16 | DType::Unspecified => unreachable!("refused when the pipeline was built"),
        }
    };
}

/// Values rounded to what `dtype` can hold (floats: to their precision; integers: rounded half
/// away from zero and saturated, as `cast` writes them).
fn quantize(dtype: DType, values: &mut [f64]) {
    match dtype {
        DType::Float32 => values.iter_mut().for_each(|x| *x = *x as f32 as f64),
        DType::Float64 => {}
        _ => with_element!(dtype, T => values.iter_mut().for_each(|x| *x = T::from_f64(*x).to_f64())),
    }
}

/// Elements converted to f64 at a time: each operator then runs as a tight loop over this many
/// values (which the compiler vectorizes), with its parameters and dtype fixed.
const BLOCK: usize = 4096;

/// Runs fused element-wise operators in one pass from `from` to `to`.
fn run_elementwise(ops: &[ElemOp], from: DType, to: DType, data: &[u8]) -> Vec<u8> {
    fn typed<I: Element, O: Element>(data: &[u8], ops: &[ElemOp]) -> Vec<u8> {
        let num_elements = data.len() / I::SIZE;
        // Runs within which every operator's parameters are constant: the smallest channel run
        // (channel runs of one shape nest: each is a product of trailing axes).
        let run_len = ops.iter().map(|op| op.inner).min().unwrap_or(usize::MAX).clamp(1, num_elements.max(1));
        let mut out = vec![0u8; num_elements * O::SIZE];
        let mut params: Vec<(f64, f64)> = vec![(0.0, 0.0); ops.len()];
        let mut scratch = vec![0f64; run_len.min(BLOCK)];
        let runs = data.chunks(run_len * I::SIZE).zip(out.chunks_mut(run_len * O::SIZE));
        for (run, (src, dst)) in runs.enumerate() {
            let first = run * run_len;
            for (param, op) in params.iter_mut().zip(ops) {
                let channel = if op.params.len() == 1 { 0 } else { (first / op.inner) % op.params.len() };
                *param = op.params[channel];
            }
            for (src, dst) in src.chunks(BLOCK * I::SIZE).zip(dst.chunks_mut(BLOCK * O::SIZE)) {
                let values = &mut scratch[..src.len() / I::SIZE];
                for (x, s) in values.iter_mut().zip(src.chunks_exact(I::SIZE)) {
                    *x = I::read(s).to_f64();
                }
                for (op, &(a, b)) in ops.iter().zip(&params) {
                    match op.kind {
                        ElemKind::Affine => values.iter_mut().for_each(|x| *x = *x * a + b),
                        ElemKind::Normalize => values.iter_mut().for_each(|x| *x = (*x - a) * b),
                        ElemKind::Clip => values.iter_mut().for_each(|x| *x = x.clamp(a, b)),
                    }
                    quantize(op.dtype, values);
                }
                for (x, d) in values.iter().zip(dst.chunks_exact_mut(O::SIZE)) {
                    O::from_f64(*x).write_into(d);
                }
            }
        }
        out
    }
    with_element!(from, I => with_element!(to, O => typed::<I, O>(data, ops)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(columns: Vec<Vec<u8>>) -> Vec<FieldRows> {
        columns.into_iter().map(|data| FieldRows { data, offsets: None }).collect()
    }

    fn schema(name: &str, dtype: DType, shape: &[u64]) -> FieldSchema {
        FieldSchema { name: name.into(), dtype, sample_shape: shape.to_vec(), ragged: false, utf8: false }
    }

    #[test]
    fn output_schema_follows_the_chain() {
        let source = [schema("image", DType::Uint8, &[3, 64, 64]), schema("label", DType::Int64, &[])];
        let pipeline = Pipeline::new(
            "image: random_crop(56, 56) | flip(axis=-1, p=0.5) | cast(float32, scale=1/255) | normalize(mean=[0.5,0.4,0.3], std=[0.2, 0.2, 0.2])",
            &source,
            1 << 24,
        )
        .expect("valid");
        assert_eq!(pipeline.schema()[0], schema("image", DType::Float32, &[3, 56, 56]));
        assert_eq!(pipeline.schema()[1], source[1], "fields not named pass through");
        let kinds: Vec<bool> =
            pipeline.chains[0].steps.iter().map(|(s, _)| matches!(s, Step::Elementwise { .. })).collect();
        assert_eq!(kinds, [false, true], "crop+flip fused into one copy, cast+normalize into one pass");
        let file = "# a comment\nimage: center_crop(32, 32)\n     | flip(axis=1)\n# another\n;label: clip(min=0)";
        let pipeline = Pipeline::new(file, &source, 1 << 24).expect("valid");
        assert_eq!(pipeline.schema()[0], schema("image", DType::Uint8, &[3, 32, 32]));
    }

    #[test]
    fn mistakes_name_the_field_and_operator() {
        let source = [schema("x", DType::Uint8, &[4, 8]), schema("b", DType::Bool, &[2])];
        let cases = [
            ("y: flip()", "no field 'y'; its fields are 'x', 'b'"),
            ("x: random_crop(9)", "field 'x', 'random_crop(9)': size 9 is larger than axis 1"),
            ("x: flip(axis=2)", "axis 2 is outside a sample of shape [4, 8]"),
            ("x: rotate(90)", "unknown operator 'rotate'"),
            ("x: normalize(mean=[1,2,3], std=[1])", "mean has 3 values but axis 0"),
            ("x: cast(float99)", "unknown dtype 'float99'"),
            ("b: clip(min=0, max=1)", "the field is bool"),
            ("x: flip(p=2)", "p must be within 0..1"),
            ("x: flip(axis=0, wobble=1)", "unknown argument 'wobble'"),
            ("x: to_chw", "to_chw takes samples of shape [H, W, C], and a sample has shape [4, 8]"),
            ("x: flip() ; x: flip()", "field 'x' has two chains"),
            ("x: clip(min=0/0, max=1)", "min must be a number, not NaN"),
            ("x: clip(max=0/0)", "max must be a number, not NaN"),
            ("x: random_crop(size=[0, 2])", "crop sizes must be whole numbers >= 1, not Number(0.0)"),
            ("x: center_crop(size=[-3])", "crop sizes must be whole numbers >= 1, not Number(-3.0)"),
            ("x: center_crop(size=[2.7, 2])", "crop sizes must be whole numbers >= 1, not Number(2.7)"),
            ("x: center_crop(size=2.7)", "crop sizes must be whole numbers >= 1, not Number(2.7)"),
            ("x: center_crop(1e30)", "crop sizes must be whole numbers >= 1"),
            ("x: cast(float32, scale=0/0)", "scale must be a finite number, not NaN"),
            ("x: cast(float32, offset=1/0)", "offset must be a finite number, not inf"),
            ("x: normalize(mean=[0/0, 1, 2, 3], std=[1])", "mean must be finite, not NaN"),
        ];
        for (text, expected) in cases {
            let error = Pipeline::new(text, &source, 1 << 24).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn centre_crop_picks_the_middle_and_flip_one_reverses() {
        let source = [schema("x", DType::Uint16, &[4, 5])];
        let rows: Vec<u16> = (0..20).collect();
        let data: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        let pipeline = Pipeline::new("x: center_crop(2, 3) | flip(axis=0, p=1)", &source, 1 << 24).expect("valid");
        let out = pipeline.apply(fixed(vec![data]), &[0], 0, 0).expect("applies");
        let values: Vec<u16> = out[0].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        // Rows 1..3, columns 1..4, then rows reversed.
        assert_eq!(values, [11, 12, 13, 6, 7, 8]);
    }

    #[test]
    fn random_steps_depend_on_seed_epoch_and_index_only() {
        let source = [schema("x", DType::Uint8, &[32])];
        let pipeline = Pipeline::new("x: random_window(8) | flip()", &source, 1 << 24).expect("valid");
        let data: Vec<u8> = (0..64).map(|i| (i % 32) as u8).collect();
        let a = pipeline.apply(fixed(vec![data.clone()]), &[3, 9], 1, 2).expect("applies");
        // Sample 9 alone, in another batch position: the same bytes as in the pair.
        let b = pipeline.apply(fixed(vec![data[32..].to_vec()]), &[9], 1, 2).expect("applies");
        assert_eq!(a[0][8..], b[0][..]);
        let other_epoch =
            (0..20).any(|e| pipeline.apply(fixed(vec![data.clone()]), &[3, 9], 1, e).expect("applies") != a);
        assert!(other_epoch, "another epoch draws other windows");
    }

    #[test]
    fn elementwise_ops_match_their_formulas() {
        let source = [schema("x", DType::Int16, &[2, 2])];
        let values: [i16; 4] = [-300, 0, 100, 30000];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let pipeline =
            Pipeline::new("x: clip(min=-100, max=200) | cast(uint8, scale=0.5, offset=100)", &source, 1 << 24)
                .expect("valid");
        let out = pipeline.apply(fixed(vec![data.clone()]), &[0], 0, 0).expect("applies");
        // clip: -100, 0, 100, 200; then x/2 + 100 = 50, 100, 150, 200.
        assert_eq!(out[0], [50, 100, 150, 200]);
        let normalize = Pipeline::new("x: normalize(mean=[10, 20], std=[2, 4])", &source, 1 << 24).expect("valid");
        let out = normalize.apply(fixed(vec![data]), &[0], 0, 0).expect("applies");
        let floats: Vec<f32> = out[0].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(floats, [-155.0, -5.0, 20.0, 7495.0]);
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        use image::ImageEncoder;
        let pixels: Vec<u8> = (0..width * height * 3).map(|i| (i * 7 % 251) as u8).collect();
        let mut encoded = Vec::new();
        image::codecs::png::PngEncoder::new(&mut encoded)
            .write_image(&pixels, width, height, image::ExtendedColorType::Rgb8)
            .expect("encode");
        encoded
    }

    fn ragged(samples: &[Vec<u8>]) -> FieldRows {
        let mut offsets = vec![0u64];
        for sample in samples {
            offsets.push(offsets[offsets.len() - 1] + sample.len() as u64);
        }
        FieldRows { data: samples.concat(), offsets: Some(offsets) }
    }

    #[test]
    fn images_decode_to_one_shape_then_take_the_fixed_operators() {
        let source = [
            FieldSchema { name: "jpg".into(), dtype: DType::Uint8, sample_shape: vec![], ragged: true, utf8: false },
            schema("cls", DType::Int64, &[]),
        ];
        let text = "jpg: decode_image | resize(8) | center_crop(8) | to_chw | cast(float32, scale=1/255)";
        let pipeline = Pipeline::new(text, &source, 1 << 20).expect("valid");
        assert_eq!(pipeline.schema()[0], schema("jpg", DType::Float32, &[3, 8, 8]));
        assert!(pipeline.decodes());
        let images = [png(12, 9), png(9, 20)];
        let labels: Vec<u8> = [4i64, 5].iter().flat_map(|l| l.to_le_bytes()).collect();
        let columns = vec![ragged(&images), FieldRows { data: labels.clone(), offsets: None }];
        let out = pipeline.apply(columns, &[0, 1], 1, 0).expect("decodes");
        assert_eq!(out[0].len(), 2 * 3 * 8 * 8 * 4);
        assert_eq!(out[1], labels, "fields without a chain pass through");
        // A sample that is not an image fails alone, by its row.
        let columns =
            vec![ragged(&[png(12, 9), b"GIF89a not really".to_vec()]), FieldRows { data: labels, offsets: None }];
        let bad = pipeline.apply(columns, &[0, 1], 1, 0).expect_err("row 1 is bad");
        assert_eq!((bad.row, bad.field.as_str()), (1, "jpg"));
        assert!(bad.reason.contains("JPEG, PNG and WebP"), "{}", bad.reason);
    }

    #[test]
    fn random_resized_crops_are_keyed_by_sample_and_epoch() {
        let source =
            [FieldSchema { name: "jpg".into(), dtype: DType::Uint8, sample_shape: vec![], ragged: true, utf8: false }];
        let pipeline = Pipeline::new("jpg: decode_image | random_resized_crop(6)", &source, 1 << 20).expect("valid");
        let image = png(40, 30);
        let run = |indices: &[u64], epoch: u64| {
            let rows = ragged(&vec![image.clone(); indices.len()]);
            pipeline.apply(vec![rows], indices, 5, epoch).expect("decodes").remove(0)
        };
        let pair = run(&[3, 9], 0);
        assert_eq!(pair[6 * 6 * 3..], run(&[9], 0)[..], "sample 9 is cropped alike in any batch");
        assert!((1..20).any(|epoch| run(&[9], epoch) != run(&[9], 0)), "other epochs draw other crops");
    }

    #[test]
    fn to_chw_moves_channels_first() {
        let source = [schema("x", DType::Uint16, &[2, 3, 2])];
        let values: Vec<u16> = (0..12).collect();
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let pipeline = Pipeline::new("x: to_chw", &source, 1 << 20).expect("valid");
        assert_eq!(pipeline.schema()[0].sample_shape, [2, 2, 3]);
        let out = pipeline.apply(fixed(vec![data]), &[0], 0, 0).expect("applies");
        let values: Vec<u16> = out[0].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(values, [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]);
    }

    #[test]
    fn image_chains_that_cannot_give_one_shape_are_refused_by_name() {
        let source = [
            FieldSchema { name: "jpg".into(), dtype: DType::Uint8, sample_shape: vec![], ragged: true, utf8: false },
            schema("x", DType::Uint8, &[4, 4, 3]),
        ];
        let cases = [
            ("jpg: flip()", "start its chain with decode_image"),
            ("jpg: decode_image | resize(256)", "after 'resize(256)' images still differ in size"),
            ("jpg: decode_image", "images still differ in size"),
            ("jpg: decode_image | random_crop(5)", "random_crop takes samples of one shape"),
            ("jpg: decode_image(mode=cmyk) | center_crop(4)", "mode must be rgb or gray"),
            ("jpg: decode_image | resize(1, 2, 3)", "give one size"),
            ("jpg: decode_image | random_resized_crop(8, scale=[0.5, 2])", "at most 1"),
            ("jpg: decode_image | random_resized_crop(8, interpolation=cubic)", "unknown interpolation 'cubic'"),
            ("x: decode_image", "decode_image takes encoded images"),
            ("x: resize(2)", "resize and random_resized_crop follow decode_image"),
            ("x: flip()", "field 'jpg' holds samples of different lengths and the pipeline gives it no chain"),
        ];
        for (text, expected) in cases {
            let error = Pipeline::new(text, &source, 1 << 20).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn flips_and_crops_of_any_axis_match_a_per_element_reference() {
        // [2, 3, 4] uint16 samples: every axis flipped in turn, with and without a centre crop.
        let shape = [2u64, 3, 4];
        let values: Vec<u16> = (0..24).collect();
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let source = [schema("x", DType::Uint16, &shape)];
        for axis in 0..3 {
            for (crop, cut) in [("", [2u64, 3, 4]), ("center_crop(2, 2) | ", [2, 2, 2])] {
                let text = format!("x: {crop}flip(axis={axis}, p=1)");
                let pipeline = Pipeline::new(&text, &source, 1 << 20).expect("valid");
                let out = pipeline.apply(fixed(vec![data.clone()]), &[0], 0, 0).expect("applies");
                let got: Vec<u16> = out[0].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                let starts: Vec<u64> = shape.iter().zip(&cut).map(|(s, c)| (s - c) / 2).collect();
                let mut expected = Vec::new();
                for i in 0..cut[0] {
                    for j in 0..cut[1] {
                        for k in 0..cut[2] {
                            let mut at = [i, j, k];
                            at[axis] = cut[axis] - 1 - at[axis];
                            let (i, j, k) = (at[0] + starts[0], at[1] + starts[1], at[2] + starts[2]);
                            expected.push(values[(i * 12 + j * 4 + k) as usize]);
                        }
                    }
                }
                assert_eq!(got, expected, "{text}");
            }
        }
    }
}
