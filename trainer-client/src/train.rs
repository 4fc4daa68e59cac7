//! `trainer-client train` (cargo feature `torch`): a real training loop on the stream — a small
//! MLP predicting the demo dataset's game result from the board, with checkpoints that hold the
//! model weights and the stream cursor together, so a restart resumes both.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use serde::Serialize;
use tch::{
    Device, Kind,
    nn::{self, Module, OptimizerConfig},
};

use crate::{
    cursor::Cursor,
    dispatch::Loaders,
    report::rss_bytes,
    sampler::{EpochPlan, PlanSpec},
    tensor::TensorConverter,
};

/// Settings of a training run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Dataset to train on.
    pub dataset: String,
    /// Field holding the model input (any numeric dtype; flattened per sample).
    pub input_field: String,
    /// Field holding the integer class label.
    pub label_field: String,
    /// Added to labels to make them 0-based (the demo's results are -1, 0, 1).
    pub label_offset: i64,
    /// Number of classes.
    pub num_classes: i64,
    /// The stream plan (batch size, shuffle, seed, rank...).
    pub plan: PlanSpec,
    /// Epochs to train, counted from epoch 0.
    pub epochs: u64,
    /// Adam learning rate.
    pub lr: f64,
    /// Training device.
    pub device: Device,
    /// Directory for `model.ot` + `cursor.json`; resumed from when both exist.
    pub checkpoint: Option<PathBuf>,
    /// Checkpoint every this many batches (and at every epoch end).
    pub checkpoint_every: u64,
    /// Stop after this many batches in this process (with a checkpoint), as if killed.
    pub max_batches: Option<u64>,
    /// Append every trained sample index (i64 little-endian) to this file.
    pub indices_log: Option<PathBuf>,
}

/// One epoch's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    /// Epoch number.
    pub epoch: u64,
    /// Samples trained on in this process.
    pub samples: u64,
    /// Mean training loss over those samples.
    pub mean_loss: f64,
    /// Samples per second.
    pub samples_per_s: f64,
    /// Share of the epoch's time spent waiting for data.
    pub wait_share: f64,
    /// Process RSS at the end of the epoch.
    pub rss_bytes: u64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Device trained on.
    pub device: String,
    /// Where it resumed from, if it did.
    pub resumed_from: Option<(u64, u64)>,
    /// Per epoch.
    pub epochs: Vec<EpochReport>,
    /// Whether it stopped early (`max_batches`).
    pub stopped_early: bool,
}

fn save_checkpoint(dir: &Path, vs: &nn::VarStore, cursor: &Cursor) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create --checkpoint {}", dir.display()))?;
    let tmp = dir.join("model.ot.tmp");
    vs.save(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("model.ot")).context("cannot move the model checkpoint in place")?;
    // The cursor is written last: a crash in between leaves the new weights with the old cursor,
    // which only repeats a few batches, never skips one.
    cursor.save(&dir.join("cursor.json"))
}

/// Trains on the stream.
///
/// # Errors
/// Streaming, tensor and checkpoint errors, with context.
pub async fn train(loaders: &mut Loaders, options: TrainOptions) -> anyhow::Result<TrainReport> {
    let info = loaders.dataset(&options.dataset)?;
    let field = |name: &str| {
        info.fields.iter().find(|f| f.name == name).with_context(|| {
            format!(
                "dataset '{}' has no field '{name}'; its fields: {}",
                info.name,
                info.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    };
    let input_dim: i64 = field(&options.input_field)?.sample_shape.iter().product::<u64>().max(1) as i64;
    field(&options.label_field)?;

    tch::manual_seed(options.plan.seed as i64);
    let mut vs = nn::VarStore::new(options.device);
    let root = vs.root();
    let model = nn::seq()
        .add(nn::linear(&root / "l1", input_dim, 256, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "l2", 256, options.num_classes, Default::default()));
    let mut optimizer = nn::Adam::default().build(&vs, options.lr)?;

    let mut start = (0u64, 0u64);
    let mut resumed_from = None;
    if let Some(dir) = &options.checkpoint {
        let (model_path, cursor_path) = (dir.join("model.ot"), dir.join("cursor.json"));
        if model_path.is_file() && cursor_path.is_file() {
            vs.load(&model_path).with_context(|| format!("cannot load {}", model_path.display()))?;
            let cursor = Cursor::load(&cursor_path)?;
            if cursor.plan != options.plan || cursor.dataset != options.dataset {
                bail!(
                    "{} was written for other stream settings; use a fresh --checkpoint directory",
                    cursor_path.display()
                );
            }
            start = (cursor.epoch, cursor.next_batch);
            resumed_from = Some(start);
            eprintln!("resuming from epoch {} batch {}", start.0, start.1);
        }
    }
    let mut indices_log = match &options.indices_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => None,
    };

    let converter = TensorConverter::new(options.device);
    let mut report =
        TrainReport { device: format!("{:?}", options.device), resumed_from, epochs: Vec::new(), stopped_early: false };
    let mut batches_here = 0u64;
    for epoch in start.0..options.epochs {
        let plan = EpochPlan::new(options.plan.clone(), epoch)?;
        let first_batch = if epoch == start.0 { start.1 } else { 0 };
        let started = Instant::now();
        let wait_before = loaders.stats().wait_seconds;
        let (mut samples, mut loss_sum) = (0u64, 0f64);
        let mut stream = loaders.epoch(&options.dataset, plan, first_batch)?;
        while let Some(batch) = stream.next().await? {
            let tensors = converter.convert(&batch)?;
            let inputs = tensors.get(&options.input_field).context("input field")?.to_kind(Kind::Float).flatten(1, -1);
            let labels =
                tensors.get(&options.label_field).context("label field")?.to_kind(Kind::Int64) + options.label_offset;
            let loss = model.forward(&inputs).cross_entropy_for_logits(&labels);
            optimizer.backward_step(&loss);
            let n = batch.indices.len() as u64;
            loss_sum += loss.double_value(&[]) * n as f64;
            samples += n;
            batches_here += 1;
            if let Some(log) = indices_log.as_mut() {
                use std::io::Write;
                let bytes: Vec<u8> = batch.indices.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
                log.write_all(&bytes).context("writing --indices-log")?;
            }
            let cursor = Cursor {
                dataset: options.dataset.clone(),
                plan: options.plan.clone(),
                epoch,
                next_batch: batch.index + 1,
            };
            let stop = options.max_batches.is_some_and(|max| batches_here >= max);
            if let Some(dir) = &options.checkpoint {
                if stop || (batch.index + 1) % options.checkpoint_every.max(1) == 0 {
                    save_checkpoint(dir, &vs, &cursor)?;
                }
            }
            if stop {
                report.stopped_early = true;
                break;
            }
        }
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let waited = stream.stats().wait_seconds - wait_before;
        let epoch_report = EpochReport {
            epoch,
            samples,
            mean_loss: if samples == 0 { 0.0 } else { loss_sum / samples as f64 },
            samples_per_s: samples as f64 / seconds,
            wait_share: (waited / seconds).min(1.0),
            rss_bytes: rss_bytes(),
        };
        println!(
            "epoch {epoch}: {} samples, mean loss {:.4}, {:.0} samples/s, {:.0}% of the time waiting for data, RSS {:.1} MiB",
            epoch_report.samples,
            epoch_report.mean_loss,
            epoch_report.samples_per_s,
            epoch_report.wait_share * 100.0,
            epoch_report.rss_bytes as f64 / (1 << 20) as f64
        );
        report.epochs.push(epoch_report);
        if report.stopped_early {
            break;
        }
        if let Some(dir) = &options.checkpoint {
            let cursor = Cursor {
                dataset: options.dataset.clone(),
                plan: options.plan.clone(),
                epoch: epoch + 1,
                next_batch: 0,
            };
            save_checkpoint(dir, &vs, &cursor)?;
        }
    }
    Ok(report)
}
